// Small pieces every page uses: the html tag, dates, states, messages.

import { html } from 'htm/preact';

export { html };

const dateTime = new Intl.DateTimeFormat(undefined, {
  dateStyle: 'medium',
  timeStyle: 'medium',
});
/** A timestamp as the reader's locale writes it, in a <time> element. */
export function When({ at }) {
  if (!at) return html`<span>—</span>`;
  const date = new Date(at);
  return html`<time datetime=${at} title=${date.toISOString()}>${dateTime.format(date)}</time>`;
}

export const FINAL = ['COMPLETED', 'REJECTED', 'FAILED', 'FLAGGED', 'CANCELLED'];

export const STATES = [
  'SUBMITTED',
  'ANALYSING',
  'GATING',
  'AWAITING_HUMAN',
  'EXECUTING',
  'REVIEWING',
  ...FINAL,
];

/** A workflow state, as a labelled badge (colour is never the only cue). */
export function State({ state }) {
  return html`<span class=${`badge state-${state.toLowerCase()}`} data-state=${state}>${state.replace('_', ' ')}</span>`;
}

export function ErrorMessage({ error }) {
  if (!error) return null;
  return html`<p class="error" role="alert">${error.message ?? String(error)}${error.code ? html` <code>${error.code}</code>` : ''}</p>`;
}

export function Loading({ what = 'Loading' }) {
  return html`<p class="muted" role="status">${what}…</p>`;
}

/** Whether the signed-in caller holds one of `roles`. */
export function holds(me, ...roles) {
  return !!me && me.roles.some((r) => roles.includes(r));
}

/** Offers `text` as a file named `name` for download. */
export function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Calls `f` at most once per `ms`, the last call winning. */
export function throttle(f, ms) {
  let timer = null;
  return () => {
    if (timer) return;
    timer = setTimeout(() => {
      timer = null;
      f();
    }, ms);
  };
}

// Audit replay: a workflow's recorded events one at a time, with the
// state after each (folded again by the server, nothing re-executed), who
// recorded it and why, its hash, and whether its stream's hash chain
// verifies up to it. Exports the steps as JSONL or CSV, downloads a
// signed digest that covers them, and downloads the workflow's receipt
// (its events with their inclusion proofs and a signed checkpoint), which
// `agentledger verify --receipt` checks with no database.

import { useEffect, useState } from 'preact/hooks';
import { useLocation } from 'wouter-preact';

import { gql } from '../api.js';
import { ErrorMessage, download, holds, html, Loading, State, When } from '../ui.js';
import { Subtasks } from './workflow.js';

const REPLAY = `query($id: ID!) {
  replay(workflowId: $id) {
    position actor role inputs summary rationale
    event { position streamId version type payload metadata recordedAt hash prevHash }
    state { state priority progress { done total } subtasks { id title tool dependsOn state attempts output } decisions { position } }
  }
  verifyWorkflow(id: $id) { ok checkedEvents firstBrokenPosition reason }
}`;
const DIGEST = `query($at: Position) { ledgerDigest(atPosition: $at) { position root keyId json } }`;
const RECEIPT = `query($id: ID!) { workflowReceipt(id: $id) }`;

/** How the chain stands at a step: verified, broken there, or after a break. */
function standing(verification, position) {
  const broken = verification.firstBrokenPosition;
  if (broken === null || broken === undefined) return 'verified';
  if (position < broken) return 'verified';
  return position === broken ? 'broken' : 'after-break';
}

const STANDING_TEXT = {
  verified: 'Hash chain verifies up to this event.',
  broken: 'This event does not verify: it was altered after it was recorded, or its link is broken.',
  'after-break': 'Comes after a broken link: it cannot be trusted until the break is explained.',
};

/**
 * One CSV cell. Text a spreadsheet would take for a formula (it may come
 * from a request or a model's rationale) is prefixed with an apostrophe.
 */
function csvCell(value) {
  let text = String(value ?? '');
  if (/^[=+\-@\t\r]/.test(text)) text = `'${text}`;
  return /[",\n\r]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function exportRows(steps, verification) {
  return steps.map((s) => ({
    position: s.position,
    version: s.event.version,
    type: s.event.type,
    recorded_at: s.event.recordedAt,
    actor: s.actor,
    role: s.role,
    summary: s.summary,
    rationale: s.rationale,
    state_after: s.state.state,
    hash: s.event.hash,
    prev_hash: s.event.prevHash,
    chain: standing(verification, s.position),
  }));
}

function Picker({ initial }) {
  const [id, setId] = useState(initial ?? '');
  const [, navigate] = useLocation();
  return html`
    <form class="inline" onSubmit=${(e) => (e.preventDefault(), navigate(`/replay/${id.trim()}`))}>
      <label for="replay-id">Workflow id</label>
      <input id="replay-id" required value=${id} onInput=${(e) => setId(e.currentTarget.value)} size="38" />
      <button type="submit">Replay</button>
    </form>`;
}

export function Replay({ me, id }) {
  const [data, setData] = useState(null);
  const [error, setError] = useState(null);
  const [at, setAt] = useState(0);
  const [digestError, setDigestError] = useState(null);

  useEffect(() => {
    if (!id) return;
    setData(null);
    setError(null);
    gql(REPLAY, { id })
      .then((d) => {
        if (d.replay.length === 0) throw new Error('There is no such workflow in your tenant.');
        setData(d);
        setAt(d.replay.length - 1);
      })
      .catch(setError);
  }, [id]);

  if (!holds(me, 'auditor', 'admin')) {
    return html`<h1>Audit replay</h1><p>The replay takes the auditor role.</p>`;
  }
  const header = html`<h1>Audit replay</h1><${Picker} initial=${id} />`;
  if (!id) return header;
  if (!data) return html`${header}<${ErrorMessage} error=${error} />${!error && html`<${Loading} />`}`;

  const steps = data.replay;
  const verification = data.verifyWorkflow;
  const step = steps[at];
  const chain = standing(verification, step.position);
  const exportJsonl = () =>
    download(`workflow-${id}.jsonl`, 'application/x-ndjson', exportRows(steps, verification).map((r) => JSON.stringify(r)).join('\n') + '\n');
  const exportCsv = () => {
    const rows = exportRows(steps, verification);
    const columns = Object.keys(rows[0]);
    const lines = [columns.join(','), ...rows.map((r) => columns.map((c) => csvCell(r[c])).join(','))];
    download(`workflow-${id}.csv`, 'text/csv', lines.join('\r\n') + '\r\n');
  };
  const digest = async () => {
    setDigestError(null);
    try {
      const { ledgerDigest } = await gql(DIGEST, { at: steps.at(-1).position });
      download(`digest-${ledgerDigest.position}.json`, 'application/json', ledgerDigest.json);
    } catch (e) {
      setDigestError(e);
    }
  };
  const receipt = async () => {
    setDigestError(null);
    try {
      const { workflowReceipt } = await gql(RECEIPT, { id });
      download(`receipt-${id}.json`, 'application/json', JSON.stringify(workflowReceipt, null, 2) + '\n');
    } catch (e) {
      setDigestError(e);
    }
  };

  return html`
    ${header}
    <div class=${`verdict ${verification.ok ? 'ok' : 'bad'}`} role="status" data-testid="verification">
      ${verification.ok
        ? html`✓ The hash chain verifies: ${verification.checkedEvents} events checked.`
        : html`✗ Tampering detected at position ${verification.firstBrokenPosition}: ${verification.reason}`}
    </div>
    <div class="stepper">
      <label for="step">Event ${at + 1} of ${steps.length}</label>
      <input id="step" type="range" min="0" max=${steps.length - 1} value=${at}
        aria-valuetext=${`Event ${at + 1} of ${steps.length}: ${step.event.type}`}
        onInput=${(e) => setAt(Number(e.currentTarget.value))} />
      <div class="actions">
        <button type="button" disabled=${at === 0} onClick=${() => setAt(at - 1)}>Previous</button>
        <button type="button" disabled=${at === steps.length - 1} onClick=${() => setAt(at + 1)}>Next</button>
      </div>
    </div>
    <div class="grid two">
      <section aria-labelledby="event" class=${`event chain-${chain}`} data-testid="replay-event" data-chain=${chain}>
        <h2 id="event">#${step.position} ${step.event.type}</h2>
        <p class="chain" data-testid="chain">${chain === 'verified' ? '✓ ' : '✗ '}${STANDING_TEXT[chain]}</p>
        <dl class="facts">
          <div><dt>Recorded</dt><dd><${When} at=${step.event.recordedAt} /></dd></div>
          <div><dt>By</dt><dd>${step.actor}${step.role ? ` as ${step.role.toLowerCase()}` : ''}</dd></div>
          <div><dt>Version</dt><dd>${step.event.version}</dd></div>
          <div><dt>Based on</dt><dd>${step.inputs.length ? step.inputs.map((p) => `#${p}`).join(', ') : '—'}</dd></div>
        </dl>
        <p>${step.summary}</p>
        ${step.rationale && html`<p class="rationale">${step.rationale}</p>`}
        <dl class="hashes">
          <dt>Hash</dt><dd><code data-testid="event-hash">${step.event.hash}</code></dd>
          <dt>Previous hash</dt><dd><code>${step.event.prevHash}</code></dd>
        </dl>
        <details><summary>Payload and metadata</summary>
          <pre>${JSON.stringify({ payload: step.event.payload, metadata: step.event.metadata }, null, 2)}</pre></details>
      </section>
      <section aria-labelledby="after" data-testid="replay-state">
        <h2 id="after">State after it</h2>
        <p><${State} state=${step.state.state} /> · ${step.state.progress.done} of ${step.state.progress.total} subtasks done · ${step.state.decisions.length} decisions</p>
        <${Subtasks} subtasks=${step.state.subtasks} />
      </section>
    </div>
    <div class="actions">
      <button type="button" class="secondary" onClick=${exportJsonl}>Export JSONL</button>
      <button type="button" class="secondary" onClick=${exportCsv}>Export CSV</button>
      <button type="button" class="secondary" onClick=${digest}>Download signed digest</button>
      <button type="button" class="secondary" onClick=${receipt}
        title="The workflow's events with their inclusion proofs and a signed checkpoint: agentledger verify --receipt checks it offline">Download receipt</button>
    </div>
    <${ErrorMessage} error=${digestError} />`;
}

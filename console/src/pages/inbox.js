// The escalation inbox: workflows waiting for a person. An operator
// approves or rejects with a comment; the server records the decision
// with the signed-in principal as its actor, refuses the submitter's own
// (four eyes), and refuses a decision on a workflow that moved on since
// the page showed it (`expectedPosition`).

import { useEffect, useState } from 'preact/hooks';
import { Link } from 'wouter-preact';

import { gql, subscribe } from '../api.js';
import { ErrorMessage, holds, html, Loading, throttle, When } from '../ui.js';

const WAITING = `{
  workflows(state: AWAITING_HUMAN, first: 50) {
    nodes { id request priority createdAt lastPosition decisions { position actor kind summary rationale at } }
  }
}`;
const DECIDE = `mutation($id: ID!, $approve: Boolean!, $comment: String!, $at: Position) {
  decideEscalation(id: $id, approve: $approve, comment: $comment, expectedPosition: $at) { id state }
}`;
const EVENTS = `subscription { workflowEvents { position } }`;

function Escalation({ workflow, mayDecide, onDecided }) {
  const [comment, setComment] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const reason = [...workflow.decisions].reverse().find((d) => d.kind.includes('escalat')) ?? workflow.decisions.at(-1);
  const decide = async (approve) => {
    if (!comment.trim()) {
      setError(new Error('Write a comment: it is recorded with your decision.'));
      return;
    }
    setBusy(true);
    setError(null);
    try {
      await gql(DECIDE, { id: workflow.id, approve, comment, at: workflow.lastPosition });
      onDecided();
    } catch (e) {
      setError(e);
      setBusy(false);
    }
  };
  const field = `comment-${workflow.id}`;
  return html`
    <li class="card" data-workflow=${workflow.id}>
      <h2 class="h3"><${Link} href=${`/workflows/${workflow.id}`}>${workflow.request}<//></h2>
      <p class="muted">${workflow.priority.toLowerCase()} priority · submitted <${When} at=${workflow.createdAt} /></p>
      ${reason && html`<p><strong>Why it waits:</strong> ${reason.rationale || reason.summary} <span class="muted">(${reason.actor})</span></p>`}
      ${mayDecide
        ? html`
          <form onSubmit=${(e) => e.preventDefault()}>
            <label for=${field}>Comment</label>
            <textarea id=${field} rows="2" required value=${comment} onInput=${(e) => setComment(e.currentTarget.value)}></textarea>
            <div class="actions">
              <button type="button" disabled=${busy} onClick=${() => decide(true)}>Approve</button>
              <button type="button" class="danger" disabled=${busy} onClick=${() => decide(false)}>Reject</button>
            </div>
          </form>`
        : html`<p class="muted">Deciding takes the operator role.</p>`}
      <${ErrorMessage} error=${error} />
    </li>`;
}

export function Inbox({ me }) {
  const [waiting, setWaiting] = useState(null);
  const [error, setError] = useState(null);
  const load = () =>
    gql(WAITING)
      .then((data) => (setWaiting(data.workflows.nodes), setError(null)))
      .catch(setError);
  useEffect(() => {
    load();
    // Escalations come and go as events are recorded.
    return subscribe(EVENTS, {}, { next: throttle(load, 1000), error: setError });
  }, []);
  return html`
    <h1>Escalation inbox</h1>
    <p>Workflows the gatekeeper or the executor left to a person. Your decision is recorded in the ledger under your name.</p>
    <${ErrorMessage} error=${error} />
    ${waiting === null && !error && html`<${Loading} />`}
    ${waiting?.length === 0 && html`<p data-testid="inbox-empty">Nothing waits for a decision.</p>`}
    <ul class="cards">
      ${(waiting ?? []).map((w) => html`<${Escalation} key=${w.id} workflow=${w} mayDecide=${holds(me, 'operator', 'admin')} onDecided=${load} />`)}
    </ul>`;
}

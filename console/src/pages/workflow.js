// One workflow: its state, the timeline of every decision (actor,
// rationale, policy) and its subtasks with their attempts, live over the
// `workflowProgress` subscription until it ends.

import { useEffect, useState } from 'preact/hooks';
import { Link } from 'wouter-preact';

import { gql, subscribe } from '../api.js';
import { ErrorMessage, FINAL, holds, html, Loading, State, When } from '../ui.js';

export const WORKFLOW_FIELDS = `
  id state priority request lastPosition version createdAt updatedAt completedAt
  progress { done total }
  subtasks { id title tool dependsOn state attempts output }
  decisions { position role actor actorKind actorVersion policyFingerprint kind summary rationale at }
  ethics { transparency collaboration autonomy fairness passed findings }`;
const ONE = `query($id: ID!) { workflow(id: $id) { ${WORKFLOW_FIELDS} } }`;
const LIVE = `subscription($id: ID!) { workflowProgress(id: $id) { ${WORKFLOW_FIELDS} } }`;
const CANCEL = `mutation($id: ID!, $reason: String) { cancelWorkflow(id: $id, reason: $reason) { state } }`;

export function Timeline({ decisions }) {
  if (decisions.length === 0) return html`<p class="muted">No decision yet.</p>`;
  return html`
    <ol class="timeline" data-testid="timeline">
      ${decisions.map((d) => html`
        <li data-kind=${d.kind}>
          <div class="when"><${When} at=${d.at} /> · #${d.position}</div>
          <div><strong>${d.kind}</strong> by <span class="actor" data-actor-kind=${d.actorKind}>${d.actor}</span>
            ${d.actorVersion && html`<span class="muted"> ${d.actorVersion}</span>`}
            ${d.role && html`<span class="muted"> as ${d.role.toLowerCase()}</span>`}</div>
          <p>${d.summary}</p>
          ${d.rationale && d.rationale !== d.summary && html`<details><summary>Rationale</summary><p class="rationale">${d.rationale}</p></details>`}
          ${d.policyFingerprint && html`<div class="muted small">policy <code>${d.policyFingerprint}</code></div>`}
        </li>`)}
    </ol>`;
}

export function Subtasks({ subtasks }) {
  if (subtasks.length === 0) return html`<p class="muted">No plan yet.</p>`;
  return html`
    <div class="scroll" tabindex="0" role="region" aria-label="Table, scrolls sideways">
      <table data-testid="subtasks">
        <thead><tr><th scope="col">Subtask</th><th scope="col">Tool</th><th scope="col">After</th>
          <th scope="col">State</th><th scope="col" class="num">Attempts</th><th scope="col">Output</th></tr></thead>
        <tbody>${subtasks.map((s) => html`<tr>
          <th scope="row">${s.title} <span class="muted">${s.id}</span></th>
          <td>${s.tool}</td><td>${s.dependsOn.join(', ') || '—'}</td><td>${s.state.toLowerCase()}</td>
          <td class="num">${s.attempts}</td><td class="output">${s.output ?? ''}</td>
        </tr>`)}</tbody>
      </table>
    </div>`;
}

export function WorkflowPage({ me, id }) {
  const [workflow, setWorkflow] = useState(null);
  const [error, setError] = useState(null);
  const [live, setLive] = useState(false);

  useEffect(() => {
    setWorkflow(null);
    gql(ONE, { id })
      .then(({ workflow }) => {
        if (!workflow) setError(new Error('There is no such workflow in your tenant.'));
        else setWorkflow((now) => now ?? workflow);
      })
      .catch(setError);
    const stop = subscribe(LIVE, { id }, {
      next: ({ workflowProgress }) => {
        setLive(!FINAL.includes(workflowProgress.state));
        setWorkflow((now) => (now && now.version > workflowProgress.version ? now : workflowProgress));
      },
      error: setError,
      complete: () => setLive(false),
    });
    return stop;
  }, [id]);

  const cancel = async () => {
    try {
      await gql(CANCEL, { id, reason: 'cancelled from the console' });
    } catch (e) {
      setError(e);
    }
  };

  if (!workflow) return html`<h1>Workflow</h1><${ErrorMessage} error=${error} />${!error && html`<${Loading} />`}`;
  const ended = FINAL.includes(workflow.state);
  return html`
    <h1>Workflow</h1>
    <p class="request" lang="">${workflow.request}</p>
    <dl class="facts">
      <div><dt>State</dt><dd data-testid="workflow-state"><${State} state=${workflow.state} /></dd></div>
      <div><dt>Priority</dt><dd>${workflow.priority.toLowerCase()}</dd></div>
      <div><dt>Subtasks done</dt><dd>${workflow.progress.done} of ${workflow.progress.total}</dd></div>
      <div><dt>Submitted</dt><dd><${When} at=${workflow.createdAt} /></dd></div>
      <div><dt>Ended</dt><dd><${When} at=${workflow.completedAt} /></dd></div>
      <div><dt>Id</dt><dd><code>${workflow.id}</code></dd></div>
    </dl>
    <p class="muted" role="status">${live ? 'Live: this page follows the workflow as it runs.' : ended ? 'Ended.' : ''}</p>
    <${ErrorMessage} error=${error} />
    <div class="actions">
      ${holds(me, 'auditor', 'admin') && html`<${Link} href=${`/replay/${workflow.id}`}>Replay and verify<//>`}
      ${workflow.state === 'AWAITING_HUMAN' && holds(me, 'operator', 'admin') && html`<${Link} href="/inbox">Decide in the inbox<//>`}
      ${!ended && holds(me, 'submitter', 'operator', 'admin') && html`<button type="button" class="secondary" onClick=${cancel}>Cancel workflow</button>`}
    </div>
    <section aria-labelledby="decisions"><h2 id="decisions">Decisions</h2><${Timeline} decisions=${workflow.decisions} /></section>
    <section aria-labelledby="plan"><h2 id="plan">Subtasks</h2><${Subtasks} subtasks=${workflow.subtasks} /></section>
    ${workflow.ethics && html`
      <section aria-labelledby="ethics"><h2 id="ethics">Ethics review</h2>
        <p>${workflow.ethics.passed ? 'Passed' : 'Flagged'}: transparency ${workflow.ethics.transparency.toFixed(2)},
          collaboration ${workflow.ethics.collaboration.toFixed(2)}, autonomy ${workflow.ethics.autonomy.toFixed(2)},
          fairness ${workflow.ethics.fairness.toFixed(2)}.</p>
        ${workflow.ethics.findings.length > 0 && html`<ul>${workflow.ethics.findings.map((f) => html`<li>${f}</li>`)}</ul>`}
      </section>`}`;
}

// The workflow list (newest first, filtered by state, a page at a time)
// and, for submitters, the form that starts one.

import { useEffect, useState } from 'preact/hooks';
import { Link, useLocation } from 'wouter-preact';

import { gql } from '../api.js';
import { ErrorMessage, holds, html, Loading, State, STATES, When } from '../ui.js';

const LIST = `query($state: WorkflowState, $after: String) {
  workflows(state: $state, first: 25, after: $after) {
    nodes { id state priority request progress { done total } createdAt updatedAt }
    pageInfo { hasNextPage endCursor }
  }
}`;
const SUBMIT = `mutation($request: String!, $priority: Priority) {
  submitWorkflow(request: $request, priority: $priority) { id state }
}`;

function SubmitForm() {
  const [request, setRequest] = useState('');
  const [priority, setPriority] = useState('NORMAL');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const [, navigate] = useLocation();
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const { submitWorkflow } = await gql(SUBMIT, { request, priority });
      navigate(`/workflows/${submitWorkflow.id}`);
    } catch (e) {
      setError(e);
      setBusy(false);
    }
  };
  return html`
    <section aria-labelledby="submit">
      <h2 id="submit">Submit a request</h2>
      <form onSubmit=${submit} class="submit">
        <label for="request">Request</label>
        <textarea id="request" rows="3" required maxlength="32768" value=${request}
          onInput=${(e) => setRequest(e.currentTarget.value)}></textarea>
        <label for="priority">Priority</label>
        <select id="priority" value=${priority} onChange=${(e) => setPriority(e.currentTarget.value)}>
          ${['LOW', 'NORMAL', 'HIGH', 'CRITICAL'].map((p) => html`<option value=${p}>${p.toLowerCase()}</option>`)}
        </select>
        <button type="submit" disabled=${busy}>${busy ? 'Submitting…' : 'Submit'}</button>
      </form>
      <${ErrorMessage} error=${error} />
    </section>`;
}

export function Workflows({ me }) {
  const [state, setState] = useState('');
  const [rows, setRows] = useState(null);
  const [page, setPage] = useState(null);
  const [error, setError] = useState(null);

  const load = async (after) => {
    setError(null);
    try {
      const { workflows } = await gql(LIST, { state: state || null, after });
      setRows((old) => (after ? [...old, ...workflows.nodes] : workflows.nodes));
      setPage(workflows.pageInfo);
    } catch (e) {
      setError(e);
    }
  };
  useEffect(() => {
    setRows(null);
    load(null);
  }, [state]);

  return html`
    <h1>Workflows</h1>
    ${holds(me, 'submitter', 'admin') && html`<${SubmitForm} />`}
    <section aria-labelledby="list">
      <h2 id="list">All workflows</h2>
      <div class="filters">
        <label for="state-filter">State</label>
        <select id="state-filter" value=${state} onChange=${(e) => setState(e.currentTarget.value)}>
          <option value="">any</option>
          ${STATES.map((s) => html`<option value=${s}>${s.replace('_', ' ').toLowerCase()}</option>`)}
        </select>
      </div>
      <${ErrorMessage} error=${error} />
      ${rows === null && !error && html`<${Loading} />`}
      ${rows?.length === 0 && html`<p>No workflows${state ? ' in this state' : ''}.</p>`}
      ${rows?.length > 0 && html`
        <div class="scroll" tabindex="0" role="region" aria-label="Table, scrolls sideways">
          <table class="workflows">
            <thead><tr><th scope="col">Request</th><th scope="col">State</th><th scope="col">Priority</th>
              <th scope="col" class="num">Subtasks</th><th scope="col">Submitted</th></tr></thead>
            <tbody>${rows.map((w) => html`<tr>
              <td><${Link} href=${`/workflows/${w.id}`}>${w.request.length > 90 ? `${w.request.slice(0, 90)}…` : w.request}<//></td>
              <td><${State} state=${w.state} /></td>
              <td>${w.priority.toLowerCase()}</td>
              <td class="num">${w.progress.done}/${w.progress.total}</td>
              <td><${When} at=${w.createdAt} /></td>
            </tr>`)}</tbody>
          </table>
        </div>`}
      ${page?.hasNextPage && html`<button type="button" onClick=${() => load(page.endCursor)}>Show more</button>`}
    </section>`;
}

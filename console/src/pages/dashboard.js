// The dashboard: workflows by state, throughput, the agents' decisions and
// latencies, projection lag. Live: every event of the tenant arrives over
// the `workflowEvents` subscription; the counts are read again (at most
// once a second) when events arrive, and every ten seconds regardless.

import { useEffect, useMemo, useRef, useState } from 'preact/hooks';

import { gql, onLiveConnection, subscribe } from '../api.js';
import { FigureChart } from '../chart.js';
import { ErrorMessage, FINAL, html, Loading, STATES, throttle } from '../ui.js';

const FIGURES = `{
  workflowCounts { state count }
  projectionLag { projection behindEvents }
  agentMetrics { agent role decisions approvals rejections revisions escalations retries failures flagged latencyMeanMs latencyP95Ms latencyMaxMs }
}`;
const EVENTS = `subscription { workflowEvents { position type } }`;
const WINDOW = 60;

function useFigures() {
  const [figures, setFigures] = useState(null);
  const [error, setError] = useState(null);
  const [live, setLive] = useState(false);
  // Events per second over the last minute: [events, workflows ended].
  const buckets = useRef(new Map());
  const [tick, setTick] = useState(0);

  useEffect(() => {
    let gone = false;
    const load = () =>
      gql(FIGURES)
        .then((data) => !gone && (setFigures(data), setError(null)))
        .catch((e) => !gone && setError(e));
    const soon = throttle(load, 1000);
    load();
    const every = setInterval(load, 10_000);
    const clock = setInterval(() => setTick((t) => t + 1), 1000);
    const connection = onLiveConnection(setLive);
    const stop = subscribe(EVENTS, {}, {
      next: ({ workflowEvents: e }) => {
        const second = Math.floor(Date.now() / 1000);
        const bucket = buckets.current.get(second) ?? [0, 0];
        bucket[0] += 1;
        if (FINAL.some((s) => e.type === `Workflow${s[0]}${s.slice(1).toLowerCase()}`)) bucket[1] += 1;
        buckets.current.set(second, bucket);
        soon();
      },
      error: (e) => (setLive(false), setError(e)),
    });
    return () => {
      gone = true;
      connection();
      stop();
      clearInterval(every);
      clearInterval(clock);
    };
  }, []);

  const throughput = useMemo(() => {
    const now = Math.floor(Date.now() / 1000);
    for (const second of buckets.current.keys()) if (second < now - WINDOW) buckets.current.delete(second);
    const seconds = Array.from({ length: WINDOW }, (_, i) => now - WINDOW + 1 + i);
    return {
      labels: seconds.map((s) => `${s - now}s`),
      events: seconds.map((s) => buckets.current.get(s)?.[0] ?? 0),
      ended: seconds.map((s) => buckets.current.get(s)?.[1] ?? 0),
    };
  }, [tick]);
  return { figures, error, live, throughput };
}

export function Dashboard() {
  const { figures, error, live, throughput } = useFigures();
  const counts = figures?.workflowCounts ?? STATES.map((state) => ({ state, count: 0 }));
  const agents = figures?.agentMetrics ?? [];
  const stateSeries = useMemo(() => [{ label: 'Workflows', data: counts.map((c) => c.count) }], [figures]);
  const stateLabels = useMemo(() => counts.map((c) => c.state.replace('_', ' ')), [figures]);
  const rateSeries = useMemo(
    () => [
      { label: 'Events per second', data: throughput.events },
      { label: 'Workflows ended per second', data: throughput.ended },
    ],
    [throughput],
  );
  const latencySeries = useMemo(
    () => [
      { label: 'Mean (ms)', data: agents.map((a) => a.latencyMeanMs ?? 0) },
      { label: 'p95 (ms)', data: agents.map((a) => a.latencyP95Ms ?? 0) },
    ],
    [figures],
  );
  const agentLabels = useMemo(() => agents.map((a) => a.agent), [figures]);
  const sum = (f) => throughput[f].reduce((a, b) => a + b, 0);
  const recent = { events: sum('events'), ended: sum('ended') };

  return html`
    <h1>Dashboard</h1>
    <p class="muted" role="status" data-testid="live" data-live=${live}>${live ? 'Live: updating as events are recorded.' : 'Waiting for the live feed…'}</p>
    <${ErrorMessage} error=${error} />
    ${!figures && !error && html`<${Loading} />`}
    <div class="grid">
      <section aria-labelledby="by-state">
        <h2 id="by-state">Workflows by state</h2>
        <${FigureChart} type="bar" label="Workflows by state" labels=${stateLabels} series=${stateSeries} />
        <table data-testid="state-counts">
          <caption class="sr-only">Workflows by state</caption>
          <thead><tr><th scope="col">State</th><th scope="col" class="num">Workflows</th></tr></thead>
          <tbody>${counts.map((c) => html`<tr><th scope="row">${c.state.replace('_', ' ')}</th><td class="num" data-state=${c.state}>${c.count}</td></tr>`)}</tbody>
        </table>
      </section>
      <section aria-labelledby="throughput">
        <h2 id="throughput">Throughput, last minute</h2>
        <${FigureChart} type="line" label="Events and ended workflows per second over the last minute" labels=${throughput.labels} series=${rateSeries} />
        <p data-testid="recent" data-events=${recent.events} data-ended=${recent.ended}>${recent.events} events and ${recent.ended} workflows ended in the last ${WINDOW} seconds.</p>
      </section>
      <section aria-labelledby="agents">
        <h2 id="agents">Agents</h2>
        <${FigureChart} type="bar" label="Decision latency by agent, mean and 95th percentile" labels=${agentLabels} series=${latencySeries} />
        <div class="scroll" tabindex="0" role="region" aria-label="Table, scrolls sideways">
          <table>
            <thead><tr>
              <th scope="col">Agent</th><th scope="col" class="num">Decisions</th><th scope="col" class="num">Approved</th>
              <th scope="col" class="num">Rejected</th><th scope="col" class="num">Escalated</th><th scope="col" class="num">Retries</th>
              <th scope="col" class="num">Failures</th><th scope="col" class="num">Mean ms</th><th scope="col" class="num">p95 ms</th>
            </tr></thead>
            <tbody>${agents.map((a) => html`<tr>
              <th scope="row">${a.agent}${a.role ? html` <span class="muted">(${a.role.toLowerCase()})</span>` : ''}</th>
              <td class="num">${a.decisions}</td><td class="num">${a.approvals}</td><td class="num">${a.rejections}</td>
              <td class="num">${a.escalations}</td><td class="num">${a.retries}</td><td class="num">${a.failures}</td>
              <td class="num">${a.latencyMeanMs?.toFixed(1) ?? '—'}</td><td class="num">${a.latencyP95Ms?.toFixed(0) ?? '—'}</td>
            </tr>`)}</tbody>
          </table>
        </div>
      </section>
      <section aria-labelledby="lag">
        <h2 id="lag">Projection lag</h2>
        <table>
          <thead><tr><th scope="col">Projection</th><th scope="col" class="num">Events behind</th></tr></thead>
          <tbody>${(figures?.projectionLag ?? []).map((p) => html`<tr><th scope="row">${p.projection}</th><td class="num">${p.behindEvents}</td></tr>`)}</tbody>
        </table>
      </section>
    </div>`;
}

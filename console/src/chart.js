// Charts (Chart.js), each with the table of its figures beside it for
// screen readers and for reading exact values.

import {
  BarController,
  BarElement,
  CategoryScale,
  Chart,
  Legend,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
} from 'chart.js';
import { useEffect, useRef } from 'preact/hooks';

import { html } from './ui.js';

Chart.register(
  BarController,
  BarElement,
  CategoryScale,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Legend,
  Tooltip,
);

const COLOURS = ['#2563eb', '#16a34a', '#d97706', '#dc2626', '#7c3aed', '#0891b2'];

/**
 * A chart of `labels` against `series` ([{ label, data }]); `type` is
 * `bar` or `line`. Redrawn in place when the figures change.
 */
export function FigureChart({ type, labels, series, label, stacked = false }) {
  const canvas = useRef(null);
  const chart = useRef(null);
  useEffect(() => {
    chart.current = new Chart(canvas.current, {
      type,
      data: { labels: [], datasets: [] },
      options: {
        animation: false,
        responsive: true,
        maintainAspectRatio: false,
        plugins: { legend: { display: series.length > 1 } },
        scales: {
          x: { stacked },
          y: { stacked, beginAtZero: true, ticks: { precision: 0 } },
        },
      },
    });
    return () => chart.current.destroy();
  }, [type]);
  useEffect(() => {
    const c = chart.current;
    c.data.labels = labels;
    c.data.datasets = series.map((s, i) => ({
      label: s.label,
      data: s.data,
      backgroundColor: COLOURS[i % COLOURS.length],
      borderColor: COLOURS[i % COLOURS.length],
      pointRadius: 0,
    }));
    c.update('none');
  }, [labels, series]);
  return html`<div class="chart"><canvas ref=${canvas} role="img" aria-label=${label}></canvas></div>`;
}

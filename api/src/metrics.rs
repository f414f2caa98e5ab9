//! HTTP request counts and latency histograms per route and status, in
//! Prometheus text format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

/// Upper bounds of the latency buckets, in seconds.
const BOUNDS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    /// Per bound, not cumulative; the last counts what is above every bound.
    buckets: [u64; BOUNDS.len() + 1],
}

/// Requests seen, by (route, status).
#[derive(Default)]
pub struct HttpMetrics {
    series: Mutex<BTreeMap<(String, u16), Series>>,
}

impl HttpMetrics {
    fn observe(&self, route: String, status: u16, seconds: f64) {
        let mut series = self.series.lock().expect("metrics lock");
        let s = series.entry((route, status)).or_default();
        s.count += 1;
        s.sum += seconds;
        let i = BOUNDS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(BOUNDS.len());
        s.buckets[i] += 1;
    }

    /// Appends the series to `out`.
    pub fn render(&self, out: &mut String) {
        let series = self.series.lock().expect("metrics lock");
        let _ = writeln!(
            out,
            "# HELP agentledger_http_requests_total HTTP requests by route and status."
        );
        let _ = writeln!(out, "# TYPE agentledger_http_requests_total counter");
        for ((route, status), s) in series.iter() {
            let _ = writeln!(
                out,
                "agentledger_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {}",
                s.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP agentledger_http_request_seconds HTTP request latency."
        );
        let _ = writeln!(out, "# TYPE agentledger_http_request_seconds histogram");
        for ((route, status), s) in series.iter() {
            let labels = format!("route=\"{route}\",status=\"{status}\"");
            let mut cumulative = 0;
            for (bound, n) in BOUNDS.iter().zip(&s.buckets) {
                cumulative += n;
                let _ = writeln!(out, "agentledger_http_request_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "agentledger_http_request_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                s.count
            );
            let _ = writeln!(
                out,
                "agentledger_http_request_seconds_sum{{{labels}}} {}",
                s.sum
            );
            let _ = writeln!(
                out,
                "agentledger_http_request_seconds_count{{{labels}}} {}",
                s.count
            );
        }
    }
}

/// Middleware: times every request to a known route.
pub async fn track(
    State(metrics): State<Arc<HttpMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unknown".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.observe(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

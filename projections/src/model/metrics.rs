//! The agent metrics read model: per agent and per minute (of the events'
//! `recorded_at`), decision counts, retries, failures, decision latency as
//! fixed histogram buckets (so minutes and processes add up, and a p95 can be
//! read back), and RUNE's mean scores.

use std::collections::BTreeMap;

use agentledger_domain::workflow::{Verdict, WorkflowEvent};
use agentledger_eventstore::ActorKind;
use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use uuid::Uuid;

use super::Fact;

/// Upper bounds of the latency buckets, in milliseconds; the last bucket
/// (index `LATENCY_BOUNDS_MS.len()`) holds everything above.
pub const LATENCY_BOUNDS_MS: [f64; 13] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1_000.0, 2_000.0, 5_000.0, 10_000.0,
];

/// Number of latency buckets.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// One agent's figures for one minute.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentMetrics {
    /// The tenant of the workflows these decisions were made in.
    pub tenant: String,
    pub agent: String,
    /// The minute, truncated.
    pub bucket: DateTime<Utc>,
    pub decisions: i64,
    pub approvals: i64,
    pub rejections: i64,
    pub revisions: i64,
    pub escalations: i64,
    /// Attempts after the first.
    pub retries: i64,
    /// Failed attempts.
    pub failures: i64,
    /// Workflows RUNE flagged.
    pub flagged: i64,
    pub latency_count: i64,
    /// Microseconds (integers add up the same in any order).
    pub latency_sum_us: i64,
    pub latency_max_us: i64,
    pub latency_buckets: Vec<i64>,
    pub ethics_count: i64,
    /// Sums of scores in millionths.
    pub transparency_sum: i64,
    pub collaboration_sum: i64,
    pub autonomy_sum: i64,
    pub fairness_sum: i64,
}

/// A score in millionths.
fn millionths(score: f64) -> i64 {
    (score * 1e6).round() as i64
}

impl AgentMetrics {
    fn empty(tenant: &str, agent: &str, bucket: DateTime<Utc>) -> Self {
        Self {
            tenant: tenant.to_string(),
            agent: agent.to_string(),
            bucket,
            latency_buckets: vec![0; LATENCY_BUCKETS],
            ..Self::default()
        }
    }

    /// Adds `other`'s figures (same agent; any bucket) to these.
    pub fn merge(&mut self, other: &Self) {
        self.decisions += other.decisions;
        self.approvals += other.approvals;
        self.rejections += other.rejections;
        self.revisions += other.revisions;
        self.escalations += other.escalations;
        self.retries += other.retries;
        self.failures += other.failures;
        self.flagged += other.flagged;
        self.latency_count += other.latency_count;
        self.latency_sum_us += other.latency_sum_us;
        self.latency_max_us = self.latency_max_us.max(other.latency_max_us);
        for (mine, theirs) in self.latency_buckets.iter_mut().zip(&other.latency_buckets) {
            *mine += theirs;
        }
        self.ethics_count += other.ethics_count;
        self.transparency_sum += other.transparency_sum;
        self.collaboration_sum += other.collaboration_sum;
        self.autonomy_sum += other.autonomy_sum;
        self.fairness_sum += other.fairness_sum;
    }

    /// Mean decision latency in milliseconds.
    pub fn latency_mean_ms(&self) -> Option<f64> {
        (self.latency_count > 0)
            .then(|| self.latency_sum_us as f64 / 1e3 / self.latency_count as f64)
    }

    /// Longest decision latency in milliseconds.
    pub fn latency_max_ms(&self) -> f64 {
        self.latency_max_us as f64 / 1e3
    }

    /// RUNE's mean scores (transparency, collaboration, autonomy, fairness).
    pub fn ethics_means(&self) -> Option<[f64; 4]> {
        (self.ethics_count > 0).then(|| {
            let n = self.ethics_count as f64 * 1e6;
            [
                self.transparency_sum as f64 / n,
                self.collaboration_sum as f64 / n,
                self.autonomy_sum as f64 / n,
                self.fairness_sum as f64 / n,
            ]
        })
    }

    /// The 95th percentile of decision latency, as the upper bound of the
    /// bucket it falls in (the maximum for the open last bucket).
    pub fn latency_p95_ms(&self) -> Option<f64> {
        if self.latency_count == 0 {
            return None;
        }
        let rank = (self.latency_count as f64 * 0.95).ceil() as i64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(
                    LATENCY_BOUNDS_MS
                        .get(i)
                        .copied()
                        .unwrap_or(self.latency_max_ms())
                        .min(self.latency_max_ms()),
                );
            }
        }
        Some(self.latency_max_ms())
    }

    fn observe_latency(&mut self, us: i64) {
        let ms = us as f64 / 1e3;
        self.latency_count += 1;
        self.latency_sum_us += us;
        self.latency_max_us = self.latency_max_us.max(us);
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency_buckets[i] += 1;
    }
}

/// The minute `at` falls in.
pub fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(TimeDelta::minutes(1)).unwrap_or(at)
}

/// Whether `event` is an agent's decision (counted, and timed from its
/// causation), rather than a step on the way to one.
fn is_decision(event: &WorkflowEvent) -> bool {
    use WorkflowEvent as E;
    matches!(
        event,
        E::AnalysisProduced { .. }
            | E::ExecutionFinished { .. }
            | E::GateDecided { .. }
            | E::SubtaskSucceeded { .. }
            | E::SubtaskSkipped { .. }
            | E::SubtaskFailed { .. }
            | E::EthicsReviewed { .. }
    )
}

/// Figures added up from a batch of events, by (agent, minute).
#[derive(Debug, Default)]
pub struct MetricsBatch {
    /// By tenant, agent and minute.
    pub rows: BTreeMap<(String, String, DateTime<Utc>), AgentMetrics>,
}

impl MetricsBatch {
    /// Counts `fact`. `caused_at` is when the event it answers (its
    /// causation) was recorded, if known: the decision latency is the time
    /// between. `first_of_append` is false for a decision that shares its
    /// causation with the decision before it (one append, several
    /// decisions: only the first is timed).
    pub fn count(&mut self, fact: &Fact, caused_at: Option<DateTime<Utc>>, first_of_append: bool) {
        use WorkflowEvent as E;
        let actor = &fact.metadata.actor;
        if actor.kind != ActorKind::Agent {
            return;
        }
        let at = fact.recorded.recorded_at;
        let bucket = minute_of(at);
        let row = self
            .rows
            .entry((fact.metadata.tenant.clone(), actor.name.clone(), bucket))
            .or_insert_with(|| AgentMetrics::empty(&fact.metadata.tenant, &actor.name, bucket));
        match &fact.event {
            E::GateDecided { verdict, .. } => match verdict {
                Verdict::Approve => row.approvals += 1,
                Verdict::Reject => row.rejections += 1,
                Verdict::Revise => row.revisions += 1,
                Verdict::Escalate => row.escalations += 1,
            },
            E::SubtaskEscalated { .. } => row.escalations += 1,
            E::SubtaskStarted { attempt, .. } if *attempt > 1 => row.retries += 1,
            E::SubtaskFailed { .. } => row.failures += 1,
            E::EthicsReviewed { scores, passed, .. } => {
                row.ethics_count += 1;
                row.transparency_sum += millionths(scores.transparency);
                row.collaboration_sum += millionths(scores.collaboration);
                row.autonomy_sum += millionths(scores.autonomy);
                row.fairness_sum += millionths(scores.fairness);
                if !passed {
                    row.flagged += 1;
                }
            }
            _ => {}
        }
        let decision = is_decision(&fact.event);
        if !decision {
            return;
        }
        row.decisions += 1;
        if let (Some(caused_at), true) = (caused_at, first_of_append) {
            let us = (at - caused_at).num_microseconds().unwrap_or(0).max(0);
            row.observe_latency(us);
        }
    }
}

/// What the metrics projection remembers of a workflow: when each of its
/// events was recorded (to time decisions by their causation), and the
/// causation of its last agent decision.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub times: Vec<(Uuid, DateTime<Utc>)>,
    pub last_causation: Option<Uuid>,
    pub version: Option<u64>,
}

impl Timeline {
    /// Counts `fact` into `batch` and remembers it.
    pub fn count(&mut self, fact: &Fact, batch: &mut MetricsBatch) {
        let causation = fact.metadata.causation_id;
        let caused_at = causation.and_then(|c| {
            self.times
                .iter()
                .rev()
                .find(|(id, _)| *id == c)
                .map(|(_, at)| *at)
        });
        let first = causation.is_none() || causation != self.last_causation;
        batch.count(fact, caused_at, first);
        self.remember(fact);
    }

    /// Remembers `fact` without counting it (loading a workflow's past).
    pub fn remember(&mut self, fact: &Fact) {
        self.times
            .push((fact.recorded.event_id, fact.recorded.recorded_at));
        if fact.metadata.actor.kind == ActorKind::Agent && is_decision(&fact.event) {
            self.last_causation = fact.metadata.causation_id;
        }
        self.version = Some(fact.recorded.stream_version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_reads_the_bucket_holding_the_95th_percentile() {
        let mut m = AgentMetrics::empty("default", "lubit", Utc::now());
        for _ in 0..94 {
            m.observe_latency(3_000);
        }
        for _ in 0..6 {
            m.observe_latency(150_000);
        }
        // The 95th falls in (100, 200]; no sample exceeded 150.
        assert_eq!(m.latency_p95_ms(), Some(150.0));
        assert_eq!(
            m.latency_mean_ms(),
            Some((94.0 * 3.0 + 6.0 * 150.0) / 100.0)
        );
        m.observe_latency(5_000_000);
        assert_eq!(m.latency_p95_ms(), Some(200.0), "the bucket's bound");
        let mut other = AgentMetrics::empty("default", "lubit", Utc::now());
        other.observe_latency(20_000_000);
        m.merge(&other);
        assert_eq!(m.latency_count, 102);
        assert_eq!(m.latency_max_ms(), 20_000.0);
        assert_eq!(m.latency_buckets[LATENCY_BUCKETS - 1], 1);
    }

    #[test]
    fn minutes_truncate() {
        let at: DateTime<Utc> = "2026-11-25T07:41:59.999Z".parse().unwrap();
        assert_eq!(
            minute_of(at),
            "2026-11-25T07:41:00Z".parse::<DateTime<Utc>>().unwrap()
        );
    }
}

//! What the service's long-running tasks say about themselves: how often
//! each was restarted after a failure, and what keeps it from working now.
//! The projection runner and the agent runtime write it; `/ready` and
//! `/metrics` read it. One per process, shared by cloning.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex};

/// The health of the process's tasks, by task name.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<String, TaskHealth>>>);

/// One task's health.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskHealth {
    /// Restarts after a failure since the process started.
    pub restarts: u64,
    /// Why the task is not working now; `None` while it works.
    pub problem: Option<String>,
}

impl Health {
    fn with<T>(&self, task: &str, f: impl FnOnce(&mut TaskHealth) -> T) -> T {
        let mut tasks = self.0.lock().expect("health lock");
        f(tasks.entry(task.to_string()).or_default())
    }

    /// Lists `task` (with no restart), so that its counter is reported
    /// from the start.
    pub fn register(&self, task: &str) {
        self.with(task, |_| ());
    }

    /// `task` failed and will be started again; `reason` is its problem
    /// until it reports [`Health::recovered`].
    pub fn restarted(&self, task: &str, reason: impl Display) {
        self.with(task, |t| {
            t.restarts += 1;
            t.problem = Some(reason.to_string());
        });
    }

    /// One unit of `task`'s work failed and was started again; the task
    /// itself goes on working (a workflow's drive, a tool's attempt).
    pub fn counted(&self, task: &str) {
        self.with(task, |t| t.restarts += 1);
    }

    /// `task` does not work, and will not by itself (it stopped).
    pub fn stopped(&self, task: &str, reason: impl Display) {
        self.with(task, |t| t.problem = Some(format!("stopped: {reason}")));
    }

    /// `task` works again.
    pub fn recovered(&self, task: &str) {
        self.with(task, |t| t.problem = None);
    }

    /// Every task's health, by name.
    pub fn snapshot(&self) -> Vec<(String, TaskHealth)> {
        let tasks = self.0.lock().expect("health lock");
        tasks.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// What a caught panic said, for a log line and a task's problem.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_count_and_problems_clear() {
        let health = Health::default();
        health.register("projections");
        assert_eq!(health.snapshot()[0].1, TaskHealth::default());
        health.restarted("projections", "connection refused");
        health.restarted("projections", "connection refused");
        let (_, t) = &health.snapshot()[0];
        assert_eq!(t.restarts, 2);
        assert_eq!(t.problem.as_deref(), Some("connection refused"));
        health.recovered("projections");
        assert_eq!(health.snapshot()[0].1.problem, None);
        health.stopped("projections", "unreadable event");
        assert_eq!(
            health.snapshot()[0].1.problem.as_deref(),
            Some("stopped: unreadable event")
        );
        assert_eq!(health.snapshot()[0].1.restarts, 2);
        health.counted("agents");
        let agents = &health.snapshot()[0].1;
        assert_eq!((agents.restarts, agents.problem.as_deref()), (1, None));
    }
}

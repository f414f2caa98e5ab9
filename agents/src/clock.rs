//! Time for the runtime, injected: leases, deadlines and backoff read this
//! clock, so tests move time by hand instead of sleeping (paused tokio time
//! would fire every timeout at once while a real query is in flight).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{oneshot, watch};

/// A source of the current time and of sleeps.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
    /// Completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
}

/// The wall clock and tokio's timers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        tokio::time::sleep(duration).boxed()
    }
}

/// A clock that moves only when told to ([`ManualClock::advance`]).
#[derive(Debug, Clone)]
pub struct ManualClock {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<ManualState>,
    /// How many sleeps are pending (dropped ones no longer count).
    sleepers: watch::Sender<usize>,
}

#[derive(Debug)]
struct ManualState {
    now: DateTime<Utc>,
    next_id: u64,
    waiting: Vec<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    at: DateTime<Utc>,
    wake: oneshot::Sender<()>,
}

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(ManualState {
                    now,
                    next_id: 0,
                    waiting: Vec::new(),
                }),
                sleepers: watch::channel(0).0,
            }),
        }
    }

    /// Moves time forward and wakes every sleep that has ended.
    pub fn advance(&self, by: Duration) {
        let mut state = self.shared.lock();
        state.now += chrono::Duration::from_std(by).expect("a sane duration");
        let now = state.now;
        let (due, waiting): (Vec<_>, Vec<_>) = state.waiting.drain(..).partition(|w| w.at <= now);
        state.waiting = waiting;
        self.shared.sleepers.send_replace(state.waiting.len());
        drop(state);
        for waiter in due {
            let _ = waiter.wake.send(());
        }
    }

    /// Waits until at least `count` sleeps are pending: the point where
    /// advancing the clock is sure to wake what a test is waiting for.
    pub async fn sleepers_at_least(&self, count: usize) {
        let mut rx = self.shared.sleepers.subscribe();
        let _ = rx.wait_for(|n| *n >= count).await;
    }

    /// Waits until at most `count` sleeps are pending: for a test that
    /// counts the sleeps of a new runtime, until those of one that died
    /// (its tasks are dropped a moment after it ends) are gone.
    pub async fn sleepers_at_most(&self, count: usize) {
        let mut rx = self.shared.sleepers.subscribe();
        let _ = rx.wait_for(|n| *n <= count).await;
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, ManualState> {
        self.state.lock().expect("clock lock")
    }
}

/// Removes a sleep that is dropped before it ends from the pending count.
struct Pending {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.waiting.retain(|w| w.id != self.id);
        self.shared.sleepers.send_replace(state.waiting.len());
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.shared.lock().now
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let (wake, rx) = oneshot::channel();
        let mut state = self.shared.lock();
        let at = state.now + chrono::Duration::from_std(duration).expect("a sane duration");
        if at <= state.now {
            return futures::future::ready(()).boxed();
        }
        state.next_id += 1;
        let id = state.next_id;
        state.waiting.push(Waiter { id, at, wake });
        self.shared.sleepers.send_replace(state.waiting.len());
        let pending = Pending {
            shared: self.shared.clone(),
            id,
        };
        async move {
            let _pending = pending;
            // The sender lives in the clock: it is only dropped when woken.
            let _ = rx.await;
        }
        .boxed()
    }
}

/// `future`, or `None` once `limit` has passed on `clock`.
pub async fn timeout<T>(
    clock: &dyn Clock,
    limit: Duration,
    future: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        value = future => Some(value),
        () = clock.sleep(limit) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_sleep_ends_only_when_the_clock_passes_its_end() {
        let clock = ManualClock::new(Utc::now());
        let start = clock.now();
        let mut sleep = clock.sleep(Duration::from_secs(10));
        clock.advance(Duration::from_secs(9));
        assert!(futures::poll!(&mut sleep).is_pending());
        clock.advance(Duration::from_secs(1));
        sleep.await;
        assert_eq!(clock.now() - start, chrono::Duration::seconds(10));
    }

    #[tokio::test]
    async fn a_dropped_sleep_no_longer_counts_as_pending() {
        let clock = ManualClock::new(Utc::now());
        let a = clock.sleep(Duration::from_secs(1));
        let _b = clock.sleep(Duration::from_secs(1));
        assert_eq!(*clock.shared.sleepers.borrow(), 2);
        drop(a);
        assert_eq!(*clock.shared.sleepers.borrow(), 1);
    }

    #[tokio::test]
    async fn a_timeout_fires_on_the_injected_clock() {
        let clock = ManualClock::new(Utc::now());
        let waiter = {
            let clock = clock.clone();
            tokio::spawn(async move {
                timeout(
                    &clock,
                    Duration::from_millis(500),
                    futures::future::pending::<()>(),
                )
                .await
            })
        };
        clock.sleepers_at_least(1).await;
        clock.advance(Duration::from_millis(500));
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(
            timeout(&clock, Duration::from_secs(1), async { 7 }).await,
            Some(7)
        );
    }
}

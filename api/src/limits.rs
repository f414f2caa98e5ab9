//! Hard limits on what one caller, address or socket may take (issue #12):
//! request rates per credential and per client address (`governor`),
//! and on WebSockets, subscriptions per connection, connections per
//! credential and operations per second on one socket (a socket counts as
//! one HTTP request, at its upgrade, so its operations need their own
//! limiter).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

/// A rate: so many per second, with bursts up to `burst`. Zero turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    fn quota(self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second))?;
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

/// The limits' settings.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// Requests (HTTP requests and WebSocket operations) per credential.
    pub per_credential: Rate,
    /// HTTP requests per client address, before authentication.
    pub per_address: Rate,
    /// Subscriptions open at once on one WebSocket.
    pub subscriptions_per_connection: usize,
    /// WebSockets open at once per credential.
    pub connections_per_credential: usize,
    /// Time a WebSocket has to send `connection_init`.
    pub init_timeout: Duration,
    /// How often the server pings an open WebSocket.
    pub ping_interval: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            per_credential: Rate {
                per_second: 1_000,
                burst: 2_000,
            },
            per_address: Rate {
                per_second: 2_000,
                burst: 4_000,
            },
            subscriptions_per_connection: 100,
            connections_per_credential: 1_000,
            init_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
        }
    }
}

/// Keys a keyed limiter remembers before forgetting the idle ones.
const MAX_KEYS: usize = 100_000;

/// The limiters of one process.
pub struct Limiters {
    config: LimitsConfig,
    per_credential: Option<DefaultKeyedRateLimiter<String>>,
    per_address: Option<DefaultKeyedRateLimiter<IpAddr>>,
    connections: Mutex<HashMap<String, usize>>,
}

impl std::fmt::Debug for Limiters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiters")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Refused for going too fast: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for a `Retry-After` header (at least 1).
    pub fn seconds(self) -> u64 {
        self.0.as_secs_f64().ceil().max(1.0) as u64
    }
}

fn check<K: std::hash::Hash + Eq + Clone>(
    limiter: &Option<DefaultKeyedRateLimiter<K>>,
    key: &K,
) -> Result<(), RetryAfter> {
    let Some(limiter) = limiter else {
        return Ok(());
    };
    if limiter.len() > MAX_KEYS {
        limiter.retain_recent();
    }
    limiter
        .check_key(key)
        .map_err(|not_until| RetryAfter(not_until.wait_time_from(DefaultClock::default().now())))
}

impl Limiters {
    pub fn new(config: LimitsConfig) -> Self {
        Self {
            per_credential: config
                .per_credential
                .quota()
                .map(DefaultKeyedRateLimiter::keyed),
            per_address: config
                .per_address
                .quota()
                .map(DefaultKeyedRateLimiter::keyed),
            connections: Mutex::default(),
            config,
        }
    }

    /// The settings.
    pub fn config(&self) -> &LimitsConfig {
        &self.config
    }

    /// One more request from `address`.
    pub fn check_address(&self, address: IpAddr) -> Result<(), RetryAfter> {
        check(&self.per_address, &address)
    }

    /// One more request or operation by the credential `subject`.
    pub fn check_credential(&self, subject: &str) -> Result<(), RetryAfter> {
        check(&self.per_credential, &subject.to_string())
    }

    /// Counts a WebSocket of `subject` while the returned guard lives;
    /// `None` when the credential has its maximum open already.
    pub fn open_connection(self: &Arc<Self>, subject: &str) -> Option<ConnectionSlot> {
        let mut open = self.connections.lock().expect("connections lock");
        let count = open.entry(subject.to_string()).or_default();
        if *count >= self.config.connections_per_credential {
            return None;
        }
        *count += 1;
        Some(ConnectionSlot {
            limiters: self.clone(),
            subject: subject.to_string(),
        })
    }

    /// A limiter of operations on one socket, at the credential's rate.
    pub fn per_socket(&self) -> Option<DefaultDirectRateLimiter> {
        self.config
            .per_credential
            .quota()
            .map(DefaultDirectRateLimiter::direct)
    }
}

/// One open WebSocket of a credential; counted down on drop.
pub struct ConnectionSlot {
    limiters: Arc<Limiters>,
    subject: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limiters.connections.lock().expect("connections lock");
        if let Some(count) = open.get_mut(&self.subject) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.subject);
            }
        }
    }
}

/// Subscriptions open on one socket.
#[derive(Clone, Default)]
pub struct OpenCount(Arc<AtomicUsize>);

impl OpenCount {
    /// Takes a place when fewer than `max` are taken.
    pub fn take(&self, max: usize) -> Option<OpenPlace> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| OpenPlace(self.0.clone()))
    }
}

/// A place among a socket's open subscriptions; given back on drop.
pub struct OpenPlace(Arc<AtomicUsize>);

impl Drop for OpenPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_is_stopped_past_its_burst_and_others_are_not() {
        let limiters = Limiters::new(LimitsConfig {
            per_credential: Rate {
                per_second: 1,
                burst: 3,
            },
            ..LimitsConfig::default()
        });
        for _ in 0..3 {
            limiters.check_credential("a").unwrap();
        }
        let refused = limiters.check_credential("a").unwrap_err();
        assert!(refused.0 <= Duration::from_secs(1) && refused.seconds() == 1);
        limiters.check_credential("b").unwrap();
    }

    #[test]
    fn connections_and_subscriptions_are_counted_while_held() {
        let limiters = Arc::new(Limiters::new(LimitsConfig {
            connections_per_credential: 2,
            ..LimitsConfig::default()
        }));
        let one = limiters.open_connection("k").unwrap();
        let _two = limiters.open_connection("k").unwrap();
        assert!(limiters.open_connection("k").is_none());
        drop(one);
        assert!(limiters.open_connection("k").is_some());
        let open = OpenCount::default();
        let first = open.take(1).unwrap();
        assert!(open.take(1).is_none());
        drop(first);
        assert!(open.take(1).is_some());
    }

    #[test]
    fn a_zero_rate_is_no_limit() {
        let limiters = Limiters::new(LimitsConfig {
            per_address: Rate {
                per_second: 0,
                burst: 0,
            },
            ..LimitsConfig::default()
        });
        for _ in 0..10_000 {
            limiters
                .check_address(IpAddr::from([127, 0, 0, 1]))
                .unwrap();
        }
    }
}

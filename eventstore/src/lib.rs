//! The agentledger event store: append-only, hash-chained streams of JSON
//! events with a gap-safe global order and catch-up-then-live subscriptions.
//!
//! Two implementations behave identically behind [`EventStore`]:
//! [`PostgresEventStore`] (the real one) and [`InMemoryEventStore`] (embedded
//! dev mode, fast unit tests). One contract test suite runs against both.
//!
//! This crate depends on nothing else of agentledger and knows nothing of
//! workflows, agents or GraphQL: it stores JSON events named by type.
//!
//! ```
//! # tokio_test_block(async {
//! use agentledger_eventstore::*;
//! use serde_json::json;
//!
//! let store = InMemoryEventStore::default();
//! let stream = StreamId::new("workflow-1").unwrap();
//! let event = NewEvent::new("Greeted", json!({"text": "안녕하세요"}), Metadata::new(Actor::system()));
//! let appended = store.append(&stream, ExpectedVersion::NoStream, vec![event]).await.unwrap();
//! assert_eq!(appended.stream_version, 0);
//! assert!(store.verify_stream(&stream).await.unwrap().ok);
//! # });
//! # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

pub mod api_keys;
mod append;
pub mod chain;
pub mod checkpoint;
pub mod digest;
pub mod embedded;
mod error;
mod event;
pub mod health;
mod memory;
pub mod migrate;
pub mod postgres;
mod prepare;
pub mod receipt;
pub mod signing;
pub mod subject_keys;
pub mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tlog;

use async_trait::async_trait;
use futures::StreamExt;

pub use chain::{
    verify_events, CanonicalEvent, ChainVerifier, ExcerptVerifier, LedgerVerifier, Verification,
};
pub use embedded::EmbeddedLedger;
pub use error::{describe as describe_db_error, StoreError};
pub use event::{
    json_len, Actor, ActorKind, AppendResult, ExpectedVersion, Metadata, NewEvent, Page, PolicyRef,
    Position, ReadFrom, RecordedEvent, StreamId, MAX_EVENT_TYPE_LEN, MAX_STREAM_ID_LEN,
};
pub use memory::InMemoryEventStore;
pub use postgres::{PostgresEventStore, PostgresOptions};
pub use prepare::Limits;
pub use subscription::Subscription;

/// How many live events a process keeps for subscribers that are behind;
/// a subscriber further behind than this reads the table instead.
pub const LIVE_BUFFER: usize = 4096;

/// An append-only store of event streams. See the crate docs.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically, all or nothing.
    ///
    /// - `expected` must match the stream's last version, else
    ///   [`StoreError::Conflict`] and nothing is written.
    /// - Resending events whose ids are already stored in this stream with the
    ///   same content returns the original positions with `deduplicated: true`
    ///   and writes nothing, whatever `expected` says; the same id with other
    ///   content is [`StoreError::IdempotencyMismatch`].
    /// - Invalid input ([`Limits`], stream id, event type, non-object payload,
    ///   NUL characters) is [`StoreError::BadInput`], nothing written.
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError>;

    /// Up to `limit` events of `stream` with version ≥ `from_version`, in version order.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Up to `limit` events of `$all` with position ≥ `from_position`, in position order.
    ///
    /// Gap-safe: once an event at position `p` has been read, no event with a
    /// position below `p` can appear later, so a reader resumes from `p + 1`.
    /// Positions are strictly increasing; an aborted append may leave a
    /// position unused.
    async fn read_all(
        &self,
        from_position: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// A page of [`EventStore::read_all`] or [`EventStore::read_stream`]
    /// that also ends with the event that brings its payloads and metadata
    /// to `max_bytes` (one event at least, whatever its size), so that a
    /// reader holds a bounded page however large the events are; `cut`
    /// says that it ended there. What subscriptions catch up with.
    async fn read_page(
        &self,
        from: ReadFrom<'_>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Page, StoreError> {
        let events = match from {
            ReadFrom::All(position) => self.read_all(position, limit).await?,
            ReadFrom::Stream(stream, version) => self.read_stream(stream, version, limit).await?,
        };
        Ok(Page::bounded(events, max_bytes))
    }

    /// Up to `limit` events with `from_position ≤ position ≤ to_position`,
    /// in position order. `to_position` must be a head position read
    /// before ([`EventStore::head_position`]): every event up to it is
    /// visible, so no safety check is needed and stores may read directly.
    async fn read_range(
        &self,
        from_position: Position,
        to_position: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut page = self.read_all(from_position, limit).await?;
        page.retain(|e| e.global_position <= to_position);
        Ok(page)
    }

    /// [`EventStore::read_range`] as verification reads it: payload and
    /// metadata in canonical form.
    async fn read_range_canonical(
        &self,
        from_position: Position,
        to_position: Position,
        limit: usize,
    ) -> Result<Vec<CanonicalEvent>, StoreError> {
        let page = self.read_range(from_position, to_position, limit).await?;
        Ok(page.iter().map(CanonicalEvent::of).collect())
    }

    /// The position of the last event readers can see (0 when there is none):
    /// every event up to it is readable, none below it can still appear.
    async fn head_position(&self) -> Result<Position, StoreError>;

    /// Every event with position ≥ `from_position`, then live; see [`Subscription`].
    fn subscribe_all(&self, from_position: Position) -> Subscription;

    /// Every event of `stream` with version ≥ `from_version`, then live.
    fn subscribe_stream(&self, stream: StreamId, from_version: u64) -> Subscription;

    /// Recomputes `stream`'s hash chain from what is stored and names the
    /// first event that does not match. Reads in pages: memory stays bounded.
    async fn verify_stream(&self, stream: &StreamId) -> Result<Verification, StoreError> {
        const PAGE: usize = 1_000;
        let mut verifier = ChainVerifier::new();
        let mut from = 0;
        loop {
            let page = self.read_stream(stream, from, PAGE).await?;
            page.iter().for_each(|e| verifier.check(e));
            match page.last() {
                Some(last) if page.len() == PAGE => from = last.stream_version + 1,
                _ => return Ok(verifier.finish()),
            }
        }
    }
}

/// Recomputes every stream's hash chain, reading `$all` in pages: memory stays
/// bounded by the number of streams, not events. `progress` is called after
/// every page with (position reached, head position).
pub async fn verify_ledger(
    store: &dyn EventStore,
    progress: impl FnMut(Position, Position),
) -> Result<Verification, StoreError> {
    let head = store.head_position().await?;
    let verifier = scan(
        store,
        head,
        LedgerVerifier::new(),
        LedgerVerifier::check_canonical,
        progress,
    )
    .await?;
    Ok(verifier.finish())
}

/// Hands every event with position ≤ `up_to`, in order, to `each`, in a
/// three-stage pipeline: the database prepares the next page (requested
/// ahead, by position range) while this task decodes the current one and a
/// blocking thread checks the one before. On two cores that kept both busy
/// best (docs/performance.md). Memory: a few pages of 1,000 events.
pub(crate) async fn scan<S: Send + 'static>(
    store: &dyn EventStore,
    up_to: Position,
    state: S,
    each: fn(&mut S, &CanonicalEvent),
    mut progress: impl FnMut(Position, Position),
) -> Result<S, StoreError> {
    const PAGE: u64 = 1_000;
    let (pages, mut received) = tokio::sync::mpsc::channel::<Vec<CanonicalEvent>>(1);
    let worker = tokio::task::spawn_blocking(move || {
        let mut state = state;
        while let Some(page) = received.blocking_recv() {
            page.iter().for_each(|event| each(&mut state, event));
        }
        state
    });
    let ranges = (0..up_to.div_ceil(PAGE)).map(|i| {
        let from = i * PAGE + 1;
        (from, (from + PAGE - 1).min(up_to))
    });
    let mut reads = futures::stream::iter(ranges)
        .map(|(from, to)| async move {
            let page = store.read_range_canonical(from, to, PAGE as usize).await?;
            Ok::<_, StoreError>((to, page))
        })
        .buffered(2);
    while let Some(read) = reads.next().await {
        let (to, page) = read?;
        if pages.send(page).await.is_err() {
            break; // the worker panicked: reported below
        }
        progress(to, up_to);
    }
    drop(pages);
    worker
        .await
        .map_err(|e| StoreError::Unavailable(format!("the verifying thread failed: {e}")))
}

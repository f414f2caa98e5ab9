//! The in-memory store, for the embedded dev mode and fast unit tests.
//! It behaves like the PostgreSQL store, and keeps nothing across restarts
//! unless it writes through to an [`EmbeddedLedger`] (`serve --data-dir`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::append::{decide, now_micros, recorded, written, Existing, Outcome, StreamHead};
use crate::embedded::EmbeddedLedger;
use crate::prepare::{prepare, Limits};
use crate::subscription::{StreamRouter, Subscription};
use crate::{
    AppendResult, EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, StoreError,
    StreamId,
};

/// An event store held in process memory. Cheap to clone: clones share the data.
#[derive(Clone)]
pub struct InMemoryEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    live: broadcast::Sender<Arc<RecordedEvent>>,
    /// Started on the first stream subscription (it needs a runtime).
    router: OnceLock<Arc<StreamRouter>>,
    limits: Limits,
    /// Where appends are written before they become visible, if anywhere.
    journal: Option<Arc<EmbeddedLedger>>,
}

#[derive(Default)]
struct State {
    /// Index `i` holds position `i + 1`.
    events: Vec<Arc<RecordedEvent>>,
    /// Per stream, the indexes of its events in version order.
    streams: HashMap<StreamId, Vec<usize>>,
    ids: HashMap<(StreamId, Uuid), usize>,
}

impl Default for InMemoryEventStore {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl InMemoryEventStore {
    /// An empty store enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self::with(limits, State::default(), None)
    }

    /// A store holding `events` (positions 1, 2, … in order, as read back
    /// from `journal`) that writes every later append to `journal`.
    pub(crate) fn restored(
        limits: Limits,
        events: Vec<RecordedEvent>,
        journal: Arc<EmbeddedLedger>,
    ) -> Self {
        let mut state = State::default();
        for (index, event) in events.into_iter().enumerate() {
            debug_assert_eq!(event.global_position, index as Position + 1);
            state
                .ids
                .insert((event.stream_id.clone(), event.event_id), index);
            state
                .streams
                .entry(event.stream_id.clone())
                .or_default()
                .push(index);
            state.events.push(Arc::new(event));
        }
        Self::with(limits, state, Some(journal))
    }

    fn with(limits: Limits, state: State, journal: Option<Arc<EmbeddedLedger>>) -> Self {
        let (live, _) = broadcast::channel(crate::LIVE_BUFFER);
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                live,
                router: OnceLock::new(),
                limits,
                journal,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated
        // (appends push after every check), so a poisoned lock is still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl EventStore for InMemoryEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let prepared = prepare(stream, events, &self.inner.limits)?;
        let mut state = self.state();
        let existing: Vec<Option<Existing<'_>>> = prepared
            .iter()
            .map(|p| {
                state
                    .ids
                    .get(&(stream.clone(), p.event.event_id))
                    .map(|&i| Existing::Stored(&state.events[i]))
            })
            .collect();
        let head = state
            .streams
            .get(stream)
            .and_then(|indexes| indexes.last())
            .map(|&i| StreamHead {
                version: state.events[i].stream_version,
                hash: state.events[i].hash,
            });
        let next_position = state.events.len() as Position + 1;
        let recorded_at = now_micros();
        let records = match decide(
            stream,
            expected,
            &prepared,
            &existing,
            head,
            next_position,
            recorded_at,
        )? {
            Outcome::AlreadyStored(result) => return Ok(result),
            Outcome::Write(records) => records,
        };
        drop(existing);
        if let Some(journal) = &self.inner.journal {
            // Written before it is visible, under the same lock: the file
            // holds what readers saw, in their order. A failed write leaves
            // nothing behind, here or there.
            journal.write(stream, &prepared, &records, recorded_at)?;
        }
        for (event, record) in prepared.into_iter().zip(&records) {
            let index = state.events.len();
            let event = Arc::new(recorded(stream, event, record, recorded_at));
            state.ids.insert((stream.clone(), event.event_id), index);
            state.streams.entry(stream.clone()).or_default().push(index);
            state.events.push(event.clone());
            // No receiver is not an error: nobody is subscribed.
            let _ = self.inner.live.send(event);
        }
        Ok(written(&records))
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.state();
        let Some(indexes) = state.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let from = usize::try_from(from_version)
            .unwrap_or(usize::MAX)
            .min(indexes.len());
        Ok(indexes[from..]
            .iter()
            .take(limit)
            .map(|&i| state.events[i].as_ref().clone())
            .collect())
    }

    async fn read_all(
        &self,
        from_position: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let state = self.state();
        let from = usize::try_from(from_position.max(1) - 1)
            .unwrap_or(usize::MAX)
            .min(state.events.len());
        Ok(state.events[from..]
            .iter()
            .take(limit)
            .map(|e| e.as_ref().clone())
            .collect())
    }

    async fn head_position(&self) -> Result<Position, StoreError> {
        Ok(self.state().events.len() as Position)
    }

    fn subscribe_all(&self, from_position: Position) -> Subscription {
        Subscription::all(
            Arc::new(self.clone()),
            self.inner.live.subscribe(),
            from_position,
        )
    }

    fn subscribe_stream(&self, stream: StreamId, from_version: u64) -> Subscription {
        Subscription::stream(
            Arc::new(self.clone()),
            self.inner
                .router
                .get_or_init(|| StreamRouter::start(&self.inner.live)),
            stream,
            from_version,
        )
    }
}

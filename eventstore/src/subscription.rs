//! Catch-up-then-live subscriptions, shared by every store.
//!
//! A subscription first reads the store page by page, then follows the
//! store's live feed (one broadcast per process, filled by a single tailer,
//! so a thousand subscribers do not mean a thousand queries per event).
//!
//! **No gap, no duplicate at the seam.** The live receiver is opened before
//! the first catch-up read, so every event committed after that read is in
//! the feed; events the feed repeats are skipped by position (or version).
//! When the feed jumps ahead, or this subscriber fell so far behind that the
//! broadcast overwrote events it had not taken yet, the subscription goes back
//! to reading the table from where it stands. A slow consumer therefore holds
//! at most one page in memory (bounded in events and in bytes) and never
//! slows anyone else.
//!
//! **Stream subscribers wake for their stream only.** A [`StreamRouter`]
//! per store follows the live feed and forwards each event to the channel of
//! its stream, if anyone follows it: a thousand stream subscribers cost one
//! map lookup per event, not a thousand wake-ups.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::{EventStore, Position, ReadFrom, RecordedEvent, StoreError, StreamId};

/// Events read per catch-up query.
pub const CATCH_UP_PAGE: usize = 500;

/// Bytes of payload and metadata per catch-up page (one event at least):
/// what a subscriber that is behind holds at most, beyond one event.
pub const CATCH_UP_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
enum Cursor {
    All { next: Position },
    Stream { stream: StreamId, next: u64 },
}

impl Cursor {
    /// Where `event` stands relative to the cursor: `None` when it belongs to another stream.
    fn compare(&self, event: &RecordedEvent) -> Option<std::cmp::Ordering> {
        match self {
            Self::All { next } => Some(event.global_position.cmp(next)),
            Self::Stream { stream, next } => {
                (event.stream_id == *stream).then(|| event.stream_version.cmp(next))
            }
        }
    }

    fn advance(&mut self, event: &RecordedEvent) {
        match self {
            Self::All { next } => *next = event.global_position + 1,
            Self::Stream { next, .. } => *next = event.stream_version + 1,
        }
    }
}

/// Events a stream channel buffers for a subscriber that is behind.
const STREAM_BUFFER: usize = 256;

/// What a stream channel carries: an event, or word that the router fell
/// behind the live feed and events may be missing (re-read the table).
type Routed = Option<Arc<RecordedEvent>>;

/// Forwards the live feed to per-stream channels; see the module docs.
pub struct StreamRouter {
    streams: Mutex<HashMap<StreamId, broadcast::Sender<Routed>>>,
}

impl StreamRouter {
    /// A router following `live`; its task ends when the feed closes.
    pub fn start(live: &broadcast::Sender<Arc<RecordedEvent>>) -> Arc<Self> {
        let router = Arc::new(Self {
            streams: Mutex::new(HashMap::new()),
        });
        let weak: Weak<Self> = Arc::downgrade(&router);
        let mut feed = live.subscribe();
        tokio::spawn(async move {
            loop {
                let received = feed.recv().await;
                let Some(router) = weak.upgrade() else { return };
                let mut streams = router.streams.lock().expect("router lock");
                match received {
                    Ok(event) => {
                        let gone = streams
                            .get(&event.stream_id)
                            .is_some_and(|tx| tx.send(Some(event.clone())).is_err());
                        if gone {
                            streams.remove(&event.stream_id);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        streams.retain(|_, tx| tx.send(None).is_ok());
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        router
    }

    fn subscribe(&self, stream: &StreamId) -> broadcast::Receiver<Routed> {
        let mut streams = self.streams.lock().expect("router lock");
        if let Some(tx) = streams.get(stream) {
            return tx.subscribe();
        }
        // Channels whose subscribers left without another event coming.
        if streams.len() >= 1_024 && streams.len().is_power_of_two() {
            streams.retain(|_, tx| tx.receiver_count() > 0);
        }
        let (tx, rx) = broadcast::channel(STREAM_BUFFER);
        streams.insert(stream.clone(), tx);
        rx
    }
}

enum Live {
    All(broadcast::Receiver<Arc<RecordedEvent>>),
    Stream(broadcast::Receiver<Routed>),
}

impl Live {
    /// The next live event; `Ok(None)` when events may have been missed.
    async fn recv(&mut self) -> Result<Option<Arc<RecordedEvent>>, RecvError> {
        match self {
            Self::All(rx) => rx.recv().await.map(Some),
            Self::Stream(rx) => rx.recv().await,
        }
    }
}

/// A live feed of recorded events; see the module docs for its guarantees.
pub struct Subscription {
    store: Arc<dyn EventStore>,
    live: Live,
    cursor: Cursor,
    buffer: VecDeque<Arc<RecordedEvent>>,
    catching_up: bool,
    /// Events asked for by the next catch-up read.
    page_limit: usize,
}

impl Subscription {
    /// Every event with position ≥ `from` (positions start at 1), then live.
    pub fn all(
        store: Arc<dyn EventStore>,
        live: broadcast::Receiver<Arc<RecordedEvent>>,
        from: Position,
    ) -> Self {
        Self::new(store, Live::All(live), Cursor::All { next: from.max(1) })
    }

    /// Every event of `stream` with version ≥ `from_version`, then live.
    pub fn stream(
        store: Arc<dyn EventStore>,
        router: &StreamRouter,
        stream: StreamId,
        from_version: u64,
    ) -> Self {
        Self::new(
            store,
            Live::Stream(router.subscribe(&stream)),
            Cursor::Stream {
                stream,
                next: from_version,
            },
        )
    }

    fn new(store: Arc<dyn EventStore>, live: Live, cursor: Cursor) -> Self {
        Self {
            store,
            live,
            cursor,
            buffer: VecDeque::new(),
            catching_up: true,
            page_limit: CATCH_UP_PAGE,
        }
    }

    /// A stream subscription whose caller, after opening it, read the
    /// stream itself up to `next_version` (exclusive): it goes live from
    /// there without reading the same events again. Sound only when the
    /// read began after the subscription was opened (a later commit is then
    /// in the live feed); a jump in the feed still makes it read. No effect
    /// on a subscription to `$all`, whose positions have holes.
    pub fn read_by_caller(&mut self, next_version: u64) {
        if let Cursor::Stream { next, .. } = &mut self.cursor {
            if self.buffer.is_empty() && *next <= next_version {
                *next = next_version;
                self.catching_up = false;
            }
        }
    }

    /// The next event, waiting for one to be committed if need be.
    /// `None` when the store shut down; an error when a catch-up read failed
    /// (calling again retries from the same place).
    pub async fn next(&mut self) -> Option<Result<Arc<RecordedEvent>, StoreError>> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.cursor.advance(&event);
                return Some(Ok(event));
            }
            if self.catching_up {
                let from = match &self.cursor {
                    Cursor::All { next } => ReadFrom::All(*next),
                    Cursor::Stream { stream, next } => ReadFrom::Stream(stream, *next),
                };
                let page = match self
                    .store
                    .read_page(from, self.page_limit, CATCH_UP_BYTES)
                    .await
                {
                    Ok(page) => page,
                    Err(e) => return Some(Err(e)),
                };
                self.catching_up = page.cut || page.events.len() == self.page_limit;
                // After a page cut by bytes, ask for about as many events as
                // fitted (twice, to grow back): the store need not read 500
                // large events to hand over a few.
                self.page_limit = if page.cut {
                    (page.events.len() * 2).clamp(1, CATCH_UP_PAGE)
                } else {
                    CATCH_UP_PAGE
                };
                self.buffer.extend(page.events.into_iter().map(Arc::new));
                continue;
            }
            match self.live.recv().await {
                Ok(None) => self.catching_up = true,
                Ok(Some(event)) => match self.cursor.compare(&event) {
                    None | Some(std::cmp::Ordering::Less) => continue,
                    Some(std::cmp::Ordering::Equal) => self.buffer.push_back(event),
                    // Something between the cursor and this event was not delivered live.
                    Some(std::cmp::Ordering::Greater) => self.catching_up = true,
                },
                Err(RecvError::Lagged(_)) => self.catching_up = true,
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// The subscription as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Result<Arc<RecordedEvent>, StoreError>> + Send {
        futures::stream::unfold(self, |mut sub| async move {
            sub.next().await.map(|item| (item, sub))
        })
    }
}

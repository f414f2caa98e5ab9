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
//! at most one page in memory and never slows anyone else.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::{EventStore, Position, RecordedEvent, StoreError, StreamId};

/// Events read per catch-up query.
pub const CATCH_UP_PAGE: usize = 500;

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

/// A live feed of recorded events; see the module docs for its guarantees.
pub struct Subscription {
    store: Arc<dyn EventStore>,
    live: broadcast::Receiver<Arc<RecordedEvent>>,
    cursor: Cursor,
    buffer: VecDeque<Arc<RecordedEvent>>,
    catching_up: bool,
}

impl Subscription {
    /// Every event with position ≥ `from` (positions start at 1), then live.
    pub fn all(
        store: Arc<dyn EventStore>,
        live: broadcast::Receiver<Arc<RecordedEvent>>,
        from: Position,
    ) -> Self {
        Self::new(store, live, Cursor::All { next: from.max(1) })
    }

    /// Every event of `stream` with version ≥ `from_version`, then live.
    pub fn stream(
        store: Arc<dyn EventStore>,
        live: broadcast::Receiver<Arc<RecordedEvent>>,
        stream: StreamId,
        from_version: u64,
    ) -> Self {
        Self::new(
            store,
            live,
            Cursor::Stream {
                stream,
                next: from_version,
            },
        )
    }

    fn new(
        store: Arc<dyn EventStore>,
        live: broadcast::Receiver<Arc<RecordedEvent>>,
        cursor: Cursor,
    ) -> Self {
        Self {
            store,
            live,
            cursor,
            buffer: VecDeque::new(),
            catching_up: true,
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
                let page = match &self.cursor {
                    Cursor::All { next } => self.store.read_all(*next, CATCH_UP_PAGE).await,
                    Cursor::Stream { stream, next } => {
                        self.store.read_stream(stream, *next, CATCH_UP_PAGE).await
                    }
                };
                let page = match page {
                    Ok(page) => page,
                    Err(e) => return Some(Err(e)),
                };
                self.catching_up = page.len() == CATCH_UP_PAGE;
                self.buffer.extend(page.into_iter().map(Arc::new));
                continue;
            }
            match self.live.recv().await {
                Ok(event) => match self.cursor.compare(&event) {
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

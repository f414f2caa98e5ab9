//! The tailer task: one per process, it reads committed events from the
//! table in position order and broadcasts them to this process's subscribers.
//!
//! Wake-ups: this process's own commits (in-process), `NOTIFY` from any
//! process (a dedicated `LISTEN` connection: a pooled one would lose
//! notifications), and a safety poll. After the listener (re)connects it
//! reads again from its last position, because notifications sent while it
//! was away are lost. The tailer also sends the coalesced `NOTIFY` for this
//! process's commits, after they committed and at most one per interval.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::{broadcast, Notify};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::rows::read_all;
use super::{DatabaseUrl, NOTIFY_CHANNEL};
use crate::{Position, RecordedEvent, StoreError};

const PAGE: usize = 1_000;
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

pub(crate) struct Tailer {
    pub url: DatabaseUrl,
    pub pool: Pool,
    pub live: broadcast::Sender<Arc<RecordedEvent>>,
    /// Signalled by this process's writer after each commit.
    pub committed: Arc<Notify>,
    /// The last position broadcast.
    pub last: Position,
    pub safety_poll: Duration,
    pub notify_interval: Duration,
}

impl Tailer {
    pub async fn run(mut self, stop: CancellationToken) {
        let remote = Arc::new(Notify::new());
        let announce = Arc::new(Notify::new());
        tokio::spawn(announce_commits(
            self.pool.clone(),
            announce.clone(),
            self.notify_interval,
            stop.clone(),
        ));
        let mut listener: Option<Client> = None;
        loop {
            if listener.as_ref().is_none_or(Client::is_closed) {
                listener = match listen(&self.url, remote.clone()).await {
                    Ok(client) => Some(client),
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener could not connect; retrying");
                        None
                    }
                };
            }
            if let Err(e) = self.catch_up().await {
                tracing::warn!(error = %e, "tailer could not read new events; retrying");
            }
            let wait = if listener.is_some() {
                self.safety_poll
            } else {
                RECONNECT_DELAY
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.committed.notified() => announce.notify_one(),
                _ = remote.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn catch_up(&mut self) -> Result<(), StoreError> {
        if self.live.receiver_count() == 0 {
            // Nobody listens (a bench, a process without projections): skip
            // the reads. When a subscriber comes, the tailer reads on from
            // where it stopped; the subscriber skips what it already read.
            return Ok(());
        }
        let client = self.pool.get().await?;
        loop {
            let page = read_all(&client, self.last + 1, PAGE).await?;
            let full = page.len() == PAGE;
            for event in page {
                self.last = event.global_position;
                // No receiver is fine: nobody is subscribed right now.
                let _ = self.live.send(Arc::new(event));
            }
            if !full {
                return Ok(());
            }
        }
    }
}

/// Opens the `LISTEN` connection; each notification signals `remote`.
async fn listen(url: &DatabaseUrl, remote: Arc<Notify>) -> Result<Client, tokio_postgres::Error> {
    let (client, mut connection) = url.connect().await?;
    let notifications = remote.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => notifications.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "event listener connection lost");
                    break;
                }
            }
        }
        // Wake the tailer so that it notices the closed client and reconnects.
        notifications.notify_one();
    });
    client
        .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
        .await?;
    Ok(client)
}

/// Sends `NOTIFY` after local commits, at most once per `interval`.
async fn announce_commits(
    pool: Pool,
    announce: Arc<Notify>,
    interval: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = announce.notified() => {}
        }
        match pool.get().await {
            Ok(client) => {
                if let Err(e) = client
                    .batch_execute(&format!("NOTIFY {NOTIFY_CHANNEL}"))
                    .await
                {
                    tracing::warn!(error = %e, "NOTIFY failed; other processes will find the events by polling");
                }
            }
            Err(e) => tracing::warn!(error = %e, "NOTIFY skipped: no connection"),
        }
        tokio::time::sleep(interval).await;
    }
}

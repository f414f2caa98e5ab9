//! The tailer task: one per process, it reads committed events from the
//! table in position order and broadcasts them to this process's subscribers.
//!
//! Wake-ups: this process's own commits (in-process: a group that follows
//! on from the last position broadcast is passed on as the writer built it,
//! without reading it back), `NOTIFY` from any
//! process (a dedicated `LISTEN` connection: a pooled one would lose
//! notifications), and a safety poll. After the listener (re)connects it
//! reads again from its last position, because notifications sent while it
//! was away are lost. The tailer also sends the coalesced `NOTIFY` for this
//! process's commits, after they committed and at most one per interval,
//! with a payload naming this process, so that its own listener ignores it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::{broadcast, Notify};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;

use super::rows::read_all;
use super::writer::Commits;
use super::{Channels, DatabaseUrl, Notice, Peers, NOTIFY_CHANNEL, PRESENCE_LOCK};
use crate::{Position, RecordedEvent, StoreError};

const PAGE: usize = 1_000;
/// Own events held behind a gap at most; beyond, reads bring them.
const MAX_PENDING: usize = 10_000;
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

pub(crate) struct Tailer {
    pub url: DatabaseUrl,
    /// Other channels the listener serves ([`super::PostgresEventStore::notices`]).
    pub channels: Arc<Channels>,
    pub pool: Pool,
    pub live: broadcast::Sender<Arc<RecordedEvent>>,
    /// This process's commits, from its writer lanes.
    pub committed: Arc<Commits>,
    /// The last position broadcast. Every position up to it is settled
    /// (committed or never to be), and every event up to it was broadcast
    /// (or came before this process started).
    pub last: Position,
    /// This process's committed groups not yet broadcast, by first
    /// position: they wait behind a gap.
    pub pending: BTreeMap<Position, Vec<Arc<RecordedEvent>>>,
    pub safety_poll: Duration,
    pub notify_interval: Duration,
    /// Whether other processes listen, and how often to look.
    pub peers: Peers,
    pub presence_check: Duration,
}

/// Holders of the presence lock in this database, this process included.
const PRESENCE_HOLDERS: &str = "SELECT count(*) FROM pg_locks
     WHERE locktype = 'advisory' AND granted AND objsubid = 1
       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND classid = $1 AND objid = $2";

impl Tailer {
    pub async fn run(mut self, stop: CancellationToken) {
        let remote = Arc::new(Notify::new());
        let announce = Arc::new(Notify::new());
        // Our own announcements carry this id, so that our listener can
        // tell them from other processes' (we know our commits already).
        let origin = uuid::Uuid::new_v4().to_string();
        tokio::spawn(announce_commits(
            self.pool.clone(),
            announce.clone(),
            self.notify_interval,
            origin.clone(),
            self.peers.clone(),
            stop.clone(),
        ));
        let mut listener: Option<Client> = None;
        let mut heard: HashSet<String> = HashSet::new();
        let mut read = true;
        let mut poll_due = tokio::time::Instant::now();
        let mut presence_due = tokio::time::Instant::now() + self.presence_check;
        // What `peers.heard()` was when the last check found no other
        // process: a second such check with nothing heard between them
        // makes this process quiet.
        let mut lonely_since: Option<u64> = None;
        loop {
            if listener.as_ref().is_none_or(Client::is_closed) {
                read = true;
                heard.clear();
                // Until shown otherwise, someone may be listening.
                self.peers.set(true);
                lonely_since = None;
                listener = match listen(
                    &self.url,
                    remote.clone(),
                    origin.clone(),
                    &self.channels,
                    &self.peers,
                )
                .await
                {
                    Ok(client) => Some(client),
                    Err(e) => {
                        tracing::warn!(error = %e, "event listener could not connect; retrying");
                        None
                    }
                };
            }
            if let Some(client) = &listener {
                for channel in self.channels.names() {
                    if heard.contains(&channel) {
                        continue;
                    }
                    // Checked by `notices`: a plain identifier.
                    match client.batch_execute(&format!("LISTEN \"{channel}\"")).await {
                        Ok(()) => {
                            self.channels.send(&channel, Notice::Resync);
                            heard.insert(channel);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, channel, "LISTEN failed; reconnecting");
                            listener = None;
                            break;
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= presence_due {
                presence_due = tokio::time::Instant::now() + self.presence_check;
                if let Some(client) = &listener {
                    match self.look_for_peers(client, &mut lonely_since).await {
                        Ok(()) => {}
                        Err(e) => tracing::warn!(error = %e, "looking for other processes failed"),
                    }
                }
            }
            self.committed.wanted.store(
                self.live.receiver_count() > 0,
                std::sync::atomic::Ordering::Relaxed,
            );
            if read {
                // The safety poll counts from the last read, whatever woke
                // the tailer in between (own commits passed on, looks for
                // peers): it must fire on a busy process too.
                let wait = if listener.is_some() {
                    self.safety_poll
                } else {
                    RECONNECT_DELAY
                };
                poll_due = tokio::time::Instant::now() + wait;
                match self.catch_up().await {
                    Ok(()) => {
                        read = false;
                        // What waited behind a gap the read has now closed.
                        self.pass_on_pending();
                    }
                    // `read` stays set: the next wake-up tries again.
                    Err(e) => {
                        tracing::warn!(error = %e, "tailer could not read new events; retrying")
                    }
                }
            }
            let woke_to_read = tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.committed.wake.notified() => {
                    announce.notify_one();
                    !self.pass_on_own_commits()
                }
                _ = remote.notified() => true,
                _ = self.channels.added.notified() => false,
                _ = tokio::time::sleep_until(presence_due) => false,
                _ = tokio::time::sleep_until(poll_due) => true,
            };
            read |= woke_to_read;
        }
    }

    /// Counts the holders of the presence lock; see [`Peers`].
    async fn look_for_peers(
        &self,
        client: &Client,
        lonely_since: &mut Option<u64>,
    ) -> Result<(), tokio_postgres::Error> {
        let heard_before = self.peers.heard();
        let (high, low) = (
            (PRESENCE_LOCK as u64 >> 32) as u32,
            (PRESENCE_LOCK as u64 & 0xFFFF_FFFF) as u32,
        );
        let holders: i64 = client
            .query_one(PRESENCE_HOLDERS, &[&high, &low])
            .await?
            .get(0);
        if holders > 1 || self.peers.heard() != heard_before {
            self.peers.set(true);
            *lonely_since = None;
        } else if *lonely_since == Some(heard_before) {
            self.peers.set(false);
            // An announcement heard meanwhile wins (it counts before it
            // sets "present", so one of the two sees the other).
            if self.peers.heard() != heard_before {
                self.peers.set(true);
            }
        } else {
            *lonely_since = Some(heard_before);
        }
        Ok(())
    }

    /// Broadcasts this process's committed groups that follow on from
    /// `last` without a read: positions up to `last` are settled, so a
    /// group starting right after it leaves no gap. False when a read is
    /// still needed: a group further on (another process, or another
    /// lane, holds positions between), or a failed group whose positions
    /// may hide another's commit.
    fn pass_on_own_commits(&mut self) -> bool {
        let groups = self.committed.take();
        if self.live.receiver_count() == 0 {
            // As in `catch_up`: nobody to tell, and a later read covers them.
            self.pending.clear();
            return true;
        }
        // A failed group: its positions are settled now, and a commit of
        // another process beyond them may have become visible.
        let failed = groups.iter().any(Vec::is_empty);
        for group in groups.into_iter().filter(|g| !g.is_empty()) {
            self.pending.insert(group[0].global_position, group);
        }
        self.pass_on_pending();
        !failed && self.pending.is_empty()
    }

    /// Broadcasts the held groups that now follow on from `last`, in
    /// order; drops those a read already brought. Groups behind a gap stay
    /// (a read, or the group that fills the gap, lets them go), up to a
    /// bound beyond which reads alone are relied on.
    fn pass_on_pending(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            let group = entry.get();
            let end = group.last().map_or(0, |e| e.global_position);
            if end <= self.last {
                entry.remove(); // a read already brought them
                continue;
            }
            if *entry.key() > self.last + 1 {
                break; // a gap: another process's or lane's positions
            }
            for event in entry.remove() {
                if event.global_position > self.last {
                    self.last = event.global_position;
                    let _ = self.live.send(event);
                }
            }
        }
        if self.pending.values().map(Vec::len).sum::<usize>() > MAX_PENDING {
            self.pending.clear();
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

/// Opens the `LISTEN` connection; each notification of the events' channel
/// from another process (one whose payload is not `origin`) signals
/// `remote`; those of other channels go to their subscribers in `channels`.
async fn listen(
    url: &DatabaseUrl,
    remote: Arc<Notify>,
    origin: String,
    channels: &Arc<Channels>,
    peers: &Peers,
) -> Result<Client, tokio_postgres::Error> {
    let (client, mut connection) = url.connect().await?;
    let notifications = remote.clone();
    let channels = channels.clone();
    let peers = peers.clone();
    // `origin` is a UUID: nothing in it needs quoting.
    let origin_id = origin.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) if n.channel() != NOTIFY_CHANNEL => {
                    channels.send(n.channel(), Notice::Payload(n.payload().to_string()));
                }
                Ok(AsyncMessage::Notification(n)) if n.payload() == origin => {}
                Ok(AsyncMessage::Notification(_)) => {
                    peers.heard_from_one();
                    notifications.notify_one();
                }
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
    // Present first, then listening, then said so: a process that counts
    // the holders after this one's lock sees it, and one that counted
    // before hears the announcement below.
    client
        .execute("SELECT pg_advisory_lock_shared($1)", &[&PRESENCE_LOCK])
        .await?;
    client
        .batch_execute(&format!(
            "LISTEN {NOTIFY_CHANNEL}; NOTIFY {NOTIFY_CHANNEL}, '{origin_id}'"
        ))
        .await?;
    Ok(client)
}

/// Sends `NOTIFY` after local commits, at most once per `interval`, and
/// none while no other process listens.
async fn announce_commits(
    pool: Pool,
    announce: Arc<Notify>,
    interval: Duration,
    origin: String,
    peers: Peers,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = announce.notified() => {}
        }
        if !peers.present() {
            continue;
        }
        match pool.get().await {
            Ok(client) => {
                if let Err(e) = client
                    // `origin` is a UUID: nothing in it needs quoting.
                    .batch_execute(&format!("NOTIFY {NOTIFY_CHANNEL}, '{origin}'"))
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

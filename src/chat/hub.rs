//! Fan-out of reply events to the watchers on this replica.
//!
//! Every response that has watchers here has one broadcast channel. A reply generated here
//! publishes into it directly; a reply generated on another replica reaches it through this
//! replica's one tail task, which reads the reply logs of all such responses from the store in
//! one blocking call and publishes what it finds. A watcher first subscribes, then reads the
//! log's newest events, and drops what it has already seen, so nothing falls between the two.
//!
//! Slow watchers: a broadcast channel keeps the newest `capacity` events; a watcher that falls
//! further behind skips to them (each revision carries the whole reply, and the terminal event
//! is the newest of all, so nothing but in-between states is lost).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use super::events::ReplyEvent;
use crate::sessions::{ReplyLog, SessionStore, TailCursor};

struct Channel {
    tx: broadcast::Sender<ReplyEvent>,
    origin: Origin,
}

enum Origin {
    /// Generated here: the reply task publishes.
    Local,
    /// Generated elsewhere: the tail publishes, reading on from the cursor once it is known.
    Remote(Option<TailCursor>),
}

/// The channels of this replica.
pub(super) struct Hub {
    channels: Mutex<HashMap<String, Channel>>,
    capacity: usize,
    /// Woken when a remote response gains its first watcher.
    remote_added: Notify,
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            capacity: capacity.max(2),
            remote_added: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().expect("hub poisoned")
    }

    /// Opens the channel of a reply generated here.
    pub fn open_local(&self, response_id: &str) {
        let (tx, _) = broadcast::channel(self.capacity);
        self.lock().insert(
            response_id.to_owned(),
            Channel {
                tx,
                origin: Origin::Local,
            },
        );
    }

    /// Publishes an event of a local reply; the terminal event closes its channel.
    pub fn publish(&self, response_id: &str, event: ReplyEvent) {
        let mut channels = self.lock();
        let done = matches!(event, ReplyEvent::Done(_));
        if let Some(c) = channels.get(response_id) {
            let _ = c.tx.send(event);
        }
        if done {
            // Receivers still get what was sent before the sender goes.
            channels.remove(response_id);
        }
    }

    /// Subscribes to a response; `local` tells whether this replica generates it.
    fn subscribe(&self, response_id: &str) -> (broadcast::Receiver<ReplyEvent>, bool) {
        let mut channels = self.lock();
        if let Some(c) = channels.get(response_id) {
            return (c.tx.subscribe(), matches!(c.origin, Origin::Local));
        }
        let (tx, rx) = broadcast::channel(self.capacity);
        // Not tailed until `tail_from` says where the log stands.
        channels.insert(
            response_id.to_owned(),
            Channel {
                tx,
                origin: Origin::Remote(None),
            },
        );
        (rx, false)
    }

    /// Has the tail read a remote response on from `cursor`, unless it already does.
    fn tail_from(&self, session_id: &str, response_id: &str, cursor: &str) {
        let mut channels = self.lock();
        if let Some(c) = channels.get_mut(response_id) {
            if let Origin::Remote(remote @ None) = &mut c.origin {
                *remote = Some(TailCursor {
                    session_id: session_id.to_owned(),
                    response_id: response_id.to_owned(),
                    cursor: cursor.to_owned(),
                });
                self.remote_added.notify_one();
            }
        }
    }

    /// The cursors the tail reads; channels nobody watches any more are dropped.
    fn remote_cursors(&self) -> Vec<TailCursor> {
        let mut channels = self.lock();
        channels.retain(|_, c| matches!(c.origin, Origin::Local) || c.tx.receiver_count() > 0);
        channels
            .values()
            .filter_map(|c| match &c.origin {
                Origin::Remote(cursor) => cursor.clone(),
                Origin::Local => None,
            })
            .collect()
    }

    /// Publishes events the tail read for a remote response and moves its cursor on.
    fn publish_remote(&self, response_id: &str, events: Vec<ReplyEvent>, cursor: String) {
        let mut channels = self.lock();
        let Some(c) = channels.get_mut(response_id) else {
            return;
        };
        let mut done = false;
        for e in events {
            done |= matches!(e, ReplyEvent::Done(_));
            let _ = c.tx.send(e);
        }
        if let Origin::Remote(Some(remote)) = &mut c.origin {
            remote.cursor = cursor;
        }
        if done {
            channels.remove(response_id);
        }
    }

    /// A watch on a reply that `open_local` just opened, before it produced anything.
    pub fn local_watch(&self, response_id: &str, session_id: &str) -> ReplyWatch {
        let (live, _) = self.subscribe(response_id);
        let log = ReplyLog {
            session_id: session_id.to_owned(),
            newest: Vec::new(),
            cursor: String::new(),
        };
        ReplyWatch::new(response_id, &log, live, 0)
    }

    /// A watch on `response_id` from what `log` (read after subscribing) holds, skipping
    /// revisions up to `after_revision`.
    pub async fn watch(
        &self,
        store: &dyn SessionStore,
        response_id: &str,
        after_revision: usize,
    ) -> Result<Option<ReplyWatch>, crate::sessions::StoreError> {
        let (live, local) = self.subscribe(response_id);
        let Some(log) = store.reply_log(response_id).await? else {
            return Ok(None);
        };
        let watch = ReplyWatch::new(response_id, &log, live, after_revision);
        if !local && !watch.done_seen() {
            self.tail_from(&log.session_id, response_id, &log.cursor);
        }
        Ok(Some(watch))
    }
}

/// The events of one response, for one watcher: what the log held when it started watching,
/// then what follows, each revision once and in order, ending with the terminal event.
pub struct ReplyWatch {
    pub response_id: String,
    pub session_id: String,
    queued: VecDeque<ReplyEvent>,
    live: broadcast::Receiver<ReplyEvent>,
    last_revision: usize,
    done: bool,
}

impl ReplyWatch {
    fn new(response_id: &str, log: &ReplyLog, live: broadcast::Receiver<ReplyEvent>, after_revision: usize) -> Self {
        let mut watch = Self {
            response_id: response_id.to_owned(),
            session_id: log.session_id.clone(),
            queued: VecDeque::new(),
            live,
            last_revision: after_revision,
            done: false,
        };
        for logged in &log.newest {
            match serde_json::from_str::<ReplyEvent>(&logged.payload) {
                Ok(event) => watch.admit_into_queue(event),
                Err(e) => tracing::warn!(response = response_id, error = %e, "unreadable reply log entry"),
            }
        }
        watch
    }

    /// The newest revision the log held when watching started, if any.
    pub fn latest(&self) -> Option<&super::events::RevisionEvent> {
        self.queued.iter().rev().find_map(|e| match e {
            ReplyEvent::Revision(r) => Some(r),
            ReplyEvent::Done(_) => None,
        })
    }

    /// Leaves out revisions up to `revision` (the client was just shown it).
    pub fn skip_through(&mut self, revision: usize) {
        self.queued
            .retain(|e| !matches!(e, ReplyEvent::Revision(r) if r.revision <= revision));
        self.last_revision = self.last_revision.max(revision);
    }

    fn done_seen(&self) -> bool {
        self.queued.iter().any(|e| matches!(e, ReplyEvent::Done(_)))
    }

    /// Whether `event` is new to this watcher; records it.
    fn admit(&mut self, event: &ReplyEvent) -> bool {
        match event {
            ReplyEvent::Revision(r) if r.revision > self.last_revision => {
                self.last_revision = r.revision;
                true
            }
            ReplyEvent::Revision(_) => false,
            ReplyEvent::Done(_) => !std::mem::replace(&mut self.done, true),
        }
    }

    fn admit_into_queue(&mut self, event: ReplyEvent) {
        if self.admit(&event) {
            self.queued.push_back(event);
        }
    }

    /// The next event; `None` after the terminal event, or when the reply's events stopped
    /// coming (its channel closed without one).
    pub async fn next(&mut self) -> Option<ReplyEvent> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Some(e);
            }
            if self.done {
                return None;
            }
            match self.live.recv().await {
                Ok(event) => {
                    if self.admit(&event) {
                        return Some(event);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    crate::metrics::revisions_skipped(skipped);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The replica's one reader of remote reply logs: blocks in the store for up to `block` at a
/// time and fans what it reads out to the watchers. Stops on `shutdown`.
pub(super) async fn tail(hub: Arc<Hub>, store: Arc<dyn SessionStore>, block: Duration, shutdown: CancellationToken) {
    let retry = Duration::from_millis(200);
    loop {
        let cursors = hub.remote_cursors();
        if cursors.is_empty() {
            tokio::select! {
                _ = hub.remote_added.notified() => continue,
                // Watchers that left are pruned on the next round.
                _ = tokio::time::sleep(block * 10) => continue,
                _ = shutdown.cancelled() => return,
            }
        }
        let read = tokio::select! {
            read = store.tail(&cursors, block) => read,
            _ = shutdown.cancelled() => return,
        };
        match read {
            Ok(batches) => {
                for batch in batches {
                    let events = batch
                        .events
                        .iter()
                        .filter_map(|e| serde_json::from_str::<ReplyEvent>(&e.payload).ok())
                        .collect();
                    hub.publish_remote(&batch.response_id, events, batch.cursor);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading reply logs failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

//! The in-process session store: the zero-setup default. Sessions are lost when the process
//! exits and are not shared between processes; expiry, leases and reply logs behave as in the
//! Redis store, so one process serving many connections follows the same rules as many replicas.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::Notify;

use super::{
    Appended, Begin, Lease, LeaseState, LoggedEvent, ReplyLog, ReplyStart, Retention, RunningReply, SessionInfo,
    SessionStore, StoreError, StoredMessage, TailBatch, TailCursor,
};

struct Entry {
    info: SessionInfo,
    messages: Vec<StoredMessage>,
    expires_at: Instant,
    /// Bumped on every lease grant: the fencing token.
    fence: u64,
    lease: Option<HeldLease>,
    running: Option<Running>,
}

struct HeldLease {
    token: u64,
    expires_at: Instant,
}

struct Running {
    reply: RunningReply,
    cancel_requested: bool,
}

impl Entry {
    /// Whether `lease` is the live lease of this session.
    fn holds(&self, lease: &Lease, now: Instant) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|l| l.token == lease.token && l.expires_at > now)
    }

    fn lease_state(&self) -> LeaseState {
        match &self.running {
            Some(r) if r.cancel_requested => LeaseState::CancelRequested,
            _ => LeaseState::Held,
        }
    }

    fn append(&mut self, message: StoredMessage) -> Appended {
        if let Some(cid) = &message.client_message_id {
            if let Some(existing) = self.messages.iter().find(|m| m.client_message_id.as_ref() == Some(cid)) {
                return Appended {
                    message: existing.clone(),
                    duplicate: true,
                };
            }
        }
        self.messages.push(message.clone());
        Appended {
            message,
            duplicate: false,
        }
    }
}

struct Log {
    session_id: String,
    events: VecDeque<LoggedEvent>,
    /// Set when the reply ended: the log goes away then.
    expires_at: Option<Instant>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Entry>,
    logs: HashMap<String, Log>,
    /// Alias -> session id.
    aliases: HashMap<String, String>,
    /// Ticket digest -> (owner, expiry).
    tickets: HashMap<String, (String, Instant)>,
    /// Scope -> holder -> when its slot lapses.
    slots: HashMap<String, HashMap<String, Instant>>,
    /// Scope -> the rate's theoretical arrival time (GCRA): allowed while within the burst of now.
    rates: HashMap<String, Instant>,
}

impl State {
    /// The live session `id`, refreshing its expiry; an expired one is removed.
    fn live(&mut self, id: &str, ttl: Duration) -> Result<&mut Entry, StoreError> {
        let now = Instant::now();
        if self.sessions.get(id).is_some_and(|e| e.expires_at <= now) {
            self.sessions.remove(id);
        }
        let entry = self
            .sessions
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        entry.expires_at = now + ttl;
        Ok(entry)
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        self.sessions.retain(|_, e| e.expires_at > now);
        self.logs.retain(|_, l| l.expires_at.is_none_or(|t| t > now));
        let sessions = &self.sessions;
        self.aliases.retain(|_, id| sessions.contains_key(id));
    }

    fn push_event(&mut self, response_id: &str, session_id: &str, event: &LoggedEvent, keep: usize) {
        let log = self.logs.entry(response_id.to_owned()).or_insert_with(|| Log {
            session_id: session_id.to_owned(),
            events: VecDeque::new(),
            expires_at: None,
        });
        log.events.push_back(event.clone());
        while log.events.len() > keep {
            log.events.pop_front();
        }
    }

    /// Ends a reply: message, terminal event, log expiry, no running record, no lease.
    fn end(
        &mut self,
        reply: &RunningReply,
        message: Option<StoredMessage>,
        event: Option<&LoggedEvent>,
        retention: Retention,
    ) {
        if let Ok(entry) = self.live(&reply.session_id, retention.session_ttl) {
            if let Some(message) = message {
                entry.append(message);
            }
            entry.running = None;
            entry.lease = None;
        }
        if let Some(event) = event {
            self.push_event(&reply.response_id, &reply.session_id, event, retention.reply_log_events);
        }
        if let Some(log) = self.logs.get_mut(&reply.response_id) {
            log.expires_at = Some(Instant::now() + retention.reply_log_ttl);
        }
    }
}

/// Sessions in a map. A std `Mutex` is enough: no lock is held across an `.await`.
pub struct MemoryStore {
    state: Mutex<State>,
    retention: Retention,
    /// Woken on every logged event, for tails.
    logged: Notify,
}

impl MemoryStore {
    pub fn new(retention: Retention) -> Self {
        Self {
            state: Mutex::new(State::default()),
            retention,
            logged: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("session map poisoned")
    }

    fn ttl(&self) -> Duration {
        self.retention.session_ttl
    }

    fn new_events(&self, cursors: &[TailCursor]) -> Vec<TailBatch> {
        let state = self.lock();
        cursors
            .iter()
            .filter_map(|c| {
                let after: u64 = c.cursor.parse().unwrap_or(0);
                let log = state.logs.get(&c.response_id)?;
                let events: Vec<LoggedEvent> = log.events.iter().filter(|e| e.seq > after).cloned().collect();
                let last = events.last()?.seq;
                Some(TailBatch {
                    response_id: c.response_id.clone(),
                    events,
                    cursor: last.to_string(),
                })
            })
            .collect()
    }
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn create(&self, owner: &str, metadata: serde_json::Value) -> Result<SessionInfo, StoreError> {
        let info = SessionInfo {
            id: format!("sess_{}", uuid::Uuid::new_v4().simple()),
            owner: owner.to_owned(),
            created_at: Utc::now(),
            metadata,
        };
        let mut state = self.lock();
        state.sweep();
        state.sessions.insert(
            info.id.clone(),
            Entry {
                info: info.clone(),
                messages: Vec::new(),
                expires_at: Instant::now() + self.ttl(),
                fence: 0,
                lease: None,
                running: None,
            },
        );
        Ok(info)
    }

    async fn get(&self, id: &str) -> Result<SessionInfo, StoreError> {
        Ok(self.lock().live(id, self.ttl())?.info.clone())
    }

    async fn messages(&self, id: &str) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(self.lock().live(id, self.ttl())?.messages.clone())
    }

    async fn put_ticket(&self, digest: &str, owner: &str, ttl: Duration) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        state.tickets.retain(|_, (_, expires)| *expires > now);
        state.tickets.insert(digest.to_owned(), (owner.to_owned(), now + ttl));
        Ok(())
    }

    async fn take_ticket(&self, digest: &str) -> Result<Option<String>, StoreError> {
        let taken = self.lock().tickets.remove(digest);
        Ok(taken
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(owner, _)| owner))
    }

    async fn take_slot(&self, scope: &str, holder: &str, max: usize, ttl: Duration) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut state = self.lock();
        let held = state.slots.entry(scope.to_owned()).or_default();
        held.retain(|_, lapses| *lapses > now);
        if !held.contains_key(holder) && held.len() >= max {
            return Ok(false);
        }
        held.insert(holder.to_owned(), now + ttl);
        Ok(true)
    }

    async fn renew_slots(&self, slots: &[(String, String)], ttl: Duration) -> Result<(), StoreError> {
        let lapses = Instant::now() + ttl;
        let mut state = self.lock();
        for (scope, holder) in slots {
            state
                .slots
                .entry(scope.clone())
                .or_default()
                .insert(holder.clone(), lapses);
        }
        Ok(())
    }

    async fn release_slot(&self, scope: &str, holder: &str) -> Result<(), StoreError> {
        let mut state = self.lock();
        if let Some(held) = state.slots.get_mut(scope) {
            held.remove(holder);
            if held.is_empty() {
                state.slots.remove(scope);
            }
        }
        Ok(())
    }

    async fn take_rate(&self, scope: &str, per_minute: u32, burst: u32) -> Result<Option<Duration>, StoreError> {
        let now = Instant::now();
        let interval = Duration::from_secs(60) / per_minute.max(1);
        let tolerance = interval * burst.max(1).saturating_sub(1);
        let mut state = self.lock();
        state.rates.retain(|_, tat| *tat > now);
        let tat = state.rates.get(scope).copied().unwrap_or(now).max(now);
        if tat > now + tolerance {
            return Ok(Some(tat - tolerance - now));
        }
        state.rates.insert(scope.to_owned(), tat + interval);
        Ok(None)
    }

    async fn set_metadata(&self, id: &str, metadata: serde_json::Value) -> Result<(), StoreError> {
        self.lock().live(id, self.ttl())?.info.metadata = metadata;
        Ok(())
    }

    async fn append(&self, id: &str, message: StoredMessage) -> Result<Appended, StoreError> {
        Ok(self.lock().live(id, self.ttl())?.append(message))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn aliased(&self, alias: &str, owner: &str, metadata: serde_json::Value) -> Result<SessionInfo, StoreError> {
        let known = self.lock().aliases.get(alias).cloned();
        if let Some(id) = known {
            match self.get(&id).await {
                Err(StoreError::NotFound(_)) => {}
                other => return other,
            }
        }
        let info = self.create(owner, metadata).await?;
        self.lock().aliases.insert(alias.to_owned(), info.id.clone());
        Ok(info)
    }

    async fn begin_reply(
        &self,
        session_id: &str,
        message: StoredMessage,
        start: &ReplyStart,
    ) -> Result<Begin, StoreError> {
        let mut state = self.lock();
        let entry = state.live(session_id, self.ttl())?;
        let now = Instant::now();
        let leased = entry.lease.as_ref().is_some_and(|l| l.expires_at > now);
        if leased || entry.running.is_some() {
            return Ok(Begin::Busy);
        }
        let appended = entry.append(message);
        entry.fence += 1;
        let token = entry.fence;
        entry.lease = Some(HeldLease {
            token,
            expires_at: now + Duration::from_millis(start.lease_ms),
        });
        entry.running = Some(Running {
            reply: RunningReply {
                session_id: session_id.to_owned(),
                response_id: start.response_id.clone(),
                message_id: appended.message.id.clone(),
                token,
                replica: start.replica.clone(),
                started_at: Utc::now(),
            },
            cancel_requested: false,
        });
        let lease = Lease {
            session_id: session_id.to_owned(),
            response_id: start.response_id.clone(),
            token,
        };
        state.logs.insert(
            start.response_id.clone(),
            Log {
                session_id: session_id.to_owned(),
                events: VecDeque::new(),
                expires_at: None,
            },
        );
        Ok(Begin::Started { appended, lease })
    }

    async fn renew_lease(&self, lease: &Lease, lease_ms: u64) -> Result<LeaseState, StoreError> {
        let mut state = self.lock();
        let now = Instant::now();
        let Ok(entry) = state.live(&lease.session_id, self.ttl()) else {
            return Ok(LeaseState::Lost);
        };
        if !entry.holds(lease, now) {
            return Ok(LeaseState::Lost);
        }
        if let Some(l) = entry.lease.as_mut() {
            l.expires_at = now + Duration::from_millis(lease_ms);
        }
        Ok(entry.lease_state())
    }

    async fn log_event(&self, lease: &Lease, event: &LoggedEvent) -> Result<LeaseState, StoreError> {
        let outcome = {
            let mut state = self.lock();
            let held = match state.live(&lease.session_id, self.ttl()) {
                Ok(entry) if entry.holds(lease, Instant::now()) => Some(entry.lease_state()),
                _ => None,
            };
            match held {
                Some(s) => {
                    state.push_event(
                        &lease.response_id,
                        &lease.session_id,
                        event,
                        self.retention.reply_log_events,
                    );
                    s
                }
                None => LeaseState::Lost,
            }
        };
        self.logged.notify_waiters();
        Ok(outcome)
    }

    async fn finish_reply(
        &self,
        lease: &Lease,
        message: Option<StoredMessage>,
        event: Option<&LoggedEvent>,
    ) -> Result<LeaseState, StoreError> {
        {
            let mut state = self.lock();
            let reply = match state.live(&lease.session_id, self.ttl()) {
                Ok(entry) if entry.holds(lease, Instant::now()) => entry.running.as_ref().map(|r| r.reply.clone()),
                _ => None,
            };
            let Some(reply) = reply else {
                return Ok(LeaseState::Lost);
            };
            state.end(&reply, message, event, self.retention);
        }
        self.logged.notify_waiters();
        Ok(LeaseState::Held)
    }

    async fn running_reply(&self, session_id: &str) -> Result<Option<RunningReply>, StoreError> {
        Ok(self
            .lock()
            .live(session_id, self.ttl())?
            .running
            .as_ref()
            .map(|r| r.reply.clone()))
    }

    async fn request_cancel(&self, session_id: &str, response_id: &str) -> Result<bool, StoreError> {
        let mut state = self.lock();
        let entry = state.live(session_id, self.ttl())?;
        match entry.running.as_mut() {
            Some(r) if r.reply.response_id == response_id => {
                r.cancel_requested = true;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn reply_log(&self, response_id: &str) -> Result<Option<ReplyLog>, StoreError> {
        let mut state = self.lock();
        state.sweep();
        Ok(state.logs.get(response_id).map(|log| {
            let skip = log.events.len().saturating_sub(2);
            let newest: Vec<LoggedEvent> = log.events.iter().skip(skip).cloned().collect();
            ReplyLog {
                session_id: log.session_id.clone(),
                cursor: newest.last().map_or(0, |e| e.seq).to_string(),
                newest,
            }
        }))
    }

    async fn tail(&self, cursors: &[TailCursor], block: Duration) -> Result<Vec<TailBatch>, StoreError> {
        let deadline = tokio::time::Instant::now() + block;
        loop {
            // Registered before the check, so an event logged in between still wakes us.
            let woken = self.logged.notified();
            let batches = self.new_events(cursors);
            if !batches.is_empty() {
                return Ok(batches);
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn expired_replies(&self, limit: usize) -> Result<Vec<RunningReply>, StoreError> {
        let now = Instant::now();
        Ok(self
            .lock()
            .sessions
            .values()
            .filter(|e| e.lease.as_ref().is_none_or(|l| l.expires_at <= now))
            .filter_map(|e| e.running.as_ref().map(|r| r.reply.clone()))
            .take(limit)
            .collect())
    }

    async fn recover_reply(
        &self,
        reply: &RunningReply,
        message: StoredMessage,
        event: &LoggedEvent,
    ) -> Result<bool, StoreError> {
        {
            let mut state = self.lock();
            let now = Instant::now();
            let Some(entry) = state.sessions.get(&reply.session_id) else {
                return Ok(false);
            };
            let expired = entry.lease.as_ref().is_none_or(|l| l.expires_at <= now);
            let same = entry.running.as_ref().is_some_and(|r| r.reply.token == reply.token);
            if !(expired && same) {
                return Ok(false);
            }
            state.end(reply, Some(message), Some(event), self.retention);
        }
        self.logged.notify_waiters();
        Ok(true)
    }
}

//! The Redis session store: what lets any replica serve any session.
//!
//! Key schema (`{p}` is `store.key_prefix`; the session id sits in a hash tag so one session's
//! keys share a cluster slot):
//!
//! | key | type | holds |
//! | --- | --- | --- |
//! | `{p}:{<session_id>}:info` | hash | `owner`, `created_at` (RFC 3339), `metadata` (JSON) |
//! | `{p}:{<session_id>}:messages` | list | one JSON message per entry, oldest first |
//! | `{p}:{<session_id>}:client_ids` | hash | `client_message_id` -> the stored message JSON |
//! | `{p}:{<session_id>}:fence` | string | the fencing counter, bumped on every lease grant |
//! | `{p}:{<session_id>}:lease` | string | the live lease's token; expires after `chat.lease_ms` unless renewed |
//! | `{p}:{<session_id>}:running` | hash | the running reply: `response_id`, `message_id`, `token`, `replica`, `started_at`, `cancel` |
//! | `{p}:{<session_id>}:log:<response_id>` | stream | the reply's newest events (`seq`, `e` = JSON), capped at `store.reply_log_events`, kept `store.reply_log_ttl_secs` after the reply |
//! | `{p}:response:<response_id>` | string | the session of a response, as long as its log |
//! | `{p}:leases` | sorted set | sessions with a running reply, scored by lease deadline (ms since the epoch) |
//! | `{p}:alias:<alias>` | string | the session an outside conversation id names (the Chatwoot bot's), with the session TTL |
//! | `{p}:slots:<scope>` | sorted set | the connection slots a key or client address holds on every replica (`<replica>:<n>`), scored by when each lapses (ms, Redis clock) unless renewed |
//! | `{p}:rate:<scope>` | string | a shared rate's theoretical arrival time (GCRA, ms, Redis clock), expiring when it is past |
//! | `{p}:stats` | stream | the timing feed's records of every replica (`r` = JSON), about the newest [`STATS_KEPT`], expiring an hour after the last |
//!
//! The session keys carry the session TTL, refreshed on every read and append. Every write that
//! must be atomic is one Lua script: an append (existence, idempotency, write), the start of a
//! reply (no running reply, append, lease grant), and every write of a reply, which first checks
//! that the caller's fencing token is still the live lease's. The scripts touch `{p}:leases` and
//! `{p}:response:*` beside one session's keys, so they need a single Redis (not a cluster).
//!
//! Blocking reads of reply logs (`XREAD BLOCK`) use a connection of their own: on the shared
//! multiplexed connection they would stall every other command; the timing feed's blocking
//! reads have a third connection, so a quiet feed never delays a reply's tail.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, Script};

use super::commands::CommandConnection;
use super::{
    Appended, Begin, Lease, LeaseState, LoggedEvent, ReplyLog, ReplyStart, Retention, RunningReply, SessionInfo,
    SessionStore, StatsBatch, StoreError, StoredMessage, TailBatch, TailCursor,
};

/// Timing-feed records kept in `{p}:stats` (approximately: `XADD MAXLEN ~`).
pub const STATS_KEPT: usize = 1000;

/// KEYS[1] the slots; ARGV: holder, max, ttl ms. Frees lapsed slots, then takes one if any is
/// free. The Redis clock, so replicas with skewed clocks agree.
const TAKE_SLOT_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"#;

/// KEYS: the slots, one per holder; ARGV: ttl ms, then the holders. A live holder whose slot
/// lapsed holds it again: the connection it stands for is still open.
const RENEW_SLOTS_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"#;

/// KEYS[1] the rate; ARGV: ms between events, burst. Generic cell rate algorithm: 0 when the
/// event is allowed (and counted), else the ms until one would be.
const TAKE_RATE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = interval * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return math.ceil(tat - tolerance - now)
end
local next = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', next), 'PX', math.ceil(next - now))
return 0
"#;

const APPEND_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local ttl = tonumber(ARGV[3])
if ARGV[2] ~= '' then
  local existing = redis.call('HGET', KEYS[3], ARGV[2])
  if existing then
    for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
    return {'duplicate', existing}
  end
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
end
redis.call('RPUSH', KEYS[2], ARGV[1])
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
return {'ok'}
"#;

/// KEYS: info. ARGV: metadata (JSON), session ttl (s). Only an existing session is written, so
/// an update racing the session's expiry cannot bring back a header without its messages.
const SET_METADATA_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'metadata', ARGV[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"#;

/// KEYS: info, messages, client_ids, lease, fence, running, response, leases.
/// ARGV: message, client_message_id, session ttl (s), lease (ms), response_id, replica,
/// started_at, message_id, now (ms), session_id.
const BEGIN_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if redis.call('EXISTS', KEYS[4]) == 1 or redis.call('EXISTS', KEYS[6]) == 1 then return {'busy'} end
local ttl = tonumber(ARGV[3])
local stored = ARGV[1]
local message_id = ARGV[8]
local duplicate = '0'
local existing = false
if ARGV[2] ~= '' then existing = redis.call('HGET', KEYS[3], ARGV[2]) end
if existing then
  stored = existing
  duplicate = '1'
  message_id = cjson.decode(existing)['id']
else
  if ARGV[2] ~= '' then redis.call('HSET', KEYS[3], ARGV[2], ARGV[1]) end
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
local token = redis.call('INCR', KEYS[5])
redis.call('SET', KEYS[4], token, 'PX', ARGV[4])
redis.call('HSET', KEYS[6], 'response_id', ARGV[5], 'message_id', message_id, 'token', token,
  'replica', ARGV[6], 'started_at', ARGV[7], 'cancel', '0')
redis.call('ZADD', KEYS[8], tonumber(ARGV[9]) + tonumber(ARGV[4]), ARGV[10])
redis.call('SET', KEYS[7], ARGV[10], 'EX', ttl)
for i = 1, 6 do if i ~= 4 then redis.call('EXPIRE', KEYS[i], ttl) end end
return {'ok', tostring(token), duplicate, stored}
"#;

/// KEYS: lease, running, leases. ARGV: token, lease (ms), now (ms), session_id.
const RENEW_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[3], tonumber(ARGV[3]) + tonumber(ARGV[2]), ARGV[4])
if redis.call('HGET', KEYS[2], 'cancel') == '1' then return 2 end
return 1
"#;

/// KEYS: lease, running, log. ARGV: token, seq, event, log cap, log ttl while running (ms).
const LOG_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[3], 'MAXLEN', ARGV[4], '*', 'seq', ARGV[2], 'e', ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
if redis.call('HGET', KEYS[2], 'cancel') == '1' then return 2 end
return 1
"#;

/// The end of a reply, after the caller's check: KEYS: lease, running, messages, log, info,
/// client_ids, response, leases. ARGV: (check arg), message or '', seq, event or '', log cap, log ttl
/// (ms), session ttl (s), session_id.
const END_REPLY: &str = r#"
if ARGV[2] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then redis.call('RPUSH', KEYS[3], ARGV[2]) end
if ARGV[4] ~= '' then redis.call('XADD', KEYS[4], 'MAXLEN', ARGV[5], '*', 'seq', ARGV[3], 'e', ARGV[4]) end
redis.call('PEXPIRE', KEYS[4], ARGV[6])
redis.call('PEXPIRE', KEYS[7], ARGV[6])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[8], ARGV[8])
for _, k in ipairs({KEYS[3], KEYS[5], KEYS[6]}) do redis.call('EXPIRE', k, ARGV[7]) end
return 1
"#;

/// Finishing needs the caller's token to be the live lease (ARGV[1]).
const FINISH_CHECK: &str = "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end";

/// Recovering needs the lease gone and the running reply to be the one the caller saw (ARGV[1]).
const RECOVER_CHECK: &str =
    "if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HGET', KEYS[2], 'token') ~= ARGV[1] then return 0 end";

/// KEYS: running. ARGV: response_id.
const CANCEL_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], 'response_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'cancel', '1')
return 1
"#;

/// The longest wait between two reconnect attempts: Redis back from a restart is found within
/// about this long.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(500);
/// Reconnect attempts in one go.
const RECONNECT_RETRIES: usize = 4;

/// Sessions in Redis through an auto-reconnecting connection. A command that fails while Redis
/// is away still errors (as `Unavailable`); the next one uses the restored connection.
pub struct RedisStore {
    conn: CommandConnection,
    /// For blocking log reads only; reopened after an error.
    tail_conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// For the timing feed's blocking reads only; reopened after an error.
    stats_conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    client: redis::Client,
    connect_timeout: Duration,
    command_timeout: Duration,
    prefix: String,
    ttl_secs: i64,
    retention: Retention,
    append: Script,
    begin: Script,
    renew: Script,
    log: Script,
    finish: Script,
    recover: Script,
    cancel: Script,
    set_metadata: Script,
    take_slot: Script,
    renew_slots: Script,
    take_rate: Script,
}

impl RedisStore {
    /// Connects, failing with `Unavailable` when Redis does not answer within `connect_timeout`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        retention: Retention,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let unavailable = |e: String| StoreError::Unavailable(format!("{url}: {e}"));
        let client = redis::Client::open(url).map_err(|e| unavailable(e.to_string()))?;
        // Reconnects wait 1 s, then double, capped at RECONNECT_MAX_DELAY, RECONNECT_RETRIES
        // times; the next command after that starts over. (The crate's defaults wait up to
        // minutes.) Commands meanwhile fail after `command_timeout` (`within`).
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(command_timeout)
            .set_factor(2)
            .set_max_delay(RECONNECT_MAX_DELAY.as_millis() as u64)
            .set_number_of_retries(RECONNECT_RETRIES);
        let conn = CommandConnection::connect(client.clone(), config, connect_timeout, command_timeout)
            .await
            .map_err(|e| match e.is_timeout() {
                true => unavailable(format!("no answer within {connect_timeout:?}")),
                false => unavailable(e.to_string()),
            })?;
        Ok(Self {
            conn,
            tail_conn: tokio::sync::Mutex::new(None),
            stats_conn: tokio::sync::Mutex::new(None),
            client,
            connect_timeout,
            command_timeout,
            prefix: prefix.to_owned(),
            ttl_secs: retention.session_ttl.as_secs() as i64,
            retention,
            append: Script::new(APPEND_SCRIPT),
            begin: Script::new(BEGIN_SCRIPT),
            renew: Script::new(RENEW_SCRIPT),
            log: Script::new(LOG_SCRIPT),
            finish: Script::new(&format!("{FINISH_CHECK}\n{END_REPLY}")),
            recover: Script::new(&format!("{RECOVER_CHECK}\n{END_REPLY}")),
            cancel: Script::new(CANCEL_SCRIPT),
            set_metadata: Script::new(SET_METADATA_SCRIPT),
            take_slot: Script::new(TAKE_SLOT_SCRIPT),
            renew_slots: Script::new(RENEW_SLOTS_SCRIPT),
            take_rate: Script::new(TAKE_RATE_SCRIPT),
        })
    }

    fn keys(&self, id: &str) -> [String; 3] {
        [
            self.key(id, "info"),
            self.key(id, "messages"),
            self.key(id, "client_ids"),
        ]
    }

    fn key(&self, id: &str, name: &str) -> String {
        format!("{}:{{{id}}}:{name}", self.prefix)
    }

    fn log_key(&self, session_id: &str, response_id: &str) -> String {
        self.key(session_id, &format!("log:{response_id}"))
    }

    fn response_key(&self, response_id: &str) -> String {
        format!("{}:response:{response_id}", self.prefix)
    }

    fn leases_key(&self) -> String {
        format!("{}:leases", self.prefix)
    }

    fn slots_key(&self, scope: &str) -> String {
        format!("{}:slots:{scope}", self.prefix)
    }

    fn stats_key(&self) -> String {
        format!("{}:stats", self.prefix)
    }

    fn log_ttl_ms(&self) -> u64 {
        self.retention.reply_log_ttl.as_millis() as u64
    }

    /// Runs the finish or recover script, which share their keys and arguments.
    async fn end_reply(
        &self,
        script: &Script,
        session_id: &str,
        response_id: &str,
        token: u64,
        message: Option<&StoredMessage>,
        event: Option<&LoggedEvent>,
    ) -> Result<bool, StoreError> {
        let message = match message {
            Some(m) => serde_json::to_string(m).map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => String::new(),
        };
        let [info, messages, client_ids] = self.keys(session_id);
        let done: i64 = self
            .within(
                script
                    .key(self.key(session_id, "lease"))
                    .key(self.key(session_id, "running"))
                    .key(messages)
                    .key(self.log_key(session_id, response_id))
                    .key(info)
                    .key(client_ids)
                    .key(self.response_key(response_id))
                    .key(self.leases_key())
                    .arg(token)
                    .arg(message)
                    .arg(event.map_or(0, |e| e.seq))
                    .arg(event.map_or("", |e| e.payload.as_str()))
                    .arg(self.retention.reply_log_events)
                    .arg(self.log_ttl_ms())
                    .arg(self.ttl_secs)
                    .arg(session_id)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        Ok(done == 1)
    }

    /// Bounds one command by `store.command_timeout_ms`: a paused or unreachable Redis (the
    /// connection manager waiting out its reconnect backoff) fails the request in time instead
    /// of holding it.
    async fn within<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.command_timeout, command).await {
            Ok(result) => Ok(result?),
            Err(_) => {
                // Lost requests or replies leave the connection out of step: use a new one.
                self.conn.mark_stale();
                Err(StoreError::Unavailable(format!(
                    "no answer within {} ms",
                    self.command_timeout.as_millis()
                )))
            }
        }
    }

    /// The connection for blocking reads, opened on first use.
    async fn tail_connection(&self, block: Duration) -> Result<MultiplexedConnection, StoreError> {
        self.blocking_connection(&self.tail_conn, block).await
    }

    async fn blocking_connection(
        &self,
        slot: &tokio::sync::Mutex<Option<MultiplexedConnection>>,
        block: Duration,
    ) -> Result<MultiplexedConnection, StoreError> {
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(block + self.command_timeout);
        let conn = self
            .within(self.client.get_multiplexed_async_connection_with_config(&config))
            .await?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn touch(&self, id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for k in self.keys(id) {
            pipe.expire(k, self.ttl_secs).ignore();
        }
        pipe.expire(self.key(id, "fence"), self.ttl_secs).ignore();
        self.within(pipe.query_async::<()>(&mut self.conn.clone())).await?;
        Ok(())
    }
}

fn parse_message(json: &str) -> Result<StoredMessage, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("message: {e}")))
}

fn lease_state(code: i64) -> LeaseState {
    match code {
        1 => LeaseState::Held,
        2 => LeaseState::CancelRequested,
        _ => LeaseState::Lost,
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn parse_event(entry: &StreamId) -> Result<LoggedEvent, StoreError> {
    let seq: Option<u64> = entry.get("seq");
    let payload: Option<String> = entry.get("e");
    match (seq, payload) {
        (Some(seq), Some(payload)) => Ok(LoggedEvent { seq, payload }),
        _ => Err(StoreError::Corrupt(format!(
            "reply log entry {} lacks seq or e",
            entry.id
        ))),
    }
}

fn parse_running(
    session_id: &str,
    fields: &std::collections::HashMap<String, String>,
) -> Result<RunningReply, StoreError> {
    let field = |name: &str| {
        fields
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::Corrupt(format!("running reply of {session_id} lacks {name}")))
    };
    Ok(RunningReply {
        session_id: session_id.to_owned(),
        response_id: field("response_id")?,
        message_id: field("message_id")?,
        token: field("token")?
            .parse()
            .map_err(|e| StoreError::Corrupt(format!("running token: {e}")))?,
        replica: field("replica")?,
        started_at: DateTime::parse_from_rfc3339(&field("started_at")?)
            .map_err(|e| StoreError::Corrupt(format!("running started_at: {e}")))?
            .with_timezone(&Utc),
    })
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn create(&self, owner: &str, metadata: serde_json::Value) -> Result<SessionInfo, StoreError> {
        let info = SessionInfo {
            id: format!("sess_{}", uuid::Uuid::new_v4().simple()),
            owner: owner.to_owned(),
            created_at: Utc::now(),
            metadata,
        };
        let [info_key, ..] = self.keys(&info.id);
        self.within(
            redis::pipe()
                .atomic()
                .hset_multiple(
                    &info_key,
                    &[
                        ("owner", info.owner.clone()),
                        ("created_at", info.created_at.to_rfc3339()),
                        ("metadata", info.metadata.to_string()),
                    ],
                )
                .ignore()
                .expire(&info_key, self.ttl_secs)
                .ignore()
                .query_async::<()>(&mut self.conn.clone()),
        )
        .await?;
        Ok(info)
    }

    async fn get(&self, id: &str) -> Result<SessionInfo, StoreError> {
        let [info_key, ..] = self.keys(id);
        let (owner, created_at, metadata): (Option<String>, Option<String>, Option<String>) = self
            .within(self.conn.clone().hget(&info_key, &["owner", "created_at", "metadata"]))
            .await?;
        let (Some(owner), Some(created_at), Some(metadata)) = (owner, created_at, metadata) else {
            return Err(StoreError::NotFound(id.to_owned()));
        };
        self.touch(id).await?;
        Ok(SessionInfo {
            id: id.to_owned(),
            owner,
            created_at: DateTime::parse_from_rfc3339(&created_at)
                .map_err(|e| StoreError::Corrupt(format!("created_at: {e}")))?
                .with_timezone(&Utc),
            metadata: serde_json::from_str(&metadata).map_err(|e| StoreError::Corrupt(format!("metadata: {e}")))?,
        })
    }

    async fn messages(&self, id: &str) -> Result<Vec<StoredMessage>, StoreError> {
        let [info_key, messages_key, _] = self.keys(id);
        let (exists, raw): (bool, Vec<String>) = self
            .within(
                redis::pipe()
                    .exists(&info_key)
                    .lrange(&messages_key, 0, -1)
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        if !exists {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        self.touch(id).await?;
        raw.iter().map(|m| parse_message(m)).collect()
    }

    async fn put_ticket(&self, digest: &str, owner: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = format!("{}:ticket:{digest}", self.prefix);
        let options = redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(ttl.as_millis().max(1) as u64));
        self.within(self.conn.clone().set_options::<_, _, ()>(&key, owner, options))
            .await?;
        Ok(())
    }

    async fn take_ticket(&self, digest: &str) -> Result<Option<String>, StoreError> {
        let key = format!("{}:ticket:{digest}", self.prefix);
        // GETDEL: of two upgrades with one ticket, exactly one gets the owner.
        Ok(self.within(self.conn.clone().get_del(&key)).await?)
    }

    async fn take_slot(&self, scope: &str, holder: &str, max: usize, ttl: Duration) -> Result<bool, StoreError> {
        let taken: i64 = self
            .within(
                self.take_slot
                    .key(self.slots_key(scope))
                    .arg(holder)
                    .arg(max)
                    .arg(ttl.as_millis().max(1) as u64)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        Ok(taken == 1)
    }

    async fn renew_slots(&self, slots: &[(String, String)], ttl: Duration) -> Result<(), StoreError> {
        if slots.is_empty() {
            return Ok(());
        }
        let mut invocation = self.renew_slots.prepare_invoke();
        invocation.arg(ttl.as_millis().max(1) as u64);
        for (scope, holder) in slots {
            invocation.key(self.slots_key(scope)).arg(holder);
        }
        let _: i64 = self.within(invocation.invoke_async(&mut self.conn.clone())).await?;
        Ok(())
    }

    async fn release_slot(&self, scope: &str, holder: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .within(self.conn.clone().zrem(self.slots_key(scope), holder))
            .await?;
        Ok(())
    }

    async fn take_rate(&self, scope: &str, per_minute: u32, burst: u32) -> Result<Option<Duration>, StoreError> {
        let wait_ms: u64 = self
            .within(
                self.take_rate
                    .key(format!("{}:rate:{scope}", self.prefix))
                    .arg(60_000.0 / f64::from(per_minute.max(1)))
                    .arg(burst.max(1))
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
    }

    async fn set_metadata(&self, id: &str, metadata: serde_json::Value) -> Result<(), StoreError> {
        let [info_key, ..] = self.keys(id);
        let written: i64 = self
            .within(
                self.set_metadata
                    .key(&info_key)
                    .arg(metadata.to_string())
                    .arg(self.ttl_secs)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        if written == 0 {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        self.touch(id).await
    }

    async fn append(&self, id: &str, message: StoredMessage) -> Result<Appended, StoreError> {
        let json = serde_json::to_string(&message).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let keys = self.keys(id);
        let reply: Vec<String> = self
            .within(
                self.append
                    .key(&keys[0])
                    .key(&keys[1])
                    .key(&keys[2])
                    .arg(&json)
                    .arg(message.client_message_id.as_deref().unwrap_or(""))
                    .arg(self.ttl_secs)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Appended {
                message,
                duplicate: false,
            }),
            Some("duplicate") => {
                let existing = reply
                    .get(1)
                    .ok_or_else(|| StoreError::Corrupt("duplicate without message".into()))?;
                Ok(Appended {
                    message: parse_message(existing)?,
                    duplicate: true,
                })
            }
            Some("missing") => Err(StoreError::NotFound(id.to_owned())),
            other => Err(StoreError::Corrupt(format!("unexpected append reply {other:?}"))),
        }
    }

    async fn aliased(&self, alias: &str, owner: &str, metadata: serde_json::Value) -> Result<SessionInfo, StoreError> {
        let key = format!("{}:alias:{alias}", self.prefix);
        let mut conn = self.conn.clone();
        for _ in 0..2 {
            let known: Option<String> = self.within(conn.get(&key)).await?;
            if let Some(id) = known {
                match self.get(&id).await {
                    Ok(info) => {
                        let _: () = self.within(conn.expire(&key, self.ttl_secs)).await?;
                        return Ok(info);
                    }
                    Err(StoreError::NotFound(_)) => {
                        let _: () = self.within(conn.del(&key)).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            let info = self.create(owner, metadata.clone()).await?;
            let set: bool = self
                .within(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(&info.id)
                        .arg("NX")
                        .arg("EX")
                        .arg(self.ttl_secs)
                        .query_async::<Option<String>>(&mut conn),
                )
                .await?
                .is_some();
            if set {
                return Ok(info);
            }
            // Another replica bound the alias first: use its session (ours expires unused).
        }
        Err(StoreError::Corrupt(format!("alias {alias} kept changing")))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.within(redis::cmd("PING").query_async::<String>(&mut self.conn.clone()))
            .await?;
        Ok(())
    }

    async fn begin_reply(
        &self,
        session_id: &str,
        message: StoredMessage,
        start: &ReplyStart,
    ) -> Result<Begin, StoreError> {
        let json = serde_json::to_string(&message).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let [info, messages, client_ids] = self.keys(session_id);
        let reply: Vec<String> = self
            .within(
                self.begin
                    .key(info)
                    .key(messages)
                    .key(client_ids)
                    .key(self.key(session_id, "lease"))
                    .key(self.key(session_id, "fence"))
                    .key(self.key(session_id, "running"))
                    .key(self.response_key(&start.response_id))
                    .key(self.leases_key())
                    .arg(&json)
                    .arg(message.client_message_id.as_deref().unwrap_or(""))
                    .arg(self.ttl_secs)
                    .arg(start.lease_ms)
                    .arg(&start.response_id)
                    .arg(&start.replica)
                    .arg(Utc::now().to_rfc3339())
                    .arg(&message.id)
                    .arg(now_ms())
                    .arg(session_id)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => {
                let corrupt = || StoreError::Corrupt(format!("unexpected begin reply {reply:?}"));
                let token = reply.get(1).and_then(|t| t.parse().ok()).ok_or_else(corrupt)?;
                let duplicate = reply.get(2).ok_or_else(corrupt)? == "1";
                let stored = if duplicate {
                    parse_message(reply.get(3).ok_or_else(corrupt)?)?
                } else {
                    message
                };
                Ok(Begin::Started {
                    appended: Appended {
                        message: stored,
                        duplicate,
                    },
                    lease: Lease {
                        session_id: session_id.to_owned(),
                        response_id: start.response_id.clone(),
                        token,
                    },
                })
            }
            Some("busy") => Ok(Begin::Busy),
            Some("missing") => Err(StoreError::NotFound(session_id.to_owned())),
            other => Err(StoreError::Corrupt(format!("unexpected begin reply {other:?}"))),
        }
    }

    async fn renew_lease(&self, lease: &Lease, lease_ms: u64) -> Result<LeaseState, StoreError> {
        let code: i64 = self
            .within(
                self.renew
                    .key(self.key(&lease.session_id, "lease"))
                    .key(self.key(&lease.session_id, "running"))
                    .key(self.leases_key())
                    .arg(lease.token)
                    .arg(lease_ms)
                    .arg(now_ms())
                    .arg(&lease.session_id)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        Ok(lease_state(code))
    }

    async fn log_event(&self, lease: &Lease, event: &LoggedEvent) -> Result<LeaseState, StoreError> {
        let code: i64 = self
            .within(
                self.log
                    .key(self.key(&lease.session_id, "lease"))
                    .key(self.key(&lease.session_id, "running"))
                    .key(self.log_key(&lease.session_id, &lease.response_id))
                    .arg(lease.token)
                    .arg(event.seq)
                    .arg(&event.payload)
                    .arg(self.retention.reply_log_events)
                    .arg(self.ttl_secs * 1000)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        Ok(lease_state(code))
    }

    async fn finish_reply(
        &self,
        lease: &Lease,
        message: Option<StoredMessage>,
        event: Option<&LoggedEvent>,
    ) -> Result<LeaseState, StoreError> {
        let done = self
            .end_reply(
                &self.finish,
                &lease.session_id,
                &lease.response_id,
                lease.token,
                message.as_ref(),
                event,
            )
            .await?;
        Ok(if done { LeaseState::Held } else { LeaseState::Lost })
    }

    async fn running_reply(&self, session_id: &str) -> Result<Option<RunningReply>, StoreError> {
        let (exists, fields): (bool, std::collections::HashMap<String, String>) = self
            .within(
                redis::pipe()
                    .exists(self.key(session_id, "info"))
                    .hgetall(self.key(session_id, "running"))
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
        if !exists {
            return Err(StoreError::NotFound(session_id.to_owned()));
        }
        if fields.is_empty() {
            return Ok(None);
        }
        parse_running(session_id, &fields).map(Some)
    }

    async fn request_cancel(&self, session_id: &str, response_id: &str) -> Result<bool, StoreError> {
        let code: i64 = self
            .within(
                self.cancel
                    .key(self.key(session_id, "running"))
                    .arg(response_id)
                    .invoke_async(&mut self.conn.clone()),
            )
            .await?;
        Ok(code == 1)
    }

    async fn reply_log(&self, response_id: &str) -> Result<Option<ReplyLog>, StoreError> {
        let mut conn = self.conn.clone();
        let session_id: Option<String> = self.within(conn.get(self.response_key(response_id))).await?;
        let Some(session_id) = session_id else {
            return Ok(None);
        };
        let range: StreamRangeReply = self
            .within(conn.xrevrange_count(self.log_key(&session_id, response_id), "+", "-", 2))
            .await?;
        let cursor = range.ids.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone());
        let mut newest = range.ids.iter().map(parse_event).collect::<Result<Vec<_>, _>>()?;
        newest.reverse();
        Ok(Some(ReplyLog {
            session_id,
            newest,
            cursor,
        }))
    }

    async fn tail(&self, cursors: &[TailCursor], block: Duration) -> Result<Vec<TailBatch>, StoreError> {
        if cursors.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        let keys: Vec<String> = cursors
            .iter()
            .map(|c| self.log_key(&c.session_id, &c.response_id))
            .collect();
        let ids: Vec<&str> = cursors.iter().map(|c| c.cursor.as_str()).collect();
        let options = StreamReadOptions::default().block(block.as_millis() as usize).count(64);
        let mut conn = self.tail_connection(block).await?;
        let read: Result<Option<StreamReadReply>, _> = conn.xread_options(&keys, &ids, &options).await;
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                // A broken or timed-out blocking connection is not reused.
                *self.tail_conn.lock().await = None;
                return Err(e.into());
            }
        };
        let Some(read) = read else {
            return Ok(Vec::new());
        };
        read.keys
            .into_iter()
            .filter_map(|k| {
                let i = keys.iter().position(|key| *key == k.key)?;
                let cursor = k.ids.last()?.id.clone();
                Some((i, cursor, k.ids))
            })
            .map(|(i, cursor, ids)| {
                Ok(TailBatch {
                    response_id: cursors[i].response_id.clone(),
                    events: ids.iter().map(parse_event).collect::<Result<_, _>>()?,
                    cursor,
                })
            })
            .collect()
    }

    async fn expired_replies(&self, limit: usize) -> Result<Vec<RunningReply>, StoreError> {
        let mut conn = self.conn.clone();
        let sessions: Vec<String> = self
            .within(conn.zrangebyscore_limit(self.leases_key(), "-inf", now_ms(), 0, limit as isize))
            .await?;
        let mut expired = Vec::new();
        for session_id in sessions {
            let (leased, fields): (bool, std::collections::HashMap<String, String>) = self
                .within(
                    redis::pipe()
                        .exists(self.key(&session_id, "lease"))
                        .hgetall(self.key(&session_id, "running"))
                        .query_async(&mut conn),
                )
                .await?;
            if fields.is_empty() {
                // Ended (or expired with its session): nothing to recover.
                let _: () = self.within(conn.zrem(self.leases_key(), &session_id)).await?;
            } else if !leased {
                expired.push(parse_running(&session_id, &fields)?);
            }
        }
        Ok(expired)
    }

    async fn recover_reply(
        &self,
        reply: &RunningReply,
        message: StoredMessage,
        event: &LoggedEvent,
    ) -> Result<bool, StoreError> {
        self.end_reply(
            &self.recover,
            &reply.session_id,
            &reply.response_id,
            reply.token,
            Some(&message),
            Some(event),
        )
        .await
    }

    async fn publish_stats(&self, record: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        let key = self.stats_key();
        let _: () = self
            .within(
                redis::pipe()
                    .cmd("XADD")
                    .arg(&key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(STATS_KEPT)
                    .arg("*")
                    .arg("r")
                    .arg(record)
                    .ignore()
                    .expire(&key, 3600)
                    .ignore()
                    .query_async(&mut conn),
            )
            .await?;
        Ok(true)
    }

    async fn read_stats(&self, cursor: Option<&str>, block: Duration) -> Result<Option<StatsBatch>, StoreError> {
        let key = self.stats_key();
        let cursor = match cursor {
            Some(c) => c.to_owned(),
            None => {
                // The newest entry's id: `$` in every call would miss what arrives in between.
                let mut conn = self.conn.clone();
                let newest: StreamRangeReply = self.within(conn.xrevrange_count(&key, "+", "-", 1)).await?;
                newest.ids.first().map_or_else(|| "0-0".to_owned(), |e| e.id.clone())
            }
        };
        let options = StreamReadOptions::default()
            .block(block.as_millis() as usize)
            .count(256);
        let mut conn = self.blocking_connection(&self.stats_conn, block).await?;
        let read: Result<Option<StreamReadReply>, _> = conn.xread_options(&[&key], &[&cursor], &options).await;
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                *self.stats_conn.lock().await = None;
                return Err(e.into());
            }
        };
        let ids: Vec<StreamId> = read.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids).collect();
        let cursor = ids.last().map_or(cursor, |e| e.id.clone());
        let records = ids.iter().filter_map(|e| e.get::<String>("r")).collect();
        Ok(Some(StatsBatch { records, cursor }))
    }
}

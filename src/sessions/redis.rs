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
//!
//! All three keys carry the session TTL, refreshed on every read and append. An append is one
//! Lua script, so the existence check, the idempotency check and the write are atomic even with
//! several replicas appending to the same session.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{Appended, SessionInfo, SessionStore, StoreError, StoredMessage};

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

/// Sessions in Redis through an auto-reconnecting connection. A command that fails while Redis
/// is away still errors (as `Unavailable`); the next one uses the restored connection.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    ttl_secs: i64,
    append: Script,
}

impl RedisStore {
    /// Connects, failing with `Unavailable` when Redis does not answer within `connect_timeout`.
    pub async fn connect(
        url: &str,
        prefix: &str,
        ttl: Duration,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let unavailable = |e: String| StoreError::Unavailable(format!("{url}: {e}"));
        let client = redis::Client::open(url).map_err(|e| unavailable(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(connect_timeout)
            .set_response_timeout(command_timeout)
            .set_max_delay(connect_timeout.as_millis() as u64)
            .set_number_of_retries(2);
        let conn = tokio::time::timeout(connect_timeout, ConnectionManager::new_with_config(client, config))
            .await
            .map_err(|_| unavailable(format!("no answer within {connect_timeout:?}")))?
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            ttl_secs: ttl.as_secs() as i64,
            append: Script::new(APPEND_SCRIPT),
        })
    }

    fn keys(&self, id: &str) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}:{{{id}}}:info"),
            format!("{p}:{{{id}}}:messages"),
            format!("{p}:{{{id}}}:client_ids"),
        ]
    }

    async fn touch(&self, id: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for k in self.keys(id) {
            pipe.expire(k, self.ttl_secs).ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }
}

fn parse_message(json: &str) -> Result<StoredMessage, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("message: {e}")))
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
            .query_async::<()>(&mut self.conn.clone())
            .await?;
        Ok(info)
    }

    async fn get(&self, id: &str) -> Result<SessionInfo, StoreError> {
        let [info_key, ..] = self.keys(id);
        let (owner, created_at, metadata): (Option<String>, Option<String>, Option<String>) = self
            .conn
            .clone()
            .hget(&info_key, &["owner", "created_at", "metadata"])
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
        let (exists, raw): (bool, Vec<String>) = redis::pipe()
            .exists(&info_key)
            .lrange(&messages_key, 0, -1)
            .query_async(&mut self.conn.clone())
            .await?;
        if !exists {
            return Err(StoreError::NotFound(id.to_owned()));
        }
        self.touch(id).await?;
        raw.iter().map(|m| parse_message(m)).collect()
    }

    async fn append(&self, id: &str, message: StoredMessage) -> Result<Appended, StoreError> {
        let json = serde_json::to_string(&message).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let keys = self.keys(id);
        let reply: Vec<String> = self
            .append
            .key(&keys[0])
            .key(&keys[1])
            .key(&keys[2])
            .arg(&json)
            .arg(message.client_message_id.as_deref().unwrap_or(""))
            .arg(self.ttl_secs)
            .invoke_async(&mut self.conn.clone())
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

    async fn ping(&self) -> Result<(), StoreError> {
        redis::cmd("PING").query_async::<String>(&mut self.conn.clone()).await?;
        Ok(())
    }
}

//! The in-process session store: the zero-setup default. Sessions are lost when the process
//! exits and are not shared between replicas; expiry matches the Redis store's.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;

use super::{Appended, SessionInfo, SessionStore, StoreError, StoredMessage};

struct Entry {
    info: SessionInfo,
    messages: Vec<StoredMessage>,
    expires_at: Instant,
}

/// Sessions in a map. A std `Mutex` is enough: no lock is held across an `.await`.
pub struct MemoryStore {
    sessions: Mutex<HashMap<String, Entry>>,
    ttl: Duration,
}

impl MemoryStore {
    pub fn new(ttl: Duration) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Runs `f` on a live session, refreshing its expiry; expired sessions are removed.
    fn with_live<T>(&self, id: &str, f: impl FnOnce(&mut Entry) -> T) -> Result<T, StoreError> {
        let mut sessions = self.sessions.lock().expect("session map poisoned");
        let now = Instant::now();
        match sessions.get_mut(id) {
            Some(e) if e.expires_at > now => {
                e.expires_at = now + self.ttl;
                Ok(f(e))
            }
            Some(_) => {
                sessions.remove(id);
                Err(StoreError::NotFound(id.to_owned()))
            }
            None => Err(StoreError::NotFound(id.to_owned())),
        }
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
        let mut sessions = self.sessions.lock().expect("session map poisoned");
        let now = Instant::now();
        sessions.retain(|_, e| e.expires_at > now);
        sessions.insert(
            info.id.clone(),
            Entry {
                info: info.clone(),
                messages: Vec::new(),
                expires_at: now + self.ttl,
            },
        );
        Ok(info)
    }

    async fn get(&self, id: &str) -> Result<SessionInfo, StoreError> {
        self.with_live(id, |e| e.info.clone())
    }

    async fn messages(&self, id: &str) -> Result<Vec<StoredMessage>, StoreError> {
        self.with_live(id, |e| e.messages.clone())
    }

    async fn append(&self, id: &str, message: StoredMessage) -> Result<Appended, StoreError> {
        self.with_live(id, |e| {
            if let Some(cid) = &message.client_message_id {
                if let Some(existing) = e.messages.iter().find(|m| m.client_message_id.as_ref() == Some(cid)) {
                    return Appended {
                        message: existing.clone(),
                        duplicate: true,
                    };
                }
            }
            e.messages.push(message.clone());
            Appended {
                message,
                duplicate: false,
            }
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

//! One-time tickets: how a browser page opens an authenticated WebSocket without holding an
//! API key. The page's own backend, which holds the key, asks `POST /v1/tickets` for a ticket
//! and hands it to the page; the page opens `/v1/chat?ticket=…`. A ticket admits one upgrade,
//! within `auth.ticket_ttl_secs` of being issued, as the key that asked for it.
//!
//! Tickets live in the session store, so any replica redeems a ticket any replica issued; the
//! store holds only their SHA-256 digests (like the configured keys), and taking one is a single
//! atomic read-and-delete, so two upgrades racing with the same ticket cannot both get in.
//! A ticket in a URL still reaches access logs, but by then it is used or about to expire.

use std::sync::Arc;
use std::time::Duration;

use crate::keys::{self, KeyDigest};
use crate::sessions::{SessionStore, StoreError};

/// What every ticket starts with.
pub const TICKET_PREFIX: &str = "tk_";

/// A ticket just issued.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub ticket: String,
    pub expires_in: Duration,
}

/// Issues and redeems tickets in the session store.
#[derive(Clone)]
pub struct Tickets {
    store: Arc<dyn SessionStore>,
    ttl: Duration,
}

impl Tickets {
    pub fn new(store: Arc<dyn SessionStore>, ttl: Duration) -> Self {
        Self { store, ttl }
    }

    /// A fresh ticket that admits one upgrade as `owner`.
    pub async fn issue(&self, owner: &str) -> Result<Ticket, StoreError> {
        let ticket = keys::random_token(TICKET_PREFIX);
        self.store
            .put_ticket(&KeyDigest::of(&ticket).to_string(), owner, self.ttl)
            .await?;
        Ok(Ticket {
            ticket,
            expires_in: self.ttl,
        })
    }

    /// The owner `presented` was issued for, once; `None` for a ticket that is unknown, already
    /// used or expired.
    pub async fn redeem(&self, presented: &str) -> Result<Option<String>, StoreError> {
        if !presented.starts_with(TICKET_PREFIX) {
            return Ok(None);
        }
        self.store.take_ticket(&KeyDigest::of(presented).to_string()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::sessions::memory::MemoryStore;
    use crate::sessions::Retention;

    #[tokio::test]
    async fn a_ticket_admits_its_owner_once_and_only_before_it_expires() {
        let store: Arc<dyn SessionStore> = Arc::new(MemoryStore::new(Retention::of(&Config::defaults().store)));
        let tickets = Tickets::new(store.clone(), Duration::from_secs(60));
        let issued = tickets.issue("alice").await.unwrap();
        assert!(issued.ticket.starts_with(TICKET_PREFIX) && issued.ticket.len() > 40);
        assert_eq!(tickets.redeem(&issued.ticket).await.unwrap().as_deref(), Some("alice"));
        assert_eq!(tickets.redeem(&issued.ticket).await.unwrap(), None, "used once");
        assert_eq!(tickets.redeem("tk_made_up").await.unwrap(), None);
        assert_eq!(tickets.redeem("sk_not_a_ticket").await.unwrap(), None);

        let short = Tickets::new(store, Duration::from_millis(30));
        let issued = short.issue("bob").await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(short.redeem(&issued.ticket).await.unwrap(), None, "expired");
    }
}

//! Limits shared by every replica on one session store (`[quotas]`): the WebSocket connections a
//! key or a client address holds open at once, the messages a key sends per minute over every
//! front end, and the requests an address makes per minute before it has authenticated. With
//! Redis as the store, two replicas do not double them.
//!
//! A connection holds one slot per scope (its address, its key) in the store, which its replica
//! renews every third of `quotas.slot_ttl_secs`; a replica killed without closing its sockets
//! stops renewing, and its slots are free again within that TTL. Rates are a generic cell rate
//! algorithm kept in the store, so a burst may not be spread across replicas to get more.
//! The store's clock (Redis `TIME`) decides, so replicas with skewed clocks agree.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::config::QuotasConfig;
use crate::sessions::{SessionStore, StoreError};

/// Slots renewed per store call.
const RENEW_CHUNK: usize = 256;

/// Why a quota refused.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("more than {per_minute} {what} per minute {from}; try again in {} ms", retry_after.as_millis())]
    RateLimited {
        what: &'static str,
        from: &'static str,
        per_minute: u32,
        retry_after: Duration,
    },
    #[error("{from} already holds {max} open connections (across every replica)")]
    Full { from: &'static str, max: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl QuotaError {
    /// How long the caller should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            QuotaError::RateLimited { retry_after, .. } => Some(*retry_after),
            QuotaError::Full { .. } | QuotaError::Store(_) => None,
        }
    }
}

/// The quotas of this replica, over the shared store.
pub struct Quotas {
    store: Arc<dyn SessionStore>,
    config: QuotasConfig,
    /// Names this replica's slots apart from every other replica's.
    replica: String,
    next_slot: AtomicU64,
    /// The slots this replica holds: slot number -> (scope, holder), renewed together.
    held: Mutex<HashMap<u64, (String, String)>>,
}

/// The slots one open connection holds; dropping it frees them.
pub struct ConnectionSlots {
    quotas: Arc<Quotas>,
    slots: Vec<u64>,
}

impl Drop for ConnectionSlots {
    fn drop(&mut self) {
        let freed = self.unlist();
        if freed.is_empty() {
            return;
        }
        // Outside a runtime (a test's teardown) the slots lapse after their TTL instead.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(release_all(self.quotas.store.clone(), freed));
        }
    }
}

impl ConnectionSlots {
    /// Adds the slot of the key the connection authenticated with; on `Err` the connection
    /// must close (dropping these frees the address's slot too).
    pub async fn add_key(&mut self, owner: &str) -> Result<(), QuotaError> {
        let max = self.quotas.config.key_connections;
        self.take(key_scope(owner), max, "this key").await
    }

    /// Frees the slots now, where [`Drop`] frees them in the background: a refused connection's
    /// address slot is free before its client can try again.
    pub async fn release(mut self) {
        let freed = self.unlist();
        release_all(self.quotas.store.clone(), freed).await;
    }

    /// Takes the slots off the renewal list; returns them.
    fn unlist(&mut self) -> Vec<(String, String)> {
        let mut held = self.quotas.held.lock().expect("quota slots poisoned");
        self.slots.drain(..).filter_map(|n| held.remove(&n)).collect()
    }

    async fn take(&mut self, scope: String, max: usize, from: &'static str) -> Result<(), QuotaError> {
        if max == 0 {
            return Ok(());
        }
        let quotas = &self.quotas;
        let n = quotas.next_slot.fetch_add(1, Ordering::Relaxed);
        let holder = format!("{}:{n}", quotas.replica);
        // Listed before it is taken, so a renewal racing with the take cannot miss it; freed
        // with the others if the take fails or refuses.
        quotas
            .held
            .lock()
            .expect("quota slots poisoned")
            .insert(n, (scope.clone(), holder.clone()));
        self.slots.push(n);
        match quotas.store.take_slot(&scope, &holder, max, quotas.slot_ttl()).await? {
            true => Ok(()),
            false => Err(QuotaError::Full { from, max }),
        }
    }
}

impl Quotas {
    /// Quotas over `store`, with the task that renews this replica's slots (it stops when the
    /// quotas are dropped). Call inside a tokio runtime.
    pub fn start(store: Arc<dyn SessionStore>, config: QuotasConfig) -> Arc<Self> {
        let quotas = Arc::new(Self {
            store,
            config,
            replica: uuid::Uuid::new_v4().simple().to_string(),
            next_slot: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
        });
        tokio::spawn(renew(Arc::downgrade(&quotas)));
        quotas
    }

    fn slot_ttl(&self) -> Duration {
        Duration::from_secs(self.config.slot_ttl_secs)
    }

    /// Counts one HTTP request (a WebSocket upgrade among them) from `address`, before it is
    /// authenticated.
    pub async fn address_request(&self, address: IpAddr) -> Result<(), QuotaError> {
        let c = &self.config;
        self.rate(
            &address_scope(address),
            c.ip_requests_per_minute,
            c.ip_request_burst,
            "requests",
            "from this address",
        )
        .await
    }

    /// Counts one message of `owner`'s key, whichever front end it came through.
    pub async fn key_message(&self, owner: &str) -> Result<(), QuotaError> {
        let c = &self.config;
        self.rate(
            &key_scope(owner),
            c.key_messages_per_minute,
            c.key_message_burst,
            "messages",
            "with this key",
        )
        .await
    }

    async fn rate(
        &self,
        scope: &str,
        per_minute: u32,
        burst: u32,
        what: &'static str,
        from: &'static str,
    ) -> Result<(), QuotaError> {
        if per_minute == 0 {
            return Ok(());
        }
        match self.store.take_rate(scope, per_minute, burst).await? {
            None => Ok(()),
            Some(retry_after) => Err(QuotaError::RateLimited {
                what,
                from,
                per_minute,
                retry_after,
            }),
        }
    }

    /// The slot of a connection from `address`, taken before it authenticates; add its key's
    /// with [`ConnectionSlots::add_key`].
    pub async fn connection(self: &Arc<Self>, address: IpAddr) -> Result<ConnectionSlots, QuotaError> {
        let mut slots = ConnectionSlots {
            quotas: self.clone(),
            slots: Vec::with_capacity(2),
        };
        let max = self.config.ip_connections;
        slots.take(address_scope(address), max, "this address").await?;
        Ok(slots)
    }

    /// How many slots this replica holds (the unit tests check that refusals hold none).
    pub fn held_slots(&self) -> usize {
        self.held.lock().expect("quota slots poisoned").len()
    }
}

async fn release_all(store: Arc<dyn SessionStore>, slots: Vec<(String, String)>) {
    for (scope, holder) in slots {
        if let Err(e) = store.release_slot(&scope, &holder).await {
            tracing::debug!(error = %e, "connection slot not released; it lapses after its TTL");
        }
    }
}

fn address_scope(address: IpAddr) -> String {
    // An IPv4 client reaching an IPv6 socket counts as its IPv4 address.
    let address = match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    format!("ip:{address}")
}

fn key_scope(owner: &str) -> String {
    format!("key:{owner}")
}

/// Renews this replica's slots every third of their TTL until the quotas are dropped. A failed
/// renewal is retried next round: slots lapse only after a whole TTL without one.
async fn renew(quotas: Weak<Quotas>) {
    let every = match quotas.upgrade() {
        Some(q) => q.slot_ttl() / 3,
        None => return,
    };
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(quotas) = quotas.upgrade() else { return };
        let held: Vec<(String, String)> = quotas
            .held
            .lock()
            .expect("quota slots poisoned")
            .values()
            .cloned()
            .collect();
        for chunk in held.chunks(RENEW_CHUNK) {
            if let Err(e) = quotas.store.renew_slots(chunk, quotas.slot_ttl()).await {
                tracing::warn!(error = %e, "connection slots not renewed; retrying");
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::sessions::{MemoryStore, Retention};

    fn quotas(edit: impl FnOnce(&mut QuotasConfig)) -> Arc<Quotas> {
        let mut config = Config::defaults().quotas;
        edit(&mut config);
        let store = Arc::new(MemoryStore::new(Retention::of(&Config::defaults().store)));
        Quotas::start(store, config)
    }

    #[tokio::test]
    async fn a_refused_connection_holds_no_slot_and_a_closed_one_frees_both() {
        let q = quotas(|c| {
            c.ip_connections = 2;
            c.key_connections = 1;
        });
        let here: IpAddr = "10.0.0.1".parse().unwrap();
        let connect = |owner: &'static str| {
            let q = q.clone();
            async move {
                let mut slots = q.connection(here).await?;
                if let Err(e) = slots.add_key(owner).await {
                    slots.release().await;
                    return Err(e);
                }
                Ok::<_, QuotaError>(slots)
            }
        };
        let first = connect("alice").await.unwrap();
        assert_eq!(q.held_slots(), 2);
        let full = connect("alice").await.err().unwrap();
        assert!(matches!(full, QuotaError::Full { max: 1, .. }), "{full}");
        assert_eq!(q.held_slots(), 2, "the refused connection's address slot was freed");
        let bob = connect("bob").await.unwrap();
        let third = connect("carol").await.err().unwrap();
        assert!(matches!(third, QuotaError::Full { max: 2, .. }), "{third}");
        drop(first);
        drop(bob);
        assert_eq!(q.held_slots(), 0);
        tokio::task::yield_now().await;
        connect("alice").await.expect("freed slots are free");
    }

    #[tokio::test]
    async fn rates_allow_the_burst_then_one_per_interval() {
        let q = quotas(|c| {
            c.key_messages_per_minute = 600;
            c.key_message_burst = 3;
        });
        for _ in 0..3 {
            q.key_message("alice").await.unwrap();
        }
        let limited = q.key_message("alice").await.err().unwrap();
        let wait = limited.retry_after().unwrap();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        q.key_message("bob").await.expect("another key has its own rate");
        tokio::time::sleep(wait).await;
        q.key_message("alice").await.expect("one more after the interval");
    }

    #[tokio::test]
    async fn zero_turns_a_limit_off() {
        let q = quotas(|c| {
            c.ip_connections = 0;
            c.key_connections = 0;
            c.ip_requests_per_minute = 0;
        });
        let here: IpAddr = "::1".parse().unwrap();
        let mut open = Vec::new();
        for _ in 0..100 {
            q.address_request(here).await.unwrap();
            let mut slots = q.connection(here).await.unwrap();
            slots.add_key("anonymous").await.unwrap();
            open.push(slots);
        }
        assert_eq!(q.held_slots(), 0);
    }

    #[test]
    fn an_ipv4_client_on_an_ipv6_socket_is_its_ipv4_address() {
        assert_eq!(address_scope("::ffff:10.0.0.1".parse().unwrap()), "ip:10.0.0.1");
        assert_eq!(address_scope("10.0.0.1".parse().unwrap()), "ip:10.0.0.1");
    }
}

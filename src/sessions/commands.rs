//! The connection the Redis store sends its commands on: the `redis` crate's auto-reconnecting
//! [`ConnectionManager`], replaced by a fresh one after a command timed out.
//!
//! The crate reconnects only after errors that close the socket (a reset, a refused connect, end
//! of stream). A network partition that drops packets closes nothing: requests and replies are
//! lost, later replies no longer match their requests, and the manager keeps the connection
//! forever (measured: still refusing 40 s after the partition ended). So a timeout marks the
//! connection stale, and the next command connects anew first, bounded by the command timeout, so
//! a request still fails in time while Redis stays unreachable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// A [`ConnectionManager`] that is replaced after a timeout. Cheap to clone.
#[derive(Clone)]
pub(super) struct CommandConnection {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// A replacement connection must be up within this long (the command timeout).
    connect_within: Duration,
    current: Mutex<ConnectionManager>,
    stale: AtomicBool,
    /// One replacement at a time.
    replacing: tokio::sync::Mutex<()>,
}

impl CommandConnection {
    /// The first connection, which must be up within `connect_timeout`.
    pub async fn connect(
        client: redis::Client,
        config: ConnectionManagerConfig,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> RedisResult<Self> {
        let first = open(&client, &config, connect_timeout).await?;
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                config,
                connect_within: command_timeout,
                current: Mutex::new(first),
                stale: AtomicBool::new(false),
                replacing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// A command on this connection took too long: the next one uses a new connection.
    pub fn mark_stale(&self) {
        self.shared.stale.store(true, Ordering::Release);
    }

    /// The connection to send on, replaced first if it is stale.
    async fn connection(&self) -> RedisResult<ConnectionManager> {
        let shared = &self.shared;
        if shared.stale.load(Ordering::Acquire) {
            let _one = shared.replacing.lock().await;
            if shared.stale.load(Ordering::Acquire) {
                let fresh = open(&shared.client, &shared.config, shared.connect_within).await?;
                *shared.current.lock().expect("connection lock poisoned") = fresh;
                shared.stale.store(false, Ordering::Release);
                tracing::info!("Redis command connection replaced after a timeout");
            }
        }
        Ok(shared.current.lock().expect("connection lock poisoned").clone())
    }

    /// Marks the connection stale when `result` is a timeout.
    fn noting<T>(&self, result: RedisResult<T>) -> RedisResult<T> {
        if let Err(e) = &result {
            if e.is_timeout() {
                self.mark_stale();
            }
        }
        result
    }
}

async fn open(
    client: &redis::Client,
    config: &ConnectionManagerConfig,
    within: Duration,
) -> RedisResult<ConnectionManager> {
    match tokio::time::timeout(
        within,
        ConnectionManager::new_with_config(client.clone(), config.clone()),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {} ms", within.as_millis()),
        ))),
    }
}

impl ConnectionLike for CommandConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        async move {
            let mut conn = self.connection().await?;
            let result = conn.req_packed_command(cmd).await;
            self.noting(result)
        }
        .boxed()
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        async move {
            let mut conn = self.connection().await?;
            let result = conn.req_packed_commands(cmd, offset, count).await;
            self.noting(result)
        }
        .boxed()
    }

    fn get_db(&self) -> i64 {
        self.shared.current.lock().expect("connection lock poisoned").get_db()
    }
}

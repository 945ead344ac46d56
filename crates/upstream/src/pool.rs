//! Server pools: one deadpool per (database, user), with Breakwater's own manager that creates
//! logged-in [`ServerConn`]s and refuses to hand out one that died while idle.
//!
//! The pool never decides whether a connection is clean: the proxy returns a connection only at
//! an idle ReadyForQuery with nothing owed, and detaches (closes) it otherwise.

use std::sync::Arc;
use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, PoolError, QueueMode, RecycleError, RecycleResult};

use crate::conn::{ConnectError, ServerConn, ServerSettings, ServerTarget};

pub struct ServerManager {
    target: ServerTarget,
    /// Known once a client logged in with SCRAM when the auth_file holds only a verifier.
    credential: std::sync::Mutex<Option<proto::auth::ServerCredential>>,
    settings: ServerSettings,
}

impl managed::Manager for ServerManager {
    type Type = ServerConn;
    type Error = ConnectError;

    async fn create(&self) -> Result<ServerConn, ConnectError> {
        let mut target = self.target.clone();
        target.credential = match self.credential.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let conn = ServerConn::connect(&target, &self.settings).await;
        match &conn {
            Ok(c) => tracing::info!(server = c.id, addr = %c.addr(), pid = c.backend_pid(),
                database = %self.target.database, user = %self.target.user, "server connection opened"),
            Err(e) => tracing::warn!(database = %self.target.database, user = %self.target.user,
                error = %e, "server connection failed"),
        }
        conn
    }

    async fn recycle(
        &self,
        conn: &mut ServerConn,
        metrics: &Metrics,
    ) -> RecycleResult<ConnectError> {
        if let Some(lifetime) = self.settings.lifetime {
            if metrics.age() > lifetime {
                return Err(RecycleError::message("server_lifetime reached"));
            }
        }
        if !conn.is_healthy_idle() {
            tracing::info!(
                server = conn.id,
                pid = conn.backend_pid(),
                "idle server connection was closed by the server; dropping it"
            );
            return Err(RecycleError::message("server closed while idle"));
        }
        Ok(())
    }
}

/// A server connection checked out of a pool. Dropping it returns it to the pool; call
/// [`discard`] instead when it is not clean.
pub type PooledServer = Object<ServerManager>;

/// Closes a checked-out connection instead of returning it.
pub fn discard(server: PooledServer) {
    Object::take(server).terminate();
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("query_wait_timeout ({timeout:?}) expired waiting for a server connection to database \"{database}\"")]
    WaitTimeout { database: String, timeout: Duration },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("pool for database \"{database}\" is closed")]
    Closed { database: String },
}

pub struct ServerPool {
    pool: managed::Pool<ServerManager>,
    pub database: String,
    pub user: String,
    pub min_size: usize,
}

impl ServerPool {
    pub fn new(
        target: ServerTarget,
        settings: ServerSettings,
        size: usize,
        min_size: usize,
    ) -> Arc<Self> {
        let database = target.database.clone();
        let user = target.user.clone();
        let credential = std::sync::Mutex::new(target.credential.clone());
        let pool = managed::Pool::builder(ServerManager {
            target,
            credential,
            settings,
        })
        .max_size(size.max(1))
        // LIFO keeps the most recently used connections warm and lets the rest age out.
        .queue_mode(QueueMode::Lifo)
        .runtime(deadpool::Runtime::Tokio1)
        .build();
        match pool {
            Ok(pool) => Arc::new(ServerPool {
                pool,
                database,
                user,
                min_size,
            }),
            // Only fails without a runtime when timeouts are set, which we never do.
            Err(e) => unreachable!("deadpool build: {e}"),
        }
    }

    /// Waits (FIFO) for a connection, creating one when the pool has room.
    pub async fn checkout(&self, wait: Option<Duration>) -> Result<PooledServer, CheckoutError> {
        let get = self.pool.get();
        let result = match wait {
            Some(t) => match tokio::time::timeout(t, get).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(CheckoutError::WaitTimeout {
                        database: self.database.clone(),
                        timeout: t,
                    })
                }
            },
            None => get.await,
        };
        result.map_err(|e| match e {
            PoolError::Backend(e) => CheckoutError::Connect(e),
            _ => CheckoutError::Closed {
                database: self.database.clone(),
            },
        })
    }

    /// Gives the pool a way to log in when it had none (SCRAM keys from a client's login).
    pub fn offer_credential(&self, cred: proto::auth::ServerCredential) {
        if let Ok(mut c) = self.pool.manager().credential.lock() {
            if c.is_none() {
                *c = Some(cred);
            }
        }
    }

    pub fn status(&self) -> deadpool::Status {
        self.pool.status()
    }

    pub fn resize(&self, size: usize) {
        self.pool.resize(size.max(1));
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime` (keeping
    /// `min_pool_size`), then opens connections up to `min_pool_size`.
    pub async fn maintain(&self, settings: &ServerSettings) {
        let mut keep = self.min_size;
        self.pool.retain(|conn, m| {
            let expired = settings.lifetime.is_some_and(|l| m.age() > l) || !conn.is_healthy_idle();
            let idle_too_long = settings.idle_timeout.is_some_and(|t| m.last_used() > t);
            if expired {
                return false;
            }
            if idle_too_long && keep == 0 {
                return false;
            }
            keep = keep.saturating_sub(1);
            true
        });
        let status = self.pool.status();
        let missing = self
            .min_size
            .min(status.max_size)
            .saturating_sub(status.size);
        if missing == 0 {
            return;
        }
        // Hold `missing` fresh connections at once so the pool grows instead of handing the
        // same idle one back; dropping them puts them in the idle list.
        let timeouts = managed::Timeouts {
            wait: Some(Duration::ZERO),
            ..Default::default()
        };
        let mut held = Vec::with_capacity(missing);
        for _ in 0..missing + status.available {
            match self.pool.timeout_get(&timeouts).await {
                Ok(c) => held.push(c),
                Err(_) => break,
            }
            if self.pool.status().size >= self.min_size {
                break;
            }
        }
    }

    pub fn close(&self) {
        self.pool.close();
    }
}

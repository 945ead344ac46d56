//! Server pools: one deadpool per (database, user), with Breakwater's own manager that creates
//! logged-in [`ServerConn`]s through the host's storm controls and refuses to hand out one that
//! died while idle.
//!
//! The pool never decides whether a connection is clean: the proxy returns a connection only at
//! an idle ReadyForQuery with nothing owed, and detaches (closes) it otherwise.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, Object, PoolError, QueueMode, RecycleError, RecycleResult};
use tokio::sync::Semaphore;

use crate::conn::{ConnectError, ServerConn, ServerSettings, ServerTarget};
use crate::host::Host;

/// Caps shared between pools: `max_db_connections` (per database) and
/// `max_server_connections` (all pools). A connection holds a slot of each while it lives.
#[derive(Clone, Default)]
pub struct Limits(pub Vec<Arc<Semaphore>>);

pub struct ServerManager {
    target: ServerTarget,
    /// Known once a client logged in with SCRAM when the auth_file holds only a verifier.
    credential: std::sync::Mutex<Option<proto::auth::ServerCredential>>,
    settings: ServerSettings,
    host: Arc<Host>,
    limits: Limits,
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
        // Slots of the shared caps first: waiting for one is bounded by the client's
        // query_wait_timeout around the whole checkout.
        let mut permits = Vec::with_capacity(self.limits.0.len());
        for sem in &self.limits.0 {
            match sem.clone().acquire_owned().await {
                Ok(p) => permits.push(p),
                Err(_) => unreachable!("limit semaphores are never closed"),
            }
        }
        let conn = ServerConn::connect(&target, &self.settings, &self.host).await;
        match conn {
            Ok(mut c) => {
                c._limits = permits;
                tracing::info!(server = c.id, addr = %c.addr(), pid = c.backend_pid(),
                    database = %self.target.database, user = %self.target.user, "server connection opened");
                Ok(c)
            }
            Err(e) => {
                tracing::warn!(database = %self.target.database, user = %self.target.user,
                    host = %self.host.name, error = %e, "server connection failed");
                Err(e)
            }
        }
    }

    async fn recycle(
        &self,
        conn: &mut ServerConn,
        metrics: &Metrics,
    ) -> RecycleResult<ConnectError> {
        if let Some(lifetime) = self.settings.lifetime {
            if metrics.age() > lifetime.mul_f64(conn.jitter) {
                tracing::debug!(server = conn.id, "server_lifetime reached; closing");
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
        if let Some(delay) = self.settings.check_delay {
            let idle = metrics.recycled.unwrap_or(metrics.created).elapsed();
            if idle > delay && !self.settings.check_query.is_empty() {
                let bound = self
                    .settings
                    .login_timeout
                    .unwrap_or(Duration::from_secs(5));
                let check =
                    tokio::time::timeout(bound, conn.simple_query(&self.settings.check_query))
                        .await;
                if !matches!(check, Ok(Ok(()))) {
                    tracing::warn!(
                        server = conn.id,
                        pid = conn.backend_pid(),
                        "server_check_query failed on an idle connection; dropping it"
                    );
                    return Err(RecycleError::message("server_check_query failed"));
                }
            }
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
    #[error("query_wait_timeout ({timeout:?}) expired waiting for a server connection to database \"{database}\"{}",
        last.as_ref().map(|e| format!(" (last connection attempt: {e})")).unwrap_or_default())]
    WaitTimeout {
        database: String,
        timeout: Duration,
        last: Option<ConnectError>,
    },
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
        host: Arc<Host>,
        limits: Limits,
    ) -> Arc<Self> {
        let database = target.database.clone();
        let user = target.user.clone();
        let credential = std::sync::Mutex::new(target.credential.clone());
        let pool = managed::Pool::builder(ServerManager {
            target,
            credential,
            settings,
            host,
            limits,
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
            // Only fails without a runtime when timeouts are set, and we name the runtime.
            Err(e) => unreachable!("deadpool build: {e}"),
        }
    }

    /// Gives the pool a way to log in when it had none (SCRAM keys from a client's login).
    pub fn offer_credential(&self, cred: proto::auth::ServerCredential) {
        if let Ok(mut c) = self.pool.manager().credential.lock() {
            if c.is_none() {
                *c = Some(cred);
            }
        }
    }

    /// Waits (FIFO) for a connection, creating one when the pool has room. While the server is
    /// unreachable the client keeps waiting — the host's back-off paces the attempts — until
    /// `wait` expires; errors that waiting cannot fix (wrong password, breaker open) return at
    /// once.
    pub async fn checkout(&self, wait: Option<Duration>) -> Result<PooledServer, CheckoutError> {
        let deadline = wait.map(|w| Instant::now() + w);
        let mut last = None;
        loop {
            let get = self.pool.get();
            let result = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), get).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(CheckoutError::WaitTimeout {
                            database: self.database.clone(),
                            timeout: wait.unwrap_or_default(),
                            last,
                        })
                    }
                },
                None => get.await,
            };
            match result {
                Ok(server) => return Ok(server),
                Err(PoolError::Backend(e)) if e.is_permanent() => return Err(e.into()),
                Err(PoolError::Backend(e)) => last = Some(e),
                Err(_) => {
                    return Err(CheckoutError::Closed {
                        database: self.database.clone(),
                    })
                }
            }
        }
    }

    pub fn status(&self) -> deadpool::Status {
        self.pool.status()
    }

    pub fn host(&self) -> &Arc<Host> {
        &self.pool.manager().host
    }

    pub fn resize(&self, size: usize) {
        self.pool.resize(size.max(1));
    }

    /// Closes idle connections past `server_idle_timeout` or `server_lifetime` (each with its
    /// own jitter, keeping `min_pool_size`), then opens connections up to `min_pool_size` one
    /// at a time, so warm-up after an outage is paced by the host's storm controls.
    pub async fn maintain(&self, settings: &ServerSettings) {
        let mut keep = self.min_size;
        self.pool.retain(|conn, m| {
            let expired = settings
                .lifetime
                .is_some_and(|l| m.age() > l.mul_f64(conn.jitter))
                || !conn.is_healthy_idle();
            let idle_too_long = settings
                .idle_timeout
                .is_some_and(|t| m.last_used() > t.mul_f64(conn.jitter));
            if expired || (idle_too_long && keep == 0) {
                return false;
            }
            keep = keep.saturating_sub(1);
            true
        });
        let status = self.pool.status();
        if self.min_size.min(status.max_size) <= status.size {
            return;
        }
        // Hold fresh connections until the pool reaches its minimum so it grows instead of
        // handing the same idle one back; dropping them puts them in the idle list.
        let timeouts = managed::Timeouts {
            wait: Some(Duration::ZERO),
            ..Default::default()
        };
        let mut held = Vec::new();
        for _ in 0..self.min_size + status.available {
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

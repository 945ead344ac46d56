//! The small pools `auth_query` runs on: a few server connections per (database, auth_user),
//! apart from the client pools, so a secret lookup never waits behind client traffic nor takes
//! a client's place, and a storm of logins never opens more than `size` connections. Each
//! connection is opened through its host's storm controls and bounded by the same connect and
//! login timeouts as any server connection.
//!
//! The user name goes to the server as a bound parameter, never spliced into SQL. What comes
//! back is the password column's text; what it means (md5, SCRAM, plaintext) is the caller's
//! business. This module never caches an answer and never logs one.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;
use proto::{backend, frame, frontend};
use tokio::sync::Semaphore;

use crate::conn::ServerConn;
use crate::error::{ConnectError, QueryError};
use crate::host::Host;
use crate::settings::{ServerSettings, ServerTarget};

/// Why a lookup found no answer (as opposed to finding that the user has no password).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("connecting as auth_user \"{user}\": {source}")]
    Connect {
        user: String,
        #[source]
        source: ConnectError,
    },
    #[error("running auth_query: {0}")]
    Query(#[from] QueryError),
    #[error("the auth database has no host")]
    NoHost,
    #[error("auth_query must return one row of (user name, password); {0}")]
    Shape(&'static str),
}

/// A few logged-in connections as one auth_user to one database, and the query they run.
pub struct LookupPool {
    target: ServerTarget,
    hosts: Vec<Arc<Host>>,
    query: String,
    /// One permit per connection the pool may have open, idle or in use: the cap on what a
    /// storm of lookups costs the database.
    permits: Semaphore,
    size: usize,
    /// Idle connections, each with when it was last given back.
    idle: Mutex<Vec<(ServerConn, Instant)>>,
}

impl LookupPool {
    /// `hosts` are tried in order for each new connection; `size` is at least 1.
    pub fn new(target: ServerTarget, hosts: Vec<Arc<Host>>, query: String, size: usize) -> Self {
        LookupPool {
            target,
            hosts,
            query,
            permits: Semaphore::new(size.max(1)),
            size: size.max(1),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs the query for `user` and returns its password column: `None` when there is no row
    /// or the password is NULL. Waits for a free connection without a bound of its own: the
    /// caller bounds the whole lookup (auth_query_timeout) and, by dropping this future, closes
    /// a connection caught mid-query rather than reuse it.
    pub async fn lookup(
        &self,
        user: &str,
        settings: &ServerSettings,
    ) -> Result<Option<String>, LookupError> {
        // The semaphore is never closed; a closed one would mean no lookups, not a panic.
        let Ok(_permit) = self.permits.acquire().await else {
            return Err(LookupError::Shape("the lookup pool is closed"));
        };
        let mut conn = match self.take_idle(settings) {
            Some(conn) => conn,
            None => self.connect(settings).await?,
        };
        let answer = run(&mut conn, &self.query, user).await?;
        if let Ok(mut idle) = self.idle.lock() {
            idle.push((conn, Instant::now()));
        }
        Ok(answer)
    }

    /// Closes idle connections past server_idle_timeout or server_lifetime (the maintenance
    /// tick calls it, as for client pools). Returns whether the pool is now unused: nothing
    /// idle and no lookup running, so its owner may drop it.
    pub fn close_idle(&self, settings: &ServerSettings) -> bool {
        let Ok(mut idle) = self.idle.lock() else {
            return false;
        };
        let mut kept = Vec::with_capacity(idle.len());
        for (conn, since) in idle.drain(..) {
            let idle_too_long = settings
                .idle_timeout
                .is_some_and(|t| since.elapsed() >= conn.share(t));
            if idle_too_long || expired(&conn, settings) || !conn.is_healthy_idle() {
                conn.terminate();
            } else {
                kept.push((conn, since));
            }
        }
        *idle = kept;
        idle.is_empty() && self.permits.available_permits() == self.size
    }

    /// Connections held open now (idle ones; a lookup in flight holds its own).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
    }

    fn take_idle(&self, settings: &ServerSettings) -> Option<ServerConn> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((conn, _)) = idle.pop() {
            if conn.is_healthy_idle() && !expired(&conn, settings) {
                return Some(conn);
            }
            conn.terminate();
        }
        None
    }

    async fn connect(&self, settings: &ServerSettings) -> Result<ServerConn, LookupError> {
        let mut last = None;
        for host in &self.hosts {
            let mut target = self.target.clone();
            target.host.clone_from(&host.host);
            target.port = host.port;
            match ServerConn::connect(&target, settings, host).await {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(source) => Err(LookupError::Connect {
                user: self.target.user.clone(),
                source,
            }),
            None => Err(LookupError::NoHost),
        }
    }
}

fn expired(conn: &ServerConn, settings: &ServerSettings) -> bool {
    settings
        .lifetime
        .is_some_and(|l| conn.created().elapsed() >= conn.share(l))
}

/// One extended-protocol round trip: Parse, Bind (the user name as text), Execute, Sync.
/// PgBouncer's contract: the query returns (user name, password) and at most one row.
async fn run(
    conn: &mut ServerConn,
    query: &str,
    user: &str,
) -> Result<Option<String>, LookupError> {
    let mut out = BytesMut::with_capacity(query.len() + user.len() + 64);
    frontend::write_parse_unnamed(&mut out, query);
    frontend::write_bind_text(&mut out, &[Some(user.as_bytes())]);
    frontend::write_execute_unnamed(&mut out);
    frontend::write_sync(&mut out);
    conn.write_all(&out).await.map_err(QueryError::from)?;

    let mut rows = 0usize;
    let mut answer = None;
    let mut shape = None;
    let mut error = None;
    loop {
        let max = conn.max_message();
        let Some(msg) = frame::take_message(conn.buf_mut(), max).map_err(QueryError::from)? else {
            conn.read().await.map_err(QueryError::from)?;
            continue;
        };
        match msg.tag {
            backend::DATA_ROW => {
                rows += 1;
                let values = backend::parse_data_row(&msg.body).map_err(QueryError::from)?;
                match (rows, values.get(1)) {
                    (1, Some(password)) => {
                        answer = password.map(|p| String::from_utf8_lossy(p).into_owned());
                    }
                    (1, None) => shape = Some("it returned fewer than two columns"),
                    _ => shape = Some("it returned more than one row"),
                }
            }
            backend::ERROR_RESPONSE => {
                error.get_or_insert(
                    proto::error::parse_error_fields(&msg.body).map_err(QueryError::from)?,
                );
            }
            backend::PARAMETER_STATUS => {
                let (k, v) =
                    backend::parse_parameter_status(&msg.body).map_err(QueryError::from)?;
                let (k, v) = (k.to_owned(), v.to_owned());
                conn.set_param(&k, &v);
            }
            backend::READY_FOR_QUERY => {
                let status = backend::parse_ready_for_query(&msg.body).map_err(QueryError::from)?;
                if let Some(e) = error {
                    // Idle again after the error: the connection may serve the next lookup,
                    // but this one failed (a bad query, a missing function, no permission).
                    return Err(LookupError::Query(QueryError::Server(e)));
                }
                if status != backend::TxStatus::Idle {
                    conn.mark_broken(stats::CloseReason::ServerProtocolError);
                    return Err(QueryError::NotIdle(status.as_byte() as char).into());
                }
                return match shape {
                    Some(why) => Err(LookupError::Shape(why)),
                    None => Ok(answer),
                };
            }
            // ParseComplete, BindComplete, CommandComplete, notices.
            _ => {}
        }
    }
}

//! Host lists and failover: which of a database's hosts a new server connection goes to, what
//! role (primary or standby) each host has, and whether a pooled connection still sits on a host
//! the pool wants.
//!
//! A new connection tries the hosts in order (or rotated, with `load_balance_hosts =
//! round-robin`), each through its own storm controls, and keeps the first whose role matches
//! `target_session_attrs` (libpq's meanings). With several hosts, a host in back-off or with an
//! open breaker is skipped rather than waited for, so a dead primary never delays finding the new
//! one. When no host matches, searches go one at a time, spaced by `server_login_retry`, and the
//! caller (a client in checkout) keeps waiting within `query_wait_timeout`.
//!
//! Roles are learnt at login (`in_hot_standby` and `default_transaction_read_only`, reported by
//! PostgreSQL 14 and later; a query on older servers) and by a periodic probe. A host whose role
//! changes bumps its epoch; connections stamped with an older epoch are closed instead of reused.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::conn::ServerConn;
use crate::error::{ConnectError, QueryError};
use crate::host::{Host, Origin, Refusal};
use crate::role::{LoadBalanceHosts, Role, TargetSessionAttrs};
use crate::settings::{ServerSettings, ServerTarget};

/// The hosts of one database as one pool sees them.
pub struct HostList {
    /// Never empty: `first` is also `hosts[0]`.
    first: Arc<Host>,
    hosts: Vec<Arc<Host>>,
    pub attrs: TargetSessionAttrs,
    pub load_balance: LoadBalanceHosts,
    next: AtomicUsize,
    /// The last search found no host to serve: searches go one at a time until one does.
    no_match: AtomicBool,
    search: tokio::sync::Mutex<()>,
    /// Spacing of searches while no host matches (`server_login_retry`).
    retry: Duration,
}

impl std::fmt::Debug for HostList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostList")
            .field("hosts", &self.names())
            .field("attrs", &self.attrs)
            .field("load_balance", &self.load_balance)
            .finish()
    }
}

impl HostList {
    pub fn new(
        first: Arc<Host>,
        rest: Vec<Arc<Host>>,
        attrs: TargetSessionAttrs,
        load_balance: LoadBalanceHosts,
        retry: Duration,
    ) -> HostList {
        let mut hosts = Vec::with_capacity(1 + rest.len());
        hosts.push(first.clone());
        hosts.extend(rest);
        HostList {
            first,
            hosts,
            attrs,
            load_balance,
            next: AtomicUsize::new(0),
            no_match: AtomicBool::new(false),
            search: tokio::sync::Mutex::new(()),
            retry,
        }
    }

    /// The first configured host (never empty).
    pub fn first(&self) -> &Arc<Host> {
        &self.first
    }

    pub fn hosts(&self) -> &[Arc<Host>] {
        &self.hosts
    }

    /// `a:5432, b:5432`, for messages.
    pub fn names(&self) -> String {
        let names: Vec<&str> = self.hosts.iter().map(|h| h.name.as_str()).collect();
        names.join(", ")
    }

    /// The order in which the next connection tries the hosts.
    fn order(&self) -> Vec<Arc<Host>> {
        let n = self.hosts.len();
        let start = match self.load_balance {
            LoadBalanceHosts::Disable => 0,
            LoadBalanceHosts::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
        };
        (0..n)
            .filter_map(|i| self.hosts.get((start + i) % n).cloned())
            .collect()
    }

    /// Is a connection opened at `origin` still one this pool wants? Not once its host changed
    /// role since (unless the pool takes any role).
    pub fn still_wanted(&self, origin: &Origin) -> bool {
        self.attrs == TargetSessionAttrs::Any || origin.host.role_epoch() == origin.epoch
    }

    /// Opens a connection to the first host (in [`HostList::order`]) that is up and whose role
    /// matches. See the module docs for how hosts in trouble are skipped and how searches are
    /// paced while none matches.
    /// `connecting` goes up while a host's admitted attempt runs (see `pool::Connecting`),
    /// and down again when one fails and the search goes on.
    pub async fn connect(
        &self,
        target: &ServerTarget,
        settings: &ServerSettings,
        connecting: &crate::ConnectFlag,
    ) -> Result<ServerConn, ConnectError> {
        // With one host there is nothing to skip to: wait out its back-off as before.
        let patient = self.hosts.len() == 1;
        // While nothing matches, one search at a time; the guard is held through the pause
        // after a failed search, which is what spaces them.
        let _search = if self.no_match.load(Ordering::Acquire) {
            let guard = self.search.lock().await;
            self.no_match.load(Ordering::Acquire).then_some(guard)
        } else {
            None
        };
        let mut fallback: Option<ServerConn> = None;
        let mut errors: Vec<ConnectError> = Vec::new();
        for host in self.order() {
            let admitted = if patient {
                host.admit().await.map_err(ConnectError::from)
            } else {
                host.admit_now().await.map_err(|r| match r {
                    Refusal::Breaker(b) => ConnectError::BreakerOpen(b),
                    Refusal::Backoff { retry_in } => ConnectError::Backoff {
                        host: host.name.clone(),
                        retry_in,
                    },
                })
            };
            let attempt = match admitted {
                Ok(a) => a,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            connecting.set(true);
            let mut t = target.clone();
            t.host.clone_from(&host.host);
            t.port = host.port;
            let mut conn = match ServerConn::connect_admitted(attempt, &t, settings, &host).await {
                Ok(c) => c,
                // Wrong password, no such database: every host will say the same.
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => {
                    connecting.set(false);
                    errors.push(e);
                    continue;
                }
            };
            let role = match detect_role(&mut conn, self.attrs, settings).await {
                Ok(r) => r,
                Err(e) => {
                    connecting.set(false);
                    conn.terminate();
                    errors.push(e);
                    continue;
                }
            };
            let epoch = match role {
                Some(r) => host.observe_role(r),
                None => host.role_epoch(),
            };
            conn.origin = Some(Origin {
                host: host.clone(),
                epoch,
            });
            match role {
                Some(r) if !self.attrs.accepts(r) => {
                    if self.attrs == TargetSessionAttrs::PreferStandby && fallback.is_none() {
                        fallback = Some(conn);
                        continue;
                    }
                    tracing::debug!(host = %host.name, role = %r, wanted = %self.attrs,
                        "server role does not match target_session_attrs; trying the next host");
                    connecting.set(false);
                    conn.terminate();
                    errors.push(ConnectError::WrongRole {
                        host: host.name.clone(),
                        role: r,
                        wanted: self.attrs,
                    });
                }
                _ => return Ok(self.found(conn)),
            }
        }
        if let Some(conn) = fallback {
            return Ok(self.found(conn));
        }
        self.none_found(&target.database, errors).await
    }

    fn found(&self, conn: ServerConn) -> ServerConn {
        if self.no_match.swap(false, Ordering::AcqRel) {
            tracing::info!(hosts = %self.names(), wanted = %self.attrs, "found a server to serve the pool again");
        }
        conn
    }

    /// No host served. Fails fast when every host's breaker is open; otherwise pauses before
    /// returning so the caller's retry is paced, and says why in one error.
    async fn none_found(
        &self,
        database: &str,
        mut errors: Vec<ConnectError>,
    ) -> Result<ServerConn, ConnectError> {
        let all_breakers = !errors.is_empty()
            && errors
                .iter()
                .all(|e| matches!(e, ConnectError::BreakerOpen(_)));
        if all_breakers || (self.hosts.len() == 1 && self.attrs == TargetSessionAttrs::Any) {
            // The single-host path keeps its own pacing (the host's back-off).
            return Err(errors.pop().unwrap_or_else(|| no_hosts(self)));
        }
        if !self.no_match.swap(true, Ordering::AcqRel) {
            tracing::warn!(hosts = %self.names(), wanted = %self.attrs,
                error = %errors.last().map(|e| e.to_string()).unwrap_or_default(),
                "no upstream host can serve the pool; clients wait while Breakwater keeps looking");
        }
        // Hosts that were skipped say when they may be tried again; never wait longer than the
        // search spacing, so a host that comes back is found quickly.
        let soonest_backoff = errors
            .iter()
            .filter_map(|e| match e {
                ConnectError::Backoff { retry_in, .. } => Some(*retry_in),
                _ => None,
            })
            .min();
        let spacing = self.retry.mul_f64(0.5 + 0.5 * rand::random::<f64>());
        let pause = soonest_backoff.map_or(spacing, |b| b.min(spacing));
        crate::timer::sleep(pause.max(Duration::from_millis(10))).await;
        let last = errors.pop().unwrap_or_else(|| no_hosts(self));
        Err(ConnectError::NoMatchingHost {
            database: database.to_owned(),
            hosts: self.names(),
            wanted: self.attrs,
            last: Box::new(last),
        })
    }

    /// Logs in to every host once, bounded by `timeout` each, and records its role. Returns
    /// whether any host's role changed.
    pub async fn probe(
        &self,
        target: &ServerTarget,
        settings: &ServerSettings,
        timeout: Option<Duration>,
    ) -> bool {
        let mut changed = false;
        for host in &self.hosts {
            let before = host.role_epoch();
            let probe = async {
                let attempt = host.admit_now().await.ok()?;
                let mut t = target.clone();
                t.host.clone_from(&host.host);
                t.port = host.port;
                let mut conn = ServerConn::connect_admitted(attempt, &t, settings, host)
                    .await
                    .ok()?;
                let role = detect_role(&mut conn, self.attrs, settings).await.ok();
                conn.terminate();
                role.flatten()
            };
            let role = match timeout {
                Some(t) => crate::timer::timeout(t, probe).await.ok().flatten(),
                None => probe.await,
            };
            if let Some(r) = role {
                host.observe_role(r);
            }
            changed |= host.role_epoch() != before;
        }
        changed
    }
}

fn no_hosts(list: &HostList) -> ConnectError {
    ConnectError::Backoff {
        host: list.names(),
        retry_in: list.retry,
    }
}

/// The server's role: from ParameterStatus on PostgreSQL 14 and later; by query on older
/// servers, and only when the pool cares.
async fn detect_role(
    conn: &mut ServerConn,
    attrs: TargetSessionAttrs,
    settings: &ServerSettings,
) -> Result<Option<Role>, ConnectError> {
    if let Some(hs) = conn.param("in_hot_standby") {
        let hot_standby = hs == "on";
        let read_only = conn.param("default_transaction_read_only") == Some("on");
        return Ok(Some(Role {
            hot_standby,
            read_only,
        }));
    }
    if attrs == TargetSessionAttrs::Any {
        return Ok(None);
    }
    let addr = conn.addr().to_string();
    let sql = "SELECT pg_catalog.pg_is_in_recovery(), \
               pg_catalog.current_setting('default_transaction_read_only')";
    let bound = settings.login_timeout.unwrap_or(Duration::from_secs(5));
    let row = match crate::timer::timeout(bound, conn.query_first_row(sql)).await {
        Ok(Ok(row)) => row,
        Ok(Err(source)) => return Err(ConnectError::RoleCheck { addr, source }),
        Err(_) => {
            return Err(ConnectError::LoginTimeout {
                addr,
                timeout: bound,
            })
        }
    };
    let col = |i: usize| row.get(i).and_then(|v| v.as_deref());
    match (col(0), col(1)) {
        (Some(rec), Some(ro)) => Ok(Some(Role {
            hot_standby: rec == "t",
            read_only: ro == "on",
        })),
        _ => Err(ConnectError::RoleCheck {
            addr,
            source: QueryError::NoRow,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: Role = Role {
        hot_standby: false,
        read_only: false,
    };
    const STANDBY: Role = Role {
        hot_standby: true,
        read_only: false,
    };

    fn list(n: usize, lb: LoadBalanceHosts) -> HostList {
        let hosts = crate::Hosts::new(crate::StormSettings::default());
        let all: Vec<_> = (0..n).map(|i| hosts.get("h", 5000 + i as u16)).collect();
        let mut it = all.into_iter();
        let first = it.next().unwrap();
        HostList::new(
            first,
            it.collect(),
            TargetSessionAttrs::Any,
            lb,
            Duration::from_millis(10),
        )
    }

    #[test]
    fn round_robin_starts_one_host_further_each_time_and_disable_never_does() {
        let rr = list(3, LoadBalanceHosts::RoundRobin);
        let firsts: Vec<u16> = (0..4).map(|_| rr.order()[0].port).collect();
        assert_eq!(firsts, [5000, 5001, 5002, 5000]);
        assert_eq!(rr.order().len(), 3);
        let fixed = list(3, LoadBalanceHosts::Disable);
        let firsts: Vec<u16> = (0..3).map(|_| fixed.order()[0].port).collect();
        assert_eq!(firsts, [5000, 5000, 5000]);
    }

    #[test]
    fn a_role_change_bumps_the_epoch_and_retires_older_connections() {
        let mut l = list(1, LoadBalanceHosts::Disable);
        l.attrs = TargetSessionAttrs::ReadWrite;
        let host = l.first().clone();
        let e0 = host.observe_role(PRIMARY);
        let origin = Origin {
            host: host.clone(),
            epoch: e0,
        };
        assert!(l.still_wanted(&origin));
        assert_eq!(host.observe_role(PRIMARY), e0, "same role, same epoch");
        let e1 = host.observe_role(STANDBY);
        assert_ne!(e0, e1);
        assert!(!l.still_wanted(&origin));
        l.attrs = TargetSessionAttrs::Any;
        assert!(l.still_wanted(&origin), "a pool taking any role keeps it");
    }
}

//! What operators can do to a running proxy, for the binary's admin console and signal
//! handlers: pause and resume checkouts, disable logins, retire server connections, disconnect
//! clients, and swap in reloaded settings. Everything here acts through the pool's own switches
//! and the client registry; no session is reached into.

use std::collections::HashSet;
use std::sync::Arc;

use crate::registry::{ClientCounts, ClientInfo};
use crate::settings::{DatabaseRoute, ProxySettings};
use crate::{PoolEntry, Proxy, Shared};
use upstream::Reconfigure;

/// What operators switched that only logins read: disabled databases. (Pauses live in the
/// pool set, with the pools they gate.)
#[derive(Debug, Default)]
pub(crate) struct Switches {
    disabled: HashSet<String>,
}

impl Switches {
    pub(crate) fn is_disabled(&self, db: &str) -> bool {
        self.disabled.contains(db)
    }
}

/// Why an operator command was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("no such database: {0}")]
    NoSuchDatabase(String),
    #[error("database {0} is not paused")]
    NotPaused(String),
    #[error("pooler is not paused")]
    NotPausedAll,
    #[error("already paused")]
    AlreadyPaused,
    #[error("client not found: {0}")]
    NoSuchClient(u64),
}

/// A summary of what a reload changed, for the log and the console.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    pub resized: Vec<String>,
}

/// The pool keeps serving when only these differ; anything else re-points the database.
fn same_target(a: &DatabaseRoute, b: &DatabaseRoute) -> bool {
    a.host == b.host
        && a.port == b.port
        && a.dbname == b.dbname
        && a.user == b.user
        && a.password == b.password
        && a.pool_mode == b.pool_mode
        && a.require_auth == b.require_auth
        && a.startup_params == b.startup_params
        && a.connect_query == b.connect_query
        && a.server_auth == b.server_auth
}

impl Shared {
    pub(crate) fn switches(&self) -> std::sync::MutexGuard<'_, Switches> {
        match self.switches.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }
}

impl Proxy {
    pub fn settings(&self) -> Arc<ProxySettings> {
        self.shared.settings()
    }

    fn known(&self, db: &str) -> Result<(), ControlError> {
        if self.shared.settings().resolve(db).is_some() {
            Ok(())
        } else {
            Err(ControlError::NoSuchDatabase(db.to_owned()))
        }
    }

    /// Pools of `db` (every pool with `None`).
    pub fn pools_of(&self, db: Option<&str>) -> Vec<Arc<PoolEntry>> {
        self.shared.pools.of(db)
    }

    /// New transactions of `db` (all with `None`) wait before checkout until resumed; running
    /// ones finish. The caller waits for them and closes idle servers if it wants PgBouncer's
    /// full PAUSE.
    pub fn pause(&self, db: Option<&str>) -> Result<(), ControlError> {
        if let Some(d) = db {
            self.known(d)?;
        }
        self.shared.pools.update_pause(|p| {
            match db {
                None if p.all => return Err(ControlError::AlreadyPaused),
                None => p.all = true,
                Some(d) => {
                    p.databases.insert(d.to_owned());
                }
            }
            Ok(())
        })
    }

    pub fn resume(&self, db: Option<&str>) -> Result<(), ControlError> {
        if let Some(d) = db {
            self.known(d)?;
        }
        self.shared.pools.update_pause(|p| {
            match db {
                None if !p.all && p.databases.is_empty() => return Err(ControlError::NotPausedAll),
                // RESUME without a name lifts every pause, global and per database.
                None => {
                    p.all = false;
                    p.databases.clear();
                }
                Some(d) => {
                    if !p.databases.remove(d) && !p.all {
                        return Err(ControlError::NotPaused(d.to_owned()));
                    }
                }
            }
            Ok(())
        })
    }

    pub fn is_paused(&self, db: Option<&str>) -> bool {
        self.shared.pools.is_paused(db)
    }

    /// New logins to `db` are refused (existing clients stay).
    pub fn set_disabled(&self, db: &str, disabled: bool) -> Result<(), ControlError> {
        self.known(db)?;
        let mut sw = self.shared.switches();
        if disabled {
            sw.disabled.insert(db.to_owned());
        } else {
            sw.disabled.remove(db);
        }
        Ok(())
    }

    pub fn is_disabled(&self, db: &str) -> bool {
        self.shared.switches().is_disabled(db)
    }

    /// Closes server connections of `db` (all with `None`) as they are released; idle ones now.
    pub fn reconnect(&self, db: Option<&str>) -> Result<(), ControlError> {
        if let Some(d) = db {
            self.known(d)?;
        }
        self.shared.pools.reconnect(db);
        Ok(())
    }

    /// Disconnects every client of `db` (all with `None`) and closes its server connections;
    /// the database stays paused until RESUME, as in PgBouncer.
    pub fn kill(&self, db: Option<&str>) -> Result<usize, ControlError> {
        if let Some(d) = db {
            self.known(d)?;
        }
        self.shared.pools.update_pause(|p| match db {
            Some(d) => {
                p.databases.insert(d.to_owned());
            }
            None => p.all = true,
        });
        let n = self.shared.registry.kill_database(db);
        self.shared.pools.reconnect(db);
        Ok(n)
    }

    pub fn kill_client(&self, id: u64) -> Result<(), ControlError> {
        if self.shared.registry.kill(id) {
            Ok(())
        } else {
            Err(ControlError::NoSuchClient(id))
        }
    }

    /// SHOW CLIENTS rows.
    pub fn clients(&self) -> Vec<Arc<ClientInfo>> {
        self.shared.registry.list()
    }

    /// Logged-in clients counted per database and per user, without listing them.
    pub fn client_counts(&self) -> ClientCounts {
        self.shared.registry.counts()
    }

    /// Swaps in new settings: pool sizes, minimums and server timeouts change in place; new
    /// databases appear; a removed or re-pointed database's pools are retired — their clients
    /// finish on them, their servers close as released, and new logins get fresh pools.
    pub fn reload(&self, new: ProxySettings) -> ReloadReport {
        let mut report = ReloadReport::default();
        let old = self.shared.settings();
        for r in &new.databases {
            match old.route(&r.name) {
                None => report.added.push(r.name.clone()),
                Some(o) if !same_target(o, r) => report.changed.push(r.name.clone()),
                Some(o)
                    if o.pool_size != r.pool_size
                        || o.min_pool_size != r.min_pool_size
                        || o.reserve() != r.reserve() =>
                {
                    report.resized.push(r.name.clone())
                }
                Some(_) => {}
            }
        }
        for o in &old.databases {
            if new.route(&o.name).is_none() {
                report.removed.push(o.name.clone());
            }
        }
        self.shared.pools.reconfigure(
            new.server.clone(),
            |e| match new.resolve(&e.route.name) {
                Some(r) => {
                    // The pool's own route carries its user's pool_size and pool_mode.
                    let r = new.users.route_for(&r, &e.pool.user);
                    match same_target(&e.route, &r) {
                        true => Reconfigure::Keep {
                            size: r.pool_size,
                            min_size: r.min_pool_size,
                            reserve: r.reserve(),
                        },
                        false => Reconfigure::Retire,
                    }
                }
                None => Reconfigure::Retire,
            },
            |db| new.resolve(db).is_some(),
        );
        self.shared
            .switches()
            .disabled
            .retain(|d| new.resolve(d).is_some());
        // New server credentials are a reason to try again now: a host backing off (or with its
        // breaker open) after `28P01` would otherwise keep clients waiting out that back-off.
        let userlist_changed = old.userlist != new.userlist;
        for r in &new.databases {
            let credentials_changed = old
                .route(&r.name)
                .is_some_and(|o| o.password != r.password || o.user != r.user);
            if credentials_changed || userlist_changed {
                let hosts = std::iter::once((r.host.as_str(), r.port))
                    .chain(r.hosts.iter().map(|(h, p)| (h.as_str(), *p)));
                for (host, port) in hosts {
                    self.shared
                        .pools
                        .hosts()
                        .get(host, port)
                        .reset_failures("RELOAD changed the server credentials");
                }
            }
        }
        self.shared.admission.set_limits(new.admission);
        self.shared.auth_lookups.clear();
        match self.shared.settings.write() {
            Ok(mut s) => *s = Arc::new(new),
            Err(p) => *p.into_inner() = Arc::new(new),
        }
        report
    }
}

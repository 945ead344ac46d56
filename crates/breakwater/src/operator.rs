//! The daemon's side of the admin console, signals and stats: it adapts the proxy to the admin
//! crate's [`Control`] trait (so neither depends on the other), keeps the `stats_period`
//! history behind the `avg_*` columns, reloads config, logs the periodic stats line and feeds
//! the Prometheus exporter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use admin::{
    Action, ConfigItem, ConnView, Control, DatabaseView, PoolView, Show, ShutdownMode, UserView,
    View,
};
use proxy::Proxy;
use stats::PoolSnapshot;
use tokio::sync::watch;

use crate::config::Config;

type PoolKey = (String, String);

/// Counters at the last two `stats_period` ticks.
#[derive(Default)]
struct History {
    older: Option<(Instant, HashMap<PoolKey, PoolSnapshot>)>,
    newer: Option<(Instant, HashMap<PoolKey, PoolSnapshot>)>,
}

pub struct Daemon {
    pub proxy: Arc<Proxy>,
    config: RwLock<Config>,
    history: Mutex<History>,
    /// Set by SHUTDOWN; the daemon's main loop waits on it next to the signals.
    pub shutdown: watch::Sender<Option<ShutdownMode>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl Daemon {
    pub fn new(proxy: Arc<Proxy>, config: Config) -> Arc<Daemon> {
        Arc::new(Daemon {
            proxy,
            config: RwLock::new(config),
            history: Mutex::new(History::default()),
            shutdown: watch::channel(None).0,
        })
    }

    pub fn config(&self) -> Config {
        match self.config.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn snapshots(&self) -> HashMap<PoolKey, PoolSnapshot> {
        self.proxy
            .pools()
            .iter()
            .map(|p| {
                let s = p.stats.snapshot();
                ((s.database.clone(), s.user.clone()), s)
            })
            .collect()
    }

    /// Takes the `stats_period` tick: the newer counters become the older ones. Returns the
    /// line for the stats log (None before the second tick).
    pub fn rotate(&self) -> Option<String> {
        let now = Instant::now();
        let snaps = self.snapshots();
        let mut h = lock(&self.history);
        h.older = h.newer.take();
        h.newer = Some((now, snaps));
        let (Some((t0, older)), Some((t1, newer))) = (&h.older, &h.newer) else {
            return None;
        };
        let (mut a, mut b) = (PoolSnapshot::default(), PoolSnapshot::default());
        for (k, n) in newer {
            if let Some(o) = older.get(k) {
                a.accumulate(o);
                b.accumulate(n);
            }
        }
        let avg = b.averages(&a, t1.duration_since(*t0).as_secs_f64());
        Some(format!(
            "stats: {} xacts/s, {} queries/s, {} client parses/s, {} server parses/s, {} binds/s, in {} B/s, out {} B/s, xact {} us, query {} us, wait {} us",
            avg.xact_count, avg.query_count, avg.client_parse_count, avg.server_parse_count,
            avg.bind_count, avg.recv, avg.sent, avg.xact_time, avg.query_time, avg.wait_time
        ))
    }

    /// Publishes every pool to the metrics registry.
    pub fn publish_metrics(&self) {
        for p in self.proxy.pools() {
            let s = p.stats.snapshot();
            let status = p.pool.status();
            stats::export::publish_pool(
                &s,
                &stats::export::ServerGauges {
                    active: status.active as u64,
                    idle: status.idle as u64,
                    size: status.size as u64,
                    max_size: status.max_size as u64,
                    reserve_in_use: status.reserve_in_use as u64,
                    paused: status.paused,
                    maxwait_us: p.pool.max_wait().as_micros() as u64,
                },
            );
        }
        for h in self.proxy.hosts() {
            stats::export::publish_host(&h);
        }
        stats::export::publish_global(
            &self.proxy.global_stats().snapshot(),
            self.proxy.client_count() as u64,
        );
    }

    /// Re-reads the config file and auth_file and applies what may change while running.
    pub fn reload(&self) -> Result<String, String> {
        let next = self.config().reload().map_err(|e| {
            tracing::error!("reload rejected, keeping the running config: {e}");
            format!("RELOAD failed, keeping the running config: {e}")
        })?;
        Ok(self.apply(next))
    }

    fn apply(&self, mut next: Config) -> String {
        let current = self.config();
        for key in current.keep_restart_only(&mut next) {
            tracing::warn!(
                setting = key,
                "{key} changed in the config file but needs a restart; keeping the running value"
            );
        }
        let report = self.proxy.reload(next.proxy_settings());
        let summary = format!(
            "reloaded: {} databases ({} added, {} re-pointed, {} removed, {} resized), {} users in auth_file",
            next.file.databases.len(),
            report.added.len(),
            report.changed.len(),
            report.removed.len(),
            report.resized.len(),
            next.userlist.len(),
        );
        tracing::info!(added = ?report.added, changed = ?report.changed, removed = ?report.removed,
            resized = ?report.resized, "{summary}");
        match self.config.write() {
            Ok(mut c) => *c = next,
            Err(p) => *p.into_inner() = next,
        }
        summary
    }

    fn db_arg(db: &Option<String>) -> Option<&str> {
        db.as_deref()
    }
}

fn addr_port(a: Option<std::net::SocketAddr>) -> (String, u16) {
    match a {
        Some(a) => (a.ip().to_string(), a.port()),
        None => ("unix".into(), 0),
    }
}

impl Control for Daemon {
    fn view(&self, what: &Show) -> View {
        let config = self.config();
        let settings = self.proxy.settings();
        let (older, newer, period_secs) = {
            let h = lock(&self.history);
            let secs = match (&h.older, &h.newer) {
                (Some((a, _)), Some((b, _))) => b.duration_since(*a).as_secs_f64(),
                _ => 0.0,
            };
            (
                h.older.as_ref().map(|(_, m)| m.clone()),
                h.newer.as_ref().map(|(_, m)| m.clone()),
                secs,
            )
        };
        let clients = match what {
            Show::Clients => self.proxy.clients(),
            _ => Vec::new(),
        };
        let counts = match what {
            Show::Databases | Show::Users | Show::Lists => self.proxy.client_counts(),
            _ => proxy::ClientCounts::default(),
        };
        let count = |m: &HashMap<String, u64>, key: &str| m.get(key).copied().unwrap_or(0);
        let mut servers = Vec::new();
        let mut pools = Vec::new();
        // Databases the "*" entry serves that have pools now, listed in SHOW DATABASES as
        // PgBouncer lists its automatic databases.
        let mut auto = Vec::new();
        for p in self.proxy.pools() {
            if p.route.auto && !auto.contains(&p.route.name) {
                auto.push(p.route.name.clone());
            }
            let stats = p.stats.snapshot();
            let key = (stats.database.clone(), stats.user.clone());
            let status = p.pool.status();
            for s in p.pool.servers() {
                let (addr, port) = match s.remote {
                    Some(a) => (a.ip().to_string(), a.port()),
                    None => (s.addr.clone(), 0),
                };
                let (local_addr, local_port) = addr_port(s.local);
                servers.push(ConnView {
                    id: s.id,
                    user: s.user.clone(),
                    database: s.database.clone(),
                    state: if s.in_use() { "active" } else { "idle" }.into(),
                    addr,
                    port,
                    local_addr,
                    local_port,
                    connect_time: s.connect_time,
                    request_time: Some(s.request_time()).filter(|t| *t > SystemTime::UNIX_EPOCH),
                    remote_pid: s.pid,
                    application_name: String::new(),
                    close_needed: false,
                });
            }
            pools.push(PoolView {
                older: older.as_ref().and_then(|m| m.get(&key).cloned()),
                newer: newer.as_ref().and_then(|m| m.get(&key).cloned()),
                sv_login: stats.sv_login.max(0) as u64,
                stats,
                sv_active: status.active as u64,
                sv_idle: status.idle as u64,
                maxwait_us: p.pool.max_wait().as_micros() as u64,
                pool_size: status.max_size as u64,
                min_pool_size: status.min_size as u64,
                reserve_pool_size: status.reserve_size as u64,
                reserve_in_use: status.reserve_in_use as u64,
                pool_mode: p.route.pool_mode.as_str().into(),
                paused: status.paused,
            });
        }
        pools.sort_by(|a, b| {
            (&a.stats.database, &a.stats.user).cmp(&(&b.stats.database, &b.stats.user))
        });
        auto.sort_unstable();
        let auto: Vec<_> = auto.iter().filter_map(|n| settings.resolve(n)).collect();
        let databases = settings
            .databases
            .iter()
            .chain(auto.iter().map(|d| &**d))
            .map(|d| DatabaseView {
                name: d.name.clone(),
                host: d.host.clone(),
                port: d.port,
                dbname: d.dbname.clone(),
                force_user: d.user.clone(),
                pool_size: d.pool_size as u64,
                min_pool_size: d.min_pool_size as u64,
                reserve_pool_size: d.reserve_pool_size as u64,
                server_lifetime_secs: settings.server.lifetime.map(|l| l.as_secs()).unwrap_or(0),
                pool_mode: d.pool_mode.as_str().into(),
                current_connections: servers.iter().filter(|s| s.database == d.name).count() as u64,
                max_connections: d.max_db_connections.unwrap_or(0) as u64,
                max_client_connections: d.max_db_client_connections as u64,
                current_client_connections: count(&counts.by_database, &d.name),
                paused: self.proxy.is_paused(Some(&d.name)),
                disabled: self.proxy.is_disabled(&d.name),
            })
            .collect();
        // The auth_file's users and those with a [users.NAME] table.
        let mut names: Vec<&str> = settings.userlist.names().collect();
        names.extend(settings.users.routes.iter().map(|u| u.name.as_str()));
        names.sort_unstable();
        names.dedup();
        let users: Vec<UserView> = names
            .into_iter()
            .map(|u| {
                let own = settings.users.route(u);
                UserView {
                    name: u.to_owned(),
                    pool_size: own.and_then(|o| o.pool_size).map(|n| n as u64),
                    pool_mode: own.and_then(|o| o.pool_mode).map(|m| m.as_str().into()),
                    max_user_connections: settings.users.max_user_connections(u).unwrap_or(0)
                        as u64,
                    current_connections: servers.iter().filter(|s| s.user == u).count() as u64,
                    max_user_client_connections: settings
                        .users
                        .max_user_client_connections(u)
                        .unwrap_or(0) as u64,
                    current_client_connections: count(&counts.by_user, u),
                }
            })
            .collect();
        let clients: Vec<ConnView> = clients
            .iter()
            .map(|c| {
                let (addr, port) = addr_port(c.remote);
                let (local_addr, local_port) = addr_port(c.local);
                ConnView {
                    id: c.id,
                    user: c.user.to_string(),
                    database: c.database.to_string(),
                    state: c.state().as_str().into(),
                    addr,
                    port,
                    local_addr,
                    local_port,
                    connect_time: c.connect_time,
                    request_time: None,
                    remote_pid: 0,
                    application_name: c.application_name.clone(),
                    close_needed: false,
                }
            })
            .collect();
        View {
            version: format!("Breakwater {}", env!("CARGO_PKG_VERSION")),
            now: SystemTime::now(),
            paused: self.proxy.is_paused(None),
            period_secs,
            login_clients: match what {
                Show::Lists => self
                    .proxy
                    .client_count()
                    .saturating_sub(counts.total as usize) as u64,
                _ => 0,
            },
            used_clients: counts.total,
            client_addrs: self.proxy.tracked_sources() as u64,
            fleets: self.proxy.fleets(),
            pools,
            databases,
            clients,
            servers,
            users,
            config: config
                .show()
                .into_iter()
                .map(|(key, value, default, changeable)| ConfigItem {
                    key,
                    value,
                    default,
                    changeable,
                })
                .collect(),
            global: self.proxy.global_stats().snapshot(),
            hosts: self.proxy.hosts(),
            dns_hosts: self
                .proxy
                .dns_hosts()
                .into_iter()
                .map(|d| admin::DnsHostView {
                    hostname: d.host,
                    ttl_secs: d.ttl_left.as_secs(),
                    addrs: d
                        .addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    last_error: d.last_error,
                })
                .collect(),
        }
    }

    async fn execute(&self, action: Action) -> Result<Option<String>, String> {
        let e = |e: proxy::ControlError| e.to_string();
        match &action {
            Action::Pause(db) => {
                self.proxy.pause(Self::db_arg(db)).map_err(e)?;
                // As PgBouncer: the command returns once running transactions have finished;
                // then idle server connections are closed.
                self.proxy.wait_servers_released(Self::db_arg(db)).await;
                for p in self.proxy.pools_of(Self::db_arg(db)) {
                    p.pool.close_idle();
                }
                Ok(None)
            }
            Action::Resume(db) => self.proxy.resume(Self::db_arg(db)).map(|_| None).map_err(e),
            Action::Disable(db) => self.proxy.set_disabled(db, true).map(|_| None).map_err(e),
            Action::Enable(db) => self.proxy.set_disabled(db, false).map(|_| None).map_err(e),
            Action::Reconnect(db) => self
                .proxy
                .reconnect(Self::db_arg(db))
                .map(|_| None)
                .map_err(e),
            Action::Kill(db) => {
                let n = self.proxy.kill(Self::db_arg(db)).map_err(e)?;
                Ok(Some(format!(
                    "{n} clients disconnected; {} paused until RESUME",
                    db.as_deref().unwrap_or("every database")
                )))
            }
            Action::KillClient(id) => self.proxy.kill_client(*id).map(|_| None).map_err(e),
            Action::WaitClose(db) => {
                if let Some(d) = db {
                    if self.proxy.settings().route(d).is_none() {
                        return Err(format!("no such database: {d}"));
                    }
                }
                self.proxy.wait_stale_closed(Self::db_arg(db)).await;
                Ok(None)
            }
            Action::Reload => self.reload().map(Some),
            Action::Shutdown(mode) => {
                tracing::info!(?mode, "SHUTDOWN command issued");
                self.shutdown.send_replace(Some(*mode));
                Ok(None)
            }
            Action::Set { key, value } => {
                let next = self.config().with_setting(key, value)?;
                self.apply(next);
                Ok(None)
            }
            Action::Drill {
                database,
                host,
                mode,
                secs,
            } => {
                if !self.config().file.pooler.allow_drills {
                    return Err(
                        "failure drills are off: set allow_drills = true to allow DRILL".into(),
                    );
                }
                let mode = upstream::DrillMode::parse(mode)
                    .ok_or_else(|| format!("unknown drill mode \"{mode}\""))?;
                self.proxy
                    .drill(database.as_deref(), host, mode, Duration::from_secs(*secs))?;
                Ok(Some(format!(
                    "upstream {host} is treated as failing ({}) for {secs}s",
                    mode.as_str()
                )))
            }
        }
    }
}

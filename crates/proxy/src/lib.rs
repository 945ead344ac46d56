#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
// Tests run on runtimes of their own, with a time driver (crates/clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

//! Client sessions for Breakwater: login, routing to a pool, and the per-connection state machine
//! that moves a client's transactions onto pooled server connections. This crate never opens a
//! server socket itself (that is `upstream`) and never implements the admin console: a login to
//! the admin database is handed back to the caller as an [`AdminLogin`].

pub mod admission;
pub mod auth_query;
pub mod cancel;
mod caps;
mod client;
mod client_conn;
mod control;
#[doc(hidden)]
pub mod fuzzing;
mod ledger;
mod listen;
pub mod params;
mod park;
pub mod prepared;
pub mod registry;
pub mod scan;
mod session;
pub mod settings;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::BytesMut;
use proto::auth::{ScramVerifier, ServerCredential};
use stats::{GlobalStats, PoolStats};
use upstream::{PoolSet, PoolSpec, ServerPool, ServerTarget, Stream};

pub use auth_query::{AuthLookupSettings, AuthQueryRoute, DEFAULT_AUTH_QUERY};
pub use cancel::ClientState;
pub use client::AdminLogin;
pub use control::{ControlError, ReloadReport};
pub use registry::{ClientCounts, ClientInfo};
pub use settings::{AuthType, DatabaseRoute, PoolMode, ProxySettings, UserRoute, UserSettings};
pub use tls::{ClientTls, ClientTlsFiles};

/// Names of the virtual admin database.
pub const ADMIN_DATABASES: &[&str] = &["breakwater", "pgbouncer"];

/// One pool and what goes with it.
pub struct PoolEntry {
    pub pool: Arc<ServerPool>,
    pub stats: Arc<PoolStats>,
    pub route: DatabaseRoute,
    /// Reported parameters of a fresh server connection, for answering logins without one;
    /// shared, so a login clones a pointer, not a dozen strings.
    welcome: Mutex<Option<Welcome>>,
    /// Statements this pool's servers have parsed, so a client's Parse of one outside a
    /// transaction needs no server.
    pub(crate) known_statements: prepared::KnownStatements,
    /// Sets of unreported startup parameters (`extra_float_digits`, `options=-c …`) a server of
    /// this pool has accepted. A login with a set not listed here takes a server round trip
    /// before it is welcomed, so an unknown parameter is refused at login, as PostgreSQL does,
    /// rather than failing every query after it; clients of one application all send the same
    /// set, so the list stays short (and is capped).
    accepted_startup_settings: Mutex<Vec<Vec<(String, String)>>>,
    /// For a pool of an automatic database: since when it has had no client (see
    /// `autodb_idle_timeout`).
    unused_since: Mutex<Option<std::time::Instant>>,
    /// Its clients' LISTENs in transaction and statement mode, and its listener connection.
    pub(crate) listen: listen::Hub,
}

impl AsRef<ServerPool> for PoolEntry {
    fn as_ref(&self) -> &ServerPool {
        &self.pool
    }
}

/// Enough distinct startup-parameter sets for the applications of one pool; past it, logins
/// with a new set each take a server round trip.
const MAX_ACCEPTED_STARTUP_SETTINGS: usize = 32;

impl PoolEntry {
    pub(crate) fn startup_settings_accepted(&self, extra: &[(String, String)]) -> bool {
        extra.is_empty()
            || match self.accepted_startup_settings.lock() {
                Ok(known) => known.iter().any(|k| k == extra),
                Err(_) => false,
            }
    }

    pub(crate) fn accept_startup_settings(&self, extra: &[(String, String)]) {
        if extra.is_empty() {
            return;
        }
        if let Ok(mut known) = self.accepted_startup_settings.lock() {
            if known.len() < MAX_ACCEPTED_STARTUP_SETTINGS && !known.iter().any(|k| k == extra) {
                known.push(extra.to_vec());
            }
        }
    }
}

/// A server's ParameterStatus pairs, as a fresh connection reports them.
pub(crate) type Welcome = Arc<WelcomeParams>;

/// The pairs, with each one's place among the tracked parameters (`params::TRACKED`) worked
/// out once per pool rather than by name at every login.
pub(crate) struct WelcomeParams {
    pub params: Box<[(String, String)]>,
    pub places: Box<[Option<usize>]>,
    /// The pairs as ParameterStatus messages, one after another, and where each one ends: a
    /// login copies them instead of encoding a dozen messages (a twentieth of a login's work
    /// in a connection storm).
    encoded: Box<[u8]>,
    ends: Box<[usize]>,
}

impl WelcomeParams {
    pub fn new(params: &[(String, String)]) -> Welcome {
        let mut encoded = BytesMut::new();
        let ends = params
            .iter()
            .map(|(k, v)| {
                proto::backend::write_parameter_status(&mut encoded, k, v);
                encoded.len()
            })
            .collect();
        Arc::new(WelcomeParams {
            params: params.into(),
            places: params
                .iter()
                .map(|(k, _)| params::tracked_index(k))
                .collect(),
            encoded: encoded.as_ref().into(),
            ends,
        })
    }

    /// Writes the ParameterStatus messages to `out`, with the client's own value of a tracked
    /// parameter (`mine`, by place in `params::TRACKED`) where it differs from the server's.
    pub fn write_to<'v>(&self, out: &mut BytesMut, mine: impl Fn(usize) -> Option<&'v str>) {
        let copy = |out: &mut BytesMut, range: std::ops::Range<usize>| {
            out.extend_from_slice(self.encoded.get(range).unwrap_or_default());
        };
        // encoded[..copied] is in `out` already, or replaced by the client's values.
        let mut copied = 0;
        let mut start = 0;
        for (((name, server), place), &end) in self.params.iter().zip(&self.places).zip(&self.ends)
        {
            if let Some(value) = place.and_then(&mine).filter(|v| v != server) {
                copy(out, copied..start);
                proto::backend::write_parameter_status(out, name, value);
                copied = end;
            }
            start = end;
        }
        copy(out, copied..self.encoded.len());
    }

    /// `(place in TRACKED, value)` of each tracked parameter the server reported.
    pub fn tracked(&self) -> impl Iterator<Item = (usize, &str)> + '_ {
        self.places
            .iter()
            .zip(self.params.iter())
            .filter_map(|(place, (_, v))| Some(((*place)?, v.as_str())))
    }
}

pub struct Proxy {
    shared: Arc<Shared>,
}

/// Holds a `max_client_conn` place for as long as the connection lives.
pub(crate) struct ClientSlot(Arc<Shared>);

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
        self.0.clients_changed.changed();
    }
}

pub(crate) struct Shared {
    settings: RwLock<Arc<ProxySettings>>,
    /// The pools, with their hosts, caps, pause and epochs; each pool's proxy-side data
    /// (route, welcome, known statements) rides beside it.
    pools: PoolSet<PoolEntry>,
    pub stats: GlobalStats,
    clients: AtomicUsize,
    /// Signalled when a client leaves, for a shutdown that waits for the last one.
    clients_changed: upstream::Changes,
    next_client_id: AtomicU64,
    /// Set once, by `begin_shutdown`; sessions read it between transactions.
    pub(crate) shutting_down: AtomicBool,
    /// SCRAM verifiers derived from plaintext auth_file passwords: PBKDF2 once, not per login.
    scram_cache: Mutex<HashMap<String, ScramVerifier>>,
    /// Logged-in clients, for SHOW CLIENTS, KILL and cancels.
    pub(crate) registry: registry::ClientRegistry,
    /// What operators switched: paused and disabled databases.
    pub(crate) switches: Mutex<control::Switches>,
    /// Where transactions run, kept between them (see `session::Workspace`).
    workspaces: session::Workspaces,
    /// Clients per login user and per database under max_user_client_connections and
    /// max_db_client_connections.
    user_clients: Arc<caps::Headcount>,
    db_clients: Arc<caps::Headcount>,
    /// Per-source connection counts and login buckets (`max_client_conn_per_addr`,
    /// `client_login_rate_per_addr`).
    pub(crate) admission: Arc<admission::Admission>,
    /// auth_query's cache and lookup pools.
    pub(crate) auth_lookups: auth_query::AuthLookups,
    /// Each shard's park for idle clients, by shard, started by the first client parked there.
    parks: Mutex<Vec<Option<Arc<park::Park>>>>,
    /// When the park sweep last ran (see `Proxy::maintain`).
    swept: Mutex<Option<std::time::Instant>>,
}

/// Where a client came from, for logs and SHOW CLIENTS: the address `accept` gave, or `None`
/// for a Unix socket. Kept as an address and formatted only when a log line or span is
/// written: formatting it at accept was some 3 000 instructions of every login.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<std::net::SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("unix"),
        }
    }
}

impl Proxy {
    pub fn new(settings: ProxySettings) -> Proxy {
        let admission = Arc::new(admission::Admission::default());
        admission.set_limits(settings.admission);
        Proxy {
            shared: Arc::new(Shared {
                pools: PoolSet::new(
                    settings.storm.clone(),
                    settings.dns.clone(),
                    settings.max_server_connections,
                    settings.server.clone(),
                ),
                settings: RwLock::new(Arc::new(settings)),
                stats: GlobalStats::default(),
                clients: AtomicUsize::new(0),
                clients_changed: upstream::Changes::default(),
                next_client_id: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                scram_cache: Mutex::new(HashMap::new()),
                registry: registry::ClientRegistry::default(),
                switches: Mutex::new(control::Switches::default()),
                workspaces: session::Workspaces::default(),
                user_clients: Arc::default(),
                db_clients: Arc::default(),
                admission,
                auth_lookups: auth_query::AuthLookups::default(),
                parks: Mutex::new(Vec::new()),
                swept: Mutex::new(None),
            }),
        }
    }

    /// What client sockets should carry now (a reload may change it): accept loops keep
    /// their listening sockets tuned with it.
    pub fn client_liveness(&self) -> upstream::TcpLiveness {
        self.shared.settings().client_liveness
    }

    /// Serves one client connection to its end. Returns the connection when it logged in to the
    /// admin database, for the caller to run the console on. `inherited`: the socket came from
    /// a listener tuned with the current `client_liveness` (see
    /// [`upstream::Stream::tune_accepted`]).
    ///
    /// Not an `async fn`: that would be one more layer of the client's task keeping its own
    /// copy of the arguments for the life of the connection.
    pub fn serve(
        &self,
        stream: Stream,
        peer: Peer,
        inherited: bool,
    ) -> impl std::future::Future<Output = Option<AdminLogin>> + Send + 'static {
        client::serve(self.shared.clone(), stream, peer, inherited)
    }

    /// Opens pools whose server login is known without a client (a `user` in the database
    /// entry) and brings them to `min_pool_size`; trims idle connections past their timeouts.
    pub async fn maintain(&self) {
        let settings = self.shared.settings();
        for route in &settings.databases {
            // The "*" entry is a template; its pools open when a client names a database.
            if route.name == settings::WILDCARD_DATABASE {
                continue;
            }
            if let Some(user) = &route.user {
                let _ = self.shared.pool_for(&settings, route, user, None);
            }
        }
        self.drop_idle_auto_databases(settings.autodb_idle_timeout);
        self.sweep_idle_clients();
        self.shared.auth_lookups.close_idle(&settings.server);
        // Concurrently: one pool waiting on an unreachable host must not hold up the others.
        let pools = self.shared.all_pools();
        futures_util::future::join_all(pools.iter().map(|p| p.pool.maintain(&settings.server)))
            .await;
    }

    /// Asks clients idle for a whole sweep period to park (see `park`), once per
    /// [`park::SWEEP`] whatever the maintenance tick is.
    fn sweep_idle_clients(&self) {
        let now = std::time::Instant::now();
        {
            let mut swept = self
                .shared
                .swept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if swept.is_some_and(|t| now.duration_since(t) < park::SWEEP) {
                return;
            }
            *swept = Some(now);
        }
        self.shared.registry.sweep();
    }

    /// Closes the pools of automatic databases (made from the `"*"` entry) that have had no
    /// client and no server in use for `autodb_idle_timeout`: a host with many databases keeps
    /// pools only for those in use. A login that found such a pool just before it closed gets
    /// 57P03 and may retry (it then opens a fresh one).
    fn drop_idle_auto_databases(&self, timeout: Option<std::time::Duration>) {
        let Some(timeout) = timeout else { return };
        for e in self.shared.all_pools().iter().filter(|e| e.route.auto) {
            let s = e.stats.snapshot();
            let unused = s.cl_active.max(0) + s.cl_waiting.max(0) + s.cl_idle.max(0) == 0
                && e.pool.status().active == 0;
            let mut since = match e.unused_since.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if !unused {
                *since = None;
                continue;
            }
            let since = *since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= timeout {
                tracing::info!(database = %e.route.name, user = %e.pool.user, "automatic database unused for autodb_idle_timeout: pool closed");
                self.shared.pools.remove(&e.route.name, &e.pool.user);
                e.pool.close();
            }
        }
    }

    /// Stops accepting work: idle clients are told and closed, active ones finish their
    /// transaction first.
    pub fn begin_shutdown(&self) {
        // The flag first: a session that registered after the wake-up below reads it set.
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        self.shared.registry.wake_for_shutdown();
        // Parked clients have no task to wake: their park resumes them all.
        let parks = self
            .shared
            .parks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for park in parks.iter().flatten() {
            park.wake();
        }
    }

    /// Each fleet budget's slots (SHOW FLEET, metrics).
    pub fn fleets(&self) -> Vec<stats::FleetSnapshot> {
        self.shared.pools.fleets()
    }

    /// Source addresses the per-address limits track now.
    pub fn tracked_sources(&self) -> usize {
        self.shared.admission.tracked()
    }

    pub fn client_count(&self) -> usize {
        self.shared.clients.load(Ordering::Relaxed)
    }

    /// Returns once no client is connected (a shutdown waiting for clients to leave).
    pub async fn wait_clients_gone(&self) {
        let shared = &self.shared;
        shared
            .clients_changed
            .wait_until(|| shared.clients.load(Ordering::SeqCst) == 0)
            .await;
    }

    pub fn pools(&self) -> Vec<Arc<PoolEntry>> {
        self.shared.all_pools()
    }

    /// Returns once no server of `db` (any with `None`) is checked out (PAUSE).
    pub async fn wait_servers_released(&self, db: Option<&str>) {
        self.shared.pools.wait_released(db).await;
    }

    /// Returns once every server of `db` (any with `None`) opened before the last RECONNECT,
    /// KILL or re-pointing RELOAD is closed (WAIT_CLOSE).
    pub async fn wait_stale_closed(&self, db: Option<&str>) {
        self.shared.pools.wait_closed(db).await;
    }

    /// Storm counters and breaker state per upstream host.
    pub fn hosts(&self) -> Vec<stats::HostSnapshot> {
        self.shared
            .pools
            .hosts()
            .all()
            .iter()
            .map(|h| h.stats.snapshot())
            .collect()
    }

    /// Starts a failure drill on a configured upstream host (`host:port` as SHOW HOSTS names it),
    /// optionally checking that it serves `database`.
    pub fn drill(
        &self,
        database: Option<&str>,
        host: &str,
        mode: upstream::DrillMode,
        duration: Duration,
    ) -> Result<(), String> {
        let settings = self.shared.settings();
        let mut found = None;
        for route in &settings.databases {
            if database.is_some_and(|d| d != route.name) {
                continue;
            }
            if let Some((h, p)) = route.hosts.iter().find(|(h, p)| format!("{h}:{p}") == host) {
                found = Some((h.clone(), *p));
                break;
            }
        }
        let Some((h, p)) = found else {
            return Err(match database {
                Some(d) => format!("{host} is not a host of database \"{d}\""),
                None => format!("{host} is not a configured upstream host (host:port)"),
            });
        };
        self.shared
            .pools
            .hosts()
            .get(&h, p)
            .start_drill(mode, duration);
        Ok(())
    }

    /// Names in the DNS cache: addresses, TTL left, last error.
    pub fn dns_hosts(&self) -> Vec<upstream::DnsEntrySnapshot> {
        self.shared
            .pools
            .hosts()
            .dns()
            .map(|d| d.snapshot())
            .unwrap_or_default()
    }

    pub fn global_stats(&self) -> &GlobalStats {
        &self.shared.stats
    }

    /// Closes every pool: idle connections now, busy ones when released.
    pub fn close_pools(&self) {
        self.shared.pools.close_all();
    }
}

impl Shared {
    /// Shard `home`'s park, started on the calling thread (which must be that shard's) the
    /// first time. `None` when it cannot start (no epoll set).
    fn park_of(self: &Arc<Self>, home: u16) -> Option<Arc<park::Park>> {
        let mut parks = self
            .parks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = usize::from(home);
        if parks.len() <= i {
            parks.resize(i + 1, None);
        }
        let place = parks.get_mut(i)?;
        if let Some(p) = place {
            return Some(p.clone());
        }
        match park::Park::start(self) {
            Ok(p) => {
                *place = Some(p.clone());
                Some(p)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot park idle clients on this shard ({e}); they keep their tasks"
                );
                None
            }
        }
    }

    pub(crate) fn settings(&self) -> Arc<ProxySettings> {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn all_pools(&self) -> Vec<Arc<PoolEntry>> {
        self.pools.all()
    }

    /// The pool for (database, server user), created on first use.
    pub(crate) fn pool_for(
        &self,
        settings: &ProxySettings,
        route: &DatabaseRoute,
        server_user: &str,
        login_credential: Option<ServerCredential>,
    ) -> Arc<PoolEntry> {
        if let Some(e) = self.pools.get(&route.name, server_user) {
            if let Some(cred) = login_credential {
                e.pool.offer_credential(cred);
            }
            return e;
        }
        // Offered again below in case another login opened the pool in the meantime.
        let offer = login_credential.clone();
        let route = &settings.users.route_for(route, server_user);
        let spec = || {
            let credential = route
                .password
                .clone()
                .map(ServerCredential::Password)
                .or_else(|| match settings.userlist.get(server_user) {
                    Some(proto::auth::Secret::Plain(p)) => {
                        Some(ServerCredential::Password(p.clone()))
                    }
                    _ => None,
                })
                .or(login_credential);
            PoolSpec {
                target: ServerTarget {
                    database: route.name.clone(),
                    host: route.host.clone(),
                    port: route.port,
                    dbname: route.dbname.clone(),
                    user: server_user.to_owned(),
                    credential,
                    require_auth: route.require_auth.clone(),
                    startup_params: route.startup_params.clone(),
                    connect_query: route.connect_query.clone(),
                    server_auth: route.server_auth.clone(),
                },
                hosts: route.hosts.clone(),
                attrs: route.target_session_attrs,
                load_balance: route.load_balance_hosts,
                size: route.pool_size,
                min_size: route.min_pool_size,
                max_db_connections: route.max_db_connections,
                max_user_connections: settings.users.max_user_connections(server_user),
                reserve: route.reserve(),
                fleet: route.fleet,
            }
        };
        let entry = self
            .pools
            .get_or_open(&route.name, server_user, spec, |pool| PoolEntry {
                stats: pool.stats().clone(),
                listen: listen::Hub::new(pool.clone()),
                pool,
                route: route.clone(),
                welcome: Mutex::new(None),
                known_statements: prepared::KnownStatements::default(),
                accepted_startup_settings: Mutex::new(Vec::new()),
                unused_since: Mutex::new(None),
            });
        if let Some(cred) = offer {
            entry.pool.offer_credential(cred);
        }
        entry
    }

    fn scram_verifier_for_plain(&self, user: &str, password: &str) -> ScramVerifier {
        let mut cache = match self.scram_cache.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        cache
            .entry(user.to_owned())
            .or_insert_with(|| ScramVerifier::from_password(password))
            .clone()
    }
}

/// Reads into `buf` from `stream`, reserving room first. `Ok(0)` is end of stream.
pub(crate) async fn read_into(stream: &mut Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    reserve_read(buf);
    stream.read_buf(buf).await
}

/// Makes room for a read, in small steps: an idle client's buffer is memory held per
/// connection.
pub(crate) fn reserve_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(4096);
    }
}

/// A duration as a setting is written: whole seconds as `5s`, anything else in milliseconds.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A bound on waits Breakwater makes on its own account (parameter sync, resets).
pub(crate) fn internal_timeout(settings: &ProxySettings) -> Duration {
    settings
        .server
        .login_timeout
        .unwrap_or(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the welcome must say: every server pair in order, the client's value where it
    /// has its own.
    fn one_by_one(params: &[(String, String)], mine: &[(&str, &str)]) -> BytesMut {
        let mut out = BytesMut::new();
        for (k, v) in params {
            let v = mine
                .iter()
                .find(|(m, _)| m == k)
                .map_or(v.as_str(), |(_, v)| v);
            proto::backend::write_parameter_status(&mut out, k, v);
        }
        out
    }

    #[test]
    fn the_copied_welcome_carries_the_clients_own_values() {
        let server: Vec<(String, String)> = [
            ("application_name", ""),
            ("client_encoding", "UTF8"),
            ("server_version", "15.8"),
            ("TimeZone", "UTC"),
            ("search_path", "public"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let w = WelcomeParams::new(&server);
        for mine in [
            vec![],
            vec![("application_name", "pgbench")],
            vec![("search_path", "app")],
            vec![("application_name", "a"), ("TimeZone", "Europe/Paris")],
            vec![("client_encoding", "UTF8")],
        ] {
            let mut out = BytesMut::new();
            w.write_to(&mut out, |place| {
                let name = params::TRACKED.get(place)?;
                mine.iter().find(|(k, _)| k == name).map(|(_, v)| *v)
            });
            assert_eq!(out, one_by_one(&server, &mine), "client values {mine:?}");
        }
    }
}

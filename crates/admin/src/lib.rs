//! The admin console: a virtual database (`breakwater`, also `pgbouncer`) that answers
//! PgBouncer's SHOW commands and operator commands over the simple query protocol.
//!
//! This crate sees only a read-only [`View`] (copied out of stats snapshots and registries by the
//! binary) and acts only through the [`Control`] trait the binary implements. It never depends on
//! the proxy or the pools, so it cannot lock a pool or reach into a session.

pub mod command;
pub mod console;
pub mod show;

use std::future::Future;
use std::time::SystemTime;

pub use command::{Action, Command, Show, ShutdownMode};
pub use console::{serve, ConsoleUser};
use stats::{FleetSnapshot, GlobalSnapshot, HostSnapshot, PoolSnapshot};

/// One pool (database, user) as SHOW POOLS / STATS / LATENCY see it.
#[derive(Debug, Clone, Default)]
pub struct PoolView {
    /// Counters now.
    pub stats: PoolSnapshot,
    /// Counters at the last two `stats_period` ticks (older first), for the `avg_*` columns.
    pub older: Option<PoolSnapshot>,
    pub newer: Option<PoolSnapshot>,
    pub sv_active: u64,
    pub sv_idle: u64,
    pub sv_login: u64,
    /// How long the longest-waiting client has waited for a server, in microseconds.
    pub maxwait_us: u64,
    pub pool_size: u64,
    pub min_pool_size: u64,
    /// `reserve_pool_size`, and how many of it the pool has taken now.
    pub reserve_pool_size: u64,
    pub reserve_in_use: u64,
    pub pool_mode: String,
    pub paused: bool,
}

/// One `[databases.NAME]` entry as SHOW DATABASES sees it.
#[derive(Debug, Clone, Default)]
pub struct DatabaseView {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub force_user: Option<String>,
    pub pool_size: u64,
    pub min_pool_size: u64,
    pub reserve_pool_size: u64,
    pub server_lifetime_secs: u64,
    pub pool_mode: String,
    pub current_connections: u64,
    /// `max_db_connections`; 0 = none.
    pub max_connections: u64,
    /// `max_db_client_connections`; 0 = none.
    pub max_client_connections: u64,
    pub current_client_connections: u64,
    pub paused: bool,
    pub disabled: bool,
}

/// A client or server connection as SHOW CLIENTS / SHOW SERVERS see it.
#[derive(Debug, Clone)]
pub struct ConnView {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub state: String,
    pub addr: String,
    pub port: u16,
    pub local_addr: String,
    pub local_port: u16,
    pub connect_time: SystemTime,
    pub request_time: Option<SystemTime>,
    pub remote_pid: i32,
    pub application_name: String,
    pub close_needed: bool,
}

#[derive(Debug, Clone, Default)]
pub struct UserView {
    pub name: String,
    /// From `[users.NAME]`; `None` when the user has no value of its own.
    pub pool_size: Option<u64>,
    pub pool_mode: Option<String>,
    /// The cap in force for this user (its own or the pooler-wide one); 0 = none.
    pub max_user_connections: u64,
    pub current_connections: u64,
    pub max_user_client_connections: u64,
    pub current_client_connections: u64,
}

/// One name in the DNS cache, for SHOW DNS_HOSTS.
#[derive(Debug, Clone, Default)]
pub struct DnsHostView {
    pub hostname: String,
    /// Seconds until the answer is looked up again.
    pub ttl_secs: u64,
    /// Addresses, comma-separated (empty for a cached NXDOMAIN).
    pub addrs: String,
    pub last_error: Option<String>,
}

/// One row of SHOW CONFIG.
#[derive(Debug, Clone, Default)]
pub struct ConfigItem {
    pub key: String,
    pub value: String,
    pub default: String,
    pub changeable: bool,
}

/// Everything the SHOW commands read, copied at the moment of the query.
#[derive(Debug, Clone)]
pub struct View {
    pub version: String,
    pub now: SystemTime,
    /// PAUSE without a database is in effect.
    pub paused: bool,
    /// Seconds between the two `stats_period` ticks in [`PoolView::older`]/[`PoolView::newer`].
    pub period_secs: f64,
    pub pools: Vec<PoolView>,
    pub databases: Vec<DatabaseView>,
    /// Filled for SHOW CLIENTS only.
    pub clients: Vec<ConnView>,
    /// Logged-in clients, counted for SHOW LISTS (0 for other commands).
    pub used_clients: u64,
    pub servers: Vec<ConnView>,
    pub users: Vec<UserView>,
    pub config: Vec<ConfigItem>,
    pub global: GlobalSnapshot,
    /// Storm counters and breaker state per upstream host.
    pub hosts: Vec<HostSnapshot>,
    /// The DNS cache.
    pub dns_hosts: Vec<DnsHostView>,
    /// Clients connected but not yet logged in (or in the console).
    pub login_clients: u64,
    /// Source addresses tracked by the per-address limits (SHOW LISTS `client_addrs`).
    pub client_addrs: u64,
    /// Fleet budgets (SHOW FLEET).
    pub fleets: Vec<FleetSnapshot>,
}

impl Default for View {
    fn default() -> Self {
        View {
            version: String::new(),
            now: SystemTime::UNIX_EPOCH,
            paused: false,
            period_secs: 0.0,
            pools: Vec::new(),
            databases: Vec::new(),
            clients: Vec::new(),
            used_clients: 0,
            servers: Vec::new(),
            users: Vec::new(),
            config: Vec::new(),
            global: GlobalSnapshot::default(),
            hosts: Vec::new(),
            dns_hosts: Vec::new(),
            login_clients: 0,
            client_addrs: 0,
            fleets: Vec::new(),
        }
    }
}

/// What the console can ask of the running pooler. The binary implements it over the proxy.
pub trait Control: Send + Sync {
    /// A fresh read-only copy of what `SHOW what` reads. Only SHOW CLIENTS lists the clients
    /// (with 50k of them, listing costs tens of milliseconds), and only SHOW DATABASES, USERS
    /// and LISTS count them; the rest of the view is the same for every command.
    fn view(&self, what: &Show) -> View;

    /// Runs an operator command. `Ok(Some(notice))` adds a NOTICE before the command tag;
    /// `Err(message)` becomes an ERROR naming what went wrong.
    fn execute(
        &self,
        action: Action,
    ) -> impl Future<Output = Result<Option<String>, String>> + Send;
}

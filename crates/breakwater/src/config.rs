//! The configuration: every setting stated once (name, type, default, whether a running pooler
//! may change it), read from the TOML file key by key so that every problem is reported at once
//! with its key path and line, then validated and turned into each crate's typed settings.
//! Durations are strings with a unit (`"250ms"`, `"5s"`, `"10m"`); `"0"` disables a timeout.
//! Nothing here opens a socket or starts a task.

mod value;

use crate::pgbouncer;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::auth::Userlist;
use proxy::{AuthType, DatabaseRoute, PoolMode, ProxySettings};
use upstream::{LoadBalanceHosts, ServerAuthKind, SslMode, TargetSessionAttrs};

pub use value::{parse_timeout, SettingValue, Timeout};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("invalid config file {path}: {problems}")]
    Invalid { path: PathBuf, problems: Problems },
}

/// One thing wrong with the config, at a key path such as `databases.app.port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}: {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

/// Every problem found, in file order, so one `--check` round shows them all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems", all.len())?;
                for p in all {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

/// `log_format`: human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub const ALL: [LogFormat; 2] = [LogFormat::Text, LogFormat::Json];

    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

upstream::setting_names!(LogFormat);

/// One key of a section: how SHOW CONFIG reads it, how SET and the environment write it, how the
/// file writes it, and whether a running pooler can take a new value (RELOAD keeps the old value
/// of the others, with a warning).
pub struct Setting<S> {
    pub key: &'static str,
    pub changeable: bool,
    pub get: fn(&S) -> String,
    pub set: fn(&mut S, &str) -> Result<(), String>,
    set_toml: fn(&mut S, &toml_edit::Value) -> Result<(), String>,
    pub to_toml: fn(&S) -> Option<toml_edit::Value>,
}

/// Declares a section once: the struct, its `Default` (the only place defaults live) and the
/// table of its keys, in SHOW CONFIG order. `reload` keys take effect for new clients and new
/// server connections (pool sizes and minimums at once); `restart` keys need a restart.
macro_rules! section {
    (@changeable reload) => { true };
    (@changeable restart) => { false };
    (
        $(#[$meta:meta])*
        pub struct $name:ident, keys $table:ident {
            $( $(#[$fmeta:meta])* $key:ident: $ty:ty = $default:expr, $when:ident; )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $key: $ty, )*
        }

        /// As SHOW CONFIG spells each value; passwords are not shown.
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut d = f.debug_struct(stringify!($name));
                for s in $table {
                    let v = (s.get)(self);
                    match s.key == "password" && !v.is_empty() {
                        true => d.field(s.key, &"<redacted>"),
                        false => d.field(s.key, &v),
                    };
                }
                d.finish()
            }
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $key: $default, )* }
            }
        }

        pub const $table: &[Setting<$name>] = &[$(
            Setting {
                key: stringify!($key),
                changeable: section!(@changeable $when),
                get: |s| SettingValue::show(&s.$key),
                set: |s, v| {
                    s.$key = SettingValue::parse(v)?;
                    Ok(())
                },
                set_toml: |s, v| {
                    s.$key = SettingValue::from_toml(v)?;
                    Ok(())
                },
                to_toml: |s| SettingValue::to_toml(&s.$key),
            },
        )*];
    };
}

section! {
    /// `[pooler]`.
    pub struct Pooler, keys SETTINGS {
        listen_addr: String = "127.0.0.1".into(), restart;
        listen_port: u16 = 6432, restart;
        unix_socket_dir: Option<PathBuf> = None, restart;
        workers: usize = 0, restart;
        pool_mode: PoolMode = PoolMode::Transaction, reload;
        max_client_conn: usize = 10_000, reload;
        max_client_conn_per_addr: usize = 0, reload;
        client_login_rate_per_addr: u32 = 0, reload;
        default_pool_size: usize = 20, reload;
        min_pool_size: usize = 0, reload;
        auth_type: AuthType = AuthType::ScramSha256, reload;
        auth_file: Option<PathBuf> = None, reload;
        /// auth_query (PgBouncer's): users not in the auth_file are looked up by running
        /// auth_query as auth_user (its password from the auth_file) on auth_dbname's (else
        /// the client's) database. Unset auth_user: no lookups.
        auth_user: Option<String> = None, reload;
        auth_query: String = proxy::DEFAULT_AUTH_QUERY.into(), reload;
        auth_dbname: Option<String> = None, reload;
        /// How long a secret found (a password change waits at most this), and "no such
        /// user" (a flood of made-up names costs a lookup per name per this), are kept; "0"
        /// keeps nothing.
        auth_cache_ttl: Timeout = Timeout::secs(60), reload;
        auth_negative_cache_ttl: Timeout = Timeout::secs(10), reload;
        auth_cache_max_entries: usize = 10_000, reload;
        auth_query_timeout: Timeout = Timeout::secs(5), reload;
        /// Server connections per (database, auth_user) lookup pool.
        auth_pool_size: usize = 2, reload;
        admin_users: Vec<String> = Vec::new(), reload;
        stats_users: Vec<String> = Vec::new(), reload;
        dns_timeout: Timeout = Timeout::secs(5), reload;
        /// The DNS cache is built once at start.
        dns_min_ttl: Timeout = Timeout::secs(1), restart;
        dns_max_ttl: Timeout = Timeout::secs(15), restart;
        dns_nxdomain_ttl: Timeout = Timeout::secs(15), restart;
        dns_nameservers: Vec<String> = Vec::new(), restart;
        server_connect_timeout: Timeout = Timeout::secs(5), reload;
        server_login_timeout: Timeout = Timeout::secs(5), reload;
        /// The storm controls are shared per host and the server cap across pools; both are
        /// built once at start.
        server_connect_concurrency: usize = 4, restart;
        server_login_retry: Timeout = Timeout::millis(250), restart;
        server_login_retry_max: Timeout = Timeout::secs(15), restart;
        server_breaker_threshold: u32 = 10, restart;
        max_server_connections: usize = 0, restart;
        /// Server connections of one user across all its pools (PgBouncer's); 0 = no cap.
        /// `[users.NAME]` may set its own. Each user's cap is made when its first pool opens.
        max_user_connections: usize = 0, restart;
        /// Clients logged in as one user; 0 = no cap. `[users.NAME]` may set its own.
        max_user_client_connections: usize = 0, reload;
        /// Clients of one database; 0 = no cap. `[databases.NAME]` may set its own.
        max_db_client_connections: usize = 0, reload;
        /// Connections a pool may add beyond pool_size for clients that waited
        /// reserve_pool_timeout (PgBouncer's); 0 = no reserve.
        reserve_pool_size: usize = 0, reload;
        reserve_pool_timeout: Timeout = Timeout::secs(5), reload;
        /// Pools of databases served by the `[databases."*"]` entry close after this long
        /// without a client; "0" keeps them.
        autodb_idle_timeout: Timeout = Timeout::secs(3600), reload;
        server_check_delay: Timeout = Timeout::secs(30), reload;
        server_check_query: String = "SELECT 1".into(), reload;
        /// A pool's role probe keeps the interval it started with; the timeout is read per
        /// probe.
        server_role_check_interval: Timeout = Timeout::secs(5), restart;
        server_role_check_timeout: Timeout = Timeout::secs(2), reload;
        allow_drills: bool = false, reload;
        server_unresponsive_timeout: Timeout = Timeout::secs(30), reload;
        tcp_user_timeout: Timeout = Timeout::secs(30), reload;
        query_wait_notify: Timeout = Timeout::secs(5), reload;
        query_wait_timeout: Timeout = Timeout::secs(120), reload;
        query_timeout: Timeout = Timeout(None), reload;
        idle_transaction_timeout: Timeout = Timeout(None), reload;
        client_login_timeout: Timeout = Timeout::secs(60), reload;
        client_idle_timeout: Timeout = Timeout(None), reload;
        server_idle_timeout: Timeout = Timeout::secs(600), reload;
        server_lifetime: Timeout = Timeout::secs(3600), reload;
        server_reset_query: String = "DISCARD ALL".into(), reload;
        max_packet_size: usize = proto::DEFAULT_MAX_MESSAGE, reload;
        max_prepared_statements: usize = 200, reload;
        shutdown_timeout: Timeout = Timeout::secs(30), reload;
        /// After SIGTERM, how long new logins are still accepted (readiness is already 503).
        shutdown_accept_delay: Timeout = Timeout(None), reload;
        /// Lets a new process bind the listen port while this one drains (rolling restart).
        so_reuseport: bool = false, restart;
        /// Linux, as PgBouncer's: the kernel hands a client over once it has sent something
        /// (waiting up to 45 s), so a connection that sends nothing holds no task, no
        /// max_client_conn place and no login timer, and a login begins with its first packet
        /// already there.
        tcp_defer_accept: bool = true, restart;
        tcp_keepalive: bool = true, reload;
        tcp_keepidle: Timeout = Timeout::secs(15), reload;
        tcp_keepintvl: Timeout = Timeout::secs(5), reload;
        tcp_keepcnt: u32 = 3, reload;
        /// The same for client sockets, so that a client host that vanished mid-transaction
        /// gives its server (and its locks) back. Applied at accept: RELOAD affects new
        /// clients only.
        client_tcp_keepalive: bool = true, reload;
        client_tcp_keepidle: Timeout = Timeout::secs(10), reload;
        client_tcp_keepintvl: Timeout = Timeout::secs(5), reload;
        client_tcp_keepcnt: u32 = 3, reload;
        client_tcp_user_timeout: Timeout = Timeout::secs(20), reload;
        /// How often averages (SHOW STATS avg_*) are taken and the stats line is logged.
        stats_period: Timeout = Timeout::secs(60), reload;
        log_stats: bool = true, reload;
        log_connections: bool = true, reload;
        log_disconnections: bool = true, reload;
        log_format: LogFormat = LogFormat::Text, restart;
        /// TLS: RELOAD (or SET) re-reads the files and builds new rustls configs; new clients
        /// and new server connections use them, established ones keep theirs.
        client_tls_sslmode: SslMode = SslMode::Disable, reload;
        client_tls_cert_file: Option<PathBuf> = None, reload;
        client_tls_key_file: Option<PathBuf> = None, reload;
        client_tls_ca_file: Option<PathBuf> = None, reload;
        server_tls_sslmode: SslMode = SslMode::Prefer, reload;
        server_tls_ca_file: Option<PathBuf> = None, reload;
        server_tls_cert_file: Option<PathBuf> = None, reload;
        server_tls_key_file: Option<PathBuf> = None, reload;
        /// libpq's `require_auth` for server logins; empty: anything but a cleartext password
        /// over a connection whose certificate was not verified.
        server_require_auth: String = String::new(), reload;
        /// Where server passwords come from: `password` (the configured one) or `rds_iam`
        /// (an RDS IAM token from the AWS credential chain; needs verified TLS).
        server_auth: ServerAuthKind = ServerAuthKind::Password, reload;
        /// The region RDS IAM tokens are signed for; empty: AWS_REGION, else AWS_DEFAULT_REGION.
        rds_iam_region: String = String::new(), reload;
        /// The fleet budget's control task starts with a database's first pool and keeps its
        /// settings.
        fleet_budget: usize = 0, restart;
        fleet_min_share: usize = 1, restart;
        fleet_release_delay: Timeout = Timeout::secs(30), restart;
    }
}

section! {
    /// `[metrics]`: the Prometheus endpoint.
    pub struct Metrics, keys METRICS_SETTINGS {
        /// `host:port` to serve `/metrics` on; unset disables the exporter.
        listen: Option<String> = None, restart;
    }
}

section! {
    /// One `[databases.NAME]` entry. Unset keys take the `[pooler]` value or the route's
    /// default (see `Config::proxy_settings`).
    pub struct Database, keys DATABASE_SETTINGS {
        host: Option<String> = None, reload;
        port: Option<u16> = None, reload;
        /// `["a:5432", "b"]`: tried in order; instead of `host`/`port`.
        hosts: Option<Vec<String>> = None, reload;
        target_session_attrs: Option<TargetSessionAttrs> = None, reload;
        load_balance_hosts: Option<LoadBalanceHosts> = None, reload;
        dbname: Option<String> = None, reload;
        user: Option<String> = None, reload;
        password: Option<String> = None, reload;
        /// A file holding the server password (a mounted secret); instead of `password`.
        password_file: Option<PathBuf> = None, reload;
        pool_size: Option<usize> = None, reload;
        min_pool_size: Option<usize> = None, reload;
        pool_mode: Option<PoolMode> = None, reload;
        max_db_connections: Option<usize> = None, reload;
        /// Defaults to the `[pooler]` one.
        server_require_auth: Option<String> = None, reload;
        /// Default to the `[pooler]` ones.
        server_auth: Option<ServerAuthKind> = None, reload;
        rds_iam_region: Option<String> = None, reload;
        max_db_client_connections: Option<usize> = None, reload;
        reserve_pool_size: Option<usize> = None, reload;
        /// Default to the `[pooler]` ones.
        auth_user: Option<String> = None, reload;
        auth_query: Option<String> = None, reload;
        auth_dbname: Option<String> = None, reload;
        fleet_budget: Option<usize> = None, restart;
        fleet_min_share: Option<usize> = None, restart;
        fleet_release_delay: Option<Timeout> = None, restart;
        /// Sent in every server connection's startup packet: the defaults of clients that set
        /// none of their own (PgBouncer's per-database `client_encoding`, `timezone`).
        application_name: Option<String> = None, reload;
        timezone: Option<String> = None, reload;
        client_encoding: Option<String> = None, reload;
        /// Run once on each new server connection after login, before it is pooled.
        connect_query: Option<String> = None, reload;
    }
}

section! {
    /// One `[users.NAME]` entry (PgBouncer's `[users]`): for the pools whose server user is
    /// NAME, and for the clients that log in as NAME. Unset keys take the database's value,
    /// then `[pooler]`'s.
    pub struct User, keys USER_SETTINGS {
        pool_mode: Option<PoolMode> = None, reload;
        pool_size: Option<usize> = None, reload;
        max_user_connections: Option<usize> = None, reload;
        max_user_client_connections: Option<usize> = None, reload;
    }
}

const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_PORT: u16 = 5432;

impl Database {
    /// Every host to try, in order: `hosts`, or `host`/`port`. Validated at load.
    pub fn host_list(&self) -> Result<Vec<(String, u16)>, String> {
        match &self.hosts {
            None => Ok(vec![(
                self.host.clone().unwrap_or_else(|| DEFAULT_HOST.into()),
                self.port.unwrap_or(DEFAULT_PORT),
            )]),
            Some(_) if self.host.is_some() || self.port.is_some() => {
                Err("cannot be combined with host or port; give each host as \"host:port\"".into())
            }
            Some(list) if list.is_empty() => Err("must name at least one host".into()),
            Some(list) => list.iter().map(|h| parse_host_port(h)).collect(),
        }
    }
}

impl Database {
    /// `server_auth` resolved: an RDS IAM token carries its region (validated at load).
    fn server_auth(&self, p: &Pooler) -> upstream::ServerAuth {
        match self.server_auth.unwrap_or(p.server_auth) {
            ServerAuthKind::Password => upstream::ServerAuth::Password,
            ServerAuthKind::RdsIam => upstream::ServerAuth::RdsIam {
                region: rds_iam_region(p, self).unwrap_or_default(),
            },
        }
    }
}

/// `rds_iam_region` (the database's, else the pooler's), else the AWS environment's.
fn rds_iam_region(p: &Pooler, db: &Database) -> Option<String> {
    Some(
        db.rds_iam_region
            .as_deref()
            .unwrap_or(&p.rds_iam_region)
            .trim(),
    )
    .filter(|r| !r.is_empty())
    .map(str::to_owned)
    .or_else(upstream::rds_iam::default_region)
}

/// What `server_auth = "rds_iam"` needs: a token is a password, so only over TLS whose
/// certificate is verified, never next to a configured password, and a region to sign for.
fn rds_iam_checks(p: &Pooler, db: &Database) -> Result<(), String> {
    if db.server_auth.unwrap_or(p.server_auth) != ServerAuthKind::RdsIam {
        return Ok(());
    }
    if !matches!(
        p.server_tls_sslmode,
        SslMode::VerifyCa | SslMode::VerifyFull
    ) {
        return Err(format!(
            "\"rds_iam\" sends its token as a cleartext password, so it needs server_tls_sslmode = \"verify-full\" (or \"verify-ca\") and server_tls_ca_file with the RDS CA bundle; server_tls_sslmode is \"{}\"",
            p.server_tls_sslmode.as_str()
        ));
    }
    if db.password.is_some() || db.password_file.is_some() {
        return Err("\"rds_iam\" cannot be combined with password or password_file: the token is the password".into());
    }
    let hosts = db.host_list().unwrap_or_default();
    if hosts.iter().any(|(h, _)| h.starts_with('/')) {
        return Err(
            "\"rds_iam\" needs a TCP host (an RDS endpoint), not a Unix socket directory".into(),
        );
    }
    if rds_iam_region(p, db).is_none() {
        return Err(
            "\"rds_iam\" needs a region: set rds_iam_region, or AWS_REGION in the environment"
                .into(),
        );
    }
    let policy = upstream::RequireAuth::parse(
        db.server_require_auth
            .as_deref()
            .unwrap_or(&p.server_require_auth),
    )
    .unwrap_or_default();
    if policy.check(upstream::AuthMethod::Password, true).is_err() {
        return Err(format!(
            "\"rds_iam\" logs in with a cleartext password, which server_require_auth = \"{policy}\" refuses"
        ));
    }
    Ok(())
}

/// `dns_nameservers`: `"10.0.0.2"` (port 53) or `"127.0.0.1:5353"`.
fn nameservers(list: &[String]) -> Result<Vec<std::net::SocketAddr>, String> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<std::net::SocketAddr>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                .map_err(|_| {
                    format!("invalid name server \"{s}\"; use an IP address, optionally with :port")
                })
        })
        .collect()
}
/// `"db.internal:5433"`, `"db.internal"` (port 5432), `"[::1]:5433"`, `"/var/run/postgresql"`.
pub fn parse_host_port(s: &str) -> Result<(String, u16), String> {
    let s = s.trim();
    let bad = || format!("invalid host \"{s}\"; use \"host:port\", \"host\" or \"[ipv6]:port\"");
    if s.is_empty() {
        return Err(bad());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => DEFAULT_PORT,
            p => p
                .strip_prefix(':')
                .and_then(|p| p.parse().ok())
                .ok_or_else(bad)?,
        };
        return Ok((addr.to_owned(), port));
    }
    match s.rsplit_once(':') {
        // A bare IPv6 address has several colons and no brackets: take it whole.
        Some((host, port)) if !host.contains(':') => {
            let port = port.parse().map_err(|_| bad())?;
            if host.is_empty() {
                return Err(bad());
            }
            Ok((host.to_owned(), port))
        }
        _ => Ok((s.to_owned(), DEFAULT_PORT)),
    }
}

/// The three sections of the file, as read (defaults filled in) and before validation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigFile {
    pub pooler: Pooler,
    pub metrics: Metrics,
    pub databases: BTreeMap<String, Database>,
    pub users: BTreeMap<String, User>,
}

/// Where settings come from, in the order they apply: defaults < file < environment < flags.
/// Kept with the config so that RELOAD applies the same layers again over the re-read file.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Layers {
    /// The TOML file, if there is one.
    pub file: Option<PathBuf>,
    /// `BREAKWATER_*` variables (name, value), as read at start.
    pub env: Vec<(String, String)>,
    /// A `postgres://` URL for one database, and what gave it (`--upstream`,
    /// `BREAKWATER_UPSTREAM` or `DATABASE_URL`).
    pub upstream: Option<(String, &'static str)>,
    /// `--set key=value` flags, in order.
    pub flags: Vec<(String, String)>,
}

/// The upstream URL's password stays out of logs and panics.
impl fmt::Debug for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let upstream = self.upstream.as_ref().map(|(url, from)| {
            let shown = match url::Url::parse(url) {
                Ok(mut u) if u.password().is_some() => {
                    let _ = u.set_password(Some("redacted"));
                    u.to_string()
                }
                Ok(u) => u.to_string(),
                Err(_) => "(not a URL)".into(),
            };
            (shown, *from)
        });
        f.debug_struct("Layers")
            .field("file", &self.file)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("upstream", &upstream)
            .field("flags", &self.flags)
            .finish()
    }
}

/// The config file used when neither `--config` nor `BREAKWATER_CONFIG` names one.
pub const DEFAULT_FILE: &str = "pooler.toml";

impl Layers {
    /// The layers for a command line: `config` and `upstream` from flags, `sets` from `--set`,
    /// and the process environment `env` (passed in, so this is testable). `DATABASE_URL` is
    /// used only when there is no config file: in a sidecar's pod it often points at the
    /// pooler itself, and a file is the stronger statement of intent.
    pub fn gather(
        config: Option<PathBuf>,
        upstream: Option<String>,
        sets: &[String],
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Layers, String> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let file = config
            .or_else(|| var("BREAKWATER_CONFIG").map(PathBuf::from))
            .or_else(|| {
                let default = PathBuf::from(DEFAULT_FILE);
                // Without a URL the default file is required (and its absence reported).
                let no_url = upstream.is_none()
                    && var("BREAKWATER_UPSTREAM").is_none()
                    && var("DATABASE_URL").is_none();
                (no_url || default.exists()).then_some(default)
            });
        let upstream = match (upstream, var("BREAKWATER_UPSTREAM"), var("DATABASE_URL")) {
            (Some(url), ..) => Some((url, "--upstream")),
            (None, Some(url), _) => Some((url, "BREAKWATER_UPSTREAM")),
            (None, None, Some(url)) if file.is_none() => Some((url, "DATABASE_URL")),
            _ => None,
        };
        let flags = sets
            .iter()
            .map(|s| {
                s.split_once('=')
                    .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                    .ok_or_else(|| format!("--set {s}: write --set key=value"))
            })
            .collect::<Result<_, _>>()?;
        let env = env
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with(ENV_PREFIX)
                    && !matches!(k.as_str(), "BREAKWATER_UPSTREAM" | "BREAKWATER_CONFIG")
            })
            .collect();
        Ok(Layers {
            file,
            env,
            upstream,
            flags,
        })
    }
}

const ENV_PREFIX: &str = "BREAKWATER_";

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file, or [`NO_FILE`] when everything came from flags and the environment.
    pub path: PathBuf,
    pub layers: Layers,
    pub file: ConfigFile,
    pub userlist: Userlist,
    /// Built from the `client_tls_*` files at load; swappable by a reload.
    pub client_tls: proxy::ClientTls,
    /// Built from the `server_tls_*` files at load.
    pub server_tls: upstream::ServerTls,
    /// Accepted, but worth a look: printed by `--check` and logged at start.
    pub warnings: Vec<String>,
    /// Where each key that was set came from (`pooler.toml line 3`, `BREAKWATER_LISTEN_PORT`,
    /// `--set`, `--upstream`), by key path.
    pub origins: BTreeMap<String, String>,
    extras: Extras,
}

/// What the layers add besides settings: login entries from the upstream URL (user,
/// password), and database passwords read from `password_file`.
#[derive(Clone, Default)]
struct Extras {
    users: Vec<(String, String)>,
    file_passwords: BTreeMap<String, String>,
}

impl fmt::Debug for Extras {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Extras")
            .field(
                "users",
                &self.users.iter().map(|(u, _)| u).collect::<Vec<_>>(),
            )
            .field(
                "file_passwords",
                &self.file_passwords.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// `Config::path` when there is no config file.
pub const NO_FILE: &str = "(none: flags and environment)";

impl Config {
    /// Reads the file (if any) and applies the environment and flags over it.
    pub fn load(layers: &Layers) -> Result<Config, ConfigError> {
        let text = match &layers.file {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Self::build(layers, text.as_deref())
    }

    /// A file's text with no other layers (tests, and checking what import-pgbouncer writes).
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let layers = Layers {
            file: Some(path.to_owned()),
            ..Layers::default()
        };
        Self::build(&layers, Some(text))
    }

    fn build(layers: &Layers, text: Option<&str>) -> Result<Config, ConfigError> {
        let path = layers
            .file
            .clone()
            .unwrap_or_else(|| PathBuf::from(NO_FILE));
        let mut reader = Reader {
            text: text.unwrap_or_default(),
            file_name: path.display().to_string(),
            lines: HashMap::new(),
            origins: BTreeMap::new(),
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let mut file = ConfigFile::default();
        if let Some(text) = text {
            let doc = toml_edit::ImDocument::parse(text).map_err(|e| ConfigError::Syntax {
                path: path.clone(),
                message: match looks_like_ini(text) {
                    true => format!("{PGBOUNCER_INI}\n{}", e.to_string().trim_end()),
                    false => e.to_string().trim_end().to_owned(),
                },
            })?;
            file = reader.document(doc.as_table());
        }
        let mut extras = Extras::default();
        reader.environment(&layers.env, &mut file);
        if let Some((url, from)) = &layers.upstream {
            reader.upstream(url, from, &mut file, &mut extras);
        }
        reader.flags(&layers.flags, &mut file);
        let Reader {
            lines,
            origins,
            mut problems,
            warnings,
            ..
        } = reader;
        let config = Self::validate(&path, file, extras, &lines, &mut problems);
        match config {
            Some(mut c) if problems.is_empty() => {
                c.layers = layers.clone();
                c.warnings = warnings;
                c.origins = origins;
                Ok(c)
            }
            _ => Err(Self::invalid(&path, problems)),
        }
    }

    /// Re-reads the file and applies the same environment and flags (RELOAD, SIGHUP).
    pub fn reload(&self) -> Result<Config, ConfigError> {
        Config::load(&self.layers)
    }

    /// Validates a changed copy of this config (SET), with no line numbers.
    fn revalidate(&self, file: ConfigFile) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let extras = self.extras.clone();
        match Self::validate(&self.path, file, extras, &HashMap::new(), &mut problems) {
            Some(mut c) if problems.is_empty() => {
                c.layers = self.layers.clone();
                c.warnings = self.warnings.clone();
                c.origins = self.origins.clone();
                Ok(c)
            }
            _ => Err(Self::invalid(&self.path, problems)),
        }
    }

    fn invalid(path: &Path, mut problems: Vec<Problem>) -> ConfigError {
        // File order; problems without a line (a file the config names) after those with one.
        problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        ConfigError::Invalid {
            path: path.to_owned(),
            problems: Problems(problems),
        }
    }

    /// Checks what one key cannot check alone and reads the files the config names (relative
    /// to the config file's directory). Adds every problem found; returns the config only if
    /// it could be built.
    fn validate(
        path: &Path,
        file: ConfigFile,
        mut extras: Extras,
        lines: &HashMap<String, usize>,
        problems: &mut Vec<Problem>,
    ) -> Option<Config> {
        let mut bad = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_owned(),
                line: lines.get(key).copied(),
                message,
            })
        };
        let p = &file.pooler;
        let at_least_one = [
            ("pooler.default_pool_size", p.default_pool_size),
            (
                "pooler.server_connect_concurrency",
                p.server_connect_concurrency,
            ),
            ("pooler.tcp_keepcnt", p.tcp_keepcnt as usize),
            ("pooler.client_tcp_keepcnt", p.client_tcp_keepcnt as usize),
            ("pooler.auth_pool_size", p.auth_pool_size),
            ("pooler.auth_cache_max_entries", p.auth_cache_max_entries),
        ];
        for (key, n) in at_least_one {
            if n == 0 {
                bad(key, "must be at least 1".into());
            }
        }
        if p.max_packet_size < 1024 {
            bad(
                "pooler.max_packet_size",
                "must be at least 1024 bytes".into(),
            );
        }
        // These have no "off": the back-off needs a base and a cap, and the stats period a length.
        let mut never_zero = vec![
            ("pooler.server_login_retry", p.server_login_retry),
            ("pooler.server_login_retry_max", p.server_login_retry_max),
            ("pooler.stats_period", p.stats_period),
        ];
        if p.tcp_keepalive {
            never_zero.push(("pooler.tcp_keepidle", p.tcp_keepidle));
            never_zero.push(("pooler.tcp_keepintvl", p.tcp_keepintvl));
        }
        if p.client_tcp_keepalive {
            never_zero.push(("pooler.client_tcp_keepidle", p.client_tcp_keepidle));
            never_zero.push(("pooler.client_tcp_keepintvl", p.client_tcp_keepintvl));
        }
        for (key, t) in never_zero {
            if t.0.is_none() {
                let why = if key.contains("client_tcp_keep") {
                    " while client_tcp_keepalive = true"
                } else if key.contains("keep") {
                    " while tcp_keepalive = true"
                } else {
                    ""
                };
                bad(key, format!("cannot be \"0\"{why}"));
            }
        }
        let any_auth_user =
            p.auth_user.is_some() || file.databases.values().any(|d| d.auth_user.is_some());
        if !matches!(p.auth_type, AuthType::Trust | AuthType::Cert)
            && p.auth_file.is_none()
            && extras.users.is_empty()
            && !any_auth_user
        {
            bad(
                "pooler.auth_file",
                "is required unless auth_type = \"trust\" or \"cert\", an auth_user looks users up, or an upstream URL with a password gives the one user".into(),
            );
        }
        // auth_dbname names a [databases] entry (or one the "*" entry serves).
        let serves = |d: &str| {
            file.databases.contains_key(d)
                || file
                    .databases
                    .contains_key(proxy::settings::WILDCARD_DATABASE)
        };
        let auth_dbnames = std::iter::once(("pooler.auth_dbname".to_owned(), &p.auth_dbname))
            .chain(
                file.databases
                    .iter()
                    .map(|(n, d)| (format!("databases.{n}.auth_dbname"), &d.auth_dbname)),
            );
        for (key, dbname) in auth_dbnames {
            if let Some(d) = dbname.as_deref().filter(|d| !serves(d)) {
                bad(&key, format!("\"{d}\" is not in [databases]"));
            }
        }
        if p.auth_type == AuthType::Cert
            && !matches!(
                p.client_tls_sslmode,
                SslMode::VerifyCa | SslMode::VerifyFull
            )
        {
            bad(
                "pooler.auth_type",
                "\"cert\" needs client_tls_sslmode = \"verify-ca\" or \"verify-full\" (and client_tls_ca_file)".into(),
            );
        }
        if let Some(l) = &file.metrics.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                bad(
                    "metrics.listen",
                    format!("\"{l}\" is not an address:port such as \"127.0.0.1:9127\""),
                );
            }
        }
        if let Err(message) = nameservers(&p.dns_nameservers) {
            bad("pooler.dns_nameservers", message);
        }
        if let Err(message) = upstream::RequireAuth::parse(&p.server_require_auth) {
            bad("pooler.server_require_auth", message);
        }
        for (name, db) in &file.databases {
            if let Some(Err(message)) = db
                .server_require_auth
                .as_deref()
                .map(upstream::RequireAuth::parse)
            {
                bad(&format!("databases.{name}.server_require_auth"), message);
            }
            if let Err(message) = rds_iam_checks(p, db) {
                bad(&format!("databases.{name}.server_auth"), message);
            }
            if proxy::ADMIN_DATABASES.contains(&name.as_str()) {
                bad(
                    &format!("databases.{name}"),
                    "this name is reserved for the admin console".into(),
                );
            }
            if let Err(message) = db.host_list() {
                bad(&format!("databases.{name}.hosts"), message);
            }
            if let Some(f) = &db.password_file {
                let key = format!("databases.{name}.password_file");
                if db.password.is_some() {
                    bad(&key, "cannot be combined with password".into());
                }
                let f = path.parent().unwrap_or(Path::new(".")).join(f);
                match std::fs::read_to_string(&f) {
                    // A trailing newline from `echo secret > file` is not part of the password.
                    Ok(text) => {
                        let password = text.trim_end_matches(['\n', '\r']).to_owned();
                        extras.file_passwords.insert(name.clone(), password);
                    }
                    Err(e) => bad(&key, format!("cannot read {}: {e}", f.display())),
                }
            }
            // In a sidecar's pod DATABASE_URL names the pooler itself: that loops.
            let own_port = db.port == Some(p.listen_port) && db.hosts.is_none();
            let loopback = matches!(
                db.host.as_deref(),
                Some("127.0.0.1" | "localhost" | "::1") | None
            );
            let listens_on_loopback = p.listen_addr.split(',').map(str::trim).any(|a| {
                matches!(
                    a,
                    "*" | "127.0.0.1" | "localhost" | "::1" | "0.0.0.0" | "::"
                )
            });
            if own_port && loopback && listens_on_loopback {
                bad(
                    &format!("databases.{name}.port"),
                    format!(
                        "{} is Breakwater's own listen_port: the database would be this pooler",
                        p.listen_port
                    ),
                );
            }
            let budget = db.fleet_budget.unwrap_or(p.fleet_budget);
            let min_share = db.fleet_min_share.unwrap_or(p.fleet_min_share);
            if budget > 0 && min_share > budget {
                bad(
                    &format!("databases.{name}.fleet_min_share"),
                    format!("{min_share} is more than fleet_budget ({budget})"),
                );
            }
            if db.pool_size == Some(0) {
                bad(
                    &format!("databases.{name}.pool_size"),
                    "must be at least 1".into(),
                );
            }
        }
        for (name, user) in &file.users {
            if user.pool_size == Some(0) {
                bad(
                    &format!("users.{name}.pool_size"),
                    "must be at least 1".into(),
                );
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let userlist = match &p.auth_file {
            Some(f) => {
                let f = base.join(f);
                match std::fs::read_to_string(&f) {
                    Ok(text) => match Userlist::parse(&text) {
                        Ok(u) => Some(u),
                        Err(e) => {
                            bad(
                                "pooler.auth_file",
                                format!("invalid auth_file {}: {e}", f.display()),
                            );
                            None
                        }
                    },
                    Err(e) => {
                        bad(
                            "pooler.auth_file",
                            format!("cannot read auth_file {}: {e}", f.display()),
                        );
                        None
                    }
                }
            }
            None => Some(Userlist::default()),
        };
        // The upstream URL's user logs in with the URL's password, over the auth_file's entry.
        let userlist = userlist.map(|mut u| {
            for (user, password) in &extras.users {
                u.insert(user.clone(), proto::auth::Secret::Plain(password.clone()));
            }
            u
        });
        // Relative TLS file names are relative to the config file, like auth_file.
        let file_at = |f: &Option<PathBuf>| f.as_ref().map(|f| base.join(f));
        let client_tls = proxy::ClientTls::new(
            p.client_tls_sslmode,
            &proxy::ClientTlsFiles {
                cert_file: file_at(&p.client_tls_cert_file),
                key_file: file_at(&p.client_tls_key_file),
                ca_file: file_at(&p.client_tls_ca_file),
            },
        )
        .map_err(|e| bad("pooler.client_tls_sslmode", e.to_string()))
        .ok();
        let server_tls = upstream::ServerTls::new(
            p.server_tls_sslmode,
            &upstream::ServerTlsFiles {
                ca_file: file_at(&p.server_tls_ca_file),
                cert_file: file_at(&p.server_tls_cert_file),
                key_file: file_at(&p.server_tls_key_file),
            },
        )
        .map_err(|e| bad("pooler.server_tls_sslmode", e.to_string()))
        .ok();
        Some(Config {
            path: path.to_owned(),
            layers: Layers::default(),
            file,
            userlist: userlist?,
            client_tls: client_tls?,
            server_tls: server_tls?,
            warnings: Vec::new(),
            origins: BTreeMap::new(),
            extras,
        })
    }

    /// `SET key = value` from the admin console: a copy of this config with one `[pooler]`
    /// setting changed, validated like a loaded file.
    pub fn with_setting(&self, key: &str, value: &str) -> Result<Config, String> {
        let setting = SETTINGS
            .iter()
            .find(|s| s.key == key)
            .ok_or_else(|| format!("unknown setting \"{key}\" (SHOW CONFIG lists them)"))?;
        if !setting.changeable {
            return Err(format!(
                "{key} cannot be changed while running; edit the config file and restart"
            ));
        }
        let mut file = self.file.clone();
        (setting.set)(&mut file.pooler, value).map_err(|e| format!("{key}: {e}"))?;
        let mut next = self.revalidate(file).map_err(|e| e.to_string())?;
        next.origins.insert(format!("pooler.{key}"), "SET".into());
        Ok(next)
    }

    /// Keeps this config's value of every setting that needs a restart, naming those that
    /// differed in `next` so the caller can warn.
    pub fn keep_restart_only(&self, next: &mut Config) -> Vec<&'static str> {
        let mut kept = keep_restart_only(SETTINGS, &self.file.pooler, &mut next.file.pooler);
        // Keys are named with their section outside [pooler]; the names are static, so they are
        // spelled out here rather than formatted.
        for key in keep_restart_only(METRICS_SETTINGS, &self.file.metrics, &mut next.file.metrics) {
            kept.push(match key {
                "listen" => "metrics.listen",
                other => other,
            });
        }
        kept
    }

    /// SHOW CONFIG rows: (key, value, default, changeable).
    pub fn show(&self) -> Vec<(String, String, String, bool)> {
        let mut rows = show_rows("", SETTINGS, &self.file.pooler);
        rows.extend(show_rows("metrics.", METRICS_SETTINGS, &self.file.metrics));
        rows
    }

    /// Every value that is not the default, with where it came from, for `--check`:
    /// (key path, value, origin). Passwords are not shown.
    pub fn non_default(&self) -> Vec<(String, String, String)> {
        let origin = |key: &str| {
            self.origins
                .get(key)
                .cloned()
                .unwrap_or_else(|| "default".into())
        };
        let mut rows: Vec<_> = self
            .show()
            .into_iter()
            .filter(|(_, value, default, _)| value != default)
            .map(|(key, value, ..)| {
                let path = match key.contains('.') {
                    true => key.clone(),
                    false => format!("pooler.{key}"),
                };
                (key, value, origin(&path))
            })
            .collect();
        for (name, db) in &self.file.databases {
            let key = format!("databases.{name}");
            let hosts = db
                .host_list()
                .unwrap_or_default()
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>()
                .join(",");
            let dbname = db.dbname.as_deref().unwrap_or(name);
            rows.push((key.clone(), format!("{hosts}/{dbname}"), origin(&key)));
        }
        rows
    }

    pub fn stats_period(&self) -> Duration {
        // Validated: never "0".
        self.file.pooler.stats_period.0.unwrap_or_default()
    }

    pub fn unix_socket_path(&self) -> Option<PathBuf> {
        let p = &self.file.pooler;
        let base = self.path.parent().unwrap_or(Path::new("."));
        p.unix_socket_dir
            .as_ref()
            .map(|d| base.join(d).join(format!(".s.PGSQL.{}", p.listen_port)))
    }

    pub fn shutdown_timeout(&self) -> Option<Duration> {
        self.file.pooler.shutdown_timeout.0
    }

    pub fn shutdown_accept_delay(&self) -> Option<Duration> {
        self.file.pooler.shutdown_accept_delay.0
    }

    pub fn proxy_settings(&self) -> ProxySettings {
        let p = &self.file.pooler;
        // Validation makes every `unwrap_or_default` below unreachable: those settings are
        // never "0". The defaults themselves live only in `Pooler::default`.
        let server = upstream::ServerSettings {
            dns_timeout: p.dns_timeout.0,
            connect_timeout: p.server_connect_timeout.0,
            login_timeout: p.server_login_timeout.0,
            lifetime: p.server_lifetime.0,
            idle_timeout: p.server_idle_timeout.0,
            liveness: liveness(
                p.tcp_keepalive,
                (p.tcp_keepidle, p.tcp_keepintvl, p.tcp_keepcnt),
                p.tcp_user_timeout,
            ),
            check_delay: p.server_check_delay.0,
            check_query: p.server_check_query.clone(),
            max_message: p.max_packet_size,
            role_check_interval: p.server_role_check_interval.0,
            role_check_timeout: p.server_role_check_timeout.0,
            tls: self.server_tls.clone(),
        };
        let databases = self
            .file
            .databases
            .iter()
            .map(|(name, d)| {
                // Validated in `parse`.
                let hosts = d
                    .host_list()
                    .unwrap_or_else(|_| vec![(DEFAULT_HOST.into(), DEFAULT_PORT)]);
                let (host, port) = hosts
                    .first()
                    .cloned()
                    .unwrap_or_else(|| (DEFAULT_HOST.into(), DEFAULT_PORT));
                DatabaseRoute {
                    name: name.clone(),
                    host,
                    port,
                    hosts,
                    target_session_attrs: d.target_session_attrs.unwrap_or_default(),
                    load_balance_hosts: d.load_balance_hosts.unwrap_or_default(),
                    dbname: d.dbname.clone().unwrap_or_else(|| name.clone()),
                    user: d.user.clone(),
                    password: d
                        .password
                        .clone()
                        .or_else(|| self.extras.file_passwords.get(name).cloned()),
                    pool_size: d.pool_size.unwrap_or(p.default_pool_size),
                    min_pool_size: d.min_pool_size.unwrap_or(p.min_pool_size),
                    pool_mode: d.pool_mode.unwrap_or(p.pool_mode),
                    max_db_connections: d.max_db_connections.filter(|n| *n > 0),
                    // Validated in `parse`.
                    require_auth: upstream::RequireAuth::parse(
                        d.server_require_auth
                            .as_deref()
                            .unwrap_or(&p.server_require_auth),
                    )
                    .unwrap_or_default(),
                    server_auth: d.server_auth(p),
                    max_db_client_connections: d
                        .max_db_client_connections
                        .unwrap_or(p.max_db_client_connections),
                    reserve_pool_size: d.reserve_pool_size.unwrap_or(p.reserve_pool_size),
                    reserve_pool_timeout: p.reserve_pool_timeout.0,
                    auto: false,
                    auth_query: d.auth_user.as_ref().or(p.auth_user.as_ref()).map(|user| {
                        proxy::AuthQueryRoute {
                            user: user.clone(),
                            query: d.auth_query.clone().unwrap_or_else(|| p.auth_query.clone()),
                            dbname: d.auth_dbname.clone().or_else(|| p.auth_dbname.clone()),
                        }
                    }),
                    fleet: Some(d.fleet_budget.unwrap_or(p.fleet_budget))
                        .filter(|n| *n > 0)
                        .map(|budget| upstream::FleetSettings {
                            budget,
                            min_share: d.fleet_min_share.unwrap_or(p.fleet_min_share).min(budget),
                            release_delay: d
                                .fleet_release_delay
                                .unwrap_or(p.fleet_release_delay)
                                .0
                                .unwrap_or_default(),
                        }),
                    startup_params: [
                        ("application_name", &d.application_name),
                        ("timezone", &d.timezone),
                        ("client_encoding", &d.client_encoding),
                    ]
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_owned(), v.clone()?)))
                    .collect(),
                    connect_query: d.connect_query.clone().filter(|q| !q.trim().is_empty()),
                }
            })
            .collect();
        ProxySettings {
            log_connections: p.log_connections,
            log_disconnections: p.log_disconnections,
            auth_type: p.auth_type,
            userlist: self.userlist.clone(),
            max_client_conn: p.max_client_conn,
            admission: proxy::admission::AdmissionLimits {
                max_conn_per_addr: p.max_client_conn_per_addr,
                login_rate_per_addr: p.client_login_rate_per_addr,
            },
            admin_users: p.admin_users.clone(),
            stats_users: p.stats_users.clone(),
            client_login_timeout: p.client_login_timeout.0,
            client_idle_timeout: p.client_idle_timeout.0,
            query_wait_timeout: p.query_wait_timeout.0,
            idle_transaction_timeout: p.idle_transaction_timeout.0,
            query_timeout: p.query_timeout.0,
            query_wait_notify: p.query_wait_notify.0,
            server_unresponsive_timeout: p.server_unresponsive_timeout.0,
            max_server_connections: (p.max_server_connections > 0)
                .then_some(p.max_server_connections),
            storm: upstream::StormSettings {
                connect_concurrency: p.server_connect_concurrency,
                retry_base: p.server_login_retry.0.unwrap_or_default(),
                retry_max: p.server_login_retry_max.0.unwrap_or_default(),
                breaker_threshold: p.server_breaker_threshold,
            },
            server_reset_query: p.server_reset_query.clone(),
            max_message: p.max_packet_size,
            max_prepared_statements: p.max_prepared_statements,
            server,
            dns: upstream::DnsSettings {
                timeout: p.dns_timeout.0,
                min_ttl: p.dns_min_ttl.0.unwrap_or_default(),
                max_ttl: p.dns_max_ttl.0.unwrap_or_default(),
                nxdomain_ttl: p.dns_nxdomain_ttl.0.unwrap_or_default(),
                // Validated in `parse`.
                nameservers: nameservers(&p.dns_nameservers).unwrap_or_default(),
            },
            client_tls: self.client_tls.clone(),
            client_liveness: liveness(
                p.client_tcp_keepalive,
                (
                    p.client_tcp_keepidle,
                    p.client_tcp_keepintvl,
                    p.client_tcp_keepcnt,
                ),
                p.client_tcp_user_timeout,
            ),
            databases,
            auth_lookup: proxy::AuthLookupSettings {
                cache_ttl: p.auth_cache_ttl.0.unwrap_or_default(),
                negative_cache_ttl: p.auth_negative_cache_ttl.0.unwrap_or_default(),
                cache_max_entries: p.auth_cache_max_entries,
                timeout: p.auth_query_timeout.0,
                pool_size: p.auth_pool_size,
            },
            users: proxy::UserSettings {
                routes: self
                    .file
                    .users
                    .iter()
                    .map(|(name, u)| proxy::UserRoute {
                        name: name.clone(),
                        pool_mode: u.pool_mode,
                        pool_size: u.pool_size,
                        max_user_connections: u.max_user_connections,
                        max_user_client_connections: u.max_user_client_connections,
                    })
                    .collect(),
                max_user_connections: p.max_user_connections,
                max_user_client_connections: p.max_user_client_connections,
            },
            autodb_idle_timeout: p.autodb_idle_timeout.0,
        }
    }
}

/// One side's `*tcp_keep*` and `*tcp_user_timeout` settings as socket options. Validation
/// rejects `"0"` for idle and interval while keepalive is on, so the defaults are unreachable.
fn liveness(
    on: bool,
    (idle, interval, count): (Timeout, Timeout, u32),
    user_timeout: Timeout,
) -> upstream::TcpLiveness {
    upstream::TcpLiveness {
        keepalive: on.then(|| {
            (
                idle.0.unwrap_or_default(),
                interval.0.unwrap_or_default(),
                count,
            )
        }),
        user_timeout: user_timeout.0,
    }
}

fn keep_restart_only<S>(table: &[Setting<S>], old: &S, next: &mut S) -> Vec<&'static str> {
    let mut kept = Vec::new();
    for s in table.iter().filter(|s| !s.changeable) {
        let value = (s.get)(old);
        if (s.get)(next) != value {
            // Setting back a value that was already valid cannot fail.
            let _ = (s.set)(next, &value);
            kept.push(s.key);
        }
    }
    kept
}

fn show_rows<S: Default>(
    prefix: &str,
    table: &[Setting<S>],
    current: &S,
) -> Vec<(String, String, String, bool)> {
    let defaults = S::default();
    table
        .iter()
        .map(|s| {
            (
                format!("{prefix}{}", s.key),
                (s.get)(current),
                (s.get)(&defaults),
                s.changeable,
            )
        })
        .collect()
}

/// Walks the TOML document section by section, reading each key through its setting and
/// collecting every problem instead of stopping at the first.
struct Reader<'a> {
    text: &'a str,
    file_name: String,
    /// Key path → line, for problems found later by validation.
    lines: HashMap<String, usize>,
    /// Key path → where its value came from.
    origins: BTreeMap<String, String>,
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

impl Reader<'_> {
    fn line_of(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        let start = span?.start;
        Some(self.text.get(..start)?.matches('\n').count() + 1)
    }

    fn problem(&mut self, key: String, line: Option<usize>, message: String) {
        self.problems.push(Problem { key, line, message });
    }

    fn document(&mut self, doc: &toml_edit::Table) -> ConfigFile {
        let mut file = ConfigFile::default();
        for (name, item) in doc.iter() {
            let line = self.line_of(doc.key(name).and_then(|k| k.span()));
            match (name, item.as_table_like()) {
                ("pooler", Some(t)) => self.section("pooler", t, SETTINGS, &mut file.pooler),
                ("metrics", Some(t)) => {
                    self.section("metrics", t, METRICS_SETTINGS, &mut file.metrics)
                }
                ("databases", Some(t)) => {
                    file.databases = self.named_tables(
                        "databases",
                        t,
                        DATABASE_SETTINGS,
                        "connection string; write a [databases.NAME] table with host, port, dbname, …",
                    )
                }
                ("users", Some(t)) => {
                    file.users = self.named_tables(
                        "users",
                        t,
                        USER_SETTINGS,
                        "[users] line; write a [users.NAME] table with pool_mode, pool_size, max_user_connections, max_user_client_connections",
                    )
                }
                ("pooler" | "metrics" | "databases" | "users", None) => self.problem(
                    name.to_owned(),
                    line,
                    format!("expected a [{name}] section"),
                ),
                _ => {
                    let message = if SETTINGS.iter().any(|s| s.key == name) {
                        "must be inside the [pooler] section (it sits before any section header)"
                            .to_owned()
                    } else if name == "pgbouncer" || name == "peers" {
                        PGBOUNCER_INI.to_owned()
                    } else {
                        format!(
                            "unknown section{}",
                            did_you_mean(name, ["pooler", "metrics", "databases", "users"])
                        )
                    };
                    self.problem(name.to_owned(), line, message)
                }
            }
        }
        file
    }

    /// `[databases.NAME]` or `[users.NAME]` tables, each read as a section; a PgBouncer-style
    /// `NAME = "…"` line gets `pgbouncer_hint` (what it looks like and what to write instead).
    fn named_tables<S: Default>(
        &mut self,
        kind: &str,
        t: &dyn toml_edit::TableLike,
        keys: &[Setting<S>],
        pgbouncer_hint: &str,
    ) -> BTreeMap<String, S> {
        let mut out = BTreeMap::new();
        for (name, item) in t.iter() {
            let key = format!("{kind}.{name}");
            let line = self.line_of(t.key(name).and_then(|k| k.span()));
            match item.as_table_like() {
                Some(entry) => {
                    if let Some(line) = line {
                        let origin = format!("{} line {line}", self.file_name);
                        self.origins.insert(key.clone(), origin);
                    }
                    let mut value = S::default();
                    self.section(&key, entry, keys, &mut value);
                    out.insert(name.to_owned(), value);
                }
                None if item.is_str() => self.problem(
                    key,
                    line,
                    format!(
                        "looks like a PgBouncer {} (`breakwater import-pgbouncer` converts a pgbouncer.ini)",
                        pgbouncer_hint.replace("NAME", name)
                    ),
                ),
                None => self.problem(key, line, format!("expected a [{kind}.{name}] table")),
            }
        }
        out
    }

    fn section<S>(
        &mut self,
        prefix: &str,
        table: &dyn toml_edit::TableLike,
        keys: &[Setting<S>],
        into: &mut S,
    ) {
        for (name, item) in table.iter() {
            let path = format!("{prefix}.{name}");
            let line = self.line_of(table.key(name).and_then(|k| k.span()));
            if let Some(line) = line {
                self.lines.insert(path.clone(), line);
                let origin = format!("{} line {line}", self.file_name);
                self.origins.insert(path.clone(), origin);
            }
            let Some(setting) = keys.iter().find(|s| s.key == name) else {
                if let (Some(pgbouncer::Fate::NoOp(why)), "pooler") =
                    (pgbouncer::fate(name), prefix)
                {
                    let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
                    self.warnings.push(format!(
                        "{at}{path} (a PgBouncer setting) is ignored: {why}"
                    ));
                    continue;
                }
                let text = item.as_value().and_then(|v| match v {
                    toml_edit::Value::String(s) => Some(s.value().clone()),
                    toml_edit::Value::Integer(i) => Some(i.value().to_string()),
                    toml_edit::Value::Boolean(b) => Some(if *b.value() { "1" } else { "0" }.into()),
                    _ => None,
                });
                if let (Some(why), "pooler") = (
                    text.as_deref().and_then(|t| pgbouncer::harmless(name, t)),
                    prefix,
                ) {
                    let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
                    self.warnings.push(format!(
                        "{at}{path} (a PgBouncer setting) is ignored: {why}"
                    ));
                    continue;
                }
                let message = unknown_key(prefix, name, keys);
                self.problem(path, line, message);
                continue;
            };
            let result = match item.as_value() {
                Some(v) => (setting.set_toml)(into, v),
                None => Err("expected a value, found a table".to_owned()),
            };
            if let Err(message) = result {
                self.problem(path, line, message);
            }
        }
    }
}

impl Reader<'_> {
    /// `BREAKWATER_<KEY>` for every `[pooler]` key, `BREAKWATER_METRICS_<KEY>` for `[metrics]`.
    fn environment(&mut self, env: &[(String, String)], file: &mut ConfigFile) {
        for (var, value) in env {
            let name = var
                .strip_prefix(ENV_PREFIX)
                .unwrap_or(var)
                .to_ascii_lowercase();
            let result = match name.strip_prefix("metrics_") {
                Some(key) => self.set_text(&format!("metrics.{key}"), value, var, file),
                None => self.set_text(&format!("pooler.{name}"), value, var, file),
            };
            if let Err(message) = result {
                let message = match message {
                    Unset::Unknown => {
                        let vars = SETTINGS
                            .iter()
                            .map(|s| format!("{ENV_PREFIX}{}", s.key.to_ascii_uppercase()))
                            .chain(["BREAKWATER_UPSTREAM".into(), "BREAKWATER_CONFIG".into()])
                            .chain(METRICS_SETTINGS.iter().map(|s| {
                                format!("BREAKWATER_METRICS_{}", s.key.to_ascii_uppercase())
                            }))
                            .collect::<Vec<_>>();
                        format!(
                            "no setting has this variable{}",
                            did_you_mean(var, vars.iter().map(String::as_str))
                        )
                    }
                    Unset::Invalid(m) => m,
                };
                self.problem(format!("environment {var}"), None, message);
            }
        }
    }

    /// `--set key=value`: a `[pooler]` key, or `metrics.<key>`.
    fn flags(&mut self, flags: &[(String, String)], file: &mut ConfigFile) {
        for (key, value) in flags {
            let path = match key.split_once('.') {
                Some(_) => key.clone(),
                None => format!("pooler.{key}"),
            };
            if let Err(e) = self.set_text(&path, value, "--set", file) {
                let message = match e {
                    Unset::Unknown => format!(
                        "unknown setting{}",
                        did_you_mean(key, SETTINGS.iter().map(|s| s.key))
                    ),
                    Unset::Invalid(m) => m,
                };
                self.problem(format!("--set {key}"), None, message);
            }
        }
    }

    /// Sets `section.key` from text, recording `origin`.
    fn set_text(
        &mut self,
        path: &str,
        value: &str,
        origin: &str,
        file: &mut ConfigFile,
    ) -> Result<(), Unset> {
        fn set<S>(table: &[Setting<S>], key: &str, into: &mut S, value: &str) -> Result<(), Unset> {
            let s = table.iter().find(|s| s.key == key).ok_or(Unset::Unknown)?;
            (s.set)(into, value).map_err(Unset::Invalid)
        }
        match path.split_once('.') {
            Some(("pooler", key)) => set(SETTINGS, key, &mut file.pooler, value)?,
            Some(("metrics", key)) => set(METRICS_SETTINGS, key, &mut file.metrics, value)?,
            _ => return Err(Unset::Unknown),
        }
        // The file's line no longer says where the value is from.
        self.lines.remove(path);
        self.origins.insert(path.to_owned(), origin.to_owned());
        Ok(())
    }

    /// One database from a `postgres://user:password@host:port/dbname` URL; clients log in as
    /// the URL's user with its password.
    fn upstream(&mut self, url: &str, from: &str, file: &mut ConfigFile, extras: &mut Extras) {
        match upstream_url(url) {
            Ok(u) => {
                let key = format!("databases.{}", u.name);
                self.origins.insert(key, from.to_owned());
                if let Some(mode) = u.sslmode {
                    file.pooler.server_tls_sslmode = mode;
                    self.origins.insert(
                        "pooler.server_tls_sslmode".into(),
                        format!("{from} sslmode"),
                    );
                }
                if let Some(password) = &u.database.password {
                    extras.users.push((u.user.clone(), password.clone()));
                }
                file.databases.insert(u.name, u.database);
            }
            Err(message) => self.problem(from.to_owned(), None, message),
        }
    }
}

enum Unset {
    Unknown,
    Invalid(String),
}

/// What a `postgres://` URL says.
#[derive(Debug, PartialEq)]
struct UpstreamUrl {
    /// The database name clients use: the URL's.
    name: String,
    user: String,
    database: Database,
    sslmode: Option<SslMode>,
}

fn upstream_url(text: &str) -> Result<UpstreamUrl, String> {
    // The URL itself may hold a password: never repeat it in a message.
    let url = url::Url::parse(text).map_err(|e| format!("not a postgres:// URL ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "the URL starts with {}://; write postgres://user:password@host:port/dbname",
            url.scheme()
        ));
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| "the URL's user name, password or database is not UTF-8".to_owned())
    };
    let user = decode(url.username())?;
    if user.is_empty() {
        return Err("the URL names no user: write postgres://user:password@host/dbname".into());
    }
    let password = url.password().map(decode).transpose()?;
    let name = match decode(url.path().trim_start_matches('/'))? {
        // libpq's default: the database named after the user.
        d if d.is_empty() => user.clone(),
        d => d,
    };
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .unwrap_or("localhost")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let mut sslmode = None;
    for (k, v) in url.query_pairs() {
        match &*k {
            "sslmode" => sslmode = Some(v.parse::<SslMode>().map_err(|e| format!("sslmode: {e}"))?),
            // Client-side settings of the app's driver: nothing for the pooler to do.
            "application_name" | "connect_timeout" => {}
            other => {
                return Err(format!(
                    "the URL parameter {other} is not supported (sslmode is); set other keys with BREAKWATER_<KEY>"
                ))
            }
        }
    }
    Ok(UpstreamUrl {
        database: Database {
            host: Some(host),
            port: Some(url.port().unwrap_or(DEFAULT_PORT)),
            dbname: Some(name.clone()),
            user: Some(user.clone()),
            password,
            ..Database::default()
        },
        name,
        user,
        sslmode,
    })
}

/// The message for a key no setting of its section has: where it belongs if it is another
/// section's key, else the nearest key of this section.
fn unknown_key<S>(section: &str, key: &str, keys: &[Setting<S>]) -> String {
    let elsewhere = if section != "pooler" && SETTINGS.iter().any(|s| s.key == key) {
        Some("[pooler]")
    } else if section != "metrics" && METRICS_SETTINGS.iter().any(|s| s.key == key) {
        Some("[metrics]")
    } else if !section.starts_with("databases.") && DATABASE_SETTINGS.iter().any(|s| s.key == key) {
        Some("a [databases.NAME] table")
    } else {
        None
    };
    if section == "pooler" {
        if let Some(pgbouncer::Fate::Unsupported(why)) = pgbouncer::fate(key) {
            return format!("a PgBouncer setting Breakwater has no equivalent of: {why}");
        }
    }
    match elsewhere {
        // The shipped example once had TLS keys after the [metrics] header: TOML gives every
        // key after a header to that section, whatever the author meant.
        Some("[pooler]") => format!(
            "belongs in [pooler], but this line sits in [{section}]: move it above the [{section}] header"
        ),
        Some(place) => format!("belongs in {place}, not in [{section}]"),
        None => format!(
            "unknown key{}",
            did_you_mean(key, keys.iter().map(|s| s.key))
        ),
    }
}

const PGBOUNCER_INI: &str = "this looks like a pgbouncer.ini, not TOML: run `breakwater import-pgbouncer pgbouncer.ini [userlist.txt]` to write an equivalent pooler.toml";

/// PgBouncer's INI: a `[pgbouncer]` section, `%include`, or an unquoted value TOML cannot read
/// that PgBouncer writes (`listen_addr = *`, `app = host=db dbname=app`).
fn looks_like_ini(text: &str) -> bool {
    text.lines().map(str::trim).any(|l| {
        l.eq_ignore_ascii_case("[pgbouncer]")
            || l.starts_with("%include")
            || l.split_once('=').is_some_and(|(_, v)| {
                let v = v.trim();
                v == "*" || (!v.starts_with(['"', '\'', '[', '{']) && v.contains('='))
            })
    })
}

/// `; did you mean `admin_users`?` when one candidate is close enough to be a typo.
fn did_you_mean<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(key, c), c))
        .filter(|(score, _)| *score > 0.85)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("; did you mean `{c}`?"))
        .unwrap_or_default()
}
#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/nonexistent/pooler.toml"), text)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = parse("[pooler]\nauth_type = \"trust\"\n").unwrap();
        let s = c.proxy_settings();
        assert_eq!(c.file.pooler.listen_port, 6432);
        assert_eq!(s.query_wait_timeout, Some(Duration::from_secs(120)));
        assert_eq!(s.idle_transaction_timeout, None);
        assert_eq!(s.server_reset_query, "DISCARD ALL");
        // A client host that vanished is given up on after client_tcp_user_timeout (20 s): the
        // third unanswered probe, at 10 + 2 × 5 s, finds it expired.
        assert_eq!(
            s.client_liveness,
            upstream::TcpLiveness {
                keepalive: Some((Duration::from_secs(10), Duration::from_secs(5), 3)),
                user_timeout: Some(Duration::from_secs(20)),
            }
        );
    }

    #[test]
    fn client_keepalive_can_be_turned_off_but_not_its_intervals_zeroed() {
        let c = parse("[pooler]\nauth_type = \"trust\"\nclient_tcp_keepalive = false\nclient_tcp_user_timeout = \"0\"\n").unwrap();
        assert_eq!(
            c.proxy_settings().client_liveness,
            upstream::TcpLiveness::default()
        );
        let err = parse("[pooler]\nauth_type = \"trust\"\nclient_tcp_keepidle = \"0\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("client_tcp_keepidle") && err.contains("client_tcp_keepalive = true"),
            "{err}"
        );
    }

    #[test]
    fn auth_query_settings_come_from_the_database_else_the_pooler() {
        let c = parse(
            "[pooler]\nauth_user = \"lookup\"\nauth_dbname = \"meta\"\nauth_cache_ttl = \"2s\"\n\
             [databases.app]\n[databases.meta]\n\
             [databases.other]\nauth_user = \"other_lookup\"\nauth_query = \"SELECT * FROM f($1)\"\n",
        )
        .unwrap();
        let s = c.proxy_settings();
        let app = s.route("app").unwrap().auth_query.clone().unwrap();
        assert_eq!(
            (app.user.as_str(), app.query.as_str(), app.dbname.as_deref()),
            ("lookup", proxy::DEFAULT_AUTH_QUERY, Some("meta"))
        );
        let other = s.route("other").unwrap().auth_query.clone().unwrap();
        assert_eq!(
            (other.user.as_str(), other.query.as_str()),
            ("other_lookup", "SELECT * FROM f($1)")
        );
        assert_eq!(s.auth_lookup.cache_ttl, Duration::from_secs(2));
        assert_eq!(s.auth_lookup.negative_cache_ttl, Duration::from_secs(10));
        assert_eq!(s.auth_lookup.pool_size, 2);
        assert_eq!(s.auth_lookup.timeout, Some(Duration::from_secs(5)));
        // Without an auth_user nothing is looked up, and the auth_file is required.
        let err = parse("[databases.app]\n").unwrap_err().to_string();
        assert!(err.contains("auth_file"), "{err}");
        let plain = parse("[pooler]\nauth_type = \"trust\"\n[databases.app]\n").unwrap();
        assert!(plain
            .proxy_settings()
            .route("app")
            .unwrap()
            .auth_query
            .is_none());
    }

    #[test]
    fn auth_dbname_must_name_a_database_entry() {
        let err =
            parse("[pooler]\nauth_user = \"lookup\"\nauth_dbname = \"nope\"\n[databases.app]\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("auth_dbname") && err.contains("\"nope\" is not in [databases]"),
            "{err}"
        );
        let err = parse("[pooler]\nauth_user = \"lookup\"\nauth_pool_size = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth_pool_size: must be at least 1"), "{err}");
    }

    #[test]
    fn rds_iam_is_refused_without_verified_tls_a_region_or_with_a_password() {
        let base = "[pooler]\nauth_type = \"trust\"\nrds_iam_region = \"eu-west-1\"\n";
        let cases = [
            (
                "",
                "server_auth = \"rds_iam\"\n",
                "needs server_tls_sslmode = \"verify-full\"",
            ),
            (
                "server_tls_sslmode = \"require\"\n",
                "server_auth = \"rds_iam\"\n",
                "server_tls_sslmode is \"require\"",
            ),
            (
                "server_auth = \"rds_iam\"\nserver_tls_sslmode = \"verify-full\"\n",
                "password = \"x\"\n",
                "cannot be combined with password",
            ),
            (
                "server_tls_sslmode = \"verify-full\"\n",
                "server_auth = \"rds_iam\"\nhost = \"/var/run/postgresql\"\n",
                "not a Unix socket",
            ),
            (
                "server_tls_sslmode = \"verify-full\"\n",
                "server_auth = \"rds_iam\"\nserver_require_auth = \"scram-sha-256\"\n",
                "server_require_auth = \"scram-sha-256\" refuses",
            ),
            (
                "",
                "server_auth = \"iam\"\n",
                "\"iam\" is not password or rds_iam",
            ),
        ];
        for (pooler, db, want) in cases {
            let err = parse(&format!("{base}{pooler}[databases.app]\n{db}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains("databases.app.server_auth"),
                "{pooler}{db}: {err}"
            );
        }
    }

    #[test]
    fn rds_iam_databases_carry_their_region_and_others_their_password() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let c = parse(&format!(
            "[pooler]\nauth_type = \"trust\"\nserver_tls_sslmode = \"verify-full\"\n\
             server_tls_ca_file = \"{}\"\nserver_auth = \"rds_iam\"\nrds_iam_region = \"eu-west-1\"\n\
             [databases.app]\n[databases.us]\nrds_iam_region = \"us-east-2\"\n\
             [databases.plain]\nserver_auth = \"password\"\npassword = \"x\"\n",
            ca_file.display()
        ))
        .unwrap();
        let s = c.proxy_settings();
        let region = |db: &str| s.route(db).unwrap().server_auth.clone();
        let iam = |r: &str| upstream::ServerAuth::RdsIam { region: r.into() };
        assert_eq!(region("app"), iam("eu-west-1"));
        assert_eq!(region("us"), iam("us-east-2"));
        assert_eq!(region("plain"), upstream::ServerAuth::Password);
        assert!(c
            .show()
            .iter()
            .any(|(k, v, d, _)| k == "server_auth" && v == "rds_iam" && d == "password"));
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let err = parse("[pooler]\nauth_type = \"trust\"\nlisten_prot = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_prot"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn database_entries_inherit_pool_defaults() {
        let c = parse(
            "[pooler]\nauth_type = \"trust\"\ndefault_pool_size = 7\npool_mode = \"session\"\n\
             [databases.app]\nport = 5433\n[databases.other]\ndbname = \"x\"\npool_size = 2\npool_mode = \"statement\"\n",
        )
        .unwrap();
        let s = c.proxy_settings();
        let app = s.route("app").unwrap();
        assert_eq!(
            (app.dbname.as_str(), app.port, app.pool_size, app.pool_mode),
            ("app", 5433, 7, PoolMode::Session)
        );
        let other = s.route("other").unwrap();
        assert_eq!(
            (other.dbname.as_str(), other.pool_size, other.pool_mode),
            ("x", 2, PoolMode::Statement)
        );
    }

    #[test]
    fn pgbouncer_keys_that_ask_for_nothing_are_warnings_not_errors() {
        let c = parse(
            "[pooler]\nauth_type = \"trust\"\nignore_startup_parameters = \"extra_float_digits\"\n\
             server_round_robin = 0\nlogfile = \"\"\ntrack_extra_parameters = \"IntervalStyle\"\n\
             disable_pqexec = false\n",
        )
        .unwrap();
        for key in [
            "line 3: pooler.ignore_startup_parameters",
            "line 4: pooler.server_round_robin",
            "line 5: pooler.logfile",
            "line 6: pooler.track_extra_parameters",
            "line 7: pooler.disable_pqexec",
        ] {
            assert!(
                c.warnings.iter().any(|w| w.starts_with(key)),
                "{key}: {:?}",
                c.warnings
            );
        }
        // The same keys asking for something Breakwater does not do are still refused.
        let err = parse(
            "[pooler]\nauth_type = \"trust\"\nserver_round_robin = 1\nlogfile = \"/var/log/pgbouncer.log\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("2 problems"), "{err}");
        assert!(err.contains("line 3: pooler.server_round_robin"), "{err}");
        assert!(err.contains("line 4: pooler.logfile"), "{err}");
    }

    #[test]
    fn users_sections_override_the_database_and_the_pooler_wide_caps() {
        let c = parse(
            "[pooler]\nauth_type = \"trust\"\nmax_user_client_connections = 50\nmax_db_client_connections = 7\n\
             [databases.app]\npool_size = 4\n[databases.big]\nmax_db_client_connections = 0\n\
             [users.batch]\npool_mode = \"session\"\npool_size = 2\nmax_user_connections = 3\n\
             max_user_client_connections = 0\n",
        )
        .unwrap();
        let s = c.proxy_settings();
        let app = s.route("app").unwrap();
        assert_eq!(app.max_db_client_connections, 7);
        assert_eq!(s.route("big").unwrap().max_db_client_connections, 0);
        let batch = s.users.route_for(app, "batch");
        assert_eq!((batch.pool_size, batch.pool_mode), (2, PoolMode::Session));
        let web = s.users.route_for(app, "web");
        assert_eq!((web.pool_size, web.pool_mode), (4, PoolMode::Transaction));
        assert_eq!(s.users.max_user_connections("batch"), Some(3));
        assert_eq!(s.users.max_user_connections("web"), None);
        assert_eq!(
            s.users.max_user_client_connections("batch"),
            None,
            "0 lifts it"
        );
        assert_eq!(s.users.max_user_client_connections("web"), Some(50));

        let err = parse("[pooler]\nauth_type = \"trust\"\n[users]\napp = \"pool_mode=session\"\n[users.x]\npool_size = 0\nmax_db_connections = 1\n")
            .unwrap_err()
            .to_string();
        for want in [
            "line 4: users.app: looks like a PgBouncer [users] line",
            "line 7: users.x.max_db_connections: belongs in a [databases.NAME] table",
            "users.x.pool_size: must be at least 1",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
    }

    #[test]
    fn auth_file_is_required_unless_trust() {
        let err = parse("[pooler]\nauth_type = \"md5\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("auth_file"), "{err}");
    }

    #[test]
    fn every_default_shows_and_parses_back() {
        fn round_trip<S: Default>(table: &[Setting<S>]) {
            let defaults = S::default();
            for s in table {
                let v = (s.get)(&defaults);
                let mut other = S::default();
                (s.set)(&mut other, &v).unwrap_or_else(|e| panic!("{}: {e}", s.key));
                assert_eq!((s.get)(&other), v, "{} round-trips", s.key);
            }
        }
        round_trip(SETTINGS);
        round_trip(METRICS_SETTINGS);
        round_trip(DATABASE_SETTINGS);
        let c = parse("[pooler]\nauth_type = \"trust\"\n").unwrap();
        let rows = c.show();
        assert!(rows
            .iter()
            .any(|(k, v, d, _)| k == "query_wait_timeout" && v == "2m" && d == "2m"));
        assert!(rows.iter().any(|(k, ..)| k == "metrics.listen"));
        assert_eq!(rows.len(), SETTINGS.len() + METRICS_SETTINGS.len());
    }

    #[test]
    fn the_example_file_documents_every_key_with_its_default() {
        let text = include_str!("../../../pooler.toml.example");
        let doc = toml_edit::ImDocument::parse(text).unwrap();
        let mut reader = Reader {
            text,
            file_name: "pooler.toml.example".into(),
            lines: HashMap::new(),
            origins: BTreeMap::new(),
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let file = reader.document(doc.as_table());
        assert_eq!(reader.problems, vec![]);
        // auth_file has no default; the example names the usual one.
        let pooler = Pooler {
            auth_file: Some("userlist.txt".into()),
            ..Pooler::default()
        };
        assert_eq!(file.pooler, pooler);
        assert_eq!(file.metrics, Metrics::default());
        for (section, keys) in [
            ("pooler", SETTINGS.iter().map(|s| s.key).collect::<Vec<_>>()),
            ("metrics", METRICS_SETTINGS.iter().map(|s| s.key).collect()),
            (
                "databases",
                DATABASE_SETTINGS.iter().map(|s| s.key).collect(),
            ),
            ("users", USER_SETTINGS.iter().map(|s| s.key).collect()),
        ] {
            for key in keys {
                let shown = text.lines().any(|l| {
                    let l = l.trim_start_matches(['#', ' ']);
                    l.strip_prefix(key)
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                });
                assert!(shown, "{section}.{key} is not in pooler.toml.example");
            }
        }
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_line() {
        let err = parse(
            "[pooler]\nauth_type = \"md5\"\nadmin_user = [\"a\"]\nquery_wait_timeout = 120\n\
             tcp_keepalive = 1\ndefault_pool_size = 0\n[databases.app]\nport = \"x\"\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "6 problems",
            "line 3: pooler.admin_user: unknown key; did you mean `admin_users`?",
            "line 4: pooler.query_wait_timeout: a duration needs a unit: write \"120s\"",
            "line 5: pooler.tcp_keepalive: write true instead of 1",
            "line 6: pooler.default_pool_size: must be at least 1",
            "line 8: databases.app.port: \"x\" is not a whole number",
            "pooler.auth_file: is required",
        ] {
            assert!(err.contains(want), "{want}\n{err}");
        }
    }

    #[test]
    fn layers_take_database_url_only_without_a_file_and_flags_first() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let db_url = env(&[("DATABASE_URL", "postgres://a@h/d"), ("HOME", "/root")]);
        let l = Layers::gather(None, None, &[], db_url.clone()).unwrap();
        assert_eq!(
            l.upstream,
            Some(("postgres://a@h/d".into(), "DATABASE_URL"))
        );
        assert_eq!(l.file, None);
        assert!(l.env.is_empty(), "{l:?}");
        // With a file, DATABASE_URL is the app's business, not the pooler's.
        let l = Layers::gather(Some("p.toml".into()), None, &[], db_url.clone()).unwrap();
        assert_eq!(l.upstream, None);
        let both = env(&[
            ("DATABASE_URL", "postgres://a@h/d"),
            ("BREAKWATER_UPSTREAM", "postgres://b@h/d"),
            ("BREAKWATER_LISTEN_PORT", "7000"),
        ]);
        let l = Layers::gather(
            None,
            Some("postgres://c@h/d".into()),
            &["pool_mode=session".into()],
            both.clone(),
        )
        .unwrap();
        assert_eq!(l.upstream, Some(("postgres://c@h/d".into(), "--upstream")));
        assert_eq!(
            l.env,
            vec![("BREAKWATER_LISTEN_PORT".to_string(), "7000".to_string())]
        );
        assert_eq!(
            l.flags,
            vec![("pool_mode".to_string(), "session".to_string())]
        );
        let l = Layers::gather(None, None, &[], both).unwrap();
        assert_eq!(
            l.upstream,
            Some(("postgres://b@h/d".into(), "BREAKWATER_UPSTREAM"))
        );
        assert!(Layers::gather(None, None, &["pool_mode".into()], vec![]).is_err());
        // No URL and no file named: the default file, whose absence load() reports.
        let l = Layers::gather(None, None, &[], vec![]).unwrap();
        assert_eq!(l.file, Some(PathBuf::from(DEFAULT_FILE)));
    }

    #[test]
    fn the_upstream_password_stays_out_of_debug_output() {
        let layers = Layers {
            upstream: Some(("postgres://app:hunter2@db/app".into(), "--upstream")),
            ..Layers::default()
        };
        let c = Config::load(&layers).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn upstream_urls_decode_and_default_like_libpq() {
        let u = upstream_url("postgresql://app:p%40ss%20w@[::1]:5433/my%20db?sslmode=verify-full")
            .unwrap();
        assert_eq!(u.name, "my db");
        assert_eq!(u.user, "app");
        assert_eq!(u.database.password.as_deref(), Some("p@ss w"));
        assert_eq!(u.database.host.as_deref(), Some("::1"));
        assert_eq!(u.database.port, Some(5433));
        assert_eq!(u.sslmode, Some(SslMode::VerifyFull));
        let u = upstream_url("postgres://app@db").unwrap();
        assert_eq!((u.name.as_str(), u.database.port), ("app", Some(5432)));
        for (bad, want) in [
            ("mysql://a@h/d", "starts with mysql://"),
            ("postgres://h/d", "names no user"),
            ("postgres://a:secret@h/d?foo=1", "foo is not supported"),
            ("postgres://a:secret@h/d?sslmode=on", "sslmode"),
        ] {
            let err = upstream_url(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_upstream_url_gives_clients_its_login_and_the_file_still_applies() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pooler.toml");
        std::fs::write(&file, "[pooler]\ndefault_pool_size = 3\n").unwrap();
        let layers = Layers {
            file: Some(file),
            upstream: Some(("postgres://app:pw@db:6000/appdb".into(), "--upstream")),
            ..Layers::default()
        };
        let c = Config::load(&layers).unwrap();
        assert!(c.userlist.get("app").is_some());
        let s = c.proxy_settings();
        let route = s.route("appdb").unwrap();
        assert_eq!(
            (route.host.as_str(), route.port, route.pool_size),
            ("db", 6000, 3)
        );
        assert_eq!(route.user.as_deref(), Some("app"));
        assert_eq!(
            c.origins.get("databases.appdb").map(String::as_str),
            Some("--upstream")
        );
        // RELOAD applies the URL again over the re-read file.
        assert!(c.reload().unwrap().file.databases.contains_key("appdb"));
    }

    #[test]
    fn password_file_is_read_without_its_newline_and_excludes_password() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
        let path = dir.path().join("pooler.toml");
        let c = Config::parse(
            &path,
            "[pooler]\nauth_type = \"trust\"\n[databases.app]\npassword_file = \"secret\"\n",
        )
        .unwrap();
        assert_eq!(
            c.proxy_settings().route("app").unwrap().password.as_deref(),
            Some("s3cret")
        );
        let err = Config::parse(
            &path,
            "[pooler]\nauth_type = \"trust\"\n[databases.app]\npassword = \"x\"\npassword_file = \"nope\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cannot be combined with password"), "{err}");
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn a_database_on_the_pooler_s_own_port_is_refused() {
        let err = parse("[pooler]\nauth_type = \"trust\"\n[databases.app]\nport = 6432\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("own listen_port"), "{err}");
        // Another pooler on loopback is fine when this one listens elsewhere.
        parse("[pooler]\nauth_type = \"trust\"\nlisten_addr = \"10.1.2.3\"\n[databases.app]\nport = 6432\n")
            .unwrap();
    }

    #[test]
    fn misplaced_keys_say_where_they_belong() {
        let cases = [
            (
                "[pooler]\nauth_type = \"trust\"\n[metrics]\nclient_tls_sslmode = \"disable\"\n",
                "metrics.client_tls_sslmode: belongs in [pooler], but this line sits in [metrics]: move it above the [metrics] header",
            ),
            (
                "listen_port = 1\n[pooler]\nauth_type = \"trust\"\n",
                "line 1: listen_port: must be inside the [pooler] section",
            ),
            (
                "[pooler]\nauth_type = \"trust\"\nhost = \"db\"\n",
                "pooler.host: belongs in a [databases.NAME] table, not in [pooler]",
            ),
            (
                "[pooler]\nauth_type = \"trust\"\n[database.app]\n",
                "database: unknown section; did you mean `databases`?",
            ),
            (
                "[pooler]\nauth_type = \"trust\"\n[databases]\napp = \"host=db port=5432\"\n",
                "databases.app: looks like a PgBouncer connection string",
            ),
            (
                "[pooler]\nauth_type = \"trust\"\nno_such_thing = 1\n",
                "pooler.no_such_thing: unknown key",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(want), "{want}\n{err}");
        }
    }

    #[test]
    fn set_changes_one_setting_and_validates_it() {
        let c = parse("[pooler]\nauth_type = \"trust\"\n").unwrap();
        let n = c.with_setting("default_pool_size", "3").unwrap();
        assert_eq!(n.file.pooler.default_pool_size, 3);
        assert!(c
            .with_setting("default_pool_size", "0")
            .unwrap_err()
            .contains("at least 1"));
        assert!(c
            .with_setting("listen_port", "1")
            .unwrap_err()
            .contains("restart"));
        assert!(c
            .with_setting("nope", "1")
            .unwrap_err()
            .contains("unknown setting"));
        assert!(c.with_setting("query_wait_timeout", "soon").is_err());
    }

    #[test]
    fn reload_keeps_restart_only_settings() {
        let c = parse("[pooler]\nauth_type = \"trust\"\nlisten_port = 7000\n").unwrap();
        let mut n =
            parse("[pooler]\nauth_type = \"trust\"\nlisten_port = 7001\ndefault_pool_size = 4\n")
                .unwrap();
        assert_eq!(c.keep_restart_only(&mut n), vec!["listen_port"]);
        assert_eq!(n.file.pooler.listen_port, 7000);
        assert_eq!(n.file.pooler.default_pool_size, 4);
    }

    #[test]
    fn tls_settings_name_what_is_missing_or_unreadable() {
        let cases = [
            (
                "client_tls_sslmode = \"require\"\n",
                "client_tls_cert_file is required with client_tls_sslmode = \"require\"",
            ),
            (
                "client_tls_sslmode = \"prefer\"\nclient_tls_cert_file = \"nope.crt\"\nclient_tls_key_file = \"nope.key\"\n",
                "cannot read client_tls_cert_file /nonexistent/nope.crt",
            ),
            (
                "server_tls_sslmode = \"verify-full\"\n",
                "server_tls_ca_file is required with server_tls_sslmode = \"verify-full\"",
            ),
            (
                "server_tls_sslmode = \"verify-ca\"\nserver_tls_ca_file = \"rds.pem\"\n",
                "cannot read server_tls_ca_file /nonexistent/rds.pem",
            ),
            ("server_tls_sslmode = \"verify_full\"\n", "verify_full"),
        ];
        for (extra, want) in cases {
            let err = parse(&format!("[pooler]\nauth_type = \"trust\"\n{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{extra}: {err}");
        }
    }

    #[test]
    fn tls_defaults_are_client_disable_and_server_prefer() {
        let c = parse("[pooler]\nauth_type = \"trust\"\n").unwrap();
        let s = c.proxy_settings();
        assert_eq!(s.client_tls.mode, upstream::SslMode::Disable);
        assert_eq!(s.server.tls.mode, upstream::SslMode::Prefer);
    }

    #[test]
    fn auth_type_cert_needs_verified_client_certificates() {
        let err = parse("[pooler]\nauth_type = \"cert\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("verify-ca"), "{err}");
    }

    #[test]
    fn admin_database_names_are_reserved() {
        let err = parse("[pooler]\nauth_type = \"trust\"\n[databases.pgbouncer]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reserved"), "{err}");
    }

    #[test]
    fn hosts_lists_parse_with_default_ports_and_failover_settings() {
        let c = parse(
            "[pooler]\nauth_type = \"trust\"\n[databases.app]\n\
             hosts = [\"a:5433\", \"b\", \"[::1]:6000\", \"/run/pg\"]\n\
             target_session_attrs = \"read-write\"\nload_balance_hosts = \"round-robin\"\n",
        )
        .unwrap();
        let s = c.proxy_settings();
        let app = s.route("app").unwrap();
        let want: Vec<(String, u16)> = [("a", 5433), ("b", 5432), ("::1", 6000), ("/run/pg", 5432)]
            .iter()
            .map(|(h, p)| (h.to_string(), *p))
            .collect();
        assert_eq!(app.hosts, want);
        assert_eq!((app.host.as_str(), app.port), ("a", 5433));
        assert_eq!(
            app.target_session_attrs,
            upstream::TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            app.load_balance_hosts,
            upstream::LoadBalanceHosts::RoundRobin
        );
        assert_eq!(s.server.role_check_interval, Some(Duration::from_secs(5)));
        assert_eq!(s.server.role_check_timeout, Some(Duration::from_secs(2)));
        // Without hosts, host/port default as before, and any role serves.
        let c = parse("[pooler]\nauth_type = \"trust\"\n[databases.app]\nport = 5440\n").unwrap();
        let s = c.proxy_settings();
        let app = s.route("app").unwrap();
        assert_eq!(app.hosts, vec![("127.0.0.1".to_string(), 5440)]);
        assert_eq!(app.target_session_attrs, upstream::TargetSessionAttrs::Any);
    }

    #[test]
    fn bad_host_lists_are_errors_that_name_the_key() {
        for (db, what) in [
            ("hosts = [\"a:1\"]\nhost = \"b\"\n", "cannot be combined"),
            ("hosts = [\"a:1\"]\nport = 5\n", "cannot be combined"),
            ("hosts = []\n", "at least one host"),
            ("hosts = [\"a:notaport\"]\n", "invalid host"),
            ("hosts = [\"a:99999\"]\n", "invalid host"),
        ] {
            let err = parse(&format!(
                "[pooler]\nauth_type = \"trust\"\n[databases.app]\n{db}"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("databases.app.hosts"), "{err}");
            assert!(err.contains(what), "{db}: {err}");
        }
        let err = parse(
            "[pooler]\nauth_type = \"trust\"\n[databases.app]\ntarget_session_attrs = \"writer\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("writer") && err.contains("read-write"),
            "{err}"
        );
    }
}

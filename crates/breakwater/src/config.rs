//! The configuration: every setting stated once (name, type, default, whether a running pooler
//! may change it), read from the TOML file key by key so that every problem is reported at once
//! with its key path and line, then validated and turned into each crate's typed settings.
//! Durations are strings with a unit (`"250ms"`, `"5s"`, `"10m"`); `"0"` disables a timeout.
//! Nothing here opens a socket or starts a task.

mod value;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use proto::auth::Userlist;
use proxy::{AuthType, DatabaseRoute, PoolMode, ProxySettings};
use upstream::{LoadBalanceHosts, SslMode, TargetSessionAttrs, UnknownName};

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

impl FromStr for LogFormat {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        UnknownName::find(s, &LogFormat::ALL, LogFormat::as_str)
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One key of a section: how SHOW CONFIG reads it, how SET and the environment write it, how the
/// file writes it, and whether a running pooler can take a new value (RELOAD keeps the old value
/// of the others, with a warning).
pub struct Setting<S> {
    pub key: &'static str,
    pub changeable: bool,
    pub get: fn(&S) -> String,
    pub set: fn(&mut S, &str) -> Result<(), String>,
    set_toml: fn(&mut S, &toml_edit::Value) -> Result<(), String>,
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
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $key: $ty, )*
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
        default_pool_size: usize = 20, reload;
        min_pool_size: usize = 0, reload;
        auth_type: AuthType = AuthType::ScramSha256, reload;
        auth_file: Option<PathBuf> = None, reload;
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
        tcp_keepalive: bool = true, reload;
        tcp_keepidle: Timeout = Timeout::secs(15), reload;
        tcp_keepintvl: Timeout = Timeout::secs(5), reload;
        tcp_keepcnt: u32 = 3, reload;
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
        pool_size: Option<usize> = None, reload;
        min_pool_size: Option<usize> = None, reload;
        pool_mode: Option<PoolMode> = None, reload;
        max_db_connections: Option<usize> = None, reload;
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
}

/// A loaded, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub file: ConfigFile,
    pub userlist: Userlist,
    /// Built from the `client_tls_*` files at load; swappable by a reload.
    pub client_tls: proxy::ClientTls,
    /// Built from the `server_tls_*` files at load.
    pub server_tls: upstream::ServerTls,
    /// Accepted, but worth a look: printed by `--check` and logged at start.
    pub warnings: Vec<String>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let doc = toml_edit::ImDocument::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let mut reader = Reader {
            text,
            lines: HashMap::new(),
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let file = reader.document(doc.as_table());
        let Reader {
            lines,
            mut problems,
            warnings,
            ..
        } = reader;
        let mut config = Self::validate(path, file, &lines, &mut problems);
        if let Some(c) = &mut config {
            c.warnings = warnings;
        }
        match config {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(Self::invalid(path, problems)),
        }
    }

    /// Validates settings that did not come from a file (SET), with no line numbers.
    pub fn from_file(path: &Path, file: ConfigFile) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        match Self::validate(path, file, &HashMap::new(), &mut problems) {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(Self::invalid(path, problems)),
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
        for (key, t) in never_zero {
            if t.0.is_none() {
                let why = if key.contains("keep") {
                    " while tcp_keepalive = true"
                } else {
                    ""
                };
                bad(key, format!("cannot be \"0\"{why}"));
            }
        }
        if !matches!(p.auth_type, AuthType::Trust | AuthType::Cert) && p.auth_file.is_none() {
            bad(
                "pooler.auth_file",
                "is required unless auth_type = \"trust\" or \"cert\"".into(),
            );
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
        for (name, db) in &file.databases {
            if proxy::ADMIN_DATABASES.contains(&name.as_str()) {
                bad(
                    &format!("databases.{name}"),
                    "this name is reserved for the admin console".into(),
                );
            }
            if let Err(message) = db.host_list() {
                bad(&format!("databases.{name}.hosts"), message);
            }
            if db.pool_size == Some(0) {
                bad(
                    &format!("databases.{name}.pool_size"),
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
            file,
            userlist: userlist?,
            client_tls: client_tls?,
            server_tls: server_tls?,
            warnings: Vec::new(),
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
        let mut next = Config::from_file(&self.path, file).map_err(|e| e.to_string())?;
        next.warnings = self.warnings.clone();
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
            keepalive: p.tcp_keepalive.then(|| {
                (
                    p.tcp_keepidle.0.unwrap_or_default(),
                    p.tcp_keepintvl.0.unwrap_or_default(),
                    p.tcp_keepcnt,
                )
            }),
            tcp_user_timeout: p.tcp_user_timeout.0,
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
                    password: d.password.clone(),
                    pool_size: d.pool_size.unwrap_or(p.default_pool_size),
                    min_pool_size: d.min_pool_size.unwrap_or(p.min_pool_size),
                    pool_mode: d.pool_mode.unwrap_or(p.pool_mode),
                    max_db_connections: d.max_db_connections.filter(|n| *n > 0),
                }
            })
            .collect();
        ProxySettings {
            log_connections: p.log_connections,
            log_disconnections: p.log_disconnections,
            auth_type: p.auth_type,
            userlist: self.userlist.clone(),
            max_client_conn: p.max_client_conn,
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
            databases,
        }
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
    /// Key path → line, for problems found later by validation.
    lines: HashMap<String, usize>,
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
                    for (db, item) in t.iter() {
                        let key = format!("databases.{db}");
                        let line = self.line_of(t.key(db).and_then(|k| k.span()));
                        match item.as_table_like() {
                            Some(entry) => {
                                let mut d = Database::default();
                                self.section(&key, entry, DATABASE_SETTINGS, &mut d);
                                file.databases.insert(db.to_owned(), d);
                            }
                            None if item.is_str() => self.problem(
                                key,
                                line,
                                format!(
                                    "looks like a PgBouncer connection string; write a [databases.{db}] table with host, port, dbname, … (`breakwater import-pgbouncer` converts a pgbouncer.ini)"
                                ),
                            ),
                            None => self.problem(
                                key,
                                line,
                                format!("expected a [databases.{db}] table"),
                            ),
                        }
                    }
                }
                ("pooler" | "metrics" | "databases", None) => self.problem(
                    name.to_owned(),
                    line,
                    format!("expected a [{name}] section"),
                ),
                _ => {
                    let message = if SETTINGS.iter().any(|s| s.key == name) {
                        "must be inside the [pooler] section (it sits before any section header)"
                            .to_owned()
                    } else {
                        format!(
                            "unknown section{}",
                            did_you_mean(name, ["pooler", "metrics", "databases"])
                        )
                    };
                    self.problem(name.to_owned(), line, message)
                }
            }
        }
        file
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
            }
            let Some(setting) = keys.iter().find(|s| s.key == name) else {
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
            lines: HashMap::new(),
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

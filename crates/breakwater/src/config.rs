//! The TOML config file: parsing, defaults, validation, and conversion to each crate's typed
//! settings. Unknown keys are errors that name the key; durations are strings with a unit
//! (`"250ms"`, `"5s"`, `"10m"`), and `"0"` disables a timeout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::auth::Userlist;
use proxy::{AuthType, DatabaseRoute, PoolMode, ProxySettings};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("cannot read auth_file {path}: {source}")]
    AuthFileRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid auth_file {path}: {source}")]
    AuthFile {
        path: PathBuf,
        source: proto::auth::UserlistError,
    },
    #[error("invalid config file {path}: {source}")]
    Tls {
        path: PathBuf,
        source: upstream::TlsConfigError,
    },
}

/// A duration setting; `"0"` means disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_timeout(&s).map_err(serde::de::Error::custom)
    }
}

pub fn parse_timeout(s: &str) -> Result<Timeout, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Timeout(None));
    }
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Ok(Timeout(None)),
        Ok(d) => Ok(Timeout(Some(d))),
        Err(e) => Err(format!("invalid duration \"{s}\" ({e}); use a unit, e.g. \"250ms\", \"5s\", \"10m\", or \"0\" to disable")),
    }
}

fn secs(n: u64) -> Timeout {
    Timeout(Some(Duration::from_secs(n)))
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolModeSetting {
    Session,
    Transaction,
    Statement,
}

impl From<PoolModeSetting> for PoolMode {
    fn from(m: PoolModeSetting) -> PoolMode {
        match m {
            PoolModeSetting::Session => PoolMode::Session,
            PoolModeSetting::Transaction => PoolMode::Transaction,
            PoolModeSetting::Statement => PoolMode::Statement,
        }
    }
}

/// `log_format`: human-readable lines or one JSON object per line.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrsSetting {
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    PreferStandby,
}

impl From<TargetSessionAttrsSetting> for upstream::TargetSessionAttrs {
    fn from(t: TargetSessionAttrsSetting) -> Self {
        use upstream::TargetSessionAttrs as T;
        match t {
            TargetSessionAttrsSetting::Any => T::Any,
            TargetSessionAttrsSetting::ReadWrite => T::ReadWrite,
            TargetSessionAttrsSetting::ReadOnly => T::ReadOnly,
            TargetSessionAttrsSetting::Primary => T::Primary,
            TargetSessionAttrsSetting::Standby => T::Standby,
            TargetSessionAttrsSetting::PreferStandby => T::PreferStandby,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalanceHostsSetting {
    Disable,
    RoundRobin,
}

impl From<LoadBalanceHostsSetting> for upstream::LoadBalanceHosts {
    fn from(l: LoadBalanceHostsSetting) -> Self {
        match l {
            LoadBalanceHostsSetting::Disable => upstream::LoadBalanceHosts::Disable,
            LoadBalanceHostsSetting::RoundRobin => upstream::LoadBalanceHosts::RoundRobin,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum AuthTypeSetting {
    #[serde(rename = "trust")]
    Trust,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "cert")]
    Cert,
}

/// libpq's sslmode names, for `client_tls_sslmode` and `server_tls_sslmode`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum SslModeSetting {
    #[serde(rename = "disable")]
    Disable,
    #[serde(rename = "allow")]
    Allow,
    #[serde(rename = "prefer")]
    Prefer,
    #[serde(rename = "require")]
    Require,
    #[serde(rename = "verify-ca")]
    VerifyCa,
    #[serde(rename = "verify-full")]
    VerifyFull,
}

impl From<SslModeSetting> for upstream::SslMode {
    fn from(m: SslModeSetting) -> upstream::SslMode {
        use upstream::SslMode;
        match m {
            SslModeSetting::Disable => SslMode::Disable,
            SslModeSetting::Allow => SslMode::Allow,
            SslModeSetting::Prefer => SslMode::Prefer,
            SslModeSetting::Require => SslMode::Require,
            SslModeSetting::VerifyCa => SslMode::VerifyCa,
            SslModeSetting::VerifyFull => SslMode::VerifyFull,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pooler {
    pub listen_addr: String,
    pub listen_port: u16,
    pub unix_socket_dir: Option<PathBuf>,
    pub pool_mode: PoolModeSetting,
    pub max_client_conn: usize,
    pub default_pool_size: usize,
    pub min_pool_size: usize,
    pub auth_type: AuthTypeSetting,
    pub auth_file: Option<PathBuf>,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    pub dns_timeout: Timeout,
    pub dns_min_ttl: Timeout,
    pub dns_max_ttl: Timeout,
    pub dns_nxdomain_ttl: Timeout,
    pub dns_nameservers: Vec<String>,
    pub server_connect_timeout: Timeout,
    pub server_login_timeout: Timeout,
    pub server_connect_concurrency: usize,
    pub server_login_retry: Timeout,
    pub server_login_retry_max: Timeout,
    pub server_breaker_threshold: u32,
    pub max_server_connections: usize,
    pub server_check_delay: Timeout,
    pub server_check_query: String,
    pub server_role_check_interval: Timeout,
    pub server_role_check_timeout: Timeout,
    pub allow_drills: bool,
    pub server_unresponsive_timeout: Timeout,
    pub tcp_user_timeout: Timeout,
    pub query_wait_notify: Timeout,
    pub query_wait_timeout: Timeout,
    pub query_timeout: Timeout,
    pub idle_transaction_timeout: Timeout,
    pub client_login_timeout: Timeout,
    pub client_idle_timeout: Timeout,
    pub server_idle_timeout: Timeout,
    pub server_lifetime: Timeout,
    pub server_reset_query: String,
    pub max_packet_size: usize,
    pub max_prepared_statements: usize,
    pub shutdown_timeout: Timeout,
    pub tcp_keepalive: bool,
    pub tcp_keepidle: Timeout,
    pub tcp_keepintvl: Timeout,
    pub tcp_keepcnt: u32,
    pub workers: usize,
    /// How often averages (SHOW STATS avg_*) are taken and the stats line is logged.
    pub stats_period: Timeout,
    pub log_stats: bool,
    pub log_connections: bool,
    pub log_disconnections: bool,
    pub log_format: LogFormat,
    pub client_tls_sslmode: SslModeSetting,
    pub client_tls_cert_file: Option<PathBuf>,
    pub client_tls_key_file: Option<PathBuf>,
    pub client_tls_ca_file: Option<PathBuf>,
    pub server_tls_sslmode: SslModeSetting,
    pub server_tls_ca_file: Option<PathBuf>,
    pub server_tls_cert_file: Option<PathBuf>,
    pub server_tls_key_file: Option<PathBuf>,
}

impl Default for Pooler {
    fn default() -> Self {
        Pooler {
            listen_addr: "127.0.0.1".into(),
            listen_port: 6432,
            unix_socket_dir: None,
            pool_mode: PoolModeSetting::Transaction,
            max_client_conn: 10_000,
            default_pool_size: 20,
            min_pool_size: 0,
            auth_type: AuthTypeSetting::ScramSha256,
            auth_file: None,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
            dns_timeout: secs(5),
            dns_min_ttl: secs(1),
            dns_max_ttl: secs(15),
            dns_nxdomain_ttl: secs(15),
            dns_nameservers: Vec::new(),
            server_connect_timeout: secs(5),
            server_login_timeout: secs(5),
            server_connect_concurrency: 4,
            server_login_retry: Timeout(Some(Duration::from_millis(250))),
            server_login_retry_max: secs(15),
            server_breaker_threshold: 10,
            max_server_connections: 0,
            server_check_delay: secs(30),
            server_check_query: "SELECT 1".into(),
            server_role_check_interval: secs(5),
            server_role_check_timeout: secs(2),
            allow_drills: false,
            server_unresponsive_timeout: secs(30),
            tcp_user_timeout: secs(30),
            query_wait_notify: secs(5),
            query_wait_timeout: secs(120),
            query_timeout: Timeout(None),
            idle_transaction_timeout: Timeout(None),
            client_login_timeout: secs(60),
            client_idle_timeout: Timeout(None),
            server_idle_timeout: secs(600),
            server_lifetime: secs(3600),
            server_reset_query: "DISCARD ALL".into(),
            max_packet_size: proto::DEFAULT_MAX_MESSAGE,
            max_prepared_statements: 200,
            shutdown_timeout: secs(30),
            tcp_keepalive: true,
            tcp_keepidle: secs(15),
            tcp_keepintvl: secs(5),
            tcp_keepcnt: 3,
            workers: 0,
            stats_period: secs(60),
            log_stats: true,
            log_connections: true,
            log_disconnections: true,
            log_format: LogFormat::Text,
            client_tls_sslmode: SslModeSetting::Disable,
            client_tls_cert_file: None,
            client_tls_key_file: None,
            client_tls_ca_file: None,
            server_tls_sslmode: SslModeSetting::Prefer,
            server_tls_ca_file: None,
            server_tls_cert_file: None,
            server_tls_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    pub host: Option<String>,
    pub port: Option<u16>,
    /// `["a:5432", "b"]`: tried in order; instead of `host`/`port`.
    pub hosts: Option<Vec<String>>,
    pub target_session_attrs: Option<TargetSessionAttrsSetting>,
    pub load_balance_hosts: Option<LoadBalanceHostsSetting>,
    pub dbname: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: Option<usize>,
    pub min_pool_size: Option<usize>,
    pub pool_mode: Option<PoolModeSetting>,
    pub max_db_connections: Option<usize>,
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

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// `host:port` to serve `/metrics` on; unset disables the exporter.
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub pooler: Pooler,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
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
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_file(path, file)
    }

    /// Validates `file` and reads its auth_file (relative to the config file's directory).
    pub fn from_file(path: &Path, file: ConfigFile) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_owned(),
            message: message.to_owned(),
        };
        let p = &file.pooler;
        if p.default_pool_size == 0 {
            return Err(invalid("pooler.default_pool_size", "must be at least 1"));
        }
        if p.server_connect_concurrency == 0 {
            return Err(invalid(
                "pooler.server_connect_concurrency",
                "must be at least 1",
            ));
        }
        if p.max_packet_size < 1024 {
            return Err(invalid(
                "pooler.max_packet_size",
                "must be at least 1024 bytes",
            ));
        }
        if !matches!(p.auth_type, AuthTypeSetting::Trust | AuthTypeSetting::Cert)
            && p.auth_file.is_none()
        {
            return Err(invalid(
                "pooler.auth_file",
                "is required unless auth_type = \"trust\" or \"cert\"",
            ));
        }
        if p.auth_type == AuthTypeSetting::Cert
            && !matches!(
                p.client_tls_sslmode,
                SslModeSetting::VerifyCa | SslModeSetting::VerifyFull
            )
        {
            return Err(invalid(
                "pooler.auth_type",
                "\"cert\" needs client_tls_sslmode = \"verify-ca\" or \"verify-full\" (and client_tls_ca_file)",
            ));
        }
        if let Some(l) = &file.metrics.listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "metrics.listen",
                    &format!("\"{l}\" is not an address:port such as \"127.0.0.1:9127\""),
                ));
            }
        }
        if let Err(message) = nameservers(&p.dns_nameservers) {
            return Err(invalid("pooler.dns_nameservers", &message));
        }
        for (name, db) in &file.databases {
            if proxy::ADMIN_DATABASES.contains(&name.as_str()) {
                return Err(invalid(
                    &format!("databases.{name}"),
                    "this name is reserved for the admin console",
                ));
            }
            if let Err(message) = db.host_list() {
                return Err(invalid(&format!("databases.{name}.hosts"), &message));
            }
            if db.pool_size == Some(0) {
                return Err(invalid(
                    &format!("databases.{name}.pool_size"),
                    "must be at least 1",
                ));
            }
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let userlist = match &p.auth_file {
            Some(f) => {
                let f = base.join(f);
                let text =
                    std::fs::read_to_string(&f).map_err(|source| ConfigError::AuthFileRead {
                        path: f.clone(),
                        source,
                    })?;
                Userlist::parse(&text)
                    .map_err(|source| ConfigError::AuthFile { path: f, source })?
            }
            None => Userlist::default(),
        };
        // Relative TLS file names are relative to the config file, like auth_file.
        let file_at = |f: &Option<PathBuf>| f.as_ref().map(|f| base.join(f));
        let tls_err = |source| ConfigError::Tls {
            path: path.to_owned(),
            source,
        };
        let client_tls = proxy::ClientTls::new(
            p.client_tls_sslmode.into(),
            &proxy::ClientTlsFiles {
                cert_file: file_at(&p.client_tls_cert_file),
                key_file: file_at(&p.client_tls_key_file),
                ca_file: file_at(&p.client_tls_ca_file),
            },
        )
        .map_err(tls_err)?;
        let server_tls = upstream::ServerTls::new(
            p.server_tls_sslmode.into(),
            &upstream::ServerTlsFiles {
                ca_file: file_at(&p.server_tls_ca_file),
                cert_file: file_at(&p.server_tls_cert_file),
                key_file: file_at(&p.server_tls_key_file),
            },
        )
        .map_err(tls_err)?;
        Ok(Config {
            path: path.to_owned(),
            file,
            userlist,
            client_tls,
            server_tls,
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
        Config::from_file(&self.path, file).map_err(|e| e.to_string())
    }

    /// Keeps this config's value of every setting that needs a restart, naming those that
    /// differed in `next` so the caller can warn.
    pub fn keep_restart_only(&self, next: &mut Config) -> Vec<&'static str> {
        let mut kept = Vec::new();
        for s in SETTINGS.iter().filter(|s| !s.changeable) {
            let old = (s.get)(&self.file.pooler);
            if (s.get)(&next.file.pooler) != old {
                // Setting back a value that was already valid cannot fail.
                let _ = (s.set)(&mut next.file.pooler, &old);
                kept.push(s.key);
            }
        }
        if next.file.metrics != self.file.metrics {
            next.file.metrics = self.file.metrics.clone();
            kept.push("metrics.listen");
        }
        kept
    }

    /// SHOW CONFIG rows: (key, value, default, changeable).
    pub fn show(&self) -> Vec<(&'static str, String, String, bool)> {
        let defaults = Pooler::default();
        let mut rows: Vec<_> = SETTINGS
            .iter()
            .map(|s| {
                (
                    s.key,
                    (s.get)(&self.file.pooler),
                    (s.get)(&defaults),
                    s.changeable,
                )
            })
            .collect();
        rows.push((
            "metrics.listen",
            self.file.metrics.listen.clone().unwrap_or_default(),
            String::new(),
            false,
        ));
        rows
    }

    pub fn stats_period(&self) -> Duration {
        self.file
            .pooler
            .stats_period
            .0
            .unwrap_or(Duration::from_secs(60))
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
        let server = upstream::ServerSettings {
            dns_timeout: p.dns_timeout.0,
            connect_timeout: p.server_connect_timeout.0,
            login_timeout: p.server_login_timeout.0,
            lifetime: p.server_lifetime.0,
            idle_timeout: p.server_idle_timeout.0,
            keepalive: p.tcp_keepalive.then(|| {
                (
                    p.tcp_keepidle.0.unwrap_or(Duration::from_secs(15)),
                    p.tcp_keepintvl.0.unwrap_or(Duration::from_secs(5)),
                    p.tcp_keepcnt.max(1),
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
                    target_session_attrs: d
                        .target_session_attrs
                        .map(Into::into)
                        .unwrap_or_default(),
                    load_balance_hosts: d.load_balance_hosts.map(Into::into).unwrap_or_default(),
                    dbname: d.dbname.clone().unwrap_or_else(|| name.clone()),
                    user: d.user.clone(),
                    password: d.password.clone(),
                    pool_size: d.pool_size.unwrap_or(p.default_pool_size),
                    min_pool_size: d.min_pool_size.unwrap_or(p.min_pool_size),
                    pool_mode: d.pool_mode.unwrap_or(p.pool_mode).into(),
                    max_db_connections: d.max_db_connections.filter(|n| *n > 0),
                }
            })
            .collect();
        ProxySettings {
            log_connections: p.log_connections,
            log_disconnections: p.log_disconnections,
            auth_type: match p.auth_type {
                AuthTypeSetting::Trust => AuthType::Trust,
                AuthTypeSetting::Md5 => AuthType::Md5,
                AuthTypeSetting::ScramSha256 => AuthType::ScramSha256,
                AuthTypeSetting::Cert => AuthType::Cert,
            },
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
                retry_base: p.server_login_retry.0.unwrap_or(Duration::from_millis(250)),
                retry_max: p
                    .server_login_retry_max
                    .0
                    .unwrap_or(Duration::from_secs(15)),
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

/// How a setting's value reads and parses in SHOW CONFIG and SET (the TOML file goes through
/// serde; both spell values the same way).
trait SettingValue: Sized {
    fn show(&self) -> String;
    fn parse(s: &str) -> Result<Self, String>;
}

impl SettingValue for String {
    fn show(&self) -> String {
        self.clone()
    }
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.to_owned())
    }
}

macro_rules! number_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn show(&self) -> String {
                self.to_string()
            }
            fn parse(s: &str) -> Result<Self, String> {
                s.trim().parse().map_err(|_| format!("\"{s}\" is not a number"))
            }
        }
    )*};
}
number_setting!(u16, u32, usize);

impl SettingValue for bool {
    fn show(&self) -> String {
        self.to_string()
    }
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "1" | "yes" => Ok(true),
            "false" | "off" | "0" | "no" => Ok(false),
            _ => Err(format!("\"{s}\" is not a boolean")),
        }
    }
}

impl SettingValue for Timeout {
    fn show(&self) -> String {
        match self.0 {
            None => "0".into(),
            Some(d) => humantime::format_duration(d).to_string(),
        }
    }
    fn parse(s: &str) -> Result<Self, String> {
        parse_timeout(s)
    }
}

impl SettingValue for Option<PathBuf> {
    fn show(&self) -> String {
        self.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
    fn parse(s: &str) -> Result<Self, String> {
        Ok((!s.is_empty()).then(|| PathBuf::from(s)))
    }
}

impl SettingValue for Vec<String> {
    fn show(&self) -> String {
        self.join(",")
    }
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

impl SettingValue for PoolModeSetting {
    fn show(&self) -> String {
        PoolMode::from(*self).as_str().to_owned()
    }
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "session" => Ok(PoolModeSetting::Session),
            "transaction" => Ok(PoolModeSetting::Transaction),
            "statement" => Ok(PoolModeSetting::Statement),
            _ => Err(format!("\"{s}\" is not session, transaction or statement")),
        }
    }
}

impl SettingValue for AuthTypeSetting {
    fn show(&self) -> String {
        match self {
            AuthTypeSetting::Trust => "trust",
            AuthTypeSetting::Md5 => "md5",
            AuthTypeSetting::ScramSha256 => "scram-sha-256",
            AuthTypeSetting::Cert => "cert",
        }
        .to_owned()
    }
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "trust" => Ok(AuthTypeSetting::Trust),
            "md5" => Ok(AuthTypeSetting::Md5),
            "scram-sha-256" => Ok(AuthTypeSetting::ScramSha256),
            "cert" => Ok(AuthTypeSetting::Cert),
            _ => Err(format!("\"{s}\" is not trust, md5, scram-sha-256 or cert")),
        }
    }
}

impl SettingValue for SslModeSetting {
    fn show(&self) -> String {
        upstream::SslMode::from(*self).as_str().to_owned()
    }
    fn parse(s: &str) -> Result<Self, String> {
        use upstream::SslMode;
        Ok(match SslMode::parse(s.trim()) {
            Some(SslMode::Disable) => SslModeSetting::Disable,
            Some(SslMode::Allow) => SslModeSetting::Allow,
            Some(SslMode::Prefer) => SslModeSetting::Prefer,
            Some(SslMode::Require) => SslModeSetting::Require,
            Some(SslMode::VerifyCa) => SslModeSetting::VerifyCa,
            Some(SslMode::VerifyFull) => SslModeSetting::VerifyFull,
            None => {
                return Err(format!(
                    "\"{s}\" is not disable, allow, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }
}

impl SettingValue for LogFormat {
    fn show(&self) -> String {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .to_owned()
    }
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("\"{s}\" is not text or json")),
        }
    }
}

/// One `[pooler]` key: how SHOW CONFIG reads it, how SET writes it, and whether a running
/// pooler can take a new value (RELOAD keeps the old value of the others, with a warning).
pub struct Setting {
    pub key: &'static str,
    pub changeable: bool,
    pub get: fn(&Pooler) -> String,
    pub set: fn(&mut Pooler, &str) -> Result<(), String>,
}

macro_rules! settings_table {
    ($($key:ident: $changeable:expr),* $(,)?) => {
        /// Every `[pooler]` key, in SHOW CONFIG order.
        pub const SETTINGS: &[Setting] = &[$(
            Setting {
                key: stringify!($key),
                changeable: $changeable,
                get: |p| SettingValue::show(&p.$key),
                set: |p, v| {
                    p.$key = SettingValue::parse(v)?;
                    Ok(())
                },
            },
        )*];
    };
}

// Changeable settings take effect for new clients and new server connections (pool sizes and
// minimums at once); the others need a restart.
settings_table! {
    listen_addr: false,
    listen_port: false,
    unix_socket_dir: false,
    workers: false,
    pool_mode: true,
    max_client_conn: true,
    default_pool_size: true,
    min_pool_size: true,
    auth_type: true,
    auth_file: true,
    admin_users: true,
    stats_users: true,
    dns_timeout: true,
    // The DNS cache is built once at start.
    dns_min_ttl: false,
    dns_max_ttl: false,
    dns_nxdomain_ttl: false,
    dns_nameservers: false,
    server_connect_timeout: true,
    server_login_timeout: true,
    // The storm controls are shared per host and the server cap across pools; both are built
    // once at start.
    server_connect_concurrency: false,
    server_login_retry: false,
    server_login_retry_max: false,
    server_breaker_threshold: false,
    max_server_connections: false,
    server_check_delay: true,
    server_check_query: true,
    // A pool's role probe keeps the interval it started with; the timeout is read per probe.
    server_role_check_interval: false,
    server_role_check_timeout: true,
    allow_drills: true,
    server_unresponsive_timeout: true,
    tcp_user_timeout: true,
    query_wait_notify: true,
    query_wait_timeout: true,
    query_timeout: true,
    idle_transaction_timeout: true,
    client_login_timeout: true,
    client_idle_timeout: true,
    server_idle_timeout: true,
    server_lifetime: true,
    server_reset_query: true,
    max_packet_size: true,
    max_prepared_statements: true,
    shutdown_timeout: true,
    tcp_keepalive: true,
    tcp_keepidle: true,
    tcp_keepintvl: true,
    tcp_keepcnt: true,
    stats_period: true,
    log_stats: true,
    log_connections: true,
    log_disconnections: true,
    log_format: false,
    // TLS: RELOAD (or SET) re-reads the files and builds new rustls configs; new clients and new
    // server connections use them, established ones keep theirs.
    client_tls_sslmode: true,
    client_tls_cert_file: true,
    client_tls_key_file: true,
    client_tls_ca_file: true,
    server_tls_sslmode: true,
    server_tls_ca_file: true,
    server_tls_cert_file: true,
    server_tls_key_file: true,
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
    fn durations_need_units_and_zero_disables() {
        assert_eq!(
            parse_timeout("250ms").unwrap(),
            Timeout(Some(Duration::from_millis(250)))
        );
        assert_eq!(parse_timeout("0").unwrap(), Timeout(None));
        assert!(parse_timeout("5").is_err());
        let err = parse("[pooler]\nauth_type = \"trust\"\nquery_wait_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
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
    fn the_settings_table_covers_every_pooler_key() {
        // Every key serde knows (it lists them when rejecting an unknown one) must be in the
        // table that drives SHOW CONFIG, SET and RELOAD.
        let err = parse("[pooler]\nno_such_key = 1\n")
            .unwrap_err()
            .to_string();
        let expected = err.split("expected one of").nth(1).unwrap_or_default();
        let known: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        assert!(known.len() > 30, "{err}");
        for key in &known {
            assert!(
                SETTINGS.iter().any(|s| s.key == *key),
                "{key} is missing from SETTINGS"
            );
        }
        assert_eq!(known.len(), SETTINGS.len());
        let c = parse("[pooler]\nauth_type = \"trust\"\n").unwrap();
        let text = toml::to_string(
            &SETTINGS
                .iter()
                .map(|s| (s.key, (s.get)(&c.file.pooler)))
                .collect::<BTreeMap<_, _>>(),
        )
        .unwrap();
        assert!(text.contains("query_wait_timeout = \"2m\""), "{text}");
        for key in [
            "listen_port",
            "stats_period",
            "tcp_keepcnt",
            "workers",
            "log_stats",
        ] {
            assert!(SETTINGS.iter().any(|s| s.key == key), "{key}");
        }
        let defaults = Pooler::default();
        for s in SETTINGS {
            let v = (s.get)(&defaults);
            let mut p = Pooler::default();
            (s.set)(&mut p, &v).unwrap_or_else(|e| panic!("{}: {e}", s.key));
            assert_eq!((s.get)(&p), v, "{} round-trips", s.key);
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

//! Typed settings the proxy takes from the binary's config. No TOML here.

use std::time::Duration;

use proto::auth::Userlist;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A client holds a server for its whole session.
    Session,
    /// A client holds a server from the first message of a transaction to its end.
    Transaction,
    /// A client holds a server for one statement; multi-statement transactions are refused.
    Statement,
}

impl PoolMode {
    pub const ALL: [PoolMode; 3] = [
        PoolMode::Session,
        PoolMode::Transaction,
        PoolMode::Statement,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    Trust,
    Md5,
    ScramSha256,
    /// The client certificate's CN must be the user name (needs client_tls_sslmode verify-ca
    /// or verify-full).
    Cert,
}

impl AuthType {
    pub const ALL: [AuthType; 4] = [
        AuthType::Trust,
        AuthType::Md5,
        AuthType::ScramSha256,
        AuthType::Cert,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AuthType::Trust => "trust",
            AuthType::Md5 => "md5",
            AuthType::ScramSha256 => "scram-sha-256",
            AuthType::Cert => "cert",
        }
    }
}

// The spelling in config files, SHOW CONFIG and SET, as upstream's setting enums.
upstream::setting_names!(PoolMode, AuthType);

/// One `[databases.NAME]` entry.
#[derive(Debug, Clone)]
pub struct DatabaseRoute {
    /// The name clients connect to.
    pub name: String,
    /// The first of `hosts`.
    pub host: String,
    pub port: u16,
    /// Every host to try, in order (`hosts`, or just `host`/`port`).
    pub hosts: Vec<(String, u16)>,
    /// `target_session_attrs`: which role a server must have to serve this database.
    pub target_session_attrs: upstream::TargetSessionAttrs,
    /// `load_balance_hosts`: try hosts in order, or start one further along each time.
    pub load_balance_hosts: upstream::LoadBalanceHosts,
    pub dbname: String,
    /// Server login; `None` means the client's own user name.
    pub user: Option<String>,
    pub password: Option<String>,
    pub pool_size: usize,
    pub min_pool_size: usize,
    pub pool_mode: PoolMode,
    /// Cap on server connections to this database across all its pools.
    pub max_db_connections: Option<usize>,
    /// `server_require_auth` (the database's, else the pooler's).
    pub require_auth: upstream::RequireAuth,
    /// `server_auth` (the database's, else the pooler's), with `rds_iam_region` resolved.
    pub server_auth: upstream::ServerAuth,
    /// `max_db_client_connections`: cap on clients of this database; 0 = none.
    pub max_db_client_connections: usize,
    /// Made from the `"*"` entry for a database name not listed (PgBouncer's automatic
    /// database): its pools go after `autodb_idle_timeout` without clients.
    pub auto: bool,
    /// `reserve_pool_size` (the database's, else the pooler's) and the pooler's
    /// `reserve_pool_timeout`.
    pub reserve_pool_size: usize,
    pub reserve_pool_timeout: Option<std::time::Duration>,
    /// `fleet_budget` (with `fleet_min_share`, `fleet_release_delay`): slots shared with
    /// every other process through advisory locks; `None` when the budget is 0.
    pub fleet: Option<upstream::FleetSettings>,
    /// `auth_user` / `auth_query` / `auth_dbname` (the database's, else the pooler's): how
    /// secrets of users not in the auth_file are looked up; `None` without an auth_user.
    pub auth_query: Option<crate::auth_query::AuthQueryRoute>,
    /// `application_name`, `timezone`, `client_encoding`: sent in the startup packet of every
    /// server connection, so they are the defaults of clients that set none of their own.
    pub startup_params: Vec<(String, String)>,
    /// `connect_query`: run once on each new server connection before it is pooled.
    pub connect_query: Option<String>,
}

impl DatabaseRoute {
    pub fn reserve(&self) -> upstream::ReserveSettings {
        upstream::ReserveSettings {
            size: self.reserve_pool_size,
            timeout: self.reserve_pool_timeout,
        }
    }
}

/// One `[users.NAME]` entry: unset values fall back to the database's, then the pooler's.
#[derive(Debug, Clone, Default)]
pub struct UserRoute {
    pub name: String,
    pub pool_mode: Option<PoolMode>,
    pub pool_size: Option<usize>,
    /// 0 lifts the pooler-wide cap for this user.
    pub max_user_connections: Option<usize>,
    pub max_user_client_connections: Option<usize>,
}

/// Per-user settings (`[users.NAME]`) and the pooler-wide caps for users without their own.
#[derive(Debug, Clone, Default)]
pub struct UserSettings {
    pub routes: Vec<UserRoute>,
    /// `max_user_connections`: server connections of one user across its pools; 0 = none.
    pub max_user_connections: usize,
    /// `max_user_client_connections`: clients logged in as one user; 0 = none.
    pub max_user_client_connections: usize,
}

impl UserSettings {
    pub fn route(&self, user: &str) -> Option<&UserRoute> {
        self.routes.iter().find(|u| u.name == user)
    }

    /// The cap on server connections of `user` across its pools, if any.
    pub fn max_user_connections(&self, user: &str) -> Option<usize> {
        Some(
            self.route(user)
                .and_then(|u| u.max_user_connections)
                .unwrap_or(self.max_user_connections),
        )
        .filter(|n| *n > 0)
    }

    /// The cap on clients logged in as `user`, if any.
    pub fn max_user_client_connections(&self, user: &str) -> Option<usize> {
        Some(
            self.route(user)
                .and_then(|u| u.max_user_client_connections)
                .unwrap_or(self.max_user_client_connections),
        )
        .filter(|n| *n > 0)
    }

    /// `route` as the pool for server user `user` sees it: the user's own pool_size and
    /// pool_mode, else the database's (PgBouncer's order).
    pub fn route_for(&self, route: &DatabaseRoute, user: &str) -> DatabaseRoute {
        let own = self.route(user);
        DatabaseRoute {
            pool_size: own.and_then(|u| u.pool_size).unwrap_or(route.pool_size),
            pool_mode: own.and_then(|u| u.pool_mode).unwrap_or(route.pool_mode),
            ..route.clone()
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub auth_type: AuthType,
    pub userlist: Userlist,
    pub max_client_conn: usize,
    /// `max_client_conn_per_addr` and `client_login_rate_per_addr`.
    pub admission: crate::admission::AdmissionLimits,
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
    pub client_login_timeout: Option<Duration>,
    pub client_idle_timeout: Option<Duration>,
    pub query_wait_timeout: Option<Duration>,
    pub idle_transaction_timeout: Option<Duration>,
    /// `query_timeout`: a query running longer is cancelled; if the server still does not
    /// answer, the connection is dropped and the client told.
    pub query_timeout: Option<Duration>,
    /// `query_wait_notify`: a client waiting this long for a server gets a NOTICE.
    pub query_wait_notify: Option<Duration>,
    /// `server_unresponsive_timeout`: a server that owes a reply and has sent nothing this
    /// long while its socket looks dead is dropped.
    pub server_unresponsive_timeout: Option<Duration>,
    /// `max_server_connections`: cap on server connections across all pools.
    pub max_server_connections: Option<usize>,
    pub storm: upstream::StormSettings,
    /// Run before a session-mode server goes back to the pool, and after a transaction-mode
    /// client left session state behind.
    pub server_reset_query: String,
    pub max_message: usize,
    /// Named prepared statements kept per server connection in transaction mode (LRU); 0 passes
    /// statement names through untouched, as PgBouncer does with 0.
    pub max_prepared_statements: usize,
    pub server: upstream::ServerSettings,
    /// The DNS cache's settings (`dns_*`).
    pub dns: upstream::DnsSettings,
    /// `client_tls_sslmode` and the acceptor built from the `client_tls_*` files.
    pub client_tls: crate::tls::ClientTls,
    /// `client_tcp_*`: keepalive and TCP_USER_TIMEOUT on client sockets, so a client host
    /// that vanished without a FIN or RST is noticed and its server given back.
    pub client_liveness: upstream::TcpLiveness,
    pub databases: Vec<DatabaseRoute>,
    /// Log each client login / disconnection at info (else debug).
    pub log_connections: bool,
    pub log_disconnections: bool,
    pub users: UserSettings,
    /// `autodb_idle_timeout`: pools of automatic databases (the `"*"` entry) with no client
    /// for this long are closed; `None` keeps them.
    pub autodb_idle_timeout: Option<std::time::Duration>,
    /// `auth_cache_ttl`, `auth_negative_cache_ttl`, `auth_cache_max_entries`,
    /// `auth_query_timeout`, `auth_pool_size`.
    pub auth_lookup: crate::auth_query::AuthLookupSettings,
}

/// The name of the entry that serves every database not listed.
pub const WILDCARD_DATABASE: &str = "*";

impl ProxySettings {
    /// The `[databases.NAME]` entry of exactly `name` (the `"*"` entry only for `"*"`).
    pub fn route(&self, name: &str) -> Option<&DatabaseRoute> {
        self.databases.iter().find(|d| d.name == name)
    }

    /// The route a client asking for database `name` gets: its own entry, else one made from
    /// the `"*"` entry (its `dbname`, unless set, is the name asked for).
    pub fn resolve(&self, name: &str) -> Option<std::borrow::Cow<'_, DatabaseRoute>> {
        if name != WILDCARD_DATABASE {
            if let Some(r) = self.route(name) {
                return Some(std::borrow::Cow::Borrowed(r));
            }
        }
        let any = self.route(WILDCARD_DATABASE)?;
        Some(std::borrow::Cow::Owned(DatabaseRoute {
            name: name.to_owned(),
            dbname: match any.dbname.as_str() {
                WILDCARD_DATABASE => name.to_owned(),
                d => d.to_owned(),
            },
            auto: true,
            ..any.clone()
        }))
    }
}

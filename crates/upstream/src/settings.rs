//! Where and as whom a pool logs in, and the timeouts and limits of its server connections.
//! Plain data, built by the binary from config; nothing here does I/O.

use std::time::Duration;

use proto::auth::ServerCredential;

/// Where and as whom a pool logs in.
#[derive(Debug, Clone)]
pub struct ServerTarget {
    /// The client-facing database name (the `[databases.NAME]` section), for messages.
    pub database: String,
    /// Host name, IP address, or a directory holding a Unix socket (starts with `/`).
    pub host: String,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub credential: Option<ServerCredential>,
    /// `server_require_auth`: the methods this server may ask for.
    pub require_auth: crate::RequireAuth,
    /// Startup parameters sent at login besides `user` and `database` (the database's
    /// `application_name`, `timezone`, `client_encoding`): the server's defaults, so clients
    /// that set none of their own see these.
    pub startup_params: Vec<(String, String)>,
    /// `connect_query`: run once on each new pooled connection after login, before any client
    /// gets it; `None` runs nothing.
    pub connect_query: Option<String>,
    /// `server_auth`: the password above, or an RDS IAM token signed at connect time.
    pub server_auth: crate::ServerAuth,
}

/// Timeouts and limits for server connections.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// `dns_timeout`: one host name lookup.
    pub dns_timeout: Option<Duration>,
    /// `server_connect_timeout`: TCP connect (and TLS).
    pub connect_timeout: Option<Duration>,
    /// `server_login_timeout`: startup and authentication until the first ReadyForQuery.
    pub login_timeout: Option<Duration>,
    /// `server_lifetime`: connections older than this are closed when next released or checked.
    pub lifetime: Option<Duration>,
    /// `server_idle_timeout`: idle connections unused this long are closed (above min_pool_size).
    pub idle_timeout: Option<Duration>,
    /// `tcp_keepalive`, `tcp_keepidle/intvl/cnt` and `tcp_user_timeout`: how a server socket
    /// notices a server host that vanished.
    pub liveness: crate::stream::TcpLiveness,
    /// `server_check_delay`: a connection idle longer than this is checked before reuse.
    pub check_delay: Option<Duration>,
    /// `server_check_query`: the check; empty disables it.
    pub check_query: String,
    /// `max_packet_size`: largest message accepted from a server.
    pub max_message: usize,
    /// `server_role_check_interval`: how often pools that care about roles
    /// (`target_session_attrs` other than `any`) probe their hosts.
    pub role_check_interval: Option<Duration>,
    /// `server_role_check_timeout`: bound on one probe of one host.
    pub role_check_timeout: Option<Duration>,
    /// `server_tls_sslmode` and the rustls config built from the `server_tls_*` files.
    pub tls: crate::tls::ServerTls,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            dns_timeout: Some(Duration::from_secs(5)),
            connect_timeout: Some(Duration::from_secs(5)),
            login_timeout: Some(Duration::from_secs(5)),
            lifetime: Some(Duration::from_secs(3600)),
            idle_timeout: Some(Duration::from_secs(600)),
            liveness: crate::stream::TcpLiveness {
                keepalive: Some((Duration::from_secs(15), Duration::from_secs(5), 3)),
                user_timeout: Some(Duration::from_secs(30)),
            },
            check_delay: Some(Duration::from_secs(30)),
            check_query: "SELECT 1".into(),
            max_message: proto::DEFAULT_MAX_MESSAGE,
            role_check_interval: Some(Duration::from_secs(5)),
            role_check_timeout: Some(Duration::from_secs(2)),
            tls: crate::tls::ServerTls::disabled(),
        }
    }
}

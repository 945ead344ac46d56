//! One server connection: connect, log in, and the small amount of protocol Breakwater speaks on
//! its own account (parameter sync, reset, liveness). Forwarding client traffic is the proxy's job;
//! it reads and writes through [`ServerConn::read`] and [`ServerConn::write_all`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::auth::{md5_password_response, ScramClient, ServerCredential};
use proto::backend::{self, AuthRequest};
use proto::error::{parse_error_fields, ErrorFields};
use proto::{frame, frontend, startup, FrameError};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};

use crate::dns::{DnsCache, DnsError};
use crate::host::{DrillMode, Host};

/// What a `slow` failure drill adds to each connect.
const SLOW_DRILL_DELAY: Duration = Duration::from_secs(1);
use crate::stream::Stream;
use stats::Phase;

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
    /// `tcp_keepalive`: keepalive probes on server sockets (idle, interval, count).
    pub keepalive: Option<(Duration, Duration, u32)>,
    /// `tcp_user_timeout`: unacknowledged data older than this kills the socket (Linux).
    pub tcp_user_timeout: Option<Duration>,
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
            keepalive: Some((Duration::from_secs(15), Duration::from_secs(5), 3)),
            tcp_user_timeout: Some(Duration::from_secs(30)),
            check_delay: Some(Duration::from_secs(30)),
            check_query: "SELECT 1".into(),
            max_message: proto::DEFAULT_MAX_MESSAGE,
            role_check_interval: Some(Duration::from_secs(5)),
            role_check_timeout: Some(Duration::from_secs(2)),
            tls: crate::tls::ServerTls::disabled(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not resolve host \"{host}\": {source}")]
    Dns { host: String, source: io::Error },
    #[error("dns_timeout ({timeout:?}) expired resolving \"{host}\"")]
    DnsTimeout { host: String, timeout: Duration },
    #[error(transparent)]
    BreakerOpen(#[from] crate::host::BreakerOpen),
    #[error("server_connect_timeout ({timeout:?}) expired connecting to {addr}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("server_connect_timeout ({timeout:?}) expired during the TLS handshake with server \"{host}\" ({addr})")]
    TlsTimeout {
        host: String,
        addr: String,
        timeout: Duration,
    },
    #[error("TLS with server \"{host}\" ({addr}): {source}")]
    Tls {
        host: String,
        addr: String,
        source: crate::tls::TlsError,
    },
    #[error("server_login_timeout ({timeout:?}) expired logging in to {addr}")]
    LoginTimeout { addr: String, timeout: Duration },
    /// The server sent an ErrorResponse during login; its SQLSTATE is passed on to the client.
    #[error("server {addr} refused login: {fields}")]
    Refused { addr: String, fields: ErrorFields },
    #[error("cannot log in to server {addr} as \"{user}\": {reason}")]
    Auth {
        addr: String,
        user: String,
        reason: String,
    },
    #[error("protocol error from server {addr}: {source}")]
    Protocol { addr: String, source: FrameError },
    #[error("server {addr} closed the connection during login: {source}")]
    Io { addr: String, source: io::Error },
    /// The server is up but not what `target_session_attrs` asks for.
    #[error("server {host} is a {role}, which target_session_attrs = {wanted} does not accept")]
    WrongRole {
        host: String,
        role: crate::failover::Role,
        wanted: crate::failover::TargetSessionAttrs,
    },
    #[error("could not read the role of server {addr}: {source}")]
    RoleCheck { addr: String, source: QueryError },
    /// A host skipped because it is backing off after failures (another host may serve).
    #[error("upstream {host} is backing off after failed connection attempts; next attempt in {retry_in:?}")]
    Backoff { host: String, retry_in: Duration },
    /// No host of a list served; the client keeps waiting while Breakwater keeps looking.
    #[error("no host of database \"{database}\" ({hosts}) can serve target_session_attrs = {wanted} right now; last: {last}")]
    NoMatchingHost {
        database: String,
        hosts: String,
        wanted: crate::failover::TargetSessionAttrs,
        last: Box<ConnectError>,
    },
}

/// An error from a query Breakwater runs on its own account.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("server error: {0}")]
    Server(ErrorFields),
    #[error("server connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error from server: {0}")]
    Protocol(#[from] FrameError),
    #[error("server left the transaction open (status {0:?}) after an internal query")]
    NotIdle(char),
    #[error("an internal query returned no row")]
    NoRow,
}

/// Where a CancelRequest for this connection goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub addr: ServerAddr,
    pub pid: i32,
    pub key: i32,
}

#[derive(Debug, Clone)]
pub enum ServerAddr {
    Tcp(SocketAddr),
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerAddr::Tcp(a) => a.fmt(f),
            ServerAddr::Unix(p) => p.display().fmt(f),
        }
    }
}

impl ServerAddr {
    async fn connect(&self) -> io::Result<Stream> {
        Ok(match self {
            ServerAddr::Tcp(a) => Stream::Tcp(TcpStream::connect(a).await?),
            ServerAddr::Unix(p) => Stream::Unix(UnixStream::connect(p).await?),
        })
    }
}

impl CancelTarget {
    /// Sends the CancelRequest on a new connection. Bounded by `timeout` so a dead server cannot
    /// hold up the client asking.
    pub async fn send(&self, timeout: Duration) -> io::Result<()> {
        let work = async {
            let mut s = self.addr.connect().await?;
            let mut buf = BytesMut::with_capacity(16);
            startup::write_cancel(&mut buf, self.pid, self.key);
            s.send(&buf).await?;
            // The server closes after reading it; waiting for that tells us it was delivered.
            let mut sink = [0u8; 16];
            let _ = s.read(&mut sink).await;
            Ok(())
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "cancel timed out")))
    }
}

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// A logged-in server connection.
#[derive(Debug)]
pub struct ServerConn {
    /// Matches the `server{id}` tracing span and SHOW SERVERS.
    pub id: u64,
    stream: Stream,
    /// Bytes read from the server and not yet consumed. The proxy scans and forwards from here.
    pub buf: BytesMut,
    /// Reported parameters (ParameterStatus), as the server last told us.
    params: Vec<(String, String)>,
    /// Parameters the server does not report that Breakwater SET on a client's behalf.
    pub applied: Vec<(String, String)>,
    /// The fingerprint of the client parameters this connection was last made to match;
    /// `None` once anything changed since. Breakwater's own bookkeeping (the proxy sets it).
    pub params_synced_for: Option<u64>,
    cancel: CancelTarget,
    pub created: Instant,
    pub max_message: usize,
    /// Set when the connection must not be reused (an error mid-stream, a timeout, a cut write).
    pub broken: bool,
    /// No session parameter changed since login: its parameters are the server's defaults.
    pub pristine: bool,
    /// Statements prepared on this connection under Breakwater's global names.
    pub prepared: crate::PreparedCache,
    /// This connection's share of server_lifetime and server_idle_timeout, in thousandths
    /// (800–1000), so a pool opened at once is not recycled at once. See [`ServerConn::share`].
    pub jitter_permille: u32,
    /// The host this connection was opened on, and its role epoch then (see `failover`).
    pub origin: Option<crate::failover::Origin>,
    /// Holds a slot of `max_db_connections` / `max_server_connections` while the connection lives.
    pub(crate) _limits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// This connection's row in SHOW SERVERS; removed when the connection is dropped.
    pub(crate) registration: Option<crate::registry::Registration>,
}

impl ConnectError {
    /// The phase an attempt failed in, and whether by timeout, for the host's counters.
    pub fn phase(&self) -> Option<(Phase, bool)> {
        Some(match self {
            ConnectError::Dns { .. } => (Phase::Dns, false),
            ConnectError::DnsTimeout { .. } => (Phase::Dns, true),
            ConnectError::ConnectTimeout { .. } => (Phase::Connect, true),
            ConnectError::Connect { .. } | ConnectError::Tls { .. } => (Phase::Connect, false),
            ConnectError::TlsTimeout { .. } => (Phase::Connect, true),
            ConnectError::LoginTimeout { .. } => (Phase::Login, true),
            ConnectError::Refused { .. }
            | ConnectError::Auth { .. }
            | ConnectError::Protocol { .. }
            | ConnectError::Io { .. }
            | ConnectError::RoleCheck { .. } => (Phase::Login, false),
            ConnectError::BreakerOpen(_)
            | ConnectError::WrongRole { .. }
            | ConnectError::Backoff { .. }
            | ConnectError::NoMatchingHost { .. } => return None,
        })
    }

    /// Will trying again soon not help? (Wrong password, no such database: the client should
    /// hear it now rather than wait out query_wait_timeout.)
    pub fn is_permanent(&self) -> bool {
        match self {
            ConnectError::Refused { fields, .. } => {
                fields.code.starts_with("28") || fields.code == "3D000"
            }
            ConnectError::Auth { .. } | ConnectError::BreakerOpen(_) => true,
            ConnectError::Tls { source, .. } => source.is_permanent(),
            _ => false,
        }
    }
}

impl ServerConn {
    /// Connects and logs in, each phase bounded by its own setting, after the host's storm
    /// controls admit the attempt. The outcome feeds the host's back-off and breaker.
    pub async fn connect(
        target: &ServerTarget,
        settings: &ServerSettings,
        host: &Host,
    ) -> Result<ServerConn, ConnectError> {
        let attempt = host.admit().await?;
        Self::connect_admitted(attempt, target, settings, host).await
    }

    /// Connects and logs in with an attempt the host's storm controls already admitted.
    pub(crate) async fn connect_admitted(
        attempt: crate::host::Attempt<'_>,
        target: &ServerTarget,
        settings: &ServerSettings,
        host: &Host,
    ) -> Result<ServerConn, ConnectError> {
        let result = match host.drill() {
            None => Self::connect_phases(target, settings, host.dns.as_deref()).await,
            Some(DrillMode::Refuse) => Err(ConnectError::Connect {
                addr: host.name.clone(),
                source: io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "refused by a failure drill (DRILL)",
                ),
            }),
            Some(DrillMode::Blackhole) => {
                let t = settings.connect_timeout.unwrap_or(Duration::from_secs(5));
                tokio::time::sleep(t).await;
                Err(ConnectError::ConnectTimeout {
                    addr: format!("{} (blackholed by a failure drill)", host.name),
                    timeout: t,
                })
            }
            Some(DrillMode::Slow) => {
                tokio::time::sleep(SLOW_DRILL_DELAY).await;
                Self::connect_phases(target, settings, host.dns.as_deref()).await
            }
        };
        match &result {
            Ok(_) => attempt.succeeded(),
            Err(e) => {
                if let Some((phase, timed_out)) = e.phase() {
                    host.stats.failed(phase, timed_out);
                }
                attempt.failed();
            }
        }
        result
    }

    async fn connect_phases(
        target: &ServerTarget,
        settings: &ServerSettings,
        dns: Option<&DnsCache>,
    ) -> Result<ServerConn, ConnectError> {
        let (addrs, cached) = resolve(target, settings.dns_timeout, dns).await?;
        let err = match connect_first(&addrs, target, settings).await {
            Ok((stream, addr)) => return login_allowing_tls(stream, addr, target, settings).await,
            Err(e) => e,
        };
        // A connect to a cached address failed: the name may point elsewhere by now.
        if let (Some(dns), Some(old)) = (dns, cached) {
            if let Ok(fresh) = dns.re_resolve(&target.host, settings.dns_timeout).await {
                if fresh.addrs != old {
                    tracing::info!(host = %target.host, old = ?old, new = ?fresh.addrs,
                        "connect to a cached address failed and DNS now answers differently; retrying");
                    let addrs = tcp_addrs(&fresh.addrs, target.port);
                    let (stream, addr) = connect_first(&addrs, target, settings).await?;
                    return login_allowing_tls(stream, addr, target, settings).await;
                }
            }
        }
        Err(err)
    }

    /// This connection's share of `d` (server_lifetime, server_idle_timeout). In integers: it
    /// is checked at every checkout, and `Duration::mul_f64` was a float conversion each time.
    pub fn share(&self, d: Duration) -> Duration {
        permille_of(d, self.jitter_permille)
    }

    pub fn cancel_target(&self) -> CancelTarget {
        self.cancel.clone()
    }

    /// Local and remote socket addresses (`None` for Unix sockets).
    pub fn socket_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        self.stream.addrs()
    }

    pub fn backend_pid(&self) -> i32 {
        self.cancel.pid
    }

    pub fn addr(&self) -> &ServerAddr {
        &self.cancel.addr
    }

    pub fn params(&self) -> &[(String, String)] {
        &self.params
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Records a ParameterStatus the server sent.
    pub fn set_param(&mut self, name: &str, value: &str) {
        match self.params.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => {
                if v != value {
                    v.clear();
                    v.push_str(value);
                    self.params_synced_for = None;
                }
            }
            None => {
                self.params.push((name.to_owned(), value.to_owned()));
                self.params_synced_for = None;
            }
        }
    }

    /// Reads more bytes into `buf`. Cancellation-safe: partial input stays in `buf`.
    /// A closed connection is an `UnexpectedEof` error.
    pub async fn read(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        Ok(n)
    }

    /// Writes all of `data`. Not cancellation-safe: a caller that gives up mid-write must mark the
    /// connection broken.
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.send(data).await
    }

    /// Is the socket still open with nothing unexpected waiting? An idle server that sent
    /// something (typically a FATAL before closing) or closed is not usable.
    pub fn is_healthy_idle(&self) -> bool {
        if self.broken || !self.buf.is_empty() {
            return false;
        }
        self.stream.is_idle_and_open()
    }

    /// Runs `sql` with the simple protocol and waits for ReadyForQuery, keeping ParameterStatus
    /// up to date. Used for parameter sync and resets, never for client queries.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), QueryError> {
        let mut out = BytesMut::with_capacity(sql.len() + 6);
        frontend::write_query(&mut out, sql);
        if let Err(e) = self.write_all(&out).await {
            self.broken = true;
            return Err(e.into());
        }
        let result = self.read_until_ready().await;
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    /// Runs `sql` like [`ServerConn::simple_query`] and returns the first row's values as text.
    pub async fn query_first_row(&mut self, sql: &str) -> Result<Vec<Option<String>>, QueryError> {
        let mut out = BytesMut::with_capacity(sql.len() + 6);
        frontend::write_query(&mut out, sql);
        if let Err(e) = self.write_all(&out).await {
            self.broken = true;
            return Err(e.into());
        }
        let mut row = None;
        let result = self.read_until_ready_capturing(&mut row).await;
        if result.is_err() {
            self.broken = true;
        }
        result?;
        row.ok_or(QueryError::NoRow)
    }

    async fn read_until_ready(&mut self) -> Result<(), QueryError> {
        self.read_until_ready_capturing(&mut None).await
    }

    async fn read_until_ready_capturing(
        &mut self,
        row: &mut Option<Vec<Option<String>>>,
    ) -> Result<(), QueryError> {
        let mut error = None;
        loop {
            let Some(msg) = frame::take_message(&mut self.buf, self.max_message)? else {
                self.read().await?;
                continue;
            };
            match msg.tag {
                backend::PARAMETER_STATUS => {
                    let (k, v) = backend::parse_parameter_status(&msg.body)?;
                    let (k, v) = (k.to_owned(), v.to_owned());
                    self.set_param(&k, &v);
                }
                backend::ERROR_RESPONSE => {
                    error.get_or_insert(parse_error_fields(&msg.body)?);
                }
                backend::READY_FOR_QUERY => {
                    let status = backend::parse_ready_for_query(&msg.body)?;
                    return match (error, status) {
                        (Some(e), _) => Err(QueryError::Server(e)),
                        (None, backend::TxStatus::Idle) => Ok(()),
                        (None, s) => Err(QueryError::NotIdle(s.as_byte() as char)),
                    };
                }
                backend::DATA_ROW if row.is_none() => {
                    let values = backend::parse_data_row(&msg.body)?;
                    *row = Some(
                        values
                            .into_iter()
                            .map(|v| v.map(|b| String::from_utf8_lossy(b).into_owned()))
                            .collect(),
                    );
                }
                // CommandComplete, rows, notices: nothing to do for internal queries.
                _ => {}
            }
        }
    }

    /// Does the socket look dead while we wait for a reply: data we sent still unacknowledged,
    /// or keepalive probes unanswered? A healthy long query has everything acknowledged.
    pub fn socket_looks_dead(&self) -> bool {
        self.stream.tcp().is_some_and(tcp_info_dead)
    }

    /// Sends Terminate without waiting for anything; closing never blocks on a dead peer.
    pub fn terminate(mut self) {
        let mut out = BytesMut::with_capacity(5);
        frontend::write_terminate(&mut out);
        let _ = self.stream.try_write_now(&out);
    }
}

/// Logs in; under sslmode=allow, as libpq, a server that refuses a login in the clear (pg_hba
/// `hostssl`) gets a second attempt with TLS.
async fn login_allowing_tls(
    stream: Stream,
    addr: ServerAddr,
    target: &ServerTarget,
    settings: &ServerSettings,
) -> Result<ServerConn, ConnectError> {
    match login(stream, addr.clone(), target, settings).await {
        Err(ConnectError::Refused { .. })
            if settings.tls.mode == crate::tls::SslMode::Allow
                && matches!(addr, ServerAddr::Tcp(_)) =>
        {
            let stream = connect_one(&addr, target, settings, true).await?;
            login(stream, addr, target, settings).await
        }
        other => other,
    }
}

/// The addresses to try, and the IPs when they came from the DNS cache rather than a fresh
/// answer (so a failed connect is worth a re-lookup).
async fn resolve(
    target: &ServerTarget,
    timeout: Option<Duration>,
    dns: Option<&DnsCache>,
) -> Result<(Vec<ServerAddr>, Option<Vec<std::net::IpAddr>>), ConnectError> {
    if target.host.starts_with('/') {
        let path = std::path::Path::new(&target.host).join(format!(".s.PGSQL.{}", target.port));
        return Ok((vec![ServerAddr::Unix(path)], None));
    }
    if let Ok(ip) = target.host.parse::<std::net::IpAddr>() {
        return Ok((
            vec![ServerAddr::Tcp(SocketAddr::new(ip, target.port))],
            None,
        ));
    }
    if let Some(dns) = dns {
        let resolved = dns
            .resolve(&target.host, timeout)
            .await
            .map_err(|e| match e {
                DnsError::Timeout { host, timeout } => ConnectError::DnsTimeout { host, timeout },
                other => ConnectError::Dns {
                    host: target.host.clone(),
                    source: io::Error::other(other.to_string()),
                },
            })?;
        let addrs = tcp_addrs(&resolved.addrs, target.port);
        return Ok((addrs, resolved.cached.then_some(resolved.addrs)));
    }
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, lookup)
            .await
            .map_err(|_| ConnectError::DnsTimeout {
                host: target.host.clone(),
                timeout: t,
            })?,
        None => lookup.await,
    };
    let addrs = result.map_err(|source| ConnectError::Dns {
        host: target.host.clone(),
        source,
    })?;
    Ok((addrs.map(ServerAddr::Tcp).collect(), None))
}

fn tcp_addrs(ips: &[std::net::IpAddr], port: u16) -> Vec<ServerAddr> {
    ips.iter()
        .map(|ip| ServerAddr::Tcp(SocketAddr::new(*ip, port)))
        .collect()
}

/// Connects to the first address that answers; the last error if none does.
async fn connect_first(
    addrs: &[ServerAddr],
    target: &ServerTarget,
    settings: &ServerSettings,
) -> Result<(Stream, ServerAddr), ConnectError> {
    let mut last_err = None;
    for addr in addrs {
        match connect_one(addr, target, settings, settings.tls.asks_first()).await {
            Ok(stream) => return Ok((stream, addr.clone())),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| ConnectError::Dns {
        host: target.host.clone(),
        source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
    }))
}

/// TCP (or Unix) connect, socket options, then TLS when `tls` says so. Each of the connect and
/// the TLS negotiation is bounded by server_connect_timeout.
async fn connect_one(
    addr: &ServerAddr,
    target: &ServerTarget,
    settings: &ServerSettings,
    tls: bool,
) -> Result<Stream, ConnectError> {
    let connecting = addr.connect();
    let stream =
        match settings.connect_timeout {
            Some(t) => tokio::time::timeout(t, connecting).await.map_err(|_| {
                ConnectError::ConnectTimeout {
                    addr: addr.to_string(),
                    timeout: t,
                }
            })?,
            None => connecting.await,
        }
        .map_err(|source| ConnectError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    if let Stream::Tcp(tcp) = &stream {
        let _ = tcp.set_nodelay(true);
        if let Some((idle, interval, count)) = settings.keepalive {
            let ka = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(count);
            let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
        }
        #[cfg(target_os = "linux")]
        if let Some(t) = settings.tcp_user_timeout {
            let _ = socket2::SockRef::from(tcp).set_tcp_user_timeout(Some(t));
        }
    }
    if !tls {
        return Ok(stream);
    }
    let negotiation = settings.tls.start(stream, &target.host);
    match crate::tls::bounded(settings.connect_timeout, negotiation).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectError::Tls {
            host: target.host.clone(),
            addr: addr.to_string(),
            source,
        }),
        Err(timeout) => Err(ConnectError::TlsTimeout {
            host: target.host.clone(),
            addr: addr.to_string(),
            timeout,
        }),
    }
}

async fn login(
    stream: Stream,
    addr: ServerAddr,
    target: &ServerTarget,
    settings: &ServerSettings,
) -> Result<ServerConn, ConnectError> {
    let mut conn = ServerConn {
        id: NEXT_SERVER_ID.fetch_add(1, Ordering::Relaxed),
        stream,
        buf: BytesMut::with_capacity(16 * 1024),
        params: Vec::new(),
        applied: Vec::new(),
        params_synced_for: None,
        cancel: CancelTarget {
            addr,
            pid: 0,
            key: 0,
        },
        created: Instant::now(),
        max_message: settings.max_message,
        broken: false,
        pristine: true,
        prepared: crate::PreparedCache::default(),
        jitter_permille: rand::Rng::gen_range(&mut rand::thread_rng(), 800..=1000),
        origin: None,
        _limits: Vec::new(),
        registration: None,
    };
    let addr_s = conn.cancel.addr.to_string();
    let work = run_login(&mut conn, target);
    match settings.login_timeout {
        Some(t) => {
            tokio::time::timeout(t, work)
                .await
                .map_err(|_| ConnectError::LoginTimeout {
                    addr: addr_s,
                    timeout: t,
                })??
        }
        None => work.await?,
    }
    Ok(conn)
}

async fn run_login(conn: &mut ServerConn, target: &ServerTarget) -> Result<(), ConnectError> {
    let addr = conn.cancel.addr.to_string();
    let io_err = |source| ConnectError::Io {
        addr: addr.clone(),
        source,
    };
    let proto_err = |source| ConnectError::Protocol {
        addr: addr.clone(),
        source,
    };
    let auth_err = |reason: &str| ConnectError::Auth {
        addr: addr.clone(),
        user: target.user.clone(),
        reason: reason.to_owned(),
    };

    let mut out = BytesMut::with_capacity(256);
    startup::write_startup(
        &mut out,
        &[("user", &target.user), ("database", &target.dbname)],
    );
    conn.write_all(&out).await.map_err(io_err)?;
    let mut scram: Option<ScramClient> = None;
    loop {
        let msg = loop {
            match frame::take_message(&mut conn.buf, conn.max_message).map_err(proto_err)? {
                Some(m) => break m,
                None => {
                    conn.read().await.map_err(io_err)?;
                }
            }
        };
        out.clear();
        match msg.tag {
            backend::AUTHENTICATION => {
                match backend::parse_auth(&msg.body).map_err(proto_err)? {
                    AuthRequest::Ok => continue,
                    AuthRequest::Cleartext => match &target.credential {
                        Some(ServerCredential::Password(p)) => {
                            frontend::write_password(&mut out, p.as_bytes())
                        }
                        _ => return Err(auth_err("server asks for a cleartext password and none is configured")),
                    },
                    AuthRequest::Md5 { salt } => match &target.credential {
                        Some(ServerCredential::Password(p)) => {
                            let resp = md5_password_response(&target.user, p, salt);
                            frontend::write_password(&mut out, &resp);
                        }
                        _ => return Err(auth_err("server asks for an md5 password and no plaintext password is configured")),
                    },
                    AuthRequest::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                            return Err(auth_err("server offers no SASL mechanism Breakwater supports"));
                        }
                        let Some(cred) = &target.credential else {
                            return Err(auth_err("server asks for SCRAM and no password is configured"));
                        };
                        let client = ScramClient::new(cred);
                        frontend::write_sasl_initial_response(&mut out, "SCRAM-SHA-256", &client.client_first());
                        scram = Some(client);
                    }
                    AuthRequest::SaslContinue(data) => {
                        let Some(client) = scram.as_mut() else {
                            return Err(auth_err("SASL continue without SASL start"));
                        };
                        let reply = client
                            .server_first(&data)
                            .map_err(|e| auth_err(&format!("SCRAM: {e}")))?;
                        frontend::write_sasl_response(&mut out, &reply);
                    }
                    AuthRequest::SaslFinal(data) => {
                        let Some(client) = scram.as_mut() else {
                            return Err(auth_err("SASL final without SASL start"));
                        };
                        client
                            .server_final(&data)
                            .map_err(|e| auth_err(&format!("SCRAM: {e}")))?;
                        continue;
                    }
                    AuthRequest::Unsupported(code) => {
                        return Err(auth_err(&format!("unsupported authentication method {code}")))
                    }
                }
                conn.write_all(&out).await.map_err(io_err)?;
            }
            backend::PARAMETER_STATUS => {
                let (k, v) = backend::parse_parameter_status(&msg.body).map_err(proto_err)?;
                let (k, v) = (k.to_owned(), v.to_owned());
                conn.set_param(&k, &v);
            }
            backend::BACKEND_KEY_DATA => {
                let (pid, key) = backend::parse_backend_key_data(&msg.body).map_err(proto_err)?;
                conn.cancel.pid = pid;
                conn.cancel.key = key;
            }
            backend::ERROR_RESPONSE => {
                let fields = parse_error_fields(&msg.body).map_err(proto_err)?;
                return Err(ConnectError::Refused { addr, fields });
            }
            backend::NOTICE_RESPONSE => {}
            backend::READY_FOR_QUERY => return Ok(()),
            _ => {
                return Err(proto_err(FrameError::Malformed {
                    what: "unexpected message during login",
                }))
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn tcp_info_dead(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: TCP_INFO fills at most `len` bytes of a plain-data struct we own.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        rc == 0 && (info.tcpi_unacked > 0 || info.tcpi_probes > 0 || info.tcpi_retransmits > 0)
    }
}

#[cfg(not(target_os = "linux"))]
fn tcp_info_dead(_: &TcpStream) -> bool {
    false
}

/// `permille` thousandths of `d`; `d` itself if that would overflow (a lifetime of centuries).
fn permille_of(d: Duration, permille: u32) -> Duration {
    d.checked_mul(permille).map_or(d, |x| x / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connections_share_of_a_lifetime_is_exact_and_never_overflows() {
        assert_eq!(
            permille_of(Duration::from_secs(3600), 800),
            Duration::from_secs(2880)
        );
        assert_eq!(
            permille_of(Duration::from_millis(10), 1000),
            Duration::from_millis(10)
        );
        assert_eq!(
            permille_of(Duration::from_secs(1), 875),
            Duration::from_millis(875)
        );
        assert_eq!(permille_of(Duration::MAX, 900), Duration::MAX);
    }
}

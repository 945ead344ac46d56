//! One logged-in server connection and the small amount of protocol Breakwater speaks on its own
//! account (parameter sync, reset, liveness), plus where its CancelRequests go. Opening it is
//! `connect`'s job; forwarding client traffic is the proxy's, which reads and writes through
//! [`ServerConn::read`] and [`ServerConn::write_all`].

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::backend;
use proto::error::parse_error_fields;
use proto::{frame, frontend, startup};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UnixStream};

use crate::error::QueryError;
use crate::stream::Stream;
use stats::CloseReason;

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
    pub(crate) async fn connect(&self) -> io::Result<Stream> {
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
        crate::timer::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "cancel timed out")))
    }
}

static NEXT_SERVER_ID: AtomicU64 = AtomicU64::new(1);

/// A logged-in server connection. Its fields are private: the proxy says what happened
/// (`mark_broken`, `record_params_synced`, `after_reset`, …) and the connection keeps its own
/// bookkeeping consistent, in one place.
#[derive(Debug)]
pub struct ServerConn {
    /// Matches the `server{id}` tracing span and SHOW SERVERS.
    id: u64,
    stream: Stream,
    /// Bytes read from the server and not yet consumed. The proxy scans and forwards from here.
    buf: BytesMut,
    /// Reported parameters (ParameterStatus), as the server last told us.
    params: Vec<(String, String)>,
    /// Parameters the server does not report that Breakwater SET on a client's behalf.
    applied: Vec<(String, String)>,
    /// The fingerprint of the client parameters this connection was last made to match;
    /// `None` once anything changed since (a ParameterStatus, a SET on its way, a reset).
    params_synced_for: Option<u64>,
    cancel: CancelTarget,
    created: Instant,
    /// The shard whose reactor the socket is registered with (see `crate::home`).
    home: u16,
    max_message: usize,
    /// Why the connection must not be reused (an error mid-stream, a timeout, a cut write);
    /// `None` while it may.
    broken: Option<CloseReason>,
    /// No session parameter changed since login: its parameters are the server's defaults.
    pristine: bool,
    /// Statements prepared on this connection under Breakwater's global names.
    prepared: crate::PreparedCache,
    /// This connection's share of server_lifetime and server_idle_timeout, in thousandths
    /// (800–1000), so a pool opened at once is not recycled at once. See [`ServerConn::share`].
    jitter_permille: u32,
    /// The host this connection was opened on, and its role epoch then (see `failover`).
    pub(crate) origin: Option<crate::host::Origin>,
    /// Holds a slot of `max_db_connections` / `max_server_connections` while the connection lives.
    pub(crate) _limits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// This connection's row in SHOW SERVERS; removed when the connection is dropped.
    pub(crate) registration: Option<crate::registry::Registration>,
}

impl ServerConn {
    /// A connection that has not logged in yet (see `connect`).
    pub(crate) fn new(stream: Stream, addr: ServerAddr, max_message: usize) -> ServerConn {
        ServerConn {
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
            home: crate::home::here(),
            max_message,
            broken: None,
            pristine: true,
            prepared: crate::PreparedCache::default(),
            jitter_permille: rand::Rng::gen_range(&mut rand::thread_rng(), 800..=1000),
            origin: None,
            _limits: Vec::new(),
            registration: None,
        }
    }

    /// BackendKeyData from the login: what a CancelRequest for this connection must carry.
    pub(crate) fn set_backend_key(&mut self, pid: i32, key: i32) {
        self.cancel.pid = pid;
        self.cancel.key = key;
    }

    /// Matches the `server{id}` tracing span and SHOW SERVERS.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// When the login finished.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// `max_packet_size`: the largest message accepted from this server.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Bytes read from the server and not yet consumed.
    pub fn buf(&self) -> &BytesMut {
        &self.buf
    }

    /// The read buffer, for the proxy to scan and forward from (it consumes what it forwards).
    pub fn buf_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Statements prepared on this connection under Breakwater's global names.
    pub fn prepared(&self) -> &crate::PreparedCache {
        &self.prepared
    }

    pub fn prepared_mut(&mut self) -> &mut crate::PreparedCache {
        &mut self.prepared
    }

    /// The connection must not be reused, for `reason`. A later call replaces the reason:
    /// callers mark after the inner step that failed, so the latest is the most specific.
    pub fn mark_broken(&mut self, reason: CloseReason) {
        self.broken = Some(reason);
    }

    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Why the connection must not be reused, if it must not.
    pub fn broken_reason(&self) -> Option<CloseReason> {
        self.broken
    }

    /// No session parameter changed since login: its parameters are the server's defaults.
    pub fn is_pristine(&self) -> bool {
        self.pristine
    }

    /// Parameters the server does not report that Breakwater SET on a client's behalf.
    pub fn applied(&self) -> &[(String, String)] {
        &self.applied
    }

    /// Was this connection last made to match the client parameters with `fingerprint`, with
    /// nothing changed since?
    pub fn params_match(&self, fingerprint: u64) -> bool {
        self.params_synced_for == Some(fingerprint)
    }

    /// Breakwater is about to SET session parameters: the connection no longer has the
    /// server's defaults, and matches no client until the SET is recorded.
    pub fn begin_params_sync(&mut self) {
        self.pristine = false;
        self.params_synced_for = None;
    }

    /// The connection now matches the client parameters with `fingerprint`. `applied` are the
    /// unreported parameters a SET just gave it (`None`: nothing was SET, they stay).
    pub fn record_params_synced(
        &mut self,
        fingerprint: u64,
        applied: Option<Vec<(String, String)>>,
    ) {
        if let Some(a) = applied {
            self.applied = a;
        }
        self.params_synced_for = Some(fingerprint);
    }

    /// `server_reset_query` succeeded: DISCARD ALL (the default) drops what Breakwater SET and
    /// prepared, so none of it is assumed any more.
    pub fn after_reset(&mut self) {
        self.applied.clear();
        self.params_synced_for = None;
        self.prepared.clear();
    }

    /// A client's RESET (or `SET … TO DEFAULT`, `DISCARD ALL`) put parameters `names` (and,
    /// with `all`, every one) back to the server's defaults. Their values here are forgotten:
    /// PostgreSQL reports a reported one only if it changed, so the value is not known, and
    /// what Breakwater SET is gone. The connection matches no client until it is synced again.
    pub fn client_reset_params(&mut self, all: bool, names: &[&str]) {
        if all {
            self.applied.clear();
        }
        for name in names {
            self.applied.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            self.params.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        }
        self.params_synced_for = None;
        self.pristine = false;
    }

    /// A ParameterStatus arrived while a client used the connection: recorded, and the
    /// connection no longer has the server's defaults.
    pub fn client_changed_param(&mut self, name: &str, value: &str) {
        self.set_param(name, value);
        self.pristine = false;
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

    /// Records a ParameterStatus the server sent (at login or during an internal query).
    pub(crate) fn set_param(&mut self, name: &str, value: &str) {
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
                // Reported again after a client's reset made it unknown (see
                // `client_reset_params`): the report, not a remembered SET, says what it is.
                self.applied.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
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

    /// Is the socket registered with the calling thread's runtime?
    pub(crate) fn at_home(&self) -> bool {
        self.home == crate::home::here()
    }

    /// Moves the socket to the calling thread's runtime, for a client served there. Best effort:
    /// on an error it stays where it was, and works from there.
    pub(crate) fn move_here(&mut self) {
        let here = crate::home::here();
        match self.stream.rehome() {
            Ok(()) => self.home = here,
            Err(e) => {
                tracing::debug!(server = self.id, error = %e, "server socket stays on its runtime")
            }
        }
    }

    /// Is the socket still open with nothing unexpected waiting? An idle server that sent
    /// something (typically a FATAL before closing) or closed is not usable.
    pub fn is_healthy_idle(&self) -> bool {
        if self.broken.is_some() || !self.buf.is_empty() {
            return false;
        }
        if self.at_home() {
            self.stream.is_idle_and_open()
        } else {
            // Its runtime's reactor may lag (see `Stream::peek_idle_and_open`): this check is
            // what keeps a server whose backend died while idle from going out.
            self.stream.peek_idle_and_open()
        }
    }

    /// Runs `sql` with the simple protocol and waits for ReadyForQuery, keeping ParameterStatus
    /// up to date. Used for parameter sync and resets, never for client queries.
    pub async fn simple_query(&mut self, sql: &str) -> Result<(), QueryError> {
        self.internal_query(sql, &mut None, backend::TxStatus::Idle)
            .await
    }

    /// [`ServerConn::simple_query`] inside a client's transaction: the transaction must still
    /// be open after it (a parameter SET that is part of the client's transaction).
    pub async fn simple_query_in_transaction(&mut self, sql: &str) -> Result<(), QueryError> {
        self.internal_query(sql, &mut None, backend::TxStatus::InTransaction)
            .await
    }

    /// Runs `sql` like [`ServerConn::simple_query`] and returns the first row's values as text.
    pub async fn query_first_row(&mut self, sql: &str) -> Result<Vec<Option<String>>, QueryError> {
        let mut row = None;
        self.internal_query(sql, &mut row, backend::TxStatus::Idle)
            .await?;
        row.ok_or(QueryError::NoRow)
    }

    /// Any failure leaves the connection broken: the caller cannot know where in the exchange
    /// it stopped. Callers that know why they asked mark a more specific reason after this.
    ///
    /// So does giving up half-way. The connection counts as broken (`Unresponsive`: it did
    /// not answer in the caller's time) from the first byte sent until ReadyForQuery. A caller
    /// whose timeout drops this future leaves a reply in flight, and a server with one must
    /// not go back to the pool, where the next client would read that reply as its own.
    async fn internal_query(
        &mut self,
        sql: &str,
        row: &mut Option<Vec<Option<String>>>,
        expect: backend::TxStatus,
    ) -> Result<(), QueryError> {
        let mut out = BytesMut::with_capacity(sql.len() + 6);
        frontend::write_query(&mut out, sql);
        let before = self.broken.replace(CloseReason::Unresponsive);
        let result = match self.write_all(&out).await {
            Ok(()) => self.read_until_ready_capturing(row, expect).await,
            Err(e) => Err(e.into()),
        };
        match &result {
            Ok(()) => self.broken = before,
            Err(e) => self.mark_broken(e.close_reason()),
        }
        result
    }

    async fn read_until_ready_capturing(
        &mut self,
        row: &mut Option<Vec<Option<String>>>,
        expect: backend::TxStatus,
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
                        (None, s) if s == expect => Ok(()),
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

    fn conn() -> ServerConn {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let stream = Stream::Unix(UnixStream::from_std(a).unwrap());
        ServerConn::new(stream, ServerAddr::Unix("/tmp/x".into()), 1024)
    }

    #[tokio::test]
    async fn a_synced_connection_matches_until_anything_changes_its_parameters() {
        let mut c = conn();
        assert!(c.is_pristine() && !c.params_match(7));
        c.record_params_synced(7, None);
        assert!(c.params_match(7) && !c.params_match(8));

        // The server reporting a new value ends the match; the same value does not.
        c.set_param("TimeZone", "UTC");
        assert!(!c.params_match(7), "a new parameter");
        c.record_params_synced(7, None);
        c.set_param("TimeZone", "UTC");
        assert!(c.params_match(7), "an unchanged value");
        c.client_changed_param("TimeZone", "Europe/Paris");
        assert!(!c.params_match(7) && !c.is_pristine());

        // A SET on its way matches no one until recorded; a reset forgets what was SET.
        c.record_params_synced(7, None);
        c.begin_params_sync();
        assert!(!c.params_match(7));
        c.record_params_synced(9, Some(vec![("search_path".into(), "app".into())]));
        assert!(c.params_match(9));
        assert_eq!(c.applied().len(), 1);
        c.after_reset();
        assert!(!c.params_match(9) && c.applied().is_empty());
    }

    /// A caller that gives up on an internal query (its timeout drops the future) leaves the
    /// server with a reply in flight: the connection must say it is broken, or releasing it
    /// would put it back in the pool for the next client to read that reply. A query that
    /// completes leaves it as it was.
    #[tokio::test(start_paused = true)]
    async fn an_internal_query_given_up_half_way_leaves_the_connection_broken() {
        let (a, server) = tokio::net::UnixStream::pair().unwrap();
        let mut c = ServerConn::new(Stream::Unix(a), ServerAddr::Unix("/tmp/x".into()), 1024);
        // The server says nothing: the caller's timeout ends the wait.
        let gave_up =
            tokio::time::timeout(Duration::from_millis(10), c.simple_query("SELECT 1")).await;
        assert!(gave_up.is_err());
        assert_eq!(c.broken_reason(), Some(CloseReason::Unresponsive));

        // A query that gets its ReadyForQuery leaves a healthy connection healthy.
        let (a, mut server2) = tokio::net::UnixStream::pair().unwrap();
        let mut c = ServerConn::new(Stream::Unix(a), ServerAddr::Unix("/tmp/x".into()), 1024);
        let reply = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut query = [0u8; 14]; // 'Q', length, "SELECT 1\0"
            server2.read_exact(&mut query).await.unwrap();
            server2
                .write_all(b"C\0\0\0\x0dSELECT 1\0Z\0\0\0\x05I")
                .await
                .unwrap();
        };
        let (done, ()) = tokio::join!(c.simple_query("SELECT 1"), reply);
        assert!(done.is_ok(), "{done:?}");
        assert!(!c.is_broken());
        drop(server);
    }

    #[tokio::test]
    async fn a_broken_connection_says_why_and_the_latest_reason_wins() {
        let mut c = conn();
        assert!(!c.is_broken() && c.broken_reason().is_none());
        c.mark_broken(CloseReason::ServerLost);
        c.mark_broken(CloseReason::ParamSyncFailed);
        assert_eq!(c.broken_reason(), Some(CloseReason::ParamSyncFailed));
        assert!(!c.is_healthy_idle());
    }

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

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
    pub origin: Option<crate::host::Origin>,
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
            max_message,
            broken: false,
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

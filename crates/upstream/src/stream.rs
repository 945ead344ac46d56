//! A byte stream to a peer: TCP, a Unix socket, or TLS over TCP in either direction. Both client
//! and server connections use it, so the proxy and the server side never care which it is.
//!
//! TLS buffers: a write to a TLS variant may leave ciphertext inside rustls when the socket is
//! full, and only `flush` pushes it out. Every writer therefore uses [`Stream::send`] (write all,
//! then flush), never a bare `write_all`, or a reply could sit in a buffer while both sides wait.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Breakwater is the TLS client: a connection to a server.
    TlsToServer(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Breakwater is the TLS server: a connection from a client.
    TlsFromClient(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// A plain socket taken off the runtime's reactor (see [`Stream::detach`]): an idle
    /// client's, watched by the proxy's park. No I/O until [`Stream::attach`].
    Detached(Detached),
}

/// The socket of a [`Stream::Detached`].
#[derive(Debug)]
pub enum Detached {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
    /// Lost while changing over (tokio failed to deregister it, which closed it).
    Gone,
}

fn detached_io() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "socket detached from the runtime",
    )
}

/// How a TCP socket notices a peer that vanished without a FIN or RST (a host powered off, a
/// cable or a NAT entry gone): keepalive probes once the socket has been quiet, and
/// TCP_USER_TIMEOUT. Both sides have one: `tcp_*` for server sockets, `client_tcp_*` for
/// client sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpLiveness {
    /// Probes after `idle` of silence, every `interval`, `count` unanswered ones kill it.
    pub keepalive: Option<(std::time::Duration, std::time::Duration, u32)>,
    /// Data (or, with keepalive, probes) unacknowledged this long kills the socket (Linux). With
    /// keepalive on, this rather than `count` decides when probing gives up (tcp(7)).
    pub user_timeout: Option<std::time::Duration>,
}

impl TcpLiveness {
    fn keepalive(&self) -> Option<socket2::TcpKeepalive> {
        self.keepalive.map(|(idle, interval, count)| {
            socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(count)
        })
    }

    /// Best effort: a socket option the platform refuses leaves the socket as it was, which is
    /// what it would be without the setting.
    pub fn apply(&self, tcp: &TcpStream) {
        let sock = socket2::SockRef::from(tcp);
        if let Some(ka) = self.keepalive() {
            let _ = sock.set_tcp_keepalive(&ka);
        }
        #[cfg(target_os = "linux")]
        if let Some(t) = self.user_timeout {
            let _ = sock.set_tcp_user_timeout(Some(t));
        }
    }

    /// Sets TCP_NODELAY and exactly these options, turning off what `self` leaves off (a
    /// reload may have). For client sockets: on a listening socket, so that what it accepts
    /// inherits them (Linux), and on an accepted one that did not inherit these values.
    pub fn apply_exactly(&self, socket: &impl std::os::fd::AsFd) -> io::Result<()> {
        let sock = socket2::SockRef::from(socket);
        sock.set_nodelay(true)?;
        match self.keepalive() {
            Some(ka) => sock.set_tcp_keepalive(&ka)?,
            None => sock.set_keepalive(false)?,
        }
        #[cfg(target_os = "linux")]
        sock.set_tcp_user_timeout(self.user_timeout)?;
        Ok(())
    }
}

/// A non-blocking `MSG_PEEK` of one byte: `Ok(0)` the peer closed, `Ok(1)` it sent something,
/// `WouldBlock` nothing is there.
fn peek(fd: RawFd) -> io::Result<usize> {
    peek_into(fd, &mut [0u8; 1])
}

/// A non-blocking `MSG_PEEK` into `buf`: how much is there, `Ok(0)` when the peer closed.
fn peek_into(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv into a buffer we own, of its length; MSG_PEEK leaves the data in place.
    let n = unsafe {
        sys::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `recv(2)` into `buf`'s spare room, `Ok(0)` when the peer closed.
///
/// A system call of our own rather than tokio's `try_read_buf`, which goes through mio, std and
/// glibc's `recv`. glibc's is a cancellation point: around each call it turns the thread's
/// asynchronous cancellation on and off, about 70 instructions, and the pooler makes four such
/// calls per transaction. `syscall(2)` is not one (nothing here cancels threads).
fn recv_raw(fd: RawFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let room = spare.len();
    // SAFETY: the kernel writes at most `room` bytes at `spare`, memory `buf` owns and does not
    // read until `set_len` below says how much was written.
    let n = unsafe { sys::recv(fd, spare.as_mut_ptr().cast(), room, 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    let len = buf.len() + n.min(room);
    // SAFETY: the kernel initialised the `n` bytes after the old length, within the room.
    unsafe { buf.set_len(len) };
    Ok(n)
}

/// `send(2)`, as a system call of our own for the reason [`recv_raw`] gives.
fn send_raw(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: the kernel reads at most `data.len()` bytes at `data`.
    let n = unsafe { sys::send(fd, data.as_ptr().cast(), data.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(target_os = "linux")]
mod sys {
    use libc::{c_int, c_long, c_void, size_t};

    /// `recvfrom` or `sendto` with no address, through `syscall(2)`.
    ///
    /// # Safety
    /// `buf` is valid for `len` bytes, writable for `recvfrom`.
    unsafe fn transfer(
        call: c_long,
        fd: std::os::fd::RawFd,
        buf: *const c_void,
        len: size_t,
        flags: c_int,
    ) -> c_long {
        const NONE: c_long = 0;
        // SAFETY: as the caller promised; no address is given or asked for.
        unsafe {
            libc::syscall(
                call,
                c_long::from(fd),
                buf as c_long,
                len as c_long,
                c_long::from(flags),
                NONE,
                NONE,
            )
        }
    }

    /// # Safety
    /// `buf` is writable for `len` bytes.
    pub unsafe fn recv(
        fd: std::os::fd::RawFd,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
    ) -> c_long {
        // SAFETY: as the caller promised.
        unsafe { transfer(libc::SYS_recvfrom, fd, buf, len, flags) }
    }

    /// # Safety
    /// `buf` is readable for `len` bytes.
    pub unsafe fn send(fd: std::os::fd::RawFd, buf: *const c_void, len: size_t) -> c_long {
        // SAFETY: as the caller promised. MSG_NOSIGNAL: a closed peer is an error, not a
        // SIGPIPE.
        unsafe { transfer(libc::SYS_sendto, fd, buf, len, libc::MSG_NOSIGNAL) }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use libc::{c_int, c_void, size_t, ssize_t};

    /// # Safety
    /// `buf` is writable for `len` bytes.
    pub unsafe fn recv(
        fd: std::os::fd::RawFd,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
    ) -> ssize_t {
        // SAFETY: as the caller promised.
        unsafe { libc::recv(fd, buf, len, flags) }
    }

    /// # Safety
    /// `buf` is readable for `len` bytes. SIGPIPE is ignored (Rust's runtime sets that up).
    pub unsafe fn send(fd: std::os::fd::RawFd, buf: *const c_void, len: size_t) -> ssize_t {
        // SAFETY: as the caller promised.
        unsafe { libc::send(fd, buf, len, 0) }
    }
}

/// A frontend Terminate message, whole.
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// For [`Stream::poll_peer_closed`]: what to return when the socket is not (or no longer)
/// readable, `None` when it is and the peek decides. An error on the socket is a close.
fn not_readable(ready: Poll<io::Result<()>>) -> Option<Poll<()>> {
    match ready {
        Poll::Pending => Some(Poll::Pending),
        Poll::Ready(Err(_)) => Some(Poll::Ready(())),
        Poll::Ready(Ok(())) => None,
    }
}

impl Stream {
    /// Is the peer still there with nothing unread? `false` when the peer closed, sent
    /// something unexpected (typically a FATAL before closing), or the socket errored. For TLS
    /// the peek sees ciphertext, which is left for rustls; plaintext or a close_notify rustls
    /// already holds counts as unexpected too.
    pub fn is_idle_and_open(&self) -> bool {
        self.idle_and_open(false)
    }

    /// [`Stream::is_idle_and_open`] asking the socket itself, whatever tokio has seen: for a
    /// socket registered with another runtime, whose thread may not have turned its reactor
    /// since the peer's last bytes arrived (a busy or starved shard), so tokio's "nothing came"
    /// is not to be trusted. One `recv(MSG_PEEK)`.
    pub fn peek_idle_and_open(&self) -> bool {
        self.idle_and_open(true)
    }

    fn idle_and_open(&self, always_peek: bool) -> bool {
        use std::os::fd::AsRawFd;
        use tokio::io::Interest;
        // Plain sockets: ask tokio first. Its reactor records every event on a registered
        // socket, polled or not, so if it has seen nothing since the last read drained the
        // socket, nothing came — bar an event that arrived in the last few microseconds and
        // awaits the reactor's next turn. That saves a syscall per checkout (a fifth of
        // Breakwater's syscalls per transaction); when tokio has seen something, the peek
        // decides (and a WouldBlock clears tokio's stale readiness).
        let fd = match self {
            Stream::Tcp(s) if always_peek => s.as_raw_fd(),
            Stream::Unix(s) if always_peek => s.as_raw_fd(),
            Stream::Tcp(s) => {
                return Self::idle_by_readiness(
                    s.try_io(Interest::READABLE, || peek(s.as_raw_fd())),
                )
            }
            Stream::Unix(s) => {
                return Self::idle_by_readiness(
                    s.try_io(Interest::READABLE, || peek(s.as_raw_fd())),
                )
            }
            Stream::TlsToServer(_) | Stream::TlsFromClient(_) => match self.tls_transport() {
                Some((tcp, true)) => tcp.as_raw_fd(),
                _ => return false,
            },
            Stream::Detached(_) => return false,
        };
        Self::idle_by_readiness(peek(fd))
    }

    /// Ready once a client has left: closed its side (FIN or reset), or sent Terminate, with
    /// nothing unread before it. Pending while the socket is quiet, and while the client has
    /// sent anything else not read yet: what follows it cannot be seen without reading it,
    /// which is left to the owner. Over TLS a Terminate is ciphertext and only the close is
    /// seen. For a client waiting for a server, which has said all it has to say until it is
    /// answered, either means it is gone.
    ///
    /// Uses the read direction's waker slot, like [`Stream::readable`]: for the task that owns
    /// the stream while it is not reading.
    pub fn poll_peer_closed(&self, cx: &mut Context<'_>) -> Poll<()> {
        use std::os::fd::AsRawFd;
        use tokio::io::Interest;
        let mut head = [0u8; TERMINATE.len()];
        loop {
            // Over TLS the bytes are ciphertext: only a close says anything.
            let (peeked, plain) = match self {
                Stream::Tcp(s) => {
                    if let Some(done) = not_readable(s.poll_read_ready(cx)) {
                        return done;
                    }
                    (
                        s.try_io(Interest::READABLE, || peek_into(s.as_raw_fd(), &mut head)),
                        true,
                    )
                }
                Stream::Unix(s) => {
                    if let Some(done) = not_readable(s.poll_read_ready(cx)) {
                        return done;
                    }
                    (
                        s.try_io(Interest::READABLE, || peek_into(s.as_raw_fd(), &mut head)),
                        true,
                    )
                }
                Stream::TlsToServer(_) | Stream::TlsFromClient(_) => {
                    let Some((tcp, true)) = self.tls_transport() else {
                        // rustls holds plaintext not read yet.
                        return Poll::Pending;
                    };
                    if let Some(done) = not_readable(tcp.poll_read_ready(cx)) {
                        return done;
                    }
                    (
                        tcp.try_io(Interest::READABLE, || peek_into(tcp.as_raw_fd(), &mut head)),
                        false,
                    )
                }
                Stream::Detached(_) => return Poll::Ready(()),
            };
            return match peeked {
                Ok(0) => Poll::Ready(()),
                Ok(n) if plain && head.get(..n) == Some(&TERMINATE[..]) => Poll::Ready(()),
                Ok(_) => Poll::Pending,
                // Stale readiness, now cleared: poll again, which registers the waker.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => Poll::Ready(()),
            };
        }
    }

    /// A TLS stream's TCP socket, and whether rustls wants to read (holds no plaintext that a
    /// read would return at once); `None` for plain streams.
    fn tls_transport(&self) -> Option<(&TcpStream, bool)> {
        match self {
            Stream::TlsToServer(s) => {
                let (tcp, tls) = s.get_ref();
                Some((tcp, tls.wants_read()))
            }
            Stream::TlsFromClient(s) => {
                let (tcp, tls) = s.get_ref();
                Some((tcp, tls.wants_read()))
            }
            Stream::Tcp(_) | Stream::Unix(_) | Stream::Detached(_) => None,
        }
    }

    /// Moves the socket to the calling thread's runtime (see `crate::home`): a duplicate of its
    /// descriptor is registered with this runtime's reactor and the old one, registered with
    /// another's, is closed. TLS state stays as it is; only the transport underneath changes.
    /// On an error the stream is unchanged, and still works (its wake-ups cross threads).
    /// Only for a stream nobody is waiting on (an idle server connection).
    pub fn rehome(&mut self) -> io::Result<()> {
        use std::os::fd::AsFd;
        fn tcp(old: &mut TcpStream) -> io::Result<()> {
            let fd = old.as_fd().try_clone_to_owned()?;
            let new = TcpStream::from_std(std::net::TcpStream::from(fd))?;
            drop(std::mem::replace(old, new));
            Ok(())
        }
        match self {
            Stream::Tcp(s) => tcp(s),
            Stream::TlsToServer(s) => tcp(s.get_mut().0),
            Stream::TlsFromClient(s) => tcp(s.get_mut().0),
            Stream::Unix(old) => {
                let fd = old.as_fd().try_clone_to_owned()?;
                let new = UnixStream::from_std(std::os::unix::net::UnixStream::from(fd))?;
                drop(std::mem::replace(old, new));
                Ok(())
            }
            Stream::Detached(_) => Err(detached_io()),
        }
    }

    /// `peek`'s answer (or tokio's WouldBlock when it knows of nothing) as "idle and open".
    fn idle_by_readiness(peeked: io::Result<usize>) -> bool {
        matches!(peeked, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// The local and remote socket addresses (`None` for Unix sockets), for SHOW CLIENTS/SERVERS.
    pub fn addrs(&self) -> (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>) {
        match self.tcp() {
            Some(s) => (s.local_addr().ok(), s.peer_addr().ok()),
            None => (None, None),
        }
    }

    /// A second handle on the same socket, so an operator can shut it down (KILL) while its
    /// task owns the stream; the task then sees end-of-stream and cleans up as for any
    /// disconnect. For TLS it is the TCP socket underneath.
    pub fn shutdown_handle(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Unix(s) => Some(s.as_raw_fd()),
            Stream::Detached(_) => self.detached_fd(),
            _ => Some(self.tcp()?.as_raw_fd()),
        }
    }

    /// The TCP socket underneath, for socket options and TCP_INFO.
    pub fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) | Stream::Detached(_) => None,
            Stream::TlsToServer(s) => Some(s.get_ref().0),
            Stream::TlsFromClient(s) => Some(s.get_ref().0),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::TlsToServer(_) | Stream::TlsFromClient(_))
    }

    /// The certificate a TLS client presented (the end entity), if any.
    pub fn client_certificate(&self) -> Option<&CertificateDer<'static>> {
        match self {
            Stream::TlsFromClient(s) => s.get_ref().1.peer_certificates()?.first(),
            _ => None,
        }
    }

    /// A client socket just accepted: TCP_NODELAY and `liveness`, unless it `inherited` them
    /// from its listening socket (Linux copies both to the sockets a listener accepts; six
    /// system calls per login saved). Best effort, as [`TcpLiveness::apply`].
    pub fn tune_accepted(&self, liveness: &TcpLiveness, inherited: bool) {
        if let (false, Some(s)) = (inherited, self.tcp()) {
            let _ = liveness.apply_exactly(s);
        }
    }

    /// Waits until a read would find something (or the peer closed), without a buffer: an
    /// idle client then holds no read buffer while it waits. For TLS: at once when rustls
    /// holds plaintext not yet read, else when the socket has ciphertext (which may turn out to
    /// be less than a record, or no application data; the read then waits on).
    ///
    /// Polls the socket's read readiness rather than awaiting tokio's `readable()`, whose
    /// future carries a waiter node (some 130 bytes) that every idle client's task would hold.
    /// The read direction's waker slot is the one a read uses too, which is fine for the one
    /// task that owns the stream.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_readable(cx)).await
    }

    /// [`Stream::readable`] as a poll, for a wait that polls other things beside it.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
            Stream::TlsToServer(_) | Stream::TlsFromClient(_) => match self.tls_transport() {
                Some((tcp, true)) => tcp.poll_read_ready(cx),
                _ => Poll::Ready(Ok(())),
            },
            Stream::Detached(_) => Poll::Ready(Err(detached_io())),
        }
    }

    /// Writes all of `data` and flushes it to the socket (see the module comment). Not
    /// cancellation-safe: a caller cut off mid-send must close the stream.
    ///
    /// A plain socket is written at once when it has room, which it almost always has: no
    /// write future, no task budget, no readiness poll. What it does not take (or an error)
    /// goes the usual way.
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        use tokio::io::Interest;
        let done = match self {
            Stream::Tcp(s) => s.try_io(Interest::WRITABLE, || send_raw(s.as_raw_fd(), data)),
            Stream::Unix(s) => s.try_io(Interest::WRITABLE, || send_raw(s.as_raw_fd(), data)),
            _ => Ok(0),
        }
        .unwrap_or(0);
        if done > 0 && done == data.len() {
            return Ok(());
        }
        self.write_all(data.get(done..).unwrap_or_default()).await?;
        self.flush().await
    }

    /// Reads what has arrived into `buf` without waiting: `Pending` when nothing has (tokio
    /// has seen no readiness, or the read found nothing); `None` over TLS (and for a parked
    /// socket), where the caller's read future does the read. For a read right after a
    /// wake-up that said the socket is readable: no read future, no task budget, no waker. A read that leaves room in `buf`
    /// drained the socket (epoll is edge-triggered), so it clears tokio's readiness as
    /// `poll_read` does; left set, the next poll would pay a `recv` that finds nothing.
    pub fn try_read_now(&self, buf: &mut bytes::BytesMut) -> Option<Poll<io::Result<usize>>> {
        use tokio::io::Interest;
        let spare = buf.capacity() - buf.len();
        let mut got = 0;
        let drained = |n: usize| {
            if n > 0 && n < spare {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        };
        let read = match self {
            Stream::Tcp(s) => s.try_io(Interest::READABLE, || {
                got = recv_raw(s.as_raw_fd(), buf)?;
                drained(got)
            }),
            Stream::Unix(s) => s.try_io(Interest::READABLE, || {
                got = recv_raw(s.as_raw_fd(), buf)?;
                drained(got)
            }),
            _ => return None,
        };
        Some(match read {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got == 0 => Poll::Pending,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(got)),
            r => Poll::Ready(r),
        })
    }

    /// Writes `data` without waiting, as far as the socket takes it right now (for a goodbye
    /// such as Terminate on a connection being closed). For TLS the data is encrypted and a
    /// close_notify follows; whatever does not fit is dropped with the stream.
    pub fn try_write_now(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write(data),
            Stream::Unix(s) => s.try_write(data),
            Stream::TlsToServer(s) => {
                let (tcp, tls) = s.get_mut();
                tls_write_now(tcp, tls, data)
            }
            Stream::TlsFromClient(s) => {
                let (tcp, tls) = s.get_mut();
                tls_write_now(tcp, tls, data)
            }
            Stream::Detached(_) => Err(detached_io()),
        }
    }

    /// Takes a plain socket off this runtime's reactor (an idle client's, which costs its
    /// 256-byte registration while registered); its descriptor stays open and the same.
    /// TLS streams cannot be detached (`Unsupported`, the stream unchanged). Any other error
    /// leaves the stream `Detached(Gone)`: the socket is closed.
    pub fn detach(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(_) | Stream::Unix(_) => {}
            Stream::Detached(_) => return Ok(()),
            Stream::TlsToServer(_) | Stream::TlsFromClient(_) => {
                return Err(io::ErrorKind::Unsupported.into())
            }
        }
        let (detached, result) = match std::mem::replace(self, Stream::Detached(Detached::Gone)) {
            Stream::Tcp(s) => match s.into_std() {
                Ok(s) => (Detached::Tcp(s), Ok(())),
                Err(e) => (Detached::Gone, Err(e)),
            },
            Stream::Unix(s) => match s.into_std() {
                Ok(s) => (Detached::Unix(s), Ok(())),
                Err(e) => (Detached::Gone, Err(e)),
            },
            _ => (Detached::Gone, Err(detached_io())),
        };
        *self = Stream::Detached(detached);
        result
    }

    /// Registers a detached socket with the calling thread's runtime again. On an error the
    /// socket is closed and the stream is `Detached(Gone)`.
    pub fn attach(&mut self) -> io::Result<()> {
        let Stream::Detached(d) = self else {
            return Ok(());
        };
        *self = match std::mem::replace(d, Detached::Gone) {
            Detached::Tcp(s) => Stream::Tcp(TcpStream::from_std(s)?),
            Detached::Unix(s) => Stream::Unix(UnixStream::from_std(s)?),
            Detached::Gone => return Err(detached_io()),
        };
        Ok(())
    }

    /// A detached socket's descriptor, for the park's own epoll set.
    pub fn detached_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Detached(Detached::Tcp(s)) => Some(s.as_raw_fd()),
            Stream::Detached(Detached::Unix(s)) => Some(s.as_raw_fd()),
            _ => None,
        }
    }
}

fn tls_write_now<D>(
    tcp: &mut TcpStream,
    tls: &mut rustls::ConnectionCommon<D>,
    data: &[u8],
) -> io::Result<usize> {
    use std::io::Write;
    let n = tls.writer().write(data)?;
    tls.send_close_notify();
    let mut sink = TryWriter(tcp);
    while tls.wants_write() {
        if tls.write_tls(&mut sink)? == 0 {
            break;
        }
    }
    Ok(n)
}

/// std::io::Write over a non-blocking tokio socket: WouldBlock instead of waiting.
struct TryWriter<'a>(&'a TcpStream);

impl std::io::Write for TryWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::TlsToServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::TlsFromClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached(_) => Poll::Ready(Err(detached_io())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::TlsToServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::TlsFromClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached(_) => Poll::Ready(Err(detached_io())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::TlsToServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::TlsFromClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached(_) => Poll::Ready(Err(detached_io())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::TlsToServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::TlsFromClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached(_) => Poll::Ready(Err(detached_io())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::TlsToServer(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::TlsFromClient(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Detached(_) => Poll::Ready(Err(detached_io())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The pooler's own recv and send: what they read lands after what the buffer held, an
    /// empty socket is `WouldBlock` with the buffer untouched, a closed peer reads 0, and a
    /// send to a closed peer is an error.
    #[test]
    fn raw_recv_and_send_keep_the_buffer_and_the_error_contract() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut buf = bytes::BytesMut::with_capacity(64);
        buf.extend_from_slice(b"ab");
        let e = recv_raw(a.as_raw_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(&buf[..], b"ab");

        assert_eq!(send_raw(b.as_raw_fd(), b"hello").unwrap(), 5);
        assert_eq!(recv_raw(a.as_raw_fd(), &mut buf).unwrap(), 5);
        assert_eq!(&buf[..], b"abhello");

        // More than the spare room: the rest stays in the socket for the next read.
        let room = buf.capacity() - buf.len();
        let big = vec![7u8; room + 10];
        assert_eq!(send_raw(b.as_raw_fd(), &big).unwrap(), big.len());
        assert_eq!(recv_raw(a.as_raw_fd(), &mut buf).unwrap(), room);
        assert_eq!(buf.len(), buf.capacity());
        buf.reserve(64);
        assert_eq!(recv_raw(a.as_raw_fd(), &mut buf).unwrap(), 10);
        assert!(buf[7..].iter().all(|&x| x == 7));

        drop(b);
        assert_eq!(recv_raw(a.as_raw_fd(), &mut buf).unwrap(), 0);
        let e = send_raw(a.as_raw_fd(), b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A server connection opened on one shard and moved to another keeps working after the
    /// first shard's runtime is gone: its wake-ups now come from the new runtime's reactor.
    #[test]
    fn a_moved_stream_is_served_by_its_new_runtime_alone() {
        let first = runtime();
        let (mut ours, peer) = first.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
            (Stream::Tcp(c.unwrap()), a.unwrap().0.into_std().unwrap())
        });
        drop(first);
        let second = runtime();
        second.block_on(async {
            ours.rehome().unwrap();
            let mut peer = TcpStream::from_std(peer).unwrap();
            // Reads wait for the peer: a readiness only the new reactor can deliver.
            let echo = async {
                let mut b = [0u8; 5];
                peer.read_exact(&mut b).await.unwrap();
                peer.write_all(&b).await.unwrap();
            };
            let ask = async {
                ours.send(b"hello").await.unwrap();
                let mut b = [0u8; 5];
                ours.read_exact(&mut b).await.unwrap();
                b
            };
            let (_, got) =
                tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(echo, ask) })
                    .await
                    .expect("the moved stream is woken by its new runtime");
            assert_eq!(&got, b"hello");
        });
    }

    /// A peer that closed while its runtime's reactor has not turned since: tokio has seen
    /// nothing yet, the socket itself says it is closed. The check for a server registered with
    /// another (possibly busy) runtime asks the socket.
    #[test]
    fn a_close_the_reactor_has_not_seen_yet_is_found_by_asking_the_socket() {
        let rt = runtime();
        let (ours, peer) = rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (c, a) = tokio::join!(TcpStream::connect(addr), l.accept());
            (Stream::Tcp(c.unwrap()), a.unwrap().0)
        });
        assert!(ours.peek_idle_and_open(), "open and quiet");
        // Loopback delivers the FIN within the close; no await follows, so the reactor has
        // not turned.
        drop(peer);
        assert!(!ours.peek_idle_and_open(), "the close is found");
        drop(rt);
    }
}

//! A fault-injecting TCP proxy for storm tests: put it between the pooler and PostgreSQL, then
//! on command add latency to connects or to bytes, accept and stay silent (blackhole), refuse,
//! freeze or cap the bytes, reset connections, or drop them without a FIN or RST. It counts
//! connection attempts, open connections and logins in progress.
//!
//! It runs on its own thread with its own tokio runtime, so sync and async tests use it alike,
//! and a fault never depends on the test's runtime being polled. It never buffers more than one
//! 16 KiB chunk per direction per connection: a frozen or slowed connection pushes back through
//! TCP windows, like a real stalled peer. Dropping it stops every task and closes every socket.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use crate::port::free_port;

const CHUNK: usize = 16 * 1024;
/// SSLRequest and GSSENCRequest: the server answers each with one byte, not a message.
const NEGOTIATION_CODES: [u32; 2] = [80_877_103, 80_877_104];

/// What happens to connections accepted from now on; each keeps the fault it was accepted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFault {
    None,
    /// Wait this long before connecting upstream and forwarding.
    Latency(Duration),
    /// Accept, never connect upstream, send nothing and keep the socket open.
    Blackhole,
    /// Accept, then reset at once (SO_LINGER 0).
    Refuse,
}

/// What happens to the bytes of every connection, existing and new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteFault {
    None,
    /// Each chunk waits this long before it is written on, in both directions.
    Latency(Duration),
    /// Nothing is read or written either way; the sockets stay open.
    Freeze,
    /// At most this many bytes per second per direction per connection; 0 is a freeze.
    BandwidthCap(u64),
}

/// The proxy: listens on 127.0.0.1:[`FaultProxy::port`] and forwards to one upstream.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What every connection watches. Connections are numbered in accept order, so "the existing
/// connections" of `reset_all` and `drop_all_silently` are those numbered below a mark.
#[derive(Clone, Copy)]
struct Faults {
    connect: ConnectFault,
    bytes: ByteFault,
    reset_below: u64,
    silent_below: u64,
}

impl Faults {
    fn resets(&self, id: u64) -> bool {
        id < self.reset_below
    }

    fn forwards(&self, id: u64) -> bool {
        id >= self.silent_below
            && !matches!(self.bytes, ByteFault::Freeze | ByteFault::BandwidthCap(0))
    }
}

struct Shared {
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    attempts: AtomicU64,
    open: AtomicUsize,
    logging_in: AtomicUsize,
    peak_logging_in: AtomicUsize,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:<[`free_port`]> and forwards each accepted connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> anyhow::Result<FaultProxy> {
        let port = free_port();
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .with_context(|| format!("fault proxy: binding 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("fault proxy: building its runtime")?;
        let listener = {
            let _runtime = runtime.enter();
            TcpListener::from_std(listener).context("fault proxy: registering its listener")?
        };
        let (faults, _) = watch::channel(Faults {
            connect: ConnectFault::None,
            bytes: ByteFault::None,
            reset_below: 0,
            silent_below: 0,
        });
        let shared = Arc::new(Shared {
            upstream,
            faults,
            attempts: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            logging_in: AtomicUsize::new(0),
            peak_logging_in: AtomicUsize::new(0),
        });
        let (shutdown, stopped) = oneshot::channel();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = accept_loop(listener, thread_shared) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime drops every connection task, and with them their sockets.
                drop(runtime);
            })
            .context("fault proxy: spawning its thread")?;
        Ok(FaultProxy {
            port,
            shared,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// Where clients (or the pooler) connect: 127.0.0.1:port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The fault for connections accepted from now on (replaces the current one).
    pub fn set_connect(&self, fault: ConnectFault) {
        self.shared.faults.send_modify(|f| f.connect = fault);
    }

    /// The fault for bytes on all connections, existing and new (replaces the current one).
    pub fn set_bytes(&self, fault: ByteFault) {
        self.shared.faults.send_modify(|f| f.bytes = fault);
    }

    /// Resets every connection open now (RST to the client, close upstream).
    pub fn reset_all(&self) {
        let mark = self.shared.attempts.load(Ordering::SeqCst);
        self.shared.faults.send_modify(|f| f.reset_below = mark);
    }

    /// Stops forwarding on every connection open now, for good, without closing anything (until
    /// [`FaultProxy::reset_all`] or drop): a peer that vanished. New connections are unaffected.
    pub fn drop_all_silently(&self) {
        let mark = self.shared.attempts.load(Ordering::SeqCst);
        self.shared.faults.send_modify(|f| f.silent_below = mark);
    }

    /// Connections accepted since start.
    pub fn attempts(&self) -> u64 {
        self.shared.attempts.load(Ordering::SeqCst)
    }

    /// Connections currently open on the client side (blackholed and frozen ones included).
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Open connections whose upstream has not yet sent its first ReadyForQuery ('Z'): still
    /// connecting or logging in (blackholed ones included). A login ends at the 'Z', or when
    /// either side closes. A connection that switches to TLS or GSS encryption can no longer be
    /// read, and counts as logged in from then on.
    pub fn logging_in(&self) -> usize {
        self.shared.logging_in.load(Ordering::SeqCst)
    }

    /// The highest [`FaultProxy::logging_in`] since start or the last [`FaultProxy::reset_peak`].
    pub fn peak_logging_in(&self) -> usize {
        self.shared.peak_logging_in.load(Ordering::SeqCst)
    }

    /// Restarts the peak from the current [`FaultProxy::logging_in`].
    pub fn reset_peak(&self) {
        self.shared
            .peak_logging_in
            .store(self.logging_in(), Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                let id = shared.attempts.fetch_add(1, Ordering::SeqCst);
                let connect = shared.faults.borrow().connect;
                tokio::spawn(serve(client, id, connect, Arc::clone(&shared)));
            }
            // Out of descriptors, most likely: let connections close before trying again.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// How the client side of a connection ends.
enum Close {
    /// A FIN, after both directions ended.
    Quietly,
    /// An RST (SO_LINGER 0), which the client sees at once as "connection reset".
    WithReset,
}

/// One proxied connection, from accept until both sides close, `reset_all`, or the proxy's drop.
async fn serve(mut client: TcpStream, id: u64, connect: ConnectFault, shared: Arc<Shared>) {
    let _open = Counted::new(&shared.open);
    let close = if connect == ConnectFault::Refuse {
        Close::WithReset
    } else {
        let login = Login::new(&shared);
        let mut faults = shared.faults.subscribe();
        tokio::select! {
            close = forward(&mut client, id, connect, &shared, &login) => close,
            () = until(&mut faults, |f| f.resets(id)) => Close::WithReset,
        }
    };
    if let Close::WithReset = close {
        let _ = client.set_zero_linger();
    }
}

async fn forward(
    client: &mut TcpStream,
    id: u64,
    connect: ConnectFault,
    shared: &Shared,
    login: &Login<'_>,
) -> Close {
    match connect {
        ConnectFault::Latency(delay) => tokio::time::sleep(delay).await,
        ConnectFault::Blackhole => std::future::pending().await,
        ConnectFault::None | ConnectFault::Refuse => {}
    }
    let Ok(mut server) = TcpStream::connect(shared.upstream).await else {
        // The nearest thing to the refused connect the client would have seen without us.
        return Close::WithReset;
    };
    let (client_rx, client_tx) = client.split();
    let (server_rx, server_tx) = server.split();
    let (mut client_scan, mut server_scan) = (ClientScan::default(), ServerScan::default());
    let faults = || shared.faults.subscribe();
    // A side that has closed is no longer logging in, though the other may still be draining:
    // counting it on would make the proxy see more logins than the client has in flight.
    let ended = |result| {
        login.done();
        result
    };
    let _ = tokio::try_join!(
        async {
            let sent = |bytes: &[u8]| login.client_sent(&mut client_scan, bytes);
            ended(pump(client_rx, server_tx, id, faults(), sent).await)
        },
        async {
            let sent = |bytes: &[u8]| login.server_sent(&mut server_scan, bytes);
            ended(pump(server_rx, client_tx, id, faults(), sent).await)
        },
    );
    Close::Quietly
}

/// Copies one direction chunk by chunk, applying the byte fault to each; half-closes `to` at EOF.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    id: u64,
    mut faults: watch::Receiver<Faults>,
    mut inspect: impl FnMut(&[u8]),
) -> std::io::Result<()> {
    let mut buf = vec![0; CHUNK];
    loop {
        until(&mut faults, |f| f.forwards(id)).await;
        let limit = match faults.borrow().bytes {
            // Small reads, so a capped stream trickles instead of bursting a chunk at a time.
            ByteFault::BandwidthCap(rate) => {
                usize::try_from(rate / 10).unwrap_or(CHUNK).clamp(1, CHUNK)
            }
            _ => CHUNK,
        };
        // A read is cancel-safe: if a freeze comes first, nothing was taken from the socket.
        let n = tokio::select! {
            n = from.read(&mut buf[..limit]) => n?,
            () = until(&mut faults, |f| !f.forwards(id)) => continue,
        };
        if n == 0 {
            return to.shutdown().await;
        }
        let chunk = &buf[..n];
        inspect(chunk);
        let delay = match faults.borrow().bytes {
            ByteFault::Latency(delay) => delay,
            ByteFault::BandwidthCap(rate) => Duration::from_secs_f64(n as f64 / rate.max(1) as f64),
            ByteFault::None | ByteFault::Freeze => Duration::ZERO,
        };
        tokio::time::sleep(delay).await;
        // A freeze that came while this chunk was in hand holds it back too.
        until(&mut faults, |f| f.forwards(id)).await;
        to.write_all(chunk).await?;
    }
}

/// Waits until `ready` holds for the current faults; never returns if the proxy is gone.
async fn until(faults: &mut watch::Receiver<Faults>, ready: impl FnMut(&Faults) -> bool) {
    if faults.wait_for(ready).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A gauge held up for as long as this lives.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::SeqCst);
        Counted(gauge)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One connection's place in `logging_in`: counted from accept until the server's first 'Z', or
/// until either side closes. Each direction scans its own bytes; the one fact they share is how
/// many one-byte negotiation answers the server owes. The client side counts a request before
/// forwarding it, so the count is always up to date when the answer arrives.
struct Login<'a> {
    shared: &'a Shared,
    counting: AtomicBool,
    answers_owed: AtomicU32,
}

impl<'a> Login<'a> {
    fn new(shared: &'a Shared) -> Self {
        let now = shared.logging_in.fetch_add(1, Ordering::SeqCst) + 1;
        shared.peak_logging_in.fetch_max(now, Ordering::SeqCst);
        Login {
            shared,
            counting: AtomicBool::new(true),
            answers_owed: AtomicU32::new(0),
        }
    }

    fn client_sent(&self, scan: &mut ClientScan, bytes: &[u8]) {
        if self.counting.load(Ordering::SeqCst) {
            self.answers_owed
                .fetch_add(scan.feed(bytes), Ordering::SeqCst);
        }
    }

    fn server_sent(&self, scan: &mut ServerScan, bytes: &[u8]) {
        if self.counting.load(Ordering::SeqCst) && scan.feed(bytes, &self.answers_owed) {
            self.done();
        }
    }

    fn done(&self) {
        if self.counting.swap(false, Ordering::SeqCst) {
            self.shared.logging_in.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Drop for Login<'_> {
    fn drop(&mut self) {
        self.done();
    }
}

/// Walks a stream of length-prefixed packets across chunk boundaries, yielding each header of
/// `H` bytes (the tag if any, the length, and for startup packets the code) and skipping bodies.
struct Headers<const H: usize> {
    header: [u8; H],
    have: usize,
    skip: usize,
}

impl<const H: usize> Default for Headers<H> {
    fn default() -> Self {
        Headers {
            header: [0; H],
            have: 0,
            skip: 0,
        }
    }
}

impl<const H: usize> Headers<H> {
    /// The next complete header in `bytes` (advanced past it), or `None` once `bytes` is used up.
    /// The caller sets `skip` to the rest of that packet.
    fn next(&mut self, bytes: &mut &[u8]) -> Option<[u8; H]> {
        let skipped = self.skip.min(bytes.len());
        self.skip -= skipped;
        let taken = (H - self.have).min(bytes.len() - skipped);
        self.header[self.have..self.have + taken].copy_from_slice(&bytes[skipped..skipped + taken]);
        self.have += taken;
        *bytes = &bytes[skipped + taken..];
        (self.have == H).then(|| {
            self.have = 0;
            self.header
        })
    }
}

fn be_u32(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take(4)
        .fold(0, |n, &b| n << 8 | usize::from(b))
}

/// The client's first packets (length, code) up to its StartupMessage.
#[derive(Default)]
struct ClientScan {
    headers: Headers<8>,
    startup_seen: bool,
}

impl ClientScan {
    /// How many negotiation requests (SSL, GSS) `bytes` completed.
    fn feed(&mut self, mut bytes: &[u8]) -> u32 {
        let mut requests = 0;
        while !self.startup_seen {
            let Some(header) = self.headers.next(&mut bytes) else {
                break;
            };
            let (len, code) = (be_u32(&header), be_u32(&header[4..]) as u32);
            if len == 8 && NEGOTIATION_CODES.contains(&code) {
                requests += 1;
            } else {
                self.startup_seen = true;
            }
            self.headers.skip = len.saturating_sub(8);
        }
        requests
    }
}

/// The server's messages (tag, length) up to its first ReadyForQuery.
#[derive(Default)]
struct ServerScan {
    headers: Headers<5>,
}

impl ServerScan {
    /// Whether the login is over: 'Z' seen, or the connection went encrypted and is unreadable.
    fn feed(&mut self, mut bytes: &[u8], answers_owed: &AtomicU32) -> bool {
        loop {
            // A negotiation answer is one byte, in place of a message: 'N' means "go on in
            // plaintext"; anything else means encryption (or an error we need not follow).
            if self.headers.have == 0 && self.headers.skip == 0 && !bytes.is_empty() {
                let owed = answers_owed
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                if owed.is_ok() {
                    if bytes[0] != b'N' {
                        return true;
                    }
                    bytes = &bytes[1..];
                    continue;
                }
            }
            let Some(header) = self.headers.next(&mut bytes) else {
                return false;
            };
            if header[0] == b'Z' {
                return true;
            }
            self.headers.skip = be_u32(&header[1..]).saturating_sub(4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn packet(code: u32, body: &[u8]) -> Vec<u8> {
        let mut p = (body.len() as u32 + 8).to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(body);
        p
    }

    /// Feeds the client's bytes, then the server's, in chunks of `size`; where the login ended.
    fn login_ends_at(client: &[u8], server: &[u8], size: usize) -> Option<usize> {
        let owed = AtomicU32::new(0);
        let mut client_scan = ClientScan::default();
        for chunk in client.chunks(size) {
            owed.fetch_add(client_scan.feed(chunk), Ordering::SeqCst);
        }
        let mut server_scan = ServerScan::default();
        let mut offset = 0;
        for chunk in server.chunks(size) {
            offset += chunk.len();
            if server_scan.feed(chunk, &owed) {
                return Some(offset);
            }
        }
        None
    }

    #[test]
    fn a_login_ends_at_the_first_ready_for_query_however_the_bytes_are_split() {
        let startup = packet(196_608, b"user\0app\0\0");
        let ssl_request = packet(80_877_103, b"");
        // Bodies full of 'Z' bytes must not be taken for a ReadyForQuery.
        let login = [
            message(b'R', b"\0\0\0\0"),
            message(b'S', b"ZZZZ\0ZZ\0"),
            message(b'K', b"ZZZZZZZZ"),
        ]
        .concat();
        let ready = message(b'Z', b"I");
        let plain = [login.clone(), ready].concat();
        // Where ReadyForQuery's tag and length end: enough to know the login is over.
        let ready_at = plain.len() - 1;
        let cases = [
            ("plaintext", startup.clone(), plain.clone(), Some(ready_at)),
            ("no ReadyForQuery yet", startup.clone(), login.clone(), None),
            (
                "SSL refused, then plaintext",
                [ssl_request.clone(), startup.clone()].concat(),
                [b"N".to_vec(), plain.clone()].concat(),
                Some(ready_at + 1),
            ),
            (
                "SSL accepted: unreadable from then on",
                ssl_request.clone(),
                b"S\x16\x03\x01".to_vec(),
                Some(1),
            ),
            (
                "a NoticeResponse is a message",
                startup,
                message(b'N', b"x"),
                None,
            ),
        ];
        for (name, client, server, expected) in cases {
            for size in 1..=server.len().max(client.len()) {
                let end = login_ends_at(&client, &server, size);
                // The end is reported with the chunk that holds it.
                let expected_chunk_end =
                    expected.map(|end| (end.div_ceil(size) * size).min(server.len()));
                assert_eq!(end, expected_chunk_end, "{name}, chunks of {size}");
            }
        }
    }
}

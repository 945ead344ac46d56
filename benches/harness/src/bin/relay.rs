//! A bare relay, for calibration only: one upstream connection per client, bytes copied both
//! ways, no parsing and no pool. `benches/instructions.sh` (with `RELAY=1`) counts its
//! user-space instructions per transaction under callgrind beside Breakwater's, to say what the
//! event loop alone costs in each shape:
//!
//! - `tokio`: a current-thread runtime and `copy_bidirectional`, a task per client (the
//!   issue's calibration, and the shape of one Breakwater shard);
//! - `tokio-one-task`: the same, but every client's future is polled by one task through a
//!   `FuturesUnordered`, which polls only the futures whose wakers fired: a task per shard
//!   instead of one per client, with tokio's reactor still doing the waiting;
//! - `tokio-own-reactor`: a task per client and `copy_bidirectional` as in `tokio`, but the
//!   sockets' readiness comes from an epoll set of our own (one socket of tokio's reactor, run
//!   by one task that wakes the client tasks): replacing tokio's per-socket readiness only;
//! - `epoll`: one thread, level-triggered `epoll` and plain `read`/`write`, no runtime (the
//!   shape of a hand-written poll loop, like PgBouncer's libevent loop).
//!
//! - `epoll-in-tokio`: that loop's epoll set registered as one socket with a current-thread
//!   tokio runtime, and run by one task when tokio says it is readable: a loop of our own for
//!   the data path beside tokio for everything else.
//!
//! The difference between the two is what a poll loop of our own could save at most; the rest
//! of Breakwater's figure is the pooling itself.
//!
//!     relay tokio|epoll LISTEN_ADDR UPSTREAM_ADDR
//!
//! It runs until SIGINT. Loopback benchmarks only: it trusts its peers and blocks on a full
//! socket buffer (a pgbench reply never fills one).

use std::net::{SocketAddr, TcpListener};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, listen, upstream] = args.as_slice() else {
        anyhow::bail!("usage: relay tokio|epoll LISTEN_ADDR UPSTREAM_ADDR");
    };
    let listen: SocketAddr = listen.parse()?;
    let upstream: SocketAddr = upstream.parse()?;
    match mode.as_str() {
        "tokio" => tokio_relay(listen, upstream),
        "tokio-one-task" => tokio_one_task(listen, upstream),
        "tokio-own-reactor" => own_reactor::run(listen, upstream),
        "epoll" => epoll::run(TcpListener::bind(listen)?, upstream),
        "epoll-in-tokio" => epoll::nested(TcpListener::bind(listen)?, upstream),
        other => anyhow::bail!("unknown mode {other}"),
    }
}

fn tokio_relay(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let stop = tokio::signal::ctrl_c();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => return Ok(()),
                accepted = listener.accept() => {
                    let (mut client, _) = accepted?;
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                }
            }
        }
    })
}

fn tokio_one_task(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        // Accepting is a task of its own, so that a client's wake-up polls only the clients
        // and a channel, not the listener and the signal too.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if tx.send(client).is_err() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut clients = FuturesUnordered::new();
            loop {
                tokio::select! {
                    biased;
                    Some(()) = clients.next(), if !clients.is_empty() => {}
                    client = rx.recv() => {
                        let Some(mut client): Option<tokio::net::TcpStream> = client else { return };
                        clients.push(async move {
                            let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                                return;
                            };
                            let _ = client.set_nodelay(true);
                            let _ = server.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        });
                    }
                }
            }
        });
        tokio::signal::ctrl_c().await?;
        Ok(())
    })
}

mod own_reactor {
    use std::cell::RefCell;
    use std::io::{self, ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    const IN: u32 = libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
    const OUT: u32 = libc::EPOLLOUT as u32;
    const BAD: u32 = libc::EPOLLHUP as u32 | libc::EPOLLERR as u32;

    #[derive(Default)]
    struct Slot {
        ready: u32,
        reader: Option<Waker>,
        writer: Option<Waker>,
    }

    /// The shard's readiness table, indexed by fd: one thread, so a RefCell.
    struct Reactor {
        ep: OwnedFd,
        slots: Vec<Slot>,
    }

    thread_local! {
        static REACTOR: RefCell<Option<Reactor>> = const { RefCell::new(None) };
    }

    fn with<R>(f: impl FnOnce(&mut Reactor) -> R) -> Option<R> {
        REACTOR.with(|r| r.borrow_mut().as_mut().map(f))
    }

    /// A socket whose readiness our reactor tracks (edge-triggered, as mio does).
    pub struct Socket(TcpStream);

    impl Socket {
        fn new(s: TcpStream) -> io::Result<Socket> {
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            let fd = s.as_raw_fd();
            let added = with(|r| {
                let i = fd as usize;
                if r.slots.len() <= i {
                    r.slots.resize_with(i + 1, Slot::default);
                }
                r.slots[i] = Slot::default();
                let mut ev = libc::epoll_event {
                    events: IN | OUT | libc::EPOLLET as u32,
                    u64: fd as u64,
                };
                // SAFETY: our epoll fd; `ev` lives across the call.
                unsafe { libc::epoll_ctl(r.ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) }
            });
            if added != Some(0) {
                return Err(io::Error::other("cannot register with the reactor"));
            }
            Ok(Socket(s))
        }

        /// Ready for `want`, or the waker is kept for when it is.
        fn poll_ready(&self, cx: &mut Context<'_>, want: u32) -> Poll<()> {
            let fd = self.0.as_raw_fd() as usize;
            with(|r| match r.slots.get_mut(fd) {
                Some(slot) if slot.ready & (want | BAD) != 0 => Poll::Ready(()),
                Some(slot) => {
                    let w = if want == OUT {
                        &mut slot.writer
                    } else {
                        &mut slot.reader
                    };
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                None => Poll::Ready(()),
            })
            .unwrap_or(Poll::Ready(()))
        }

        fn clear(&self, bits: u32) {
            let fd = self.0.as_raw_fd() as usize;
            with(|r| {
                if let Some(slot) = r.slots.get_mut(fd) {
                    slot.ready &= !bits;
                }
            });
        }
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            let fd = self.0.as_raw_fd();
            with(|r| {
                if let Some(slot) = r.slots.get_mut(fd as usize) {
                    *slot = Slot::default();
                }
                // SAFETY: our epoll fd; the socket is still open.
                unsafe {
                    libc::epoll_ctl(
                        r.ep.as_raw_fd(),
                        libc::EPOLL_CTL_DEL,
                        fd,
                        std::ptr::null_mut(),
                    )
                };
            });
        }
    }

    impl tokio::io::AsyncRead for Socket {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            loop {
                if self.poll_ready(cx, IN).is_pending() {
                    return Poll::Pending;
                }
                let room = buf.initialize_unfilled();
                let len = room.len();
                match (&self.0).read(room) {
                    Ok(n) => {
                        if n < len {
                            // Drained (edge-triggered): the next read waits for a new edge.
                            self.clear(IN);
                        }
                        buf.advance(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.clear(IN),
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
        }
    }

    impl tokio::io::AsyncWrite for Socket {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            loop {
                if self.poll_ready(cx, OUT).is_pending() {
                    return Poll::Pending;
                }
                match (&self.0).write(data) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.clear(OUT),
                    r => return Poll::Ready(r),
                }
            }
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(self.0.shutdown(std::net::Shutdown::Write))
        }
    }

    /// Turns the set: records what is ready and wakes whoever waits for it.
    /// `wake` is the turn's list of wakers, kept empty between turns (no allocation per turn).
    fn turn(events: &mut [libc::epoll_event], wake: &mut Vec<Waker>) -> usize {
        let n = with(|r| {
            // SAFETY: `events` has room for its length.
            let n = unsafe {
                libc::epoll_wait(
                    r.ep.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            let n = usize::try_from(n).unwrap_or(0);
            for ev in &events[..n] {
                let Some(slot) = r.slots.get_mut(ev.u64 as usize) else {
                    continue;
                };
                slot.ready |= ev.events;
                if ev.events & (IN | BAD) != 0 {
                    wake.extend(slot.reader.take());
                }
                if ev.events & (OUT | BAD) != 0 {
                    wake.extend(slot.writer.take());
                }
            }
            n
        })
        .unwrap_or(0);
        for w in wake.drain(..) {
            w.wake();
        }
        n
    }

    pub fn run(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            // SAFETY: plain system call; the fd is owned from here on.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            anyhow::ensure!(ep >= 0, "epoll_create1: {}", io::Error::last_os_error());
            // SAFETY: a new fd, owned by nothing else.
            let ep = unsafe { OwnedFd::from_raw_fd(ep) };
            // SAFETY: the AsyncFd owns the duplicate it registers.
            let set = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    ep.try_clone()?,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| anyhow::anyhow!("registering the epoll set: {e}"))?;
            REACTOR.with(|r| {
                *r.borrow_mut() = Some(Reactor {
                    ep,
                    slots: Vec::new(),
                })
            });
            tokio::spawn(async move {
                let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
                let mut wake = Vec::with_capacity(64);
                loop {
                    let Ok(mut ready) = set.readable().await else {
                        return;
                    };
                    if turn(&mut events, &mut wake) < events.len() {
                        ready.clear_ready();
                    }
                }
            });
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(client) = client.into_std() else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream) else {
                            return;
                        };
                        let (Ok(mut c), Ok(mut s)) = (Socket::new(client), Socket::new(server))
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                    });
                }
            });
            tokio::signal::ctrl_c().await?;
            Ok(())
        })
    }
}

mod epoll {
    use std::io::{ErrorKind, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::{AsRawFd, RawFd};
    use std::sync::atomic::{AtomicBool, Ordering};

    static STOP: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_sigint(_: libc::c_int) {
        STOP.store(true, Ordering::Relaxed);
    }

    /// Both ends of one client's relay, each found by its own fd: a table indexed by fd (fds are
    /// small numbers), as a poll loop of our own would keep it. A SipHash map here cost 416 of
    /// the loop's 647 instructions per transaction.
    struct Pair {
        sock: TcpStream,
        peer: RawFd,
    }

    struct Conns(Vec<Option<Pair>>);

    impl Conns {
        fn get_mut(&mut self, fd: &RawFd) -> Option<&mut Pair> {
            self.0.get_mut(*fd as usize).and_then(Option::as_mut)
        }
        fn remove(&mut self, fd: &RawFd) -> Option<Pair> {
            self.0.get_mut(*fd as usize).and_then(Option::take)
        }
        fn insert(&mut self, fd: RawFd, pair: Pair) {
            let i = fd as usize;
            if self.0.len() <= i {
                self.0.resize_with(i + 1, || None);
            }
            self.0[i] = Some(pair);
        }
    }

    fn add(ep: RawFd, fd: RawFd) -> std::io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `ep` is our epoll fd and `ev` lives across the call.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The loop's state: its epoll set, the listener and the relayed connections.
    struct Loop {
        ep: std::os::fd::OwnedFd,
        listener: TcpListener,
        upstream: SocketAddr,
        conns: Conns,
        events: Vec<libc::epoll_event>,
        buf: Vec<u8>,
    }

    impl Loop {
        fn new(listener: TcpListener, upstream: SocketAddr) -> anyhow::Result<Loop> {
            use std::os::fd::FromRawFd;
            // SAFETY: plain system call.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            anyhow::ensure!(
                ep >= 0,
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a new fd, owned by nothing else.
            let ep = unsafe { std::os::fd::OwnedFd::from_raw_fd(ep) };
            listener.set_nonblocking(true)?;
            add(ep.as_raw_fd(), listener.as_raw_fd())?;
            Ok(Loop {
                ep,
                listener,
                upstream,
                conns: Conns(Vec::new()),
                events: vec![libc::epoll_event { events: 0, u64: 0 }; 64],
                buf: vec![0u8; 64 * 1024],
            })
        }

        /// One `epoll_wait` (`timeout_ms` -1: until something is ready) and everything it
        /// reported; returns how many events.
        fn turn(&mut self, timeout_ms: i32) -> anyhow::Result<usize> {
            let ep = self.ep.as_raw_fd();
            // SAFETY: `events` has room for the 64 events asked for.
            let n = unsafe { libc::epoll_wait(ep, self.events.as_mut_ptr(), 64, timeout_ms) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                    return Ok(0);
                }
                anyhow::bail!("epoll_wait: {}", std::io::Error::last_os_error());
            }
            let n = n as usize;
            let lfd = self.listener.as_raw_fd();
            for i in 0..n {
                let fd = self.events[i].u64 as RawFd;
                if fd == lfd {
                    accept(ep, &self.listener, self.upstream, &mut self.conns)?;
                    continue;
                }
                // Level-triggered: one read per event; whatever is left comes back next turn.
                let Some(pair) = self.conns.get_mut(&fd) else {
                    continue;
                };
                let closed = match pair.sock.read(&mut self.buf) {
                    Ok(0) => true,
                    Ok(len) => {
                        let peer = pair.peer;
                        match self.conns.get_mut(&peer) {
                            Some(other) => write_all(&mut other.sock, &self.buf[..len]).is_err(),
                            None => true,
                        }
                    }
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                };
                if closed {
                    // Dropping both streams closes them, which takes them off the epoll set.
                    if let Some(pair) = self.conns.remove(&fd) {
                        self.conns.remove(&pair.peer);
                    }
                }
            }
            Ok(n)
        }
    }

    pub fn run(listener: TcpListener, upstream: SocketAddr) -> anyhow::Result<()> {
        // SAFETY: the handler only stores to an atomic. Without SA_RESTART epoll_wait returns
        // EINTR on the signal either way (it is never restarted).
        unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
        let mut l = Loop::new(listener, upstream)?;
        while !STOP.load(Ordering::Relaxed) {
            l.turn(-1)?;
        }
        Ok(())
    }

    /// The same loop inside a current-thread tokio runtime: its epoll set is one socket of
    /// tokio's reactor, and one task runs a turn (`epoll_wait` without waiting) each time tokio
    /// says the set is readable. What a poll loop of our own would cost beside tokio, which
    /// would keep the logins, the timers and everything else.
    pub fn nested(listener: TcpListener, upstream: SocketAddr) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        rt.block_on(async move {
            let mut l = Loop::new(listener, upstream)?;
            // SAFETY: the AsyncFd owns the fd it registers (a duplicate of the set's), which
            // stays open as long as it does.
            let set = unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(
                    l.ep.try_clone()?,
                    tokio::io::Interest::READABLE,
                )
            }
            .map_err(|e| anyhow::anyhow!("registering the epoll set: {e}"))?;
            tokio::spawn(async move {
                loop {
                    let Ok(mut ready) = set.readable().await else {
                        return;
                    };
                    match l.turn(0) {
                        // Fewer events than room: the set is drained (tokio's registration is
                        // edge-triggered, and an event after this turn is a new edge).
                        Ok(n) if n < 64 => ready.clear_ready(),
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            });
            tokio::signal::ctrl_c().await?;
            Ok(())
        })
    }

    fn accept(
        ep: RawFd,
        listener: &TcpListener,
        upstream: SocketAddr,
        conns: &mut Conns,
    ) -> anyhow::Result<()> {
        loop {
            let client = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            // A blocking connect at accept time: a loopback login, the same in the short and
            // the long run, so it cancels out of the per-transaction figure.
            let server = TcpStream::connect(upstream)?;
            for s in [&client, &server] {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
            }
            let (cfd, sfd) = (client.as_raw_fd(), server.as_raw_fd());
            add(ep, cfd)?;
            add(ep, sfd)?;
            conns.insert(
                cfd,
                Pair {
                    sock: client,
                    peer: sfd,
                },
            );
            conns.insert(
                sfd,
                Pair {
                    sock: server,
                    peer: cfd,
                },
            );
        }
    }

    /// Writes everything, waiting for room if the socket is full (never, for pgbench's replies).
    fn write_all(sock: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            match sock.write(data) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let mut pfd = libc::pollfd {
                        fd: sock.as_raw_fd(),
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one pollfd, alive across the call.
                    unsafe { libc::poll(&mut pfd, 1, 1000) };
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

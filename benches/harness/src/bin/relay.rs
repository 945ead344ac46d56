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
//! - `epoll`: one thread, level-triggered `epoll` and plain `read`/`write`, no runtime (the
//!   shape of a hand-written poll loop, like PgBouncer's libevent loop).
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
        "epoll" => epoll::run(TcpListener::bind(listen)?, upstream),
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

    pub fn run(listener: TcpListener, upstream: SocketAddr) -> anyhow::Result<()> {
        // SAFETY: the handler only stores to an atomic. Without SA_RESTART epoll_wait returns
        // EINTR on the signal either way (it is never restarted).
        unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
        // SAFETY: plain system call; the fd is closed at exit.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        anyhow::ensure!(
            ep >= 0,
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        );
        listener.set_nonblocking(true)?;
        let lfd = listener.as_raw_fd();
        add(ep, lfd)?;
        let mut conns = Conns(Vec::new());
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut buf = vec![0u8; 64 * 1024];
        while !STOP.load(Ordering::Relaxed) {
            // SAFETY: `events` has room for the 64 events asked for.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 64, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                    continue;
                }
                anyhow::bail!("epoll_wait: {}", std::io::Error::last_os_error());
            }
            for ev in events.iter().take(n as usize) {
                let fd = ev.u64 as RawFd;
                if fd == lfd {
                    accept(ep, &listener, upstream, &mut conns)?;
                    continue;
                }
                // Level-triggered: one read per event; whatever is left comes back next turn.
                let Some(pair) = conns.get_mut(&fd) else {
                    continue;
                };
                let closed = match pair.sock.read(&mut buf) {
                    Ok(0) => true,
                    Ok(len) => {
                        let peer = pair.peer;
                        match conns.get_mut(&peer) {
                            Some(other) => write_all(&mut other.sock, &buf[..len]).is_err(),
                            None => true,
                        }
                    }
                    Err(e) => e.kind() != ErrorKind::WouldBlock,
                };
                if closed {
                    // Dropping both streams closes them, which takes them off the epoll set.
                    if let Some(pair) = conns.remove(&fd) {
                        conns.remove(&pair.peer);
                    }
                }
            }
        }
        // SAFETY: ours, closed once.
        unsafe { libc::close(ep) };
        Ok(())
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

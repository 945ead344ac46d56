//! Clients are served on a runtime per core: one thread each, every client's task and the
//! server connections it uses on one thread, so a transaction's wake-ups never cross threads
//! (tokio's work-stealing scheduler spent about 1 900 of some 11 700 instructions per
//! transaction handing tasks and wake-ups between its workers; see benches/README.md).
//! Each shard accepts clients itself, on its own duplicate of every listening socket (see
//! `accept_loop`); maintenance, health checks, metrics and the fleet run on the control runtime.
//! A shard's runtime has I/O but no time driver: its timers go in the control runtime's wheel
//! (`upstream::timer`), so parking a shard costs an `epoll_wait` and nothing more.
//!
//! A socket belongs to the runtime whose reactor it is registered with; `upstream::home` says
//! which, and server connections move to the runtime of the client they serve.

use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

struct Shard {
    handle: Handle,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

pub struct Shards {
    shards: Vec<Shard>,
}

impl Shards {
    /// `n` threads (at least one), each running a current-thread runtime until [`Shards::stop`].
    /// Their timers go in `control`'s wheel: a shard's runtime has no time driver (see
    /// `upstream::timer`), and `control` must outlive the shards.
    pub fn start(n: usize, control: &Handle) -> std::io::Result<Shards> {
        let mut shards = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let id = u16::try_from(i).unwrap_or(upstream::home::NONE - 1);
            let control = control.clone();
            let thread = std::thread::Builder::new()
                .name(format!("breakwater-{i}"))
                .spawn(move || {
                    upstream::home::set_this_thread(id);
                    upstream::timer::use_control_runtime(control);
                    // Drives every task spawned here until told to stop; by then the accept
                    // loops that own client tasks have ended them.
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    // Tasks left (a pool's role checks, a server's close) end with the runtime.
                    rt.shutdown_timeout(std::time::Duration::from_secs(1));
                })?;
            shards.push(Shard {
                handle,
                stop,
                thread,
            });
        }
        Ok(Shards { shards })
    }

    /// Every shard's runtime (`start` makes at least one).
    pub fn handles(&self) -> impl Iterator<Item = &Handle> {
        self.shards.iter().map(|s| &s.handle)
    }

    /// Ends every shard's runtime and waits for the threads.
    pub fn stop(self) {
        let mut threads = Vec::with_capacity(self.shards.len());
        for s in self.shards {
            let _ = s.stop.send(());
            threads.push(s.thread);
        }
        for t in threads {
            let _ = t.join();
        }
    }
}

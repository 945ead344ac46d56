//! Idle clients without a task of their own.
//!
//! A logged-in client that sends nothing still costs a tokio task (256 bytes: tokio's tasks
//! are cache-padded) and its socket's registration with the reactor (256 more), a third of
//! what an idle client holds. A sidecar in front of application servers with large client-side
//! pools holds thousands of such clients. So a client idle for a while is *parked*: its
//! session leaves its task, its socket leaves tokio's reactor for this shard's own epoll set,
//! and the session waits in the shard's park (one task per shard) until its socket becomes
//! readable (a query, a Terminate, a close, a KILL's shutdown) or Breakwater shuts down. Then
//! its socket goes back to the reactor and a new task resumes the session where it stopped.
//!
//! Who parks: a sweep (from the control runtime's maintenance, every [`SWEEP`]) marks each idle
//! client, and asks one still idle and unmarked-by-change at the next sweep to park, so a
//! client parks after one to two periods of silence; a client that is active at all never
//! pays for parking. A session that cannot park (TLS, whose state tokio-rustls keeps around
//! the registered socket; `client_idle_timeout` on, whose timer needs a task; LISTEN) says so
//! and is not asked again in that idle period.
//!
//! Parking costs two `epoll_ctl`s and a resume a few more plus a task spawn: a client that
//! comes back after a second of silence pays some microseconds once.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use stats::PoolStats;
use tokio::io::unix::AsyncFd;
use tracing::Instrument;

use crate::session::Session;
use crate::Shared;

/// How often the sweep looks at idle clients: a client parks after one to two of these.
pub(crate) const SWEEP: Duration = Duration::from_secs(1);

/// Events taken from the epoll set per call.
const BATCH: usize = 256;

/// One shard's parked sessions and the epoll set that watches their sockets.
pub(crate) struct Park {
    /// The epoll set, for adding and removing sockets (a second handle on what the park's
    /// task waits on).
    registry: mio::Registry,
    parked: Mutex<Parked>,
}

#[derive(Default)]
struct Parked {
    /// By the epoll token; a freed place is reused (`free`).
    sessions: Vec<Option<Box<Session>>>,
    free: Vec<usize>,
    /// The park's task, which shutdown wakes through each parked client's slot.
    waker: Option<Waker>,
    /// The task ended (shutdown): nothing may park any more.
    closed: bool,
}

impl Park {
    fn lock(&self) -> MutexGuard<'_, Parked> {
        self.parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Parks `session` in this shard's park (starting it the first time). Gives the session
/// back when it cannot be parked: not on a shard, shutting down, or its socket cannot leave
/// the reactor (TLS); the caller then goes on waiting in its task.
pub(crate) fn park(shared: &Arc<Shared>, mut session: Box<Session>) -> Result<(), Box<Session>> {
    let home = upstream::home::here();
    if home == upstream::home::NONE || shared.shutting_down.load(Ordering::SeqCst) {
        return Err(session);
    }
    let Some(park) = shared.park_of(home) else {
        return Err(session);
    };
    if session.client_stream_mut().detach().is_err() {
        // TLS (unchanged), or a socket tokio could not let go of (now closed, which the
        // session's next read finds).
        return Err(session);
    }
    let Some(fd) = session.client_stream_mut().detached_fd() else {
        return Err(session);
    };
    let mut parked = park.lock();
    if parked.closed {
        drop(parked);
        return Err(reattached(session));
    }
    let token = match parked.free.pop() {
        Some(t) => t,
        None => {
            parked.sessions.push(None);
            parked.sessions.len() - 1
        }
    };
    if let Err(e) = park
        .registry
        .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
    {
        parked.free.push(token);
        drop(parked);
        tracing::warn!("could not park an idle client ({e}); it keeps its task");
        return Err(reattached(session));
    }
    // The ending task's waker, left in the slot, would keep its 256 bytes alive.
    session.forget_task_waker();
    PoolStats::gauge(&shared.stats.clients_parked, 1);
    if let Some(place) = parked.sessions.get_mut(token) {
        *place = Some(session);
    }
    drop(parked);
    tracing::debug!(token, fd, "client parked");
    // A shutdown that began since the check above has woken the park already, or will find
    // this session there.
    Ok(())
}

/// A session whose socket could not be parked, back on the reactor (or with its socket
/// closed, which its next read finds).
fn reattached(mut session: Box<Session>) -> Box<Session> {
    let _ = session.client_stream_mut().attach();
    session
}

impl Park {
    /// A new, empty park for the calling thread's shard, and its task, spawned on this
    /// runtime; it ends at shutdown, once every parked session has been resumed.
    pub(crate) fn start(shared: &Arc<Shared>) -> std::io::Result<Arc<Park>> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the descriptor is the epoll set's, which `poll` owns and closes when dropped,
        // and `poll` is owned by the AsyncFd for as long as it is registered.
        let epoll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let park = Arc::new(Park {
            registry,
            parked: Mutex::new(Parked::default()),
        });
        tokio::spawn(run(park.clone(), shared.clone(), epoll));
        Ok(park)
    }

    /// Wakes the park's task (shutdown: see `Proxy::begin_shutdown`).
    pub(crate) fn wake(&self) {
        if let Some(w) = &self.lock().waker {
            w.wake_by_ref();
        }
    }

    /// Takes the session parked under `token` out of the epoll set and resumes it in a task
    /// of its own.
    fn resume(&self, shared: &Shared, token: usize) {
        let mut parked = self.lock();
        let Some(mut session) = parked.sessions.get_mut(token).and_then(Option::take) else {
            return;
        };
        parked.free.push(token);
        drop(parked);
        if let Some(fd) = session.client_stream_mut().detached_fd() {
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
        PoolStats::gauge(&shared.stats.clients_parked, -1);
        // On an error the socket is closed; the resumed session's first read says so and it
        // ends as for any client gone.
        let _ = session.client_stream_mut().attach();
        let span = session.span();
        tokio::spawn(
            async move {
                if let Some(s) = session.resume().await {
                    drop(s);
                }
            }
            .instrument(span),
        );
    }

    /// Resumes every parked session (shutdown: each then tells its client) and refuses more.
    fn resume_all(&self, shared: &Shared) {
        let tokens: Vec<usize> = {
            let mut parked = self.lock();
            parked.closed = true;
            (0..parked.sessions.len())
                .filter(|&t| matches!(parked.sessions.get(t), Some(Some(_))))
                .collect()
        };
        for t in tokens {
            self.resume(shared, t);
        }
    }
}

/// The park's task: resumes sessions whose sockets became readable, and all of them at
/// shutdown.
async fn run(park: Arc<Park>, shared: Arc<Shared>, mut epoll: AsyncFd<mio::Poll>) {
    let mut events = Events::with_capacity(BATCH);
    loop {
        let ready = std::future::poll_fn(|cx| {
            {
                let mut parked = park.lock();
                let same = parked
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()));
                if !same {
                    parked.waker = Some(cx.waker().clone());
                }
            }
            if shared.shutting_down.load(Ordering::SeqCst) {
                return Poll::Ready(None);
            }
            // The guard is dropped uncleared: readiness stays for `readable_mut` below.
            epoll.poll_read_ready(cx).map(|r| Some(r.map(drop)))
        })
        .await;
        let ready = match ready {
            Some(Ok(())) => epoll.readable_mut().await,
            Some(Err(e)) => Err(e),
            None => {
                park.resume_all(&shared);
                return;
            }
        };
        let mut guard = match ready {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!("the idle clients' epoll set failed ({e}); resuming them all");
                park.resume_all(&shared);
                return;
            }
        };
        // Edge-triggered: take every event before waiting again.
        loop {
            events.clear();
            if let Err(e) = guard
                .get_inner_mut()
                .poll(&mut events, Some(Duration::ZERO))
            {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("the idle clients' epoll set failed ({e}); resuming them all");
                drop(guard);
                park.resume_all(&shared);
                return;
            }
            for ev in &events {
                tracing::debug!(token = ev.token().0, "parked client readable");
                park.resume(&shared, ev.token().0);
            }
            if events.iter().count() < BATCH {
                guard.clear_ready();
                break;
            }
        }
    }
}

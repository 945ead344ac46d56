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
//! the registered socket; LISTEN) says so and is not asked again in that idle period. A parked
//! client's `client_idle_timeout` is kept by the park: one timer per shard, for the earliest
//! deadline, resumes an expired client to be told why it is closed.
//!
//! Parking costs two `epoll_ctl`s and a resume a few more plus a task spawn: a client that
//! comes back after a second of silence pays some microseconds once.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use stats::PoolStats;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
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
    parked: Mutex<Parked<Box<Session>>>,
}

/// The parked items of one park (sessions; anything in the unit tests) by epoll token, with
/// their deadlines. No I/O: the park's task and `park` call it under the park's lock.
struct Parked<T> {
    /// By the epoll token; a freed place is reused (`free`).
    places: Vec<Place<T>>,
    free: Vec<usize>,
    /// client_idle_timeout deadlines of parked items, earliest first, with the token and the
    /// place's generation when it was parked (an entry whose item has left since is skipped
    /// when it comes up).
    deadlines: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    /// The park's task, which shutdown (see `Proxy::begin_shutdown`) and an earlier deadline
    /// wake.
    waker: Option<Waker>,
    /// The task ended (shutdown): nothing may park any more.
    closed: bool,
}

struct Place<T> {
    item: Option<T>,
    /// Counts the items this place has held.
    generation: u32,
}

impl<T> Default for Parked<T> {
    fn default() -> Self {
        Parked {
            places: Vec::new(),
            free: Vec::new(),
            deadlines: BinaryHeap::new(),
            waker: None,
            closed: false,
        }
    }
}

impl<T> Parked<T> {
    /// A token for the next item: its place in the epoll set before it is [`Parked::put`].
    fn reserve(&mut self) -> usize {
        match self.free.pop() {
            Some(t) => t,
            None => {
                self.places.push(Place {
                    item: None,
                    generation: 0,
                });
                self.places.len() - 1
            }
        }
    }

    /// Gives back a token [`Parked::reserve`]d and not used.
    fn unreserve(&mut self, token: usize) {
        self.free.push(token);
    }

    /// Parks `item` under a reserved token; returns whether `deadline` is now the earliest
    /// (the park's timer must be set again).
    fn put(&mut self, token: usize, item: T, deadline: Option<Instant>) -> bool {
        let Some(place) = self.places.get_mut(token) else {
            return false;
        };
        place.generation = place.generation.wrapping_add(1);
        let generation = place.generation;
        place.item = Some(item);
        let Some(at) = deadline else {
            return false;
        };
        let earlier = self.earliest().is_none_or(|e| at < e);
        self.deadlines.push(Reverse((at, token, generation)));
        self.prune();
        earlier
    }

    /// Takes the item parked under `token`, freeing the token.
    fn take(&mut self, token: usize) -> Option<T> {
        let item = self.places.get_mut(token)?.item.take()?;
        self.free.push(token);
        Some(item)
    }

    /// Tokens of every parked item.
    fn tokens(&self) -> Vec<usize> {
        (0..self.places.len())
            .filter(|&t| self.is_live(t, None))
            .collect()
    }

    fn is_live(&self, token: usize, generation: Option<u32>) -> bool {
        self.places
            .get(token)
            .is_some_and(|p| p.item.is_some() && generation.is_none_or(|g| g == p.generation))
    }

    /// Deadlines of items gone are left in the heap until they come up; a heap grown well
    /// past the parked items (many short parks under a long timeout) is rebuilt.
    fn prune(&mut self) {
        if self.deadlines.len() <= 2 * (self.places.len() - self.free.len()) + 64 {
            return;
        }
        let places = &self.places;
        self.deadlines.retain(|Reverse((_, token, generation))| {
            places
                .get(*token)
                .is_some_and(|p| p.item.is_some() && p.generation == *generation)
        });
    }

    /// The earliest deadline of an item still parked, dropping those of items gone.
    fn earliest(&mut self) -> Option<Instant> {
        while let Some(Reverse((at, token, generation))) = self.deadlines.peek().copied() {
            if self.is_live(token, Some(generation)) {
                return Some(at);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Tokens of parked items whose deadline is `now` or past.
    fn expired(&mut self, now: Instant) -> Vec<usize> {
        let mut out = Vec::new();
        while let Some(at) = self.earliest() {
            if at > now {
                break;
            }
            if let Some(Reverse((_, token, _))) = self.deadlines.pop() {
                out.push(token);
            }
        }
        out
    }
}

impl Park {
    fn lock(&self) -> MutexGuard<'_, Parked<Box<Session>>> {
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
    let token = parked.reserve();
    if let Err(e) = park
        .registry
        .register(&mut SourceFd(&fd), Token(token), Interest::READABLE)
    {
        parked.unreserve(token);
        drop(parked);
        tracing::warn!("could not park an idle client ({e}); it keeps its task");
        return Err(reattached(session));
    }
    // The ending task's waker, left in the slot (and in the idle timer, which the park's
    // own timer replaces), would keep its 256 bytes alive.
    session.forget_task_waker();
    let deadline = session.take_idle_deadline();
    PoolStats::gauge(&shared.stats.clients_parked, 1);
    if parked.put(token, session, deadline) {
        // The park's timer is set for a later deadline, or none.
        if let Some(w) = &parked.waker {
            w.wake_by_ref();
        }
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
    /// of its own; `expired`: its client_idle_timeout has, and it is to say so and end.
    fn resume(&self, shared: &Shared, token: usize, expired: bool) {
        let mut parked = self.lock();
        let Some(mut session) = parked.take(token) else {
            return;
        };
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
                if let Some(s) = session.resume(expired).await {
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
            parked.tokens()
        };
        for t in tokens {
            self.resume(shared, t, false);
        }
    }
}

/// What woke the park's task.
enum Wake {
    ShuttingDown,
    Readable(std::io::Result<()>),
    Deadline,
}

/// The park's task: resumes sessions whose sockets became readable or whose idle timeout
/// expired, and all of them at shutdown.
async fn run(park: Arc<Park>, shared: Arc<Shared>, mut epoll: AsyncFd<mio::Poll>) {
    let mut events = Events::with_capacity(BATCH);
    // Set for the earliest deadline of a parked session, if any (far off otherwise).
    let far = || Instant::now() + Duration::from_secs(86_400 * 365);
    let mut timer = Box::pin(upstream::timer::sleep_until(far()));
    loop {
        let wake = std::future::poll_fn(|cx| {
            let earliest = {
                let mut parked = park.lock();
                let same = parked
                    .waker
                    .as_ref()
                    .is_some_and(|w| w.will_wake(cx.waker()));
                if !same {
                    parked.waker = Some(cx.waker().clone());
                }
                parked.earliest()
            };
            if shared.shutting_down.load(Ordering::SeqCst) {
                return Poll::Ready(Wake::ShuttingDown);
            }
            let at = earliest.unwrap_or_else(far);
            if earliest.is_some() && at != timer.deadline() {
                timer.as_mut().reset(at);
            }
            if earliest.is_some() && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Deadline);
            }
            // The guard is dropped uncleared: readiness stays for `readable_mut` below.
            epoll
                .poll_read_ready(cx)
                .map(|r| Wake::Readable(r.map(drop)))
        })
        .await;
        let ready = match wake {
            Wake::ShuttingDown => {
                park.resume_all(&shared);
                return;
            }
            Wake::Deadline => {
                let expired = park.lock().expired(Instant::now());
                for token in expired {
                    park.resume(&shared, token, true);
                }
                continue;
            }
            Wake::Readable(Ok(())) => epoll.readable_mut().await,
            Wake::Readable(Err(e)) => Err(e),
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
                park.resume(&shared, ev.token().0, false);
            }
            if events.iter().count() < BATCH {
                guard.clear_ready();
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, secs: u64) -> Option<Instant> {
        Some(base + Duration::from_secs(secs))
    }

    #[test]
    fn tokens_are_reused_and_an_item_comes_back_once() {
        let mut p = Parked::<&str>::default();
        let a = p.reserve();
        let b = p.reserve();
        assert_ne!(a, b);
        p.put(a, "a", None);
        p.put(b, "b", None);
        assert_eq!(p.tokens(), [a, b]);
        assert_eq!(p.take(a), Some("a"));
        assert_eq!(p.take(a), None, "taken once");
        assert_eq!(p.tokens(), [b]);
        assert_eq!(p.reserve(), a, "a freed token is reused");
        // A reservation not used goes back as it came.
        p.unreserve(a);
        assert_eq!(p.reserve(), a);
    }

    #[test]
    fn deadlines_come_up_in_order_and_only_for_items_still_parked() {
        let base = Instant::now();
        let mut p = Parked::<u32>::default();
        let (a, b, c) = (p.reserve(), p.reserve(), p.reserve());
        assert!(
            p.put(a, 1, at(base, 30)),
            "the first deadline is the earliest"
        );
        assert!(p.put(b, 2, at(base, 10)), "an earlier one is");
        assert!(!p.put(c, 3, at(base, 20)), "a later one is not");
        assert_eq!(p.earliest(), at(base, 10));
        // b leaves (its client spoke) and its place is reused by a client parked later
        // with a later deadline: b's old deadline must not expire the newcomer.
        assert_eq!(p.take(b), Some(2));
        let d = p.reserve();
        assert_eq!(d, b);
        p.put(d, 4, at(base, 40));
        assert_eq!(p.earliest(), at(base, 20), "b's deadline is gone with it");
        assert_eq!(p.expired(base + Duration::from_secs(25)), [c]);
        assert_eq!(
            p.expired(base + Duration::from_secs(25)),
            Vec::<usize>::new()
        );
        assert_eq!(p.expired(base + Duration::from_secs(40)), [a, d]);
        assert_eq!(p.earliest(), None);
        // Expired items are still parked until the task takes them.
        assert_eq!(p.take(a), Some(1));
    }

    #[test]
    fn the_deadline_heap_stays_near_the_number_of_parked_items() {
        let base = Instant::now();
        let mut p = Parked::<u32>::default();
        // One client parks and speaks again a thousand times under a long timeout.
        for i in 0..1000u32 {
            let t = p.reserve();
            p.put(t, i, at(base, 3600 + u64::from(i)));
            assert_eq!(p.take(t), Some(i));
        }
        assert!(
            p.deadlines.len() <= 65,
            "{} deadlines kept",
            p.deadlines.len()
        );
        assert_eq!(p.earliest(), None);
    }
}

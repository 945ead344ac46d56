//! A pool's bookkeeping, without I/O: how many connections exist, which of them are idle, and
//! whose turn it is to get one.
//!
//! A checkout first waits for a *turn*, then takes the most recently returned idle connection
//! or, when none is idle, room to open a new one. The turn stays with the connection until it
//! is given back or closed. There are as many turns as connections may exist (`max_size`), so a
//! turn holder finds either an idle connection or room, never neither (see [`Turn::take`]).
//!
//! Turns are handed out fairly: checkouts that have to wait queue by [`Source`] (the client's
//! address), first come first served within a source and round robin between sources, so one
//! noisy source with hundreds of clients waiting cannot take every turn from one with a few.
//! A free turn with nobody waiting is taken with one atomic operation and no lock; the queue's
//! map and lists are touched only by checkouts that wait and by turns given back while someone
//! does.
//!
//! Within a source's line, a turn given back on one runtime (see `crate::home`) goes to the
//! oldest waiter of that runtime rather than to an older one elsewhere, a bounded number of
//! times ([`MAX_PASSES`]): waking a task on another thread, and moving the server's socket to
//! that thread, cost more than the transaction's own work in user space (benches/README.md).
//!
//! This replaced deadpool's managed pool on the hot path: its checkout and return cost about
//! 1 700 instructions per transaction (hooks, metrics, timeouts, object wrappers), this one an
//! atomic decrement and one short lock each way (numbers in benches/README.md).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// How many times the waiter at the front of a line may be passed over for a younger one of the
/// runtime that gave the turn back, before it is served anyway. Bounds the unfairness: every
/// waiter is served within `MAX_PASSES` turns of reaching the front of its line.
///
/// Why 64 and not fewer: on a machine whose cores pgbench and PostgreSQL share with the pooler,
/// one runtime's thread often runs a burst of releases while the other's is not scheduled, and
/// its waiter at the front, passed 16 times, was handed a server its thread could not use
/// before it ran again, at the price of moving the socket. At 256 clients on a pool of 16 that
/// 0.03 – 0.12 moves per transaction, as many each way (a `fcntl`, two `epoll_ctl`, a `close`
/// and a cross-thread wake-up each); with 64, 0.00 in the same runs (benches/README.md, "The
/// waiting checkout").
pub(crate) const MAX_PASSES: u8 = 64;

/// How far into a line a turn looks for a waiter of its own runtime: twice `MAX_PASSES`, so a
/// line of two runtimes' waiters interleaved rarely hides one.
const SCAN: usize = 128;

/// The pool was closed: no more turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

/// Why [`Slots::try_turn`] found no turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoTurn {
    /// Every turn is out (or promised to a checkout that waits).
    Busy,
    Closed,
}

/// Whose checkout it is, for sharing turns fairly: the client's source address (the caller
/// decides how addresses are grouped, e.g. IPv6 by /64), or `None` for clients on a Unix
/// socket and the pool's own work, which share one place in the rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Source(pub Option<IpAddr>);

/// An idle connection and when it went idle.
#[derive(Debug)]
pub(crate) struct Idle<T> {
    pub item: T,
    pub since: Instant,
}

/// What a turn found.
#[derive(Debug)]
pub(crate) enum Taken<T> {
    /// The most recently returned idle connection.
    Idle(Idle<T>),
    /// Room for one more connection: counted already; call [`Slots::gone`] if opening it fails.
    Room,
    /// The pool shrank while this turn was held and owed one turn back: this one paid it.
    /// Wait for another.
    Shrunk,
}

#[derive(Debug)]
struct State<T> {
    /// Most recently returned last (LIFO: the warmest goes out first, the rest age out).
    idle: Vec<Idle<T>>,
    /// Open connections, idle or checked out, and ones being opened.
    size: usize,
    max_size: usize,
    /// Turns to retire as they come back, after a shrink found them checked out.
    owed: usize,
    closed: bool,
    queue: Queue,
}

/// Checkouts waiting for a turn: one FIFO line per source, served round robin.
///
/// Invariant (kept under the state lock): while anyone waits, no turn is free — a turn given
/// back goes straight to the next waiter, and a checkout queues only after finding none free.
///
/// Lines and waiters live in vectors reused as they come and go, found by index: the source is
/// hashed once per checkout that has to wait (to find its line), and handing a turn on hashes
/// nothing and allocates nothing.
#[derive(Debug, Default)]
struct Queue {
    /// Numbers waiters in arrival order, so each line is sorted by it.
    next_seq: u64,
    /// The line of each source that has waiters. foldhash, seeded per process, rather than
    /// SipHash: a key is an address the client cannot choose freely, and SipHash was about
    /// 360 instructions of every checkout that waits.
    by_source: HashMap<Source, usize, foldhash::fast::RandomState>,
    /// Lines by index; an empty one is unused (listed in `free_lines`), its buffer kept.
    lines: Vec<Line>,
    free_lines: Vec<usize>,
    /// The lines with waiters, in the order they are served next.
    ring: VecDeque<usize>,
    /// Waiters by index, until their futures end (granted or not); `None` is unused.
    waiters: Vec<Option<Waiter>>,
    free_waiters: Vec<usize>,
}

#[derive(Debug)]
struct Line {
    source: Source,
    /// Oldest first: (seq, waiter index, the waiter's runtime). The runtime is copied here so
    /// that a turn looking for a waiter of its own runtime scans one array (see `pick`).
    tickets: VecDeque<(u64, usize, u16)>,
}

#[derive(Debug)]
struct Waiter {
    seq: u64,
    line: usize,
    /// Times it was passed over, at the front of its line, for a waiter at the turn's home.
    passed: u8,
    /// Taken when the turn is handed to it.
    waker: Option<Waker>,
    /// A turn was handed to it and is its to take at its next poll.
    granted: bool,
}

/// A queued checkout's place: its waiter's index and sequence number.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    index: usize,
    seq: u64,
}

impl Queue {
    fn join(&mut self, source: Source, home: u16, waker: Waker) -> Ticket {
        let seq = self.next_seq;
        self.next_seq += 1;
        let line = match self.by_source.get(&source) {
            Some(&l) => l,
            None => {
                let l = match self.free_lines.pop() {
                    Some(l) => {
                        if let Some(line) = self.lines.get_mut(l) {
                            line.source = source;
                        }
                        l
                    }
                    None => {
                        self.lines.push(Line {
                            source,
                            tickets: VecDeque::new(),
                        });
                        self.lines.len() - 1
                    }
                };
                self.by_source.insert(source, l);
                self.ring.push_back(l);
                l
            }
        };
        let waiter = Some(Waiter {
            seq,
            line,
            passed: 0,
            waker: Some(waker),
            granted: false,
        });
        let index = match self.free_waiters.pop() {
            Some(i) => {
                if let Some(slot) = self.waiters.get_mut(i) {
                    *slot = waiter;
                }
                i
            }
            None => {
                self.waiters.push(waiter);
                self.waiters.len() - 1
            }
        };
        if let Some(l) = self.lines.get_mut(line) {
            l.tickets.push_back((seq, index, home));
        }
        Ticket { index, seq }
    }

    fn waiter(&mut self, t: Ticket) -> Option<&mut Waiter> {
        self.waiters
            .get_mut(t.index)?
            .as_mut()
            .filter(|w| w.seq == t.seq)
    }

    /// Hands a turn given back at `near` (a runtime, see `crate::home`) to the next waiter in
    /// the rotation: the line at the front of the ring gives up its oldest ticket, or the
    /// oldest of `near`'s within the first few while its oldest has been passed over fewer than
    /// [`MAX_PASSES`] times, and goes to the back. The waker goes in `wake` (woken outside the
    /// lock). Returns `false` when nobody waits for a turn.
    fn grant(&mut self, wake: &mut Wake, near: u16) -> bool {
        while let Some(l) = self.ring.pop_front() {
            let at = self.pick(l, near);
            let Some(line) = self.lines.get_mut(l) else {
                continue;
            };
            let ticket = line.tickets.remove(at);
            if line.tickets.is_empty() {
                let source = line.source;
                self.free_line(l, source);
            } else {
                self.ring.push_back(l);
            }
            let Some((seq, index, _)) = ticket else {
                continue;
            };
            if let Some(w) = self.waiter(Ticket { index, seq }) {
                w.granted = true;
                if let Some(waker) = w.waker.take() {
                    wake.push(waker);
                }
                return true;
            }
        }
        false
    }

    /// Which of line `l`'s tickets a turn given back at `near` goes to (see [`Queue::grant`]).
    /// Passing over the oldest counts against it.
    fn pick(&mut self, l: usize, near: u16) -> usize {
        let Some(line) = self.lines.get(l) else {
            return 0;
        };
        let Some(&(seq, index, front_home)) = line.tickets.front() else {
            return 0;
        };
        if front_home == near || near == crate::home::NONE {
            return 0;
        }
        let Some(front) = self
            .waiters
            .get_mut(index)
            .and_then(Option::as_mut)
            .filter(|w| w.seq == seq)
        else {
            return 0;
        };
        if front.passed >= MAX_PASSES {
            return 0;
        }
        let Some(at) = line
            .tickets
            .iter()
            .take(SCAN)
            .position(|&(_, _, h)| h == near)
        else {
            return 0;
        };
        front.passed += 1;
        at
    }

    /// A waiter's future ended. Returns whether it had been granted a turn it did not take.
    fn leave(&mut self, t: Ticket) -> bool {
        if self.waiter(t).is_none() {
            return false;
        }
        let Some(w) = self.take_waiter(t.index) else {
            return false;
        };
        if w.granted {
            return true;
        }
        if let Some(line) = self.lines.get_mut(w.line) {
            if let Ok(i) = line
                .tickets
                .binary_search_by_key(&t.seq, |&(seq, _, _)| seq)
            {
                line.tickets.remove(i);
            }
            if line.tickets.is_empty() {
                let source = line.source;
                self.free_line(w.line, source);
                self.ring.retain(|&l| l != w.line);
            }
        }
        false
    }

    /// Frees a waiter's slot; returns what it held.
    fn take_waiter(&mut self, index: usize) -> Option<Waiter> {
        let w = self.waiters.get_mut(index)?.take();
        if w.is_some() {
            self.free_waiters.push(index);
        }
        w
    }

    fn free_line(&mut self, l: usize, source: Source) {
        self.by_source.remove(&source);
        self.free_lines.push(l);
    }

    /// Checkouts whose futures have not ended, granted or not.
    fn len(&self) -> usize {
        self.waiters.len() - self.free_waiters.len()
    }
}

#[derive(Debug)]
pub(crate) struct Slots<T> {
    /// Turns nobody holds. Taken without the lock (the fast path); added to only under the
    /// state lock, and only while nobody waits, so a turn given back cannot slip past a
    /// checkout that queued for it.
    free: AtomicUsize,
    state: Mutex<State<T>>,
}

/// A turn held by a checkout. Dropped, it goes back to the queue; [`Turn::keep`] hands it to a
/// checked-out connection instead, which gives it back through [`Slots::give_back`] or
/// [`Slots::remove`].
#[derive(Debug)]
pub(crate) struct Turn<'a, T> {
    slots: &'a Slots<T>,
    held: bool,
}

impl<T> Turn<'_, T> {
    /// An idle connection, room for a new one, or (only after a shrink) nothing.
    /// Of the idle connections, the most recently returned one `prefer` likes goes first, else
    /// the most recently returned one.
    pub(crate) fn take(&mut self, prefer: impl Fn(&T) -> bool) -> Taken<T> {
        let mut s = self.slots.state();
        if let Some(at) = s.idle.iter().rposition(|i| prefer(&i.item)) {
            return Taken::Idle(s.idle.remove(at));
        }
        if let Some(idle) = s.idle.pop() {
            return Taken::Idle(idle);
        }
        // Turns in circulation are `max_size + owed`, one per checkout in progress, and every
        // connection not idle belongs to one. With none idle and nothing owed, this turn's
        // connection is missing: there is room.
        if s.owed > 0 && s.size >= s.max_size {
            s.owed -= 1;
            self.held = false;
            return Taken::Shrunk;
        }
        s.size += 1;
        Taken::Room
    }

    /// The checkout got its connection: the turn now goes with it.
    pub(crate) fn keep(mut self) {
        self.held = false;
    }
}

impl<T> Drop for Turn<'_, T> {
    fn drop(&mut self) {
        if self.held {
            self.slots.release_turns(1);
        }
    }
}

/// Sizes and queue length, for SHOW POOLS and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status {
    pub max_size: usize,
    pub size: usize,
    pub idle: usize,
    pub waiting: usize,
}

/// A checkout waiting in the queue for its turn; see [`Slots::turn`]. Dropped before it is
/// served, it leaves the line, and a turn it was granted but never took goes to the next.
pub(crate) struct TurnWait<'a, T> {
    slots: &'a Slots<T>,
    source: Source,
    /// The runtime the checkout runs on.
    home: u16,
    /// Its place in line once it has one.
    ticket: Option<Ticket>,
}

impl<'a, T> Future for TurnWait<'a, T> {
    type Output = Result<Turn<'a, T>, Closed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slots = self.slots;
        let served = || Turn { slots, held: true };
        // The fast path: a free turn (so nobody waits), taken without the lock.
        if self.ticket.is_none() && slots.take_free() {
            return Poll::Ready(Ok(served()));
        }
        let mut s = slots.state();
        if s.closed {
            if let Some(t) = self.ticket.take() {
                s.queue.leave(t);
            }
            return Poll::Ready(Err(Closed));
        }
        match self.ticket {
            None => {
                // Again under the lock, so a turn given back meanwhile is either seen here or
                // granted to this checkout once it is in line (see `Queue`).
                if slots.take_free() {
                    return Poll::Ready(Ok(served()));
                }
                let (source, home) = (self.source, self.home);
                self.ticket = Some(s.queue.join(source, home, cx.waker().clone()));
                Poll::Pending
            }
            Some(t) => match s.queue.waiter(t) {
                Some(w) if w.granted => {
                    s.queue.take_waiter(t.index);
                    self.ticket = None;
                    Poll::Ready(Ok(served()))
                }
                Some(w) => {
                    match &mut w.waker {
                        Some(old) if old.will_wake(cx.waker()) => {}
                        other => *other = Some(cx.waker().clone()),
                    }
                    Poll::Pending
                }
                // Not listed: only a drop leaves without being served, so never reached.
                None => {
                    self.ticket = None;
                    Poll::Ready(Err(Closed))
                }
            },
        }
    }
}

impl<T> Drop for TurnWait<'_, T> {
    fn drop(&mut self) {
        let Some(t) = self.ticket.take() else { return };
        let mut s = self.slots.state();
        if s.queue.leave(t) {
            // Granted but never taken: it goes on to the next in line.
            let next = self.slots.release_locked(&mut s, 1);
            drop(s);
            next.wake();
        }
    }
}

/// Waiters to wake once the lock is released: usually one, so that one needs no allocation.
#[derive(Default)]
struct Wake {
    one: Option<Waker>,
    more: Vec<Waker>,
}

impl Wake {
    fn push(&mut self, w: Waker) {
        match self.one {
            None => self.one = Some(w),
            Some(_) => self.more.push(w),
        }
    }

    fn wake(self) {
        if let Some(w) = self.one {
            w.wake();
        }
        for w in self.more {
            w.wake();
        }
    }
}

impl<T> Slots<T> {
    pub(crate) fn new(max_size: usize) -> Self {
        Slots {
            free: AtomicUsize::new(max_size),
            state: Mutex::new(State {
                idle: Vec::with_capacity(max_size),
                size: 0,
                max_size,
                owed: 0,
                closed: false,
                queue: Queue::default(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Takes a free turn if there is one. Never finds one while anyone waits (see `Queue`).
    fn take_free(&self) -> bool {
        self.free
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Waits for a turn: at once if one is free, otherwise in `source`'s line, served round
    /// robin with the other sources' lines.
    pub(crate) fn turn(&self, source: Source) -> TurnWait<'_, T> {
        TurnWait {
            slots: self,
            source,
            home: crate::home::here(),
            ticket: None,
        }
    }

    /// A turn if one is free now. Anyone waiting comes first: then there is none free.
    pub(crate) fn try_turn(&self) -> Result<Turn<'_, T>, NoTurn> {
        if self.take_free() {
            return Ok(Turn {
                slots: self,
                held: true,
            });
        }
        if self.state().closed {
            Err(NoTurn::Closed)
        } else {
            Err(NoTurn::Busy)
        }
    }

    /// A turn and the most recently returned idle connection, when both are there now; `None`
    /// otherwise (a turn taken goes straight back). The checkout's fast path: no future, one
    /// lock.
    /// Of the idle connections, the most recently returned one `prefer` likes goes first, else
    /// the most recently returned one.
    pub(crate) fn try_idle(&self, prefer: impl Fn(&T) -> bool) -> Option<(Turn<'_, T>, Idle<T>)> {
        let turn = self.try_turn().ok()?;
        let mut s = self.state();
        let idle = match s.idle.iter().rposition(|i| prefer(&i.item)) {
            Some(at) => s.idle.remove(at),
            None => s.idle.pop()?,
        };
        drop(s);
        Some((turn, idle))
    }

    /// Undoes [`Slots::try_idle`]: the connection goes back on top of the idle list, the turn
    /// back to the queue.
    pub(crate) fn untake(&self, turn: Turn<'_, T>, idle: Idle<T>) {
        self.state().idle.push(idle);
        drop(turn);
    }

    /// Turns come back: debts are paid first, then each goes to the next waiter in the
    /// rotation, or is free.
    fn release_turns(&self, n: usize) {
        let mut s = self.state();
        let wake = self.release_locked(&mut s, n);
        drop(s);
        wake.wake();
    }

    fn release_locked(&self, s: &mut State<T>, mut n: usize) -> Wake {
        let paid = n.min(s.owed);
        s.owed -= paid;
        n -= paid;
        let mut wake = Wake::default();
        if s.closed {
            return wake;
        }
        let near = crate::home::here();
        while n > 0 && s.queue.grant(&mut wake, near) {
            n -= 1;
        }
        if n > 0 {
            self.free.fetch_add(n, Ordering::Release);
        }
        wake
    }

    /// What a turn took is gone while the turn is still held: the room was not used (opening
    /// failed) or the idle connection was refused (it died, or aged out).
    pub(crate) fn gone(&self) {
        let mut s = self.state();
        s.size = s.size.saturating_sub(1);
    }

    /// A checked-out connection comes back, with its turn. Returns it when it may not stay
    /// (the pool shrank below its size, or closed): the caller closes it.
    #[must_use]
    pub(crate) fn give_back(&self, item: T, now: Instant) -> Option<T> {
        let mut s = self.state();
        let surplus = s.closed || s.size > s.max_size;
        let out = if surplus {
            s.size = s.size.saturating_sub(1);
            Some(item)
        } else {
            s.idle.push(Idle { item, since: now });
            None
        };
        let wake = self.release_locked(&mut s, 1);
        drop(s);
        wake.wake();
        out
    }

    /// A checked-out connection is closed instead of given back; its turn returns.
    pub(crate) fn remove(&self) {
        let mut s = self.state();
        s.size = s.size.saturating_sub(1);
        let wake = self.release_locked(&mut s, 1);
        drop(s);
        wake.wake();
    }

    /// Removes the idle connections `why` has a reason to close, visiting the oldest first;
    /// returns them with their reasons for the caller to close (outside the lock).
    pub(crate) fn retain<R>(&self, mut why: impl FnMut(&Idle<T>) -> Option<R>) -> Vec<(T, R)> {
        let mut s = self.state();
        let mut gone = Vec::new();
        let mut kept = Vec::with_capacity(s.idle.len());
        for idle in s.idle.drain(..) {
            match why(&idle) {
                None => kept.push(idle),
                Some(r) => gone.push((idle.item, r)),
            }
        }
        s.idle = kept;
        s.size = s.size.saturating_sub(gone.len());
        gone
    }

    /// A new maximum. Growing adds turns at once (to the waiters first); shrinking retires free
    /// turns at once and the rest as they come back, and returns the oldest idle connections
    /// beyond the new size for the caller to close.
    pub(crate) fn resize(&self, max_size: usize) -> Vec<T> {
        let mut s = self.state();
        let old = s.max_size;
        s.max_size = max_size;
        if max_size > old {
            // Debts first: turns still to be retired need not be.
            let wake = self.release_locked(&mut s, max_size - old);
            drop(s);
            wake.wake();
            return Vec::new();
        }
        let fewer = old - max_size;
        // Under the lock nothing adds free turns, and the lock-free path only takes them.
        let mut retired = 0;
        while retired < fewer && self.take_free() {
            retired += 1;
        }
        s.owed += fewer - retired;
        let excess = s.size.saturating_sub(max_size).min(s.idle.len());
        let gone: Vec<T> = s.idle.drain(..excess).map(|i| i.item).collect();
        s.size -= gone.len();
        gone
    }

    /// No more turns: waiting checkouts fail, idle connections are returned for closing, and
    /// checked-out ones are closed when they come back.
    pub(crate) fn close(&self) -> Vec<T> {
        let mut s = self.state();
        s.closed = true;
        self.free.store(0, Ordering::Release);
        let mut wake = Wake::default();
        let wakers = s.queue.waiters.iter_mut().flatten();
        for w in wakers.filter_map(|w| w.waker.take()) {
            wake.push(w);
        }
        let gone: Vec<T> = s.idle.drain(..).map(|i| i.item).collect();
        s.size = s.size.saturating_sub(gone.len());
        drop(s);
        wake.wake();
        gone
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state().closed
    }

    pub(crate) fn status(&self) -> Status {
        let s = self.state();
        Status {
            max_size: s.max_size,
            size: s.size,
            idle: s.idle.len(),
            waiting: s.queue.len(),
        }
    }
}

#[cfg(test)]
mod tests;

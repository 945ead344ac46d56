//! A pool's bookkeeping, without I/O: how many connections exist, which of them are idle, and
//! whose turn it is to get one.
//!
//! A checkout first waits for a *turn* (a permit of a FIFO semaphore, so clients are served in
//! the order they asked), then takes the most recently returned idle connection or, when none
//! is idle, room to open a new one. The turn stays with the connection until it is given back
//! or closed. There are as many turns as connections may exist (`max_size`), so a turn holder
//! finds either an idle connection or room, never neither (see [`Turn::take`]).
//!
//! This replaced deadpool's managed pool on the hot path: its checkout and return cost about
//! 1 700 instructions per transaction (hooks, metrics, timeouts, object wrappers), this one a
//! semaphore permit and one short lock each way (numbers in benches/README.md).

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::{Semaphore, TryAcquireError};

/// The pool was closed: no more turns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

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
}

#[derive(Debug)]
pub(crate) struct Slots<T> {
    turns: Semaphore,
    state: Mutex<State<T>>,
    /// Checkouts waiting for a turn (SHOW POOLS' cl_waiting side).
    waiting: AtomicUsize,
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
    pub(crate) fn take(&mut self) -> Taken<T> {
        let mut s = self.slots.state();
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
            self.slots.release_turn();
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

impl<T> Slots<T> {
    pub(crate) fn new(max_size: usize) -> Self {
        Slots {
            turns: Semaphore::new(max_size),
            state: Mutex::new(State {
                idle: Vec::with_capacity(max_size),
                size: 0,
                max_size,
                owed: 0,
                closed: false,
            }),
            waiting: AtomicUsize::new(0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State<T>> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Waits for a turn, first come first served.
    pub(crate) async fn turn(&self) -> Result<Turn<'_, T>, Closed> {
        match self.try_turn() {
            Ok(t) => return Ok(t),
            Err(TryAcquireError::Closed) => return Err(Closed),
            Err(TryAcquireError::NoPermits) => {}
        }
        self.waiting.fetch_add(1, Relaxed);
        let _waiting = Waiting(&self.waiting);
        match self.turns.acquire().await {
            Ok(p) => {
                p.forget();
                Ok(Turn {
                    slots: self,
                    held: true,
                })
            }
            Err(_) => Err(Closed),
        }
    }

    /// A turn if one is free now.
    pub(crate) fn try_turn(&self) -> Result<Turn<'_, T>, TryAcquireError> {
        let p = self.turns.try_acquire()?;
        p.forget();
        Ok(Turn {
            slots: self,
            held: true,
        })
    }

    fn release_turn(&self) {
        let mut s = self.state();
        if s.owed > 0 {
            s.owed -= 1;
        } else {
            drop(s);
            self.turns.add_permits(1);
        }
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
        if s.owed > 0 {
            s.owed -= 1;
        } else {
            drop(s);
            self.turns.add_permits(1);
        }
        out
    }

    /// A checked-out connection is closed instead of given back; its turn returns.
    pub(crate) fn remove(&self) {
        let mut s = self.state();
        s.size = s.size.saturating_sub(1);
        if s.owed > 0 {
            s.owed -= 1;
        } else {
            drop(s);
            self.turns.add_permits(1);
        }
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

    /// A new maximum. Growing adds turns at once; shrinking retires free turns at once and
    /// the rest as they come back, and returns the oldest idle connections beyond the new size
    /// for the caller to close.
    pub(crate) fn resize(&self, max_size: usize) -> Vec<T> {
        let mut s = self.state();
        let old = s.max_size;
        s.max_size = max_size;
        if max_size > old {
            let mut more = max_size - old;
            // Debts first: turns still to be retired need not be.
            let paid = more.min(s.owed);
            s.owed -= paid;
            more -= paid;
            drop(s);
            self.turns.add_permits(more);
            return Vec::new();
        }
        let fewer = old - max_size;
        let retired = self.turns.forget_permits(fewer);
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
        self.turns.close();
        let gone: Vec<T> = s.idle.drain(..).map(|i| i.item).collect();
        s.size = s.size.saturating_sub(gone.len());
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
            waiting: self.waiting.load(Relaxed),
        }
    }
}

/// Counts a waiting checkout for as long as it waits, however the wait ends.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests;

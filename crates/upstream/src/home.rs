//! Which runtime a socket belongs to.
//!
//! Breakwater serves clients on a runtime per core (the binary's `shards`): one thread each,
//! no work stealing, so a transaction's wake-ups never cross threads. A socket is registered
//! with the reactor of the runtime that opened it, and every wake-up it causes is delivered by
//! that runtime's thread. A server connection opened on one thread and then used by a client on
//! another would bring the cross-thread wake-ups back, so each connection remembers its home,
//! checkouts prefer connections at home, and a connection that must serve a client elsewhere
//! moves its socket to the client's runtime first ([`crate::Stream::rehome`]).
//!
//! The home is a property of the thread, set once by whoever starts the runtime on it, and
//! read the same way tokio finds a thread's reactor: from the thread itself. Threads of a
//! multi-threaded runtime (tests, tools) share [`NONE`], so nothing moves there.

use std::cell::Cell;

/// The home of threads not started as a shard.
pub const NONE: u16 = u16::MAX;

thread_local! {
    static HOME: Cell<u16> = const { Cell::new(NONE) };
}

/// Marks the calling thread as shard `id`'s: sockets opened here are at home here.
pub fn set_this_thread(id: u16) {
    HOME.with(|h| h.set(id));
}

/// The calling thread's shard, or [`NONE`].
pub fn here() -> u16 {
    HOME.with(Cell::get)
}

//! Where a session's Active state runs: its future on the heap and its scratch buffers, lent
//! for one transaction and given back, so an idle client carries neither and a busy one
//! allocates nothing per transaction.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::BytesMut;
use upstream::Alarm;

use super::{Held, Next, Session};
use crate::ledger::TxLedger;

/// Buffers above this capacity are not kept for the next transaction: a client that sent one
/// large message must not leave every later transaction holding its size.
pub(super) const KEEP_CAPACITY: usize = 64 * 1024;

/// A session's [`Scratch`] while it is Active, lent by its workspace: one pointer, empty while
/// the client is idle (which most clients are, most of the time: inline, the empty scratch was
/// 152 of an idle session's 464 bytes). Only the Active state uses it; were anything to touch
/// it while idle, a mutable use would allocate one (see `DerefMut`), not fail.
#[derive(Default)]
pub(crate) struct LentScratch(Option<Box<Scratch>>);

impl LentScratch {
    pub fn swap(&mut self, other: &mut LentScratch) {
        std::mem::swap(self, other);
    }
}

impl std::ops::Deref for LentScratch {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        static EMPTY: std::sync::LazyLock<Scratch> = std::sync::LazyLock::new(Scratch::default);
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for LentScratch {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.0.get_or_insert_with(Box::default)
    }
}

/// What a transaction works with besides the server: reused from one transaction to the next
/// (of any client), so that a steady stream of transactions allocates nothing.
#[derive(Default)]
pub(crate) struct Scratch {
    /// The session's timer for the Active state's timeouts.
    pub alarm: Alarm,
    /// Whether the checkout under way is opening a connection (see `Checkout::is_connecting`).
    pub connecting: upstream::ConnectFlag,
    /// The ledger of the last transaction, kept (clear) for the next one: its reply queue's
    /// allocation is reused.
    pub spare_ledger: TxLedger,
    /// Bytes on their way to the server / the client.
    pub to_server: BytesMut,
    pub to_client: BytesMut,
    /// A read buffer for the client: an idle client holds none (see `Session::active`).
    pub client_buf: BytesMut,
}

impl Scratch {
    /// After a transaction: nothing is left for the next one (of any client) to send, and
    /// buffers a large message grew are freed rather than kept.
    pub fn reset(&mut self) {
        self.to_server.clear();
        self.to_client.clear();
        for buf in [
            &mut self.to_server,
            &mut self.to_client,
            &mut self.client_buf,
        ] {
            if buf.capacity() > KEEP_CAPACITY {
                *buf = BytesMut::new();
            }
        }
    }
}

/// Where the Active state runs: the transaction's future on the heap, and its scratch.
///
/// A task's memory is the size of its largest state, and the Active state (checkout, pump,
/// release: some 2.8 KB) is many times the Idle one. Most clients are idle most of the time,
/// so the Active state lives in this box instead of in the task, and the box goes back to the
/// [`Workspaces`] list when the transaction ends. The next transaction of any client restarts
/// it in place (same future type: no allocation), so an idle client holds no room for a
/// transaction and a busy one allocates nothing per transaction. The price is a mutex to take
/// and give back the box and one move of the future per transaction (about 7 % more user-space
/// instructions per transaction by callgrind).
pub(super) struct Workspace {
    pub future: Box<dyn ActiveFuture>,
    pub scratch: LentScratch,
}

/// The Active state's future, restarted in place for each transaction.
pub(super) trait ActiveFuture: Send {
    /// Starts `session`'s Active state in place of the finished one: no allocation, and one
    /// move of the (large) future. tokio-util's `ReusableBoxFuture::set` moved it three times
    /// on the way in, which showed in the instructions per transaction.
    fn restart(&mut self, session: Box<Session>, held: Option<Held>);
    fn poll_active(&mut self, cx: &mut std::task::Context<'_>) -> Poll<(Box<Session>, Next)>;
}

/// `make` is [`Session::active`]; a generic is how its future's type gets a name. It is a
/// function item, not a pointer, so the call inlines and the new future's few live fields are
/// written in place: through a pointer the whole future (2.7 KB) was built on the stack and
/// copied in, about 290 instructions per transaction.
pub(super) struct Restartable<F, M> {
    pub future: Pin<Box<F>>,
    pub make: M,
}

impl<F, M> ActiveFuture for Restartable<F, M>
where
    F: Future<Output = (Box<Session>, Next)> + Send,
    M: Fn(Box<Session>, Option<Held>) -> F + Send,
{
    fn restart(&mut self, session: Box<Session>, held: Option<Held>) {
        self.future.set((self.make)(session, held));
    }

    fn poll_active(&mut self, cx: &mut std::task::Context<'_>) -> Poll<(Box<Session>, Next)> {
        self.future.as_mut().poll(cx)
    }
}

/// Workspaces not in use, a list per shard. Boxed so that the one a transaction has taken is a
/// pointer in the Idle task's `activate` future, not 168 bytes of every client.
///
/// A list per shard rather than one for the process: a workspace (the Active future and its
/// buffers, some 3 KB) goes back to the list of the thread that used it and comes out of it
/// again on that thread, so its memory stays in that core's cache. With one shared list, the
/// next transaction of the other shard often took the workspace this one had just written, and
/// the list's lock moved between the cores at every transaction too.
#[allow(clippy::vec_box)]
pub(crate) struct Workspaces {
    lists: [Padded<std::sync::Mutex<Vec<Box<Workspace>>>>; LISTS],
}

/// Lists: one for threads that are no shard's (tests, tools), then one per shard, shards past
/// the last sharing lists round robin (still correct, only no longer private).
const LISTS: usize = 16;

/// Its own cache lines: the lists' locks are taken by different cores.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

impl Default for Workspaces {
    fn default() -> Self {
        Workspaces {
            lists: std::array::from_fn(|_| Padded::default()),
        }
    }
}

/// Spare workspaces kept after a burst of concurrent transactions, per list; more are freed.
/// As many are in use as clients are in the Active state (waiting for a server included), so
/// this only bounds what a burst leaves behind.
const MAX_SPARE_WORKSPACES: usize = 256;

#[allow(clippy::vec_box)]
impl Workspaces {
    /// This thread's list.
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Box<Workspace>>> {
        let here = upstream::home::here();
        let i = if here == upstream::home::NONE {
            0
        } else {
            1 + usize::from(here) % (LISTS - 1)
        };
        let list = match self.lists.get(i) {
            Some(l) => &l.0,
            None => &self.lists[0].0,
        };
        match list.lock() {
            Ok(spare) => spare,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub(super) fn take(&self) -> Option<Box<Workspace>> {
        self.list().pop()
    }

    pub(super) fn give_back(&self, w: Box<Workspace>) {
        let mut spare = self.list();
        if spare.len() < MAX_SPARE_WORKSPACES {
            spare.push(w);
        }
    }
}

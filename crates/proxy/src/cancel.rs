//! Cancel forwarding: clients get Breakwater's own random BackendKeyData; a CancelRequest with
//! that key is forwarded to the server serving that client right now, and to nobody else. The
//! keys are looked up in the client registry (`registry.rs`), whose row for each client holds
//! its slot, so a client's row and slot are one allocation.
//!
//! Each client's slot holds the cancel target of the server it holds. A cancel counts itself
//! in the slot (under the slot's lock) while it is sent, and a session that clears the slot
//! before it gives its server back waits for that count to reach zero, so no server changes
//! hands while a cancel for it is in flight.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use upstream::CancelTarget;

#[derive(Debug, Default)]
pub struct CancelSlot {
    /// A plain mutex, held for a copy or a store and never across an await: set twice per
    /// transaction, where an async mutex cost a trip through its semaphore's waiter list.
    target: Mutex<Option<CancelTarget>>,
    /// Cancels on their way to the target, counted under its lock.
    sending: AtomicUsize,
    /// Notified when a cancel is sent (or given up).
    sent: tokio::sync::Notify,
    /// A cancel for the server held now could not be confirmed delivered: it may still reach
    /// the backend later, so that server must not go to another client (see
    /// [`CancelSlot::take_unconfirmed`]).
    unconfirmed: AtomicBool,
    /// Idle, waiting for a server or holding one (the low bits, a [`ClientState`]), and the
    /// marks of the park sweep ([`SWEPT`], [`PARK`]); SHOW CLIENTS reads it without the lock.
    state: std::sync::atomic::AtomicU8,
    /// The session's task while it waits on its client, for shutdown to wake (see
    /// [`CancelSlot::shutdown`]).
    shutdown_waker: AtomicWaker,
}

/// What a client is doing, as SHOW CLIENTS says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    Idle = 0,
    Waiting = 1,
    Active = 2,
}

impl ClientState {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientState::Idle => "idle",
            ClientState::Waiting => "waiting",
            ClientState::Active => "active",
        }
    }
}

/// The park sweep saw the client idle (see [`CancelSlot::sweep`]); cleared by any change of state.
const SWEPT: u8 = 0x40;
/// The client was idle through a whole sweep period: its session should park.
const PARK: u8 = 0x80;
/// The session cannot park (TLS, a timer): not asked again until its state changes.
const DECLINED: u8 = 0x20;
const STATE_BITS: u8 = 0x03;

/// What rang an idle session's bell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bell {
    ShuttingDown,
    /// Idle since the sweep before last: take the client off its task (see `crate::park`).
    Park,
}

impl CancelSlot {
    /// Sets the server the client holds: a store under the lock.
    pub fn hold(&self, target: CancelTarget) {
        let old = lock(&self.target).replace(target);
        drop(old);
    }

    /// The client holds no server now. Returns once no cancel for the old one is still on its
    /// way: the server may then go to another client without a cancel meant for this one
    /// reaching the other's query.
    pub async fn clear(&self) {
        if !self.clear_now() {
            self.cancels_sent().await;
        }
    }

    /// [`CancelSlot::clear`] without a future when no cancel is on its way (nearly always):
    /// `false` when one is, and [`CancelSlot::cancels_sent`] must be awaited before the
    /// server goes to anyone else.
    pub fn clear_now(&self) -> bool {
        let old = lock(&self.target).take();
        drop(old);
        // A cancel that saw the old target counted itself before this store took the lock,
        // and none can see it after.
        self.sending.load(Ordering::SeqCst) == 0
    }

    /// Waits until no cancel counted in the slot is still on its way.
    pub async fn cancels_sent(&self) {
        while self.sending.load(Ordering::SeqCst) > 0 {
            let sent = self.sent.notified();
            tokio::pin!(sent);
            // Listening before the second look: a cancel that ends in between wakes us.
            sent.as_mut().enable();
            if self.sending.load(Ordering::SeqCst) == 0 {
                break;
            }
            sent.await;
        }
    }

    /// What SHOW CLIENTS says the client is doing (the session's `enter` sets it). Clears the
    /// sweep's marks: a client that did anything starts its idle period again.
    pub fn set_state(&self, state: ClientState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// One pass of the park sweep (every [`crate::park::SWEEP`]): an idle client is marked
    /// the first time, and asked to park the second, if its state did not change in between.
    /// A client asked once is not woken again by later sweeps.
    pub(crate) fn sweep(&self) {
        let s = self.state.load(Ordering::Relaxed);
        if s & STATE_BITS != ClientState::Idle as u8 || s & PARK != 0 {
            return;
        }
        let want = if s & SWEPT == 0 { s | SWEPT } else { s | PARK };
        // Lost to a change of state in between: that change cleared the marks, rightly.
        if self
            .state
            .compare_exchange(s, want, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
            && want & PARK != 0
        {
            self.shutdown_waker.wake();
        }
    }

    /// The session had a reason not to park: it is not asked again in this idle period.
    pub(crate) fn park_declined(&self) {
        self.state.fetch_or(DECLINED, Ordering::Relaxed);
    }

    /// Drops the waker of a task that is ending (the session parks): a waker keeps its task's
    /// memory alive, and the parked session's park is woken another way.
    pub(crate) fn forget_waker(&self) {
        drop(self.shutdown_waker.take());
    }

    /// A resumed session starts its idle period over: the sweep marks it afresh.
    pub(crate) fn unparked(&self) {
        self.state.fetch_and(STATE_BITS, Ordering::Relaxed);
    }

    /// Ready once `shutting_down` is set; [`CancelSlot::wake_for_shutdown`] wakes the waiting
    /// task after setting it. A session waits on this, its client and its idle timer at once,
    /// twice per transaction: re-registering the same waker is a comparison, where a watch
    /// channel's `changed()` joined and left a locked list of waiters each time (some 650
    /// instructions per transaction by callgrind).
    pub fn shutdown<'a>(
        &'a self,
        shutting_down: &'a AtomicBool,
    ) -> impl std::future::Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| self.poll_shutdown(cx, shutting_down))
    }

    /// [`CancelSlot::shutdown`] as a poll.
    pub fn poll_shutdown(
        &self,
        cx: &mut std::task::Context<'_>,
        shutting_down: &AtomicBool,
    ) -> std::task::Poll<()> {
        self.shutdown_waker.register(cx.waker());
        // After registering: a flag set before this load is seen here, one set after it
        // finds the waker registered.
        if shutting_down.load(Ordering::SeqCst) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// [`CancelSlot::poll_shutdown`], and the park sweep's request, for an idle session.
    pub fn poll_bell(
        &self,
        cx: &mut std::task::Context<'_>,
        shutting_down: &AtomicBool,
    ) -> std::task::Poll<Bell> {
        if self.poll_shutdown(cx, shutting_down).is_ready() {
            return std::task::Poll::Ready(Bell::ShuttingDown);
        }
        if self.state.load(Ordering::Relaxed) & (PARK | DECLINED) == PARK {
            return std::task::Poll::Ready(Bell::Park);
        }
        std::task::Poll::Pending
    }

    pub(crate) fn wake_for_shutdown(&self) {
        self.shutdown_waker.wake();
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(std::sync::atomic::Ordering::Relaxed) & STATE_BITS {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }
}

impl CancelSlot {
    /// Forwards a cancel to the server the client holds, if it holds one. Returns whether a
    /// cancel was sent.
    pub async fn forward(&self, timeout: Duration) -> bool {
        let target = {
            let target = lock(&self.target);
            let Some(t) = target.as_ref() else {
                return false;
            };
            self.sending.fetch_add(1, Ordering::SeqCst);
            t.clone()
        };
        // Counted off when sent, failed or dropped (the caller's task ending mid-send).
        let _sending = Sending(self);
        if let Err(e) = target.send(timeout).await {
            // Before `_sending` counts it off: a release waiting for it then sees the mark.
            self.unconfirmed.store(true, Ordering::SeqCst);
            tracing::warn!(error = %e, "could not forward cancel request to the server");
        }
        true
    }

    /// Whether a cancel for the server just held could not be confirmed (and forgets it). Read
    /// after [`CancelSlot::cancels_sent`]: a server with such a cancel is closed, not given back.
    pub fn take_unconfirmed(&self) -> bool {
        self.unconfirmed.swap(false, Ordering::SeqCst)
    }
}

/// One cancel on its way to a slot's target.
struct Sending<'a>(&'a CancelSlot);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::SeqCst);
        self.0.sent.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::AsyncReadExt;
    use upstream::ServerAddr;

    #[tokio::test]
    async fn a_slot_is_not_cleared_while_a_cancel_for_its_server_is_on_its_way() {
        // A "server" that takes the cancel's connection and answers when told to.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slot = std::sync::Arc::new(CancelSlot::default());
        let target = CancelTarget {
            addr: ServerAddr::Tcp(listener.local_addr().unwrap()),
            pid: 7,
            key: 8,
        };
        slot.hold(target);
        let sender = slot.clone();
        let cancel = tokio::spawn(async move { sender.forward(Duration::from_secs(30)).await });
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut request = [0u8; 16];
        conn.read_exact(&mut request).await.unwrap();
        assert_eq!(
            request[8..],
            [0, 0, 0, 7, 0, 0, 0, 8],
            "the server's own key"
        );

        // The cancel is in flight: giving the server back must wait for it.
        let mut clear = Box::pin(slot.clear());
        assert!(clear.as_mut().now_or_never().is_none());
        // A second cancel finds the slot empty and sends nothing.
        assert!(!slot.forward(Duration::from_secs(1)).await);

        drop(conn);
        assert!(cancel.await.unwrap(), "the first cancel was sent");
        tokio::time::timeout(Duration::from_secs(10), clear)
            .await
            .expect("the slot clears once the cancel is through");
        assert_eq!(slot.sending.load(Ordering::SeqCst), 0);
        assert!(!slot.take_unconfirmed(), "the server closed: delivered");
    }

    /// A cancel whose connection the database neither answers nor closes in time may still
    /// reach the backend later: the slot says so, once, for the release to close the server.
    #[tokio::test]
    async fn a_cancel_not_confirmed_in_time_marks_the_slot() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slot = CancelSlot::default();
        slot.hold(CancelTarget {
            addr: ServerAddr::Tcp(listener.local_addr().unwrap()),
            pid: 7,
            key: 8,
        });
        // The connection is accepted by the kernel (the backlog) and never closed.
        assert!(slot.forward(Duration::from_millis(50)).await);
        assert!(slot.clear_now(), "nothing on its way any more");
        assert!(slot.take_unconfirmed());
        assert!(!slot.take_unconfirmed(), "told once");
        drop(listener);
    }
}

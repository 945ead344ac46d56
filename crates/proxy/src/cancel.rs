//! Cancel registry: clients get Breakwater's own random BackendKeyData; a CancelRequest with that
//! key is forwarded to the server serving that client right now, and to nobody else.
//!
//! Each client owns a slot holding the cancel target of the server it holds. A cancel holds the
//! slot's lock while it is sent, and a session clears the slot (taking the same lock) before it
//! gives its server back, so no server changes hands while a cancel for it is in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use upstream::CancelTarget;

#[derive(Debug, Default)]
pub struct CancelSlot {
    target: tokio::sync::Mutex<Option<CancelTarget>>,
    /// Idle, waiting for a server or holding one: SHOW CLIENTS reads it without the lock.
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

impl CancelSlot {
    pub async fn set(&self, target: Option<CancelTarget>) {
        let state = if target.is_some() {
            ClientState::Active
        } else {
            ClientState::Idle
        };
        // Twice per transaction and almost never contended (only while a cancel is being
        // sent), so try the lock before paying for an await on it.
        match self.target.try_lock() {
            Ok(mut slot) => *slot = target,
            Err(_) => *self.target.lock().await = target,
        }
        self.state
            .store(state as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// The client asks the pool for a server (it holds none yet).
    pub fn set_waiting(&self, waiting: bool) {
        let state = if waiting {
            ClientState::Waiting
        } else {
            ClientState::Idle
        };
        self.state
            .store(state as u8, std::sync::atomic::Ordering::Relaxed);
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
        std::future::poll_fn(move |cx| {
            self.shutdown_waker.register(cx.waker());
            // After registering: a flag set before this load is seen here, one set after it
            // finds the waker registered.
            if shutting_down.load(Ordering::SeqCst) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }

    pub(crate) fn wake_for_shutdown(&self) {
        self.shutdown_waker.wake();
    }

    pub fn state(&self) -> ClientState {
        match self.state.load(std::sync::atomic::Ordering::Relaxed) {
            1 => ClientState::Waiting,
            2 => ClientState::Active,
            _ => ClientState::Idle,
        }
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
}

/// Removes the client's slot when its session ends, however it ends. Owns its handle on the
/// registry so a session can live on the heap without borrowing (see `session::Workspace`).
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub key: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut slots) = self.registry.slots.lock() {
            slots.remove(&(self.pid, self.key));
        }
    }
}

impl CancelRegistry {
    /// Picks a fresh random (pid, key) for a client.
    pub fn register(self: &Arc<Self>) -> Registration {
        let slot = Arc::new(CancelSlot::default());
        loop {
            let (pid, key) = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
            let Ok(mut slots) = self.slots.lock() else {
                // A poisoned lock only means another thread panicked mid-insert; the map is
                // still a map. Cancels for this client simply won't be found.
                return Registration {
                    registry: self.clone(),
                    pid,
                    key,
                    slot,
                };
            };
            if let std::collections::hash_map::Entry::Vacant(e) = slots.entry((pid, key)) {
                e.insert(slot.clone());
                return Registration {
                    registry: self.clone(),
                    pid,
                    key,
                    slot,
                };
            }
        }
    }

    /// Forwards a cancel for the client with this key, if it holds a server. Returns whether a
    /// cancel was sent.
    pub async fn cancel(&self, pid: i32, key: i32, timeout: Duration) -> bool {
        let slot = match self.slots.lock() {
            Ok(slots) => slots.get(&(pid, key)).cloned(),
            Err(_) => None,
        };
        let Some(slot) = slot else {
            return false;
        };
        let guard = slot.target.lock().await;
        match guard.as_ref() {
            Some(target) => {
                if let Err(e) = target.send(timeout).await {
                    tracing::warn!(error = %e, "could not forward cancel request to the server");
                }
                true
            }
            None => false,
        }
    }
}

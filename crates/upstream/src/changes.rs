//! A wake-up for whoever waits for a condition on shared state (no server checked out, no
//! stale connection left, no client connected), so that PAUSE, WAIT_CLOSE and shutdown wait
//! for the event instead of polling. While nobody waits, signalling costs one fence and one
//! atomic load: it sits on the path of every released server.

use std::sync::atomic::{fence, AtomicUsize, Ordering::SeqCst};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Changes {
    watchers: AtomicUsize,
    notify: Notify,
}

impl Changes {
    /// Something waiters may care about changed; call after the change is visible.
    pub fn changed(&self) {
        // Pairs with the increment in `wait_until`: either the waiter's check sees our
        // change, or we see the waiter and wake it.
        fence(SeqCst);
        if self.watchers.load(SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Returns once `ready()` holds, checking it again after every [`Changes::changed`].
    /// Unbounded by itself: callers that must not wait forever wrap it in a timeout.
    pub async fn wait_until(&self, mut ready: impl FnMut() -> bool) {
        self.watchers.fetch_add(1, SeqCst);
        let _watching = Watching(&self.watchers);
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a change between the check and the await
            // still wakes us.
            notified.as_mut().enable();
            if ready() {
                return;
            }
            notified.await;
        }
    }
}

/// Counts a waiter for as long as it waits, however the wait ends.
struct Watching<'a>(&'a AtomicUsize);

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_waiter_wakes_on_the_change_that_makes_its_condition_true() {
        let changes = Arc::new(Changes::default());
        let done = Arc::new(AtomicBool::new(false));
        let waiter = tokio::spawn({
            let (changes, done) = (changes.clone(), done.clone());
            async move { changes.wait_until(|| done.load(SeqCst)).await }
        });
        tokio::task::yield_now().await;
        changes.changed();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a change that does not satisfy it");
        done.store(true, SeqCst);
        changes.changed();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .expect("woken by the change")
            .unwrap();
        assert_eq!(changes.watchers.load(SeqCst), 0);
    }

    #[tokio::test]
    async fn a_condition_already_true_returns_at_once() {
        let changes = Changes::default();
        changes.wait_until(|| true).await;
        assert_eq!(changes.watchers.load(SeqCst), 0);
    }
}

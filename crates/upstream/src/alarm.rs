//! A re-armable timer for waits that come and go: checkouts and reads of a server.

use std::time::Instant;

/// One re-armable timer per session. Creating a timer for each wait would insert and remove a
/// timer-wheel entry (two trips through the timer driver's lock) at every read of a server
/// (server_unresponsive_timeout applies to every wait) and at every checkout that has to wait
/// (query_wait_timeout); this one is armed no later than the earliest deadline that applies
/// and stays armed while later deadlines come and go. It may therefore ring early, and the
/// waiter re-checks whether its own deadline is due. Allocated on first use, so idle clients do
/// not carry it.
#[derive(Default)]
pub struct Alarm {
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: Option<Instant>,
}

impl Alarm {
    /// Makes sure the alarm rings at `at` or earlier.
    pub fn arm(&mut self, at: Instant) {
        if self.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at.into()),
            None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at.into()))),
        }
        self.armed = Some(at);
    }

    /// Rings once per arming; pending forever when not armed.
    pub async fn fired(&mut self) {
        match (&mut self.sleep, self.armed) {
            (Some(sleep), Some(_)) => {
                sleep.as_mut().await;
                self.armed = None;
            }
            _ => std::future::pending().await,
        }
    }
}

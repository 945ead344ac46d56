//! A re-armable timer for waits that come and go: checkouts and reads of a server.

use std::future::Future;
use std::time::Instant;

/// One re-armable timer per session. Creating a timer for each wait would insert and remove a
/// timer-wheel entry (two trips through the timer driver's lock) at every read of a server
/// (server_unresponsive_timeout applies to every wait) and at every checkout that has to wait
/// (query_wait_timeout); this one is armed no later than the earliest deadline that applies
/// and stays armed while later deadlines come and go. It may therefore ring early, and the
/// waiter re-checks whether its own deadline is due. Allocated on first use, so idle clients do
/// not carry it.
///
/// Waiting on it is cheap after the first poll: a session waits on its server, its client and
/// this alarm several times per transaction (about four at 64 clients), and polling the timer
/// each time (tokio's budget, the driver's state, the waker) showed in callgrind's count. The
/// timer keeps the waker it was last polled with, so once the current task's waker is in it, a
/// check of whether it has fired is enough.
#[derive(Default)]
pub struct Alarm {
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    armed: Option<Instant>,
    /// The timer has the waker of the task that uses the alarm now: polled since the last
    /// arming and since [`Alarm::new_owner`].
    listening: bool,
}

impl Alarm {
    /// Makes sure the alarm rings at `at` or earlier.
    pub fn arm(&mut self, at: Instant) {
        if self.armed.is_some_and(|armed| armed <= at) {
            return;
        }
        match &mut self.sleep {
            Some(sleep) => sleep.as_mut().reset(at.into()),
            None => self.sleep = Some(Box::pin(crate::timer::sleep_until(at.into()))),
        }
        self.armed = Some(at);
        self.listening = false;
    }

    /// Says that another task polls [`Alarm::fired`] from now on (the alarm is lent from one
    /// transaction, and client, to the next): its next poll hands the timer the new waker.
    pub fn new_owner(&mut self) {
        self.listening = false;
    }

    /// Rings once per arming; pending forever when not armed.
    pub async fn fired(&mut self) {
        std::future::poll_fn(|cx| self.poll_fired(cx)).await
    }

    /// [`Alarm::fired`] for a hand-written future.
    pub fn poll_fired(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let (Some(sleep), Some(_)) = (&mut self.sleep, self.armed) else {
            return std::task::Poll::Pending;
        };
        let rang = if self.listening {
            sleep.is_elapsed()
        } else {
            self.listening = true;
            sleep.as_mut().poll(cx).is_ready()
        };
        if rang {
            self.armed = None;
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits for the alarm, or gives up after 10 s. Biased: the give-up timer is polled
    /// first, so an alarm that was never told about this task cannot pass by being polled
    /// when the give-up timer wakes it.
    async fn rings(alarm: &mut Alarm) -> bool {
        tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_secs(10)) => false,
            _ = alarm.fired() => true,
        }
    }

    #[tokio::test]
    async fn it_rings_once_per_arming_and_wakes_the_task_waiting_on_it() {
        let mut alarm = Alarm::default();
        alarm.arm(Instant::now() + Duration::from_millis(20));
        assert!(rings(&mut alarm).await);
        // Not armed: pending.
        assert!(std::pin::pin!(alarm.fired())
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_pending());
        alarm.arm(Instant::now() + Duration::from_millis(20));
        assert!(rings(&mut alarm).await, "rings again once re-armed");
    }

    #[tokio::test]
    async fn a_new_owner_is_woken_not_the_task_that_polled_it_before() {
        let mut alarm = Alarm::default();
        alarm.arm(Instant::now() + Duration::from_millis(50));
        // The previous owner polled it (with a waker that wakes nobody) and went away.
        assert!(std::pin::pin!(alarm.fired())
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_pending());
        alarm.new_owner();
        assert!(rings(&mut alarm).await);
    }
}

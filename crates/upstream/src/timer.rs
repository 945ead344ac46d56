//! Timers for code that may run on a shard.
//!
//! Shards (the binary's runtime per core) are built without tokio's time driver. With it, every
//! park of a shard, about one per transaction and five per login, went through the timer wheel:
//! its lock, the next expiry, a clock read and a pass over what expired, about 430 instructions
//! per transaction and 2 500 per login in callgrind (benches/README.md, "Shards without a time
//! driver"). A shard's timers live in the control runtime's wheel instead: they are made here,
//! inside that runtime's context, and the control thread wakes the shard's task when one rings.
//! The control runtime ticks at least every 250 ms, so a timer a few seconds out, which is what
//! a session arms, does not wake the control thread early.
//!
//! Every timer in non-test code is therefore made with this module's functions (clippy's
//! `disallowed-methods` holds the workspace to that): a timer made with tokio's own on a shard
//! would panic. On any other thread they are tokio's.
//!
//! Work that makes timers inside a third-party crate is sent to the control runtime whole:
//! hickory's DNS queries with [`on_control`], the AWS credential chain's fetches with
//! [`spawn_on_control`]. The e2e suite's runs of those paths fail on a panic in the pooler's
//! log (the test kit checks), which is how the second one was found.

use std::cell::OnceCell;
use std::future::{Future, IntoFuture};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, Sleep, Timeout};

thread_local! {
    /// The runtime whose timer wheel this thread's timers go in; set on shard threads only.
    static WHEEL: OnceCell<Handle> = const { OnceCell::new() };
}

/// Marks the calling thread (a shard's, before its runtime runs) as one whose timers and
/// [`on_control`] work go to `control`, a runtime with a time driver that outlives the thread's
/// tasks.
pub fn use_control_runtime(control: Handle) {
    WHEEL.with(|w| {
        let _ = w.set(control);
    });
}

/// Runs `make` inside the control runtime's context when the thread has one.
fn in_wheel<R>(make: impl FnOnce() -> R) -> R {
    WHEEL.with(|w| match w.get() {
        Some(control) => {
            let _inside = control.enter();
            make()
        }
        None => make(),
    })
}

/// [`tokio::time::sleep`], safe on a shard.
#[allow(clippy::disallowed_methods)]
pub fn sleep(duration: Duration) -> Sleep {
    in_wheel(|| tokio::time::sleep(duration))
}

/// [`tokio::time::sleep_until`], safe on a shard.
#[allow(clippy::disallowed_methods)]
pub fn sleep_until(deadline: Instant) -> Sleep {
    in_wheel(|| tokio::time::sleep_until(deadline))
}

/// [`tokio::time::timeout`], safe on a shard.
#[allow(clippy::disallowed_methods)]
pub fn timeout<F: IntoFuture>(duration: Duration, future: F) -> Timeout<F::IntoFuture> {
    in_wheel(|| tokio::time::timeout(duration, future))
}

/// [`tokio::time::timeout_at`], safe on a shard.
#[allow(clippy::disallowed_methods)]
pub fn timeout_at<F: IntoFuture>(deadline: Instant, future: F) -> Timeout<F::IntoFuture> {
    in_wheel(|| tokio::time::timeout_at(deadline, future))
}

/// [`tokio::time::interval`], safe on a shard.
#[allow(clippy::disallowed_methods)]
pub fn interval(period: Duration) -> tokio::time::Interval {
    in_wheel(|| tokio::time::interval(period))
}

/// Runs `work` on the control runtime when called on a shard, else in place: for code whose
/// timers, tasks or sockets are not ours to make in the shard's wheel (a DNS resolver). `None`
/// when the control runtime dropped the work (it is shutting down).
pub async fn on_control<F>(work: F) -> Option<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match WHEEL.with(|w| w.get().cloned()) {
        Some(control) => control.spawn(work).await.ok(),
        None => Some(work.await),
    }
}

/// [`tokio::spawn`], on the control runtime when called on a shard: for a task whose
/// third-party code makes timers (the AWS credential chain).
pub fn spawn_on_control<F>(work: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match WHEEL.with(|w| w.get().cloned()) {
        Some(control) => control.spawn(work),
        None => tokio::spawn(work),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_made_on_a_shard_ring_from_the_control_runtime() {
        let control = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("control")
            .enable_all()
            .build()
            .unwrap();
        let to_control = control.handle().clone();
        // A thread of its own: the mark stays with the thread.
        let shard = std::thread::spawn(move || {
            use_control_runtime(to_control);
            // As a shard's: I/O, no time driver. tokio's own timers panic here.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap();
            rt.block_on(async {
                let start = Instant::now();
                sleep(Duration::from_millis(20)).await;
                let slept = start.elapsed();
                let timed_out = timeout(Duration::from_millis(20), std::future::pending::<()>())
                    .await
                    .is_err();
                let in_time = timeout_at(Instant::now() + Duration::from_secs(10), async { 7 })
                    .await
                    .ok();
                let ran_on =
                    on_control(async { std::thread::current().name().map(str::to_owned) }).await;
                let spawned_on =
                    spawn_on_control(async { std::thread::current().name().map(str::to_owned) })
                        .await
                        .ok();
                (slept, timed_out, in_time, ran_on, spawned_on)
            })
        });
        let (slept, timed_out, in_time, ran_on, spawned_on) = shard.join().unwrap();
        assert!(slept >= Duration::from_millis(20), "{slept:?}");
        assert!(timed_out);
        assert_eq!(in_time, Some(7));
        assert_eq!(ran_on, Some(Some("control".to_owned())));
        assert_eq!(spawned_on, Some(Some("control".to_owned())));
    }

    #[test]
    fn without_a_control_runtime_they_are_tokios() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let start = Instant::now();
            sleep_until(start + Duration::from_secs(3600)).await;
            // Paused time: the wait was the current runtime's clock, auto-advanced.
            assert!(start.elapsed() >= Duration::from_secs(3600));
            assert_eq!(on_control(async { 1 }).await, Some(1));
        });
    }
}

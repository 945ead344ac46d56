//! Tells systemd what the daemon is doing, for `Type=notify` units (see
//! examples/systemd/breakwater.service): READY=1 once it listens, RELOADING=1 (with the
//! MONOTONIC_USEC that `Type=notify-reload` wants) then READY=1 around a reload, STOPPING=1
//! when shutdown begins. Without `NOTIFY_SOCKET` (not run by systemd) each call does nothing.

use sd_notify::NotifyState;

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

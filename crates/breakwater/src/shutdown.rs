//! How the daemon stops, as PgBouncer 1.23+ does, for pods and rolling restarts:
//!
//! - SIGTERM: wait for clients. After `shutdown_accept_delay` (new logins still accepted) the
//!   listeners close; connected clients keep working,
//!   transactions and all, until they disconnect, bounded by `shutdown_timeout`. Kubernetes
//!   sends SIGTERM to an app and a plain sidecar together: the app's own drain needs its
//!   database until its last request.
//! - SIGINT: wait for servers (idle clients are told 57P01 at once, running transactions may
//!   finish), bounded by `shutdown_timeout`.
//! - A second signal tightens: SIGTERM again is immediate; SIGINT during a SIGTERM wait turns it
//!   into a wait for servers; any signal during a wait for servers is immediate.
//!
//! `/readyz` turns not ready on the first signal, before anything else changes.

use admin::ShutdownMode;

/// A stop signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Int,
}

impl Signal {
    /// The mode a first signal starts.
    pub fn first_mode(self) -> ShutdownMode {
        match self {
            Signal::Term => ShutdownMode::WaitForClients,
            Signal::Int => ShutdownMode::WaitForServers,
        }
    }
}

/// The mode after `signal` arrives during a shutdown in `mode`.
pub fn escalate(mode: ShutdownMode, signal: Signal) -> ShutdownMode {
    match (mode, signal) {
        (ShutdownMode::WaitForClients, Signal::Int) => ShutdownMode::WaitForServers,
        _ => ShutdownMode::Immediate,
    }
}

/// SIGTERM and SIGINT as a stream, installed once so that a second signal is seen.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let (term, int) = (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        );
        if term.is_none() || int.is_none() {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
        }
        Signals { term, int }
    }

    /// The next stop signal (never, if the handlers could not be installed).
    pub async fn next(&mut self) -> Signal {
        let sig = tokio::select! {
            Some(()) = recv(&mut self.term) => Signal::Term,
            Some(()) = recv(&mut self.int) => Signal::Int,
            else => std::future::pending().await,
        };
        tracing::info!("{} received", sig.name());
        sig
    }
}

/// The next delivery of `s`; pending forever without a handler. `select!` treats a `None`
/// (the stream ended, which tokio's never does) as "not this branch".
async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ShutdownMode::*;

    #[test]
    fn a_second_signal_tightens_the_shutdown() {
        assert_eq!(Signal::Term.first_mode(), WaitForClients);
        assert_eq!(Signal::Int.first_mode(), WaitForServers);
        for (mode, sig, next) in [
            (WaitForClients, Signal::Term, Immediate),
            (WaitForClients, Signal::Int, WaitForServers),
            (WaitForServers, Signal::Int, Immediate),
            (WaitForServers, Signal::Term, Immediate),
            (Immediate, Signal::Int, Immediate),
        ] {
            assert_eq!(escalate(mode, sig), next, "{mode:?} + {sig:?}");
        }
    }
}

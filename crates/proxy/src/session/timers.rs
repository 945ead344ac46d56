//! The Active state's timers: which one fires first, from what the ledger says is owed and when
//! things last happened. Pure, so every rule is a unit test with plain instants; the pump arms
//! one alarm for the answer and acts when it rings.

use std::time::{Duration, Instant};

use proto::backend::TxStatus;

use crate::ledger::TxLedger;
use crate::settings::ProxySettings;

/// How long a cancelled query may take to stop before its server connection is dropped.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Timer {
    None,
    IdleTransaction,
    ClientIdle,
    Query,
    CancelGrace,
    Unresponsive,
}

/// When things happened in the transaction a server is held for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    pub since: Instant,
    /// The oldest request still unanswered was sent.
    pub query_since: Option<Instant>,
    pub last_server_byte: Instant,
    pub last_client_byte: Instant,
    /// Breakwater cancelled the running query for query_timeout.
    pub cancel_sent: Option<Instant>,
}

impl Clock {
    pub fn new(now: Instant) -> Clock {
        Clock {
            since: now,
            query_since: None,
            last_server_byte: now,
            last_client_byte: now,
            cancel_sent: None,
        }
    }
}

/// The settings the timers read.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TimerSettings {
    pub idle_transaction_timeout: Option<Duration>,
    pub client_idle_timeout: Option<Duration>,
    pub query_timeout: Option<Duration>,
    pub server_unresponsive_timeout: Option<Duration>,
    /// The server stays with the client between transactions.
    pub session_mode: bool,
}

impl TimerSettings {
    pub fn of(s: &ProxySettings, session_mode: bool) -> TimerSettings {
        TimerSettings {
            idle_transaction_timeout: s.idle_transaction_timeout,
            client_idle_timeout: s.client_idle_timeout,
            query_timeout: s.query_timeout,
            server_unresponsive_timeout: s.server_unresponsive_timeout,
            session_mode,
        }
    }
}

/// The timer that fires first in the current state, if any.
pub(crate) fn next_timer(
    ledger: &TxLedger,
    clock: &Clock,
    s: &TimerSettings,
) -> (Timer, Option<Instant>) {
    let mut best = (Timer::None, None::<Instant>);
    let mut consider = |t: Timer, at: Option<Instant>| {
        if let Some(at) = at {
            if best.1.is_none_or(|b| at < b) {
                best = (t, Some(at));
            }
        }
    };
    if ledger.ready_owed() == 0 {
        if ledger.status() != TxStatus::Idle {
            consider(
                Timer::IdleTransaction,
                s.idle_transaction_timeout
                    .map(|d| clock.last_client_byte + d),
            );
        } else if s.session_mode {
            consider(
                Timer::ClientIdle,
                s.client_idle_timeout.map(|d| clock.last_client_byte + d),
            );
        }
    } else {
        match clock.cancel_sent {
            Some(sent) => consider(Timer::CancelGrace, Some(sent + CANCEL_GRACE)),
            None => consider(
                Timer::Query,
                s.query_timeout.zip(clock.query_since).map(|(d, t)| t + d),
            ),
        }
        // Silent since its last byte or since it was asked, whichever is later: a request
        // sent after the client sat idle in a transaction starts the clock afresh.
        let quiet_since = clock.query_since.map_or(clock.last_server_byte, |asked| {
            asked.max(clock.last_server_byte)
        });
        consider(
            Timer::Unresponsive,
            s.server_unresponsive_timeout.map(|d| quiet_since + d),
        );
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Received, Sent};

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn all_on() -> TimerSettings {
        TimerSettings {
            idle_transaction_timeout: Some(secs(10)),
            client_idle_timeout: Some(secs(20)),
            query_timeout: Some(secs(30)),
            server_unresponsive_timeout: Some(secs(40)),
            session_mode: false,
        }
    }

    fn in_transaction() -> TxLedger {
        let mut l = TxLedger::default();
        let _ = l.on_client(Sent::Query);
        l.on_server(Received::Ready(TxStatus::InTransaction), |_| {}, |_| {});
        l
    }

    fn waiting_for_a_reply() -> TxLedger {
        let mut l = TxLedger::default();
        let _ = l.on_client(Sent::Query);
        l
    }

    #[test]
    fn nothing_is_timed_between_transactions_in_transaction_mode() {
        let t0 = Instant::now();
        let r = next_timer(&TxLedger::default(), &Clock::new(t0), &all_on());
        assert_eq!(r, (Timer::None, None));
    }

    #[test]
    fn idle_in_transaction_counts_from_the_clients_last_byte() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.last_client_byte = t0 + secs(3);
        let r = next_timer(&in_transaction(), &clock, &all_on());
        assert_eq!(r, (Timer::IdleTransaction, Some(t0 + secs(13))));
    }

    #[test]
    fn a_session_mode_client_between_transactions_has_client_idle_timeout() {
        let t0 = Instant::now();
        let s = TimerSettings {
            session_mode: true,
            ..all_on()
        };
        let r = next_timer(&TxLedger::default(), &Clock::new(t0), &s);
        assert_eq!(r, (Timer::ClientIdle, Some(t0 + secs(20))));
    }

    #[test]
    fn a_running_query_has_query_timeout_before_server_unresponsive() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.query_since = Some(t0 + secs(1));
        let r = next_timer(&waiting_for_a_reply(), &clock, &all_on());
        assert_eq!(r, (Timer::Query, Some(t0 + secs(31))));
        let s = TimerSettings {
            query_timeout: None,
            ..all_on()
        };
        let r = next_timer(&waiting_for_a_reply(), &clock, &s);
        assert_eq!(r, (Timer::Unresponsive, Some(t0 + secs(41))));
    }

    #[test]
    fn after_a_cancel_only_its_grace_period_and_silence_count() {
        let t0 = Instant::now();
        let mut clock = Clock::new(t0);
        clock.query_since = Some(t0);
        clock.cancel_sent = Some(t0 + secs(30));
        let r = next_timer(&waiting_for_a_reply(), &clock, &all_on());
        assert_eq!(r, (Timer::CancelGrace, Some(t0 + secs(30) + CANCEL_GRACE)));
    }

    #[test]
    fn unresponsive_counts_from_the_later_of_the_request_and_the_last_byte() {
        let t0 = Instant::now();
        let s = TimerSettings {
            server_unresponsive_timeout: Some(secs(5)),
            query_timeout: None,
            ..all_on()
        };
        let mut clock = Clock::new(t0);
        clock.last_server_byte = t0 + secs(2);
        clock.query_since = Some(t0 + secs(7));
        let r = next_timer(&waiting_for_a_reply(), &clock, &s);
        assert_eq!(r, (Timer::Unresponsive, Some(t0 + secs(12))));
        clock.last_server_byte = t0 + secs(9);
        let r = next_timer(&waiting_for_a_reply(), &clock, &s);
        assert_eq!(r, (Timer::Unresponsive, Some(t0 + secs(14))));
    }

    #[test]
    fn timers_that_are_off_never_fire() {
        let t0 = Instant::now();
        let off = TimerSettings::default();
        for ledger in [in_transaction(), waiting_for_a_reply(), TxLedger::default()] {
            let mut clock = Clock::new(t0);
            clock.query_since = Some(t0);
            assert_eq!(next_timer(&ledger, &clock, &off), (Timer::None, None));
        }
    }
}

//! The listener connection of one pool: a server connection opened outside the pool's caps
//! (like the fleet's control connection; one more than `pool_size`), named
//! `breakwater listener`, that LISTENs to every channel a client of the pool listens to and
//! fans what it receives out to their inboxes. It is opened at the first LISTEN, closed when no
//! channel is left, and reopened with back-off when lost, LISTENing to every channel again;
//! notifications sent while it was away are lost, as they are for a PostgreSQL session that
//! ends. It never runs anything but LISTEN, UNLISTEN and its own SET.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use proto::backend;
use proto::frame::{self, Message};
use stats::PoolStats;
use upstream::ServerConn;

use super::registry::lock;
use super::{Inner, State};

/// Bounds one attempt to open the listener connection beyond its own connect and login
/// timeouts (a host's storm controls may queue the attempt first).
const CONNECT_GUARD: Duration = Duration::from_secs(30);
/// Bounds a write to the listener connection: a server that takes no bytes for this long is
/// treated as lost.
const WRITE_GUARD: Duration = Duration::from_secs(30);
/// Back-off between failed attempts: doubles from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection lost sooner than this after it opened counts as a failed attempt, so a server
/// that accepts and then drops the connection is not hammered.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);

const APPLICATION_NAME: &str = "SET application_name = 'breakwater listener'";

/// What the listener connection sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
    Listen(String),
    Unlisten(String),
}

impl Op {
    fn sql(&self) -> String {
        match self {
            Op::Listen(ch) => format!("LISTEN {}", quote(ch)),
            Op::Unlisten(ch) => format!("UNLISTEN {}", quote(ch)),
        }
    }
}

/// A channel name as a quoted identifier: any name a client could LISTEN to is sent exactly.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What to send so the server listens to exactly the registry's channels, given what it
/// confirmed and what is on its way: each channel's state on the server once everything in
/// flight is done is compared with whether anyone wants it.
pub(super) fn plan(state: &State, inflight: &VecDeque<Op>) -> Vec<Op> {
    let will_listen = |ch: &str| {
        inflight
            .iter()
            .rev()
            .find_map(|op| match op {
                Op::Listen(c) if c == ch => Some(true),
                Op::Unlisten(c) if c == ch => Some(false),
                _ => None,
            })
            .unwrap_or_else(|| state.confirmed.contains(ch))
    };
    let mut ops: Vec<Op> = state
        .registry
        .channels()
        .filter(|ch| !will_listen(ch))
        .map(|ch| Op::Listen(ch.clone()))
        .collect();
    let on_server: HashSet<&String> = state
        .confirmed
        .iter()
        .chain(inflight.iter().map(|op| match op {
            Op::Listen(c) | Op::Unlisten(c) => c,
        }))
        .collect();
    ops.extend(
        on_server
            .into_iter()
            .filter(|ch| !state.registry.is_wanted(ch) && will_listen(ch))
            .map(|ch| Op::Unlisten(ch.clone())),
    );
    ops
}

/// [`plan`], for sending now: a channel about to be UNLISTENed stops counting as confirmed at
/// once, not when the server answers. A client's LISTEN that comes in between then waits for
/// the LISTEN sent after the UNLISTEN, instead of being told it listens while the server is
/// about to stop (a NOTIFY in that gap reached nobody: an e2e test saw it under load).
pub(super) fn next_ops(state: &mut State, inflight: &VecDeque<Op>) -> Vec<Op> {
    let ops = plan(state, inflight);
    for op in &ops {
        if let Op::Unlisten(ch) = op {
            state.confirmed.remove(ch);
        }
    }
    ops
}

/// How a listener connection's service ended.
enum Ended {
    /// No channel is wanted any more.
    Idle,
    /// The pool is gone.
    Closed,
    /// The connection failed; the reason, for the log.
    Lost(String),
}

/// The listener connection's task: runs while its pool lives.
pub(super) async fn run(hub: Arc<Inner>) {
    let mut failures: u32 = 0;
    loop {
        if hub.closed() {
            return;
        }
        if lock(&hub.state).registry.is_empty() {
            hub.wake.notified().await;
            continue;
        }
        if failures > 0 {
            let exp = failures.saturating_sub(1).min(16);
            let pause = BACKOFF_FIRST.saturating_mul(1 << exp).min(BACKOFF_MAX);
            tokio::select! {
                () = upstream::timer::sleep(pause) => {}
                () = wait_closed(&hub) => return,
            }
        }
        let mut conn = match connect(&hub).await {
            Ok(c) => c,
            Err(why) => {
                failures = failures.saturating_add(1);
                tracing::warn!(
                    db = hub.stats.database,
                    user = hub.stats.user,
                    "could not open the LISTEN connection: {why}"
                );
                fail_waiters(&hub, &why);
                continue;
            }
        };
        let opened = Instant::now();
        tracing::info!(
            db = hub.stats.database,
            user = hub.stats.user,
            server = conn.id(),
            pid = conn.backend_pid(),
            "LISTEN connection open"
        );
        let ended = serve(&hub, &mut conn).await;
        {
            let mut s = lock(&hub.state);
            s.confirmed.clear();
            // Whatever is wanted is LISTENed to again on the next connection.
            s.dirty = true;
        }
        match ended {
            Ended::Closed => {
                conn.terminate();
                return;
            }
            Ended::Idle => {
                failures = 0;
                tracing::info!(
                    db = hub.stats.database,
                    user = hub.stats.user,
                    "no channel left; LISTEN connection closed"
                );
                conn.terminate();
            }
            Ended::Lost(why) => {
                PoolStats::add(&hub.stats.listener_reconnects, 1);
                failures = if opened.elapsed() < HEALTHY_AFTER {
                    failures.saturating_add(1)
                } else {
                    0
                };
                tracing::warn!(
                    db = hub.stats.database,
                    user = hub.stats.user,
                    "LISTEN connection lost ({why}); reconnecting. Notifications sent until it \
                     listens again are lost"
                );
            }
        }
    }
}

async fn wait_closed(hub: &Inner) {
    while !hub.closed() {
        hub.wake.notified().await;
    }
}

/// Opens the listener connection the way the pool opens its own (hosts, TLS, login).
async fn connect(hub: &Inner) -> Result<ServerConn, String> {
    let mut conn = match upstream::timer::timeout(CONNECT_GUARD, hub.pool.open_control()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => {
            return Err(format!(
                "no connection within {}",
                crate::fmt_duration(CONNECT_GUARD)
            ))
        }
    };
    match upstream::timer::timeout(WRITE_GUARD, conn.simple_query(APPLICATION_NAME)).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the server did not answer a SET".to_owned()),
    }
}

/// Tells every client waiting for a LISTEN that it failed.
fn fail_waiters(hub: &Inner, why: &str) {
    let waiters = std::mem::take(&mut lock(&hub.state).waiters);
    for tx in waiters.into_values().flatten() {
        let _ = tx.send(Err(why.to_owned()));
    }
}

/// Keeps the server's channels equal to the registry's and fans notifications out, until no
/// channel is wanted, the pool goes, or the connection fails.
async fn serve(hub: &Inner, conn: &mut ServerConn) -> Ended {
    let mut inflight: VecDeque<Op> = VecDeque::new();
    // The ErrorResponse of the statement in flight, for whoever waits for it.
    let mut error: Option<String> = None;
    let mut out = BytesMut::new();
    let max = conn.max_message();
    loop {
        if hub.closed() {
            return Ended::Closed;
        }
        loop {
            match frame::take_message(conn.buf_mut(), max) {
                Ok(Some(msg)) => on_message(hub, msg, &mut inflight, &mut error),
                Ok(None) => break,
                Err(e) => return Ended::Lost(e.to_string()),
            }
        }
        let ops = {
            let mut s = lock(&hub.state);
            if s.registry.is_empty() && inflight.is_empty() && s.confirmed.is_empty() {
                return Ended::Idle;
            }
            if std::mem::take(&mut s.dirty) {
                next_ops(&mut s, &inflight)
            } else {
                Vec::new()
            }
        };
        for op in ops {
            frontend_query(&mut out, &op.sql());
            inflight.push_back(op);
        }
        if !out.is_empty() {
            // Not in a select: a write cut short would leave the connection unusable.
            match upstream::timer::timeout(WRITE_GUARD, conn.write_all(&out)).await {
                Ok(Ok(())) => out.clear(),
                Ok(Err(e)) => return Ended::Lost(e.to_string()),
                Err(_) => return Ended::Lost("a write did not complete".to_owned()),
            }
        }
        tokio::select! {
            r = conn.read() => {
                if let Err(e) = r {
                    return Ended::Lost(e.to_string());
                }
            }
            () = hub.wake.notified() => {}
        }
    }
}

fn frontend_query(out: &mut BytesMut, sql: &str) {
    proto::frontend::write_query(out, sql);
}

/// One message from the listener connection.
fn on_message(hub: &Inner, msg: Message, inflight: &mut VecDeque<Op>, error: &mut Option<String>) {
    match msg.tag {
        backend::NOTIFICATION_RESPONSE => fan_out(hub, &msg),
        backend::ERROR_RESPONSE => {
            let why = proto::error::parse_error_fields(&msg.body)
                .map(|f| f.message)
                .unwrap_or_else(|e| e.to_string());
            error.get_or_insert(why);
        }
        backend::READY_FOR_QUERY => {
            let Some(op) = inflight.pop_front() else {
                return;
            };
            let failed = error.take();
            let mut s = lock(&hub.state);
            match op {
                Op::Listen(ch) => {
                    let waiters = s.waiters.remove(&ch).unwrap_or_default();
                    let result = match failed {
                        None => {
                            s.confirmed.insert(ch);
                            Ok(())
                        }
                        Some(why) => {
                            tracing::warn!(channel = ch, "the server refused LISTEN: {why}");
                            Err(format!("the server refused it: {why}"))
                        }
                    };
                    for tx in waiters {
                        let _ = tx.send(result.clone());
                    }
                }
                Op::Unlisten(ch) => {
                    s.confirmed.remove(&ch);
                }
            }
        }
        // CommandComplete, ParameterStatus, notices: nothing to do.
        _ => {}
    }
}

/// A NotificationResponse goes, as the server sent it (with the listener connection's
/// backend pid), into the inbox of every client on its channel.
fn fan_out(hub: &Inner, msg: &Message) {
    let mut r = frame::Reader::new(&msg.body, "NotificationResponse");
    let channel = match r.i32().and_then(|_| r.cstr_utf8()) {
        Ok(ch) => ch,
        Err(e) => {
            tracing::warn!("malformed notification from the server: {e}");
            return;
        }
    };
    let mut whole = BytesMut::with_capacity(msg.body.len() + frame::HEADER_LEN);
    frame::write_message(&mut whole, backend::NOTIFICATION_RESPONSE, |b| {
        b.extend_from_slice(&msg.body)
    });
    let whole = whole.freeze();
    let out = lock(&hub.state).registry.fan_out(channel, &whole);
    PoolStats::add(&hub.stats.notifications_sent, out.delivered);
    if out.dropped > 0 {
        PoolStats::add(&hub.stats.notifications_dropped, out.dropped);
        for client in out.started_overflowing {
            tracing::warn!(
                client,
                channel,
                "a client's notification inbox is full ({} waiting); dropping its oldest",
                super::registry::INBOX_CAP
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listen::registry::Inbox;

    fn state(wanted: &[&str], confirmed: &[&str]) -> State {
        let mut s = State::default();
        let inbox = Arc::new(Inbox::default());
        for ch in wanted {
            s.registry.listen(1, &inbox, ch).unwrap();
        }
        s.confirmed = confirmed.iter().map(|c| c.to_string()).collect();
        s
    }

    fn sorted(mut ops: Vec<Op>) -> Vec<Op> {
        ops.sort_by_key(|op| format!("{op:?}"));
        ops
    }

    #[test]
    fn the_server_is_told_the_difference_between_wanted_and_listened() {
        let l = |c: &str| Op::Listen(c.into());
        let u = |c: &str| Op::Unlisten(c.into());
        let none = VecDeque::new();
        assert_eq!(
            sorted(plan(&state(&["a", "b"], &["b", "c"]), &none)),
            vec![l("a"), u("c")]
        );
        assert!(plan(&state(&["a"], &["a"]), &none).is_empty());
        // In flight already: nothing more.
        let inflight = VecDeque::from([l("a"), u("c")]);
        assert!(plan(&state(&["a"], &["c"]), &inflight).is_empty());
        // Wanted again while its UNLISTEN is on its way: LISTEN after it.
        let inflight = VecDeque::from([u("a")]);
        assert_eq!(plan(&state(&["a"], &["a"]), &inflight), vec![l("a")]);
        // Given up while its LISTEN is on its way: UNLISTEN after it.
        let inflight = VecDeque::from([l("a")]);
        assert_eq!(plan(&state(&[], &[]), &inflight), vec![u("a")]);
        // After a reconnect nothing is confirmed: everything is LISTENed to again.
        assert_eq!(
            sorted(plan(&state(&["a", "b"], &[]), &none)),
            vec![l("a"), l("b")]
        );
    }

    /// The race an e2e test hit: the last client UNLISTENs `a`, and another LISTENs to it
    /// before the server has answered the UNLISTEN. That LISTEN must not count `a` as
    /// confirmed, and the listener must LISTEN to it again after the UNLISTEN.
    #[test]
    fn a_channel_being_unlistened_is_not_confirmed_for_a_new_listen() {
        let mut s = state(&[], &["a"]);
        let mut inflight = VecDeque::new();
        let ops = next_ops(&mut s, &inflight);
        assert_eq!(ops, vec![Op::Unlisten("a".into())]);
        assert!(
            !s.confirmed.contains("a"),
            "a LISTEN now would be answered before the server listens again"
        );
        inflight.extend(ops);
        // A client LISTENs to `a` while the UNLISTEN is on its way.
        let inbox = Arc::new(Inbox::default());
        s.registry.listen(2, &inbox, "a").unwrap();
        assert_eq!(
            next_ops(&mut s, &inflight),
            vec![Op::Listen("a".into())],
            "LISTEN again after the UNLISTEN"
        );
    }

    #[test]
    fn channel_names_are_sent_quoted() {
        assert_eq!(Op::Listen("Jobs".into()).sql(), "LISTEN \"Jobs\"");
        assert_eq!(
            Op::Unlisten("a \"b\"".into()).sql(),
            "UNLISTEN \"a \"\"b\"\"\""
        );
    }
}

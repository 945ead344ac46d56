//! LISTEN in transaction and statement mode. A client's `LISTEN ch` / `UNLISTEN ch` /
//! `UNLISTEN *` never reaches a pooled server (where it would be session state, reset away with
//! the client's notifications): Breakwater answers it and records it in its pool's [`Hub`].
//! One server connection per pool, outside the pool's caps (`server.rs`), LISTENs to the union
//! of the channels and puts each notification into the inbox of every client on its channel;
//! the session sends a client its inbox while it is idle, as PostgreSQL sends notifications
//! between transactions.
//!
//! This module never blocks a session on the listener connection for longer than the client's
//! own LISTEN (bounded by `query_wait_timeout`), and never holds its lock across an await.

mod registry;
mod server;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::error::{PgError, SqlState};
use stats::PoolStats;
use tokio::sync::{oneshot, Notify};
use upstream::ServerPool;

pub(crate) use registry::Inbox;
use registry::{lock, Registry, TooManyChannels};

/// A LISTEN or UNLISTEN statement Breakwater answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Listen(String),
    Unlisten(String),
    UnlistenAll,
}

impl Command {
    /// The CommandComplete tag PostgreSQL answers it with.
    pub(crate) fn tag(&self) -> &'static str {
        match self {
            Command::Listen(_) => "LISTEN",
            Command::Unlisten(_) | Command::UnlistenAll => "UNLISTEN",
        }
    }
}

/// PostgreSQL's longest identifier (NAMEDATALEN - 1 bytes); longer names are cut, as the
/// server cuts them, so that the name matches the channel notifications name.
const MAX_IDENTIFIER: usize = 63;

/// Is this Query text (with its NUL terminator) exactly one LISTEN or UNLISTEN statement?
///
/// Any other query returns at its first byte, so asking costs next to nothing. Recognised:
/// the keyword, one channel name (unquoted, folded to lower case; or double-quoted, with `""`
/// for a quote) or `*` after UNLISTEN, optional trailing semicolons and white space. Anything
/// else (two statements, a comment, a bad name) is not recognised and goes to the server, which
/// runs it on the pooled connection as before (or refuses it with its own error).
pub(crate) fn command(sql: &[u8]) -> Option<Command> {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    if !matches!(sql.get(start), Some(b'l' | b'L' | b'u' | b'U')) {
        return None;
    }
    let sql = sql.get(start..)?.split(|b| *b == 0).next()?;
    let text = std::str::from_utf8(sql).ok()?;
    let text = text.trim_end_matches(|c: char| c.is_ascii_whitespace() || c == ';');
    let keyword_end = text.find(|c: char| c.is_ascii_whitespace())?;
    let (keyword, rest) = text.split_at(keyword_end);
    let name = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let listen = keyword.eq_ignore_ascii_case("listen");
    if !listen && !keyword.eq_ignore_ascii_case("unlisten") {
        return None;
    }
    if !listen && name == "*" {
        return Some(Command::UnlistenAll);
    }
    let channel = identifier(name)?;
    Some(if listen {
        Command::Listen(channel)
    } else {
        Command::Unlisten(channel)
    })
}

/// The identifier that is all of `s`, as PostgreSQL names it.
fn identifier(s: &str) -> Option<String> {
    let name = if let Some(quoted) = s.strip_prefix('"') {
        let inner = quoted.strip_suffix('"')?;
        // A lone quote inside ends the identifier early: something follows it.
        if inner.replace("\"\"", "").contains('"') {
            return None;
        }
        inner.replace("\"\"", "\"")
    } else {
        let mut chars = s.chars();
        let first = chars.next()?;
        let ok_first = first.is_ascii_alphabetic() || first == '_' || !first.is_ascii();
        let ok_rest =
            chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$' || !c.is_ascii());
        if !(ok_first && ok_rest) {
            return None;
        }
        s.to_ascii_lowercase()
    };
    if name.is_empty() {
        return None;
    }
    let mut end = name.len().min(MAX_IDENTIFIER);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    Some(name.get(..end)?.to_owned())
}

/// One pool's listening clients and its listener connection. Dropped with its pool: the
/// listener connection closes then.
pub(crate) struct Hub {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    state: Mutex<State>,
    /// Wakes the listener connection's task: the registry changed, or the hub closed.
    wake: Notify,
    started: AtomicBool,
    closed: AtomicBool,
    pool: Arc<ServerPool>,
    stats: Arc<PoolStats>,
}

#[derive(Default)]
struct State {
    registry: Registry,
    /// Channels the listener connection has LISTENed to and the server confirmed.
    confirmed: HashSet<String>,
    /// Clients waiting for the server to confirm a channel.
    waiters: HashMap<String, Vec<oneshot::Sender<Result<(), String>>>>,
    /// The registry changed since the listener connection last compared it with the server's.
    dirty: bool,
}

impl Hub {
    pub(crate) fn new(pool: Arc<ServerPool>) -> Hub {
        let stats = pool.stats().clone();
        Hub {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                wake: Notify::new(),
                started: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                pool,
                stats,
            }),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }
}

impl Inner {
    fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Starts the listener connection's task, once per pool, at the first LISTEN.
    fn start(self: &Arc<Self>) {
        if !self.started.swap(true, Ordering::SeqCst) {
            tokio::spawn(server::run(self.clone()));
        }
    }

    /// Records a registry change and wakes the listener connection to act on it.
    fn changed(&self, s: &mut State) {
        s.dirty = true;
        self.gauges(s);
        self.wake.notify_one();
    }

    /// The pool's listening gauges, from the registry (under its lock, so they never go
    /// backwards against each other).
    fn gauges(&self, s: &State) {
        self.stats
            .listen_channels
            .store(s.registry.channel_count() as i64, Ordering::Relaxed);
        self.stats
            .listen_clients
            .store(s.registry.client_count() as i64, Ordering::Relaxed);
    }
}

/// One client's listening, in its pool's hub. Dropped when the client leaves, taking the
/// client off every channel.
pub(crate) struct Subscription {
    hub: Arc<Inner>,
    client: u64,
    inbox: Arc<Inbox>,
}

impl Subscription {
    pub(crate) fn new(hub: &Hub, client: u64) -> Subscription {
        Subscription {
            hub: hub.inner.clone(),
            client,
            inbox: Arc::default(),
        }
    }

    pub(crate) fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// Runs a LISTEN or UNLISTEN for this client. A LISTEN returns once the listener
    /// connection listens to the channel (at once when it does already), so a NOTIFY the
    /// client sends after its LISTEN completes reaches it, as with PostgreSQL.
    pub(crate) async fn run(&self, cmd: &Command, wait: Duration) -> Result<(), PgError> {
        match cmd {
            Command::Listen(ch) => self.listen(ch, wait).await,
            Command::Unlisten(ch) => {
                self.unlisten(ch);
                Ok(())
            }
            Command::UnlistenAll => {
                self.unlisten_all();
                Ok(())
            }
        }
    }

    async fn listen(&self, channel: &str, wait: Duration) -> Result<(), PgError> {
        let confirmed = {
            let mut s = lock(&self.hub.state);
            // Listening already (PostgreSQL says LISTEN again is a no-op): even while the
            // listener connection is reconnecting, a failure now must not take it away.
            if s.registry.listens(self.client, channel) {
                return Ok(());
            }
            let new_channel = match s.registry.listen(self.client, &self.inbox, channel) {
                Ok(new) => new,
                Err(TooManyChannels) => {
                    return Err(PgError::error(
                        SqlState("54000"),
                        format!(
                            "too many channels: a client may LISTEN to at most {} at once through Breakwater",
                            registry::MAX_CHANNELS_PER_CLIENT
                        ),
                    ))
                }
            };
            if new_channel {
                self.hub.changed(&mut s);
            } else {
                self.hub.gauges(&s);
            }
            if s.confirmed.contains(channel) {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                s.waiters.entry(channel.to_owned()).or_default().push(tx);
                Some(rx)
            }
        };
        let Some(rx) = confirmed else {
            return Ok(());
        };
        self.hub.start();
        let why = match upstream::timer::timeout(wait, rx).await {
            Ok(Ok(Ok(()))) => return Ok(()),
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => "the listener connection went away".to_owned(),
            Err(_) => format!(
                "the listener connection did not LISTEN within query_wait_timeout ({})",
                crate::fmt_duration(wait)
            ),
        };
        // Not listening after all: the client is told so, and is not left half registered.
        self.unlisten(channel);
        tracing::warn!(channel, "LISTEN failed: {why}");
        Err(PgError::error(
            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH,
            format!("could not LISTEN to channel \"{channel}\": {why}"),
        ))
    }

    pub(crate) fn unlisten(&self, channel: &str) {
        let mut s = lock(&self.hub.state);
        if s.registry.unlisten(self.client, channel) {
            self.hub.changed(&mut s);
        } else {
            self.hub.gauges(&s);
        }
    }

    pub(crate) fn unlisten_all(&self) {
        let mut s = lock(&self.hub.state);
        if s.registry.unlisten_all(self.client).is_empty() {
            self.hub.gauges(&s);
        } else {
            self.hub.changed(&mut s);
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.unlisten_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_statements_breakwater_answers_itself() {
        let listen = |c: &str| Some(Command::Listen(c.into()));
        let unlisten = |c: &str| Some(Command::Unlisten(c.into()));
        let long = "x".repeat(80);
        let cases: &[(&str, Option<Command>)] = &[
            ("LISTEN jobs\0", listen("jobs")),
            ("  listen Jobs ;\0", listen("jobs")),
            ("LISTEN \"Jobs\";;\n\0", listen("Jobs")),
            ("LISTEN \"a \"\"b\"\"\"\0", listen("a \"b\"")),
            ("listen _x$1\0", listen("_x$1")),
            ("UNLISTEN jobs\0", unlisten("jobs")),
            ("unlisten *\0", Some(Command::UnlistenAll)),
            ("UNLISTEN \"*\"\0", unlisten("*")),
            (&format!("LISTEN {long}\0"), listen(&"x".repeat(63))),
            // Not recognised: the server answers these as before.
            ("LISTEN *\0", None),
            ("LISTEN\0", None),
            ("LISTEN a b\0", None),
            ("LISTEN a; SELECT 1\0", None),
            ("LISTEN a -- why\0", None),
            ("LISTEN \"\"\0", None),
            ("LISTEN \"a\" \"b\"\0", None),
            ("LISTEN 1abc\0", None),
            ("LISTENING a\0", None),
            ("UPDATE t SET x = 1\0", None),
            ("SELECT 1\0", None),
            ("\0", None),
            ("", None),
        ];
        for (sql, want) in cases {
            assert_eq!(&command(sql.as_bytes()), want, "{sql:?}");
        }
    }

    #[test]
    fn a_long_multibyte_name_is_cut_at_a_character_boundary() {
        let name = "é".repeat(40); // 80 bytes
        let Some(Command::Listen(ch)) = command(format!("LISTEN {name}\0").as_bytes()) else {
            panic!("not recognised");
        };
        assert_eq!(ch.len(), 62);
    }
}

//! Before a server: waiting for the client, and answering what needs no server (a Close of a
//! prepared statement, a Parse of one the pool knows, Flush and Sync around them).

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use proto::backend::{self, TxStatus};
use proto::error::{PgError, SqlState};
use proto::frame::{Header, HEADER_LEN};
use proto::frontend;
use stats::{GlobalStats, PoolStats};

use super::{protocol_violation, shutdown_error, Session, Work};
use crate::cancel::Bell;
use crate::prepared::Statement;
use crate::{fmt_duration, read_into};

/// Messages up to this size are read whole before Breakwater decides about them; larger ones
/// stream (see `pump.rs`), so no batch answered here may wait for one.
pub(super) const WHOLE_LIMIT: usize = 64 * 1024;

/// What ended an idle wait.
enum Idle {
    Readable,
    /// The socket failed.
    Gone,
    /// Breakwater is shutting down: say so (the wait's loop does).
    ShuttingDown,
    /// The park sweep asks the client to park (see `crate::park`).
    Park,
    /// client_idle_timeout expired.
    Expired,
}

/// What a batch of client messages needs.
enum Local {
    /// The batch was answered without a server.
    Answered,
    /// The batch so far needs no server, but it is not complete.
    NeedMore,
    NeedServer,
}

/// A request in a batch answered without a server.
enum LocalAnswer {
    /// Close of the statement whose name is at `at..at + len` in the batch.
    Close { at: usize, len: usize },
    /// Parse of a known statement, named at `at..at + len`.
    Parse {
        at: usize,
        len: usize,
        stmt: Arc<Statement>,
    },
}

impl Session {
    /// Idle: waits until the client sends something, without reading it (so without a read
    /// buffer), or until it must go.
    ///
    /// This future is what an idle client's task holds, so it is kept small: one poll of the
    /// socket, the shutdown flag and the idle timer (a `select!` of their futures, with the
    /// notification delivery beside them, made it 160 bytes and the task 128 bytes larger).
    /// A client that LISTENs waits in [`Session::wait_listening`], boxed.
    pub(super) async fn wait_for_client(&mut self) -> Work {
        if self.listening.is_some() {
            return Box::pin(self.wait_listening()).await;
        }
        // Once per idle period: a wake-up that does not end the wait (a park request this
        // session declines) must not restart the client's idle clock.
        self.arm_idle_timer();
        loop {
            if !self.client.buf.is_empty() {
                return Work::Readable;
            }
            if self.shutting_down() {
                return Box::pin(self.send_fatal(shutdown_error())).await;
            }
            match std::future::poll_fn(|cx| self.poll_idle(cx)).await {
                Idle::Readable => return Work::Readable,
                Idle::Gone => return Work::Gone,
                Idle::ShuttingDown => {}
                Idle::Park if self.may_park() => return Work::Park,
                Idle::Park => self.cancel.slot.park_declined(),
                Idle::Expired => {
                    let e = idle_timeout_expired(self.global(), self.settings.client_idle_timeout);
                    return Box::pin(self.send_fatal(e)).await;
                }
            }
        }
    }

    /// What ends an idle wait, in the order it is looked at.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<Idle> {
        if let Poll::Ready(r) = self.client.stream.poll_readable(cx) {
            return Poll::Ready(if r.is_ok() {
                Idle::Readable
            } else {
                Idle::Gone
            });
        }
        let shutting_down = &self.shared.shutting_down;
        match self.cancel.slot.poll_bell(cx, shutting_down) {
            Poll::Ready(Bell::ShuttingDown) => return Poll::Ready(Idle::ShuttingDown),
            Poll::Ready(Bell::Park) => return Poll::Ready(Idle::Park),
            Poll::Pending => {}
        }
        // The timer exists only while client_idle_timeout is on (see `arm_idle_timer`).
        match self.idle_timer.as_mut().map(|t| t.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Idle::Expired),
            _ => Poll::Pending,
        }
    }

    /// Whether this idle client can leave its task (see `crate::park`): nothing unread or
    /// unsent, and a plain socket. A LISTENing client waits elsewhere and is never asked.
    fn may_park(&self) -> bool {
        self.client.buf.is_empty() && self.client.out.is_empty() && !self.client.stream.is_tls()
    }

    /// [`Session::wait_for_client`] for a client that listens to channels: notifications
    /// go out between transactions, as PostgreSQL sends them: here, right after one ended,
    /// and whenever one arrives while the client is idle.
    async fn wait_listening(&mut self) -> Work {
        loop {
            if self.deliver_notifications().await.is_err() {
                return Work::Gone;
            }
            if !self.client.buf.is_empty() {
                return Work::Readable;
            }
            if self.shutting_down() {
                return self.send_fatal(shutdown_error()).await;
            }
            let idle = self.arm_idle_timer();
            tokio::select! {
                r = self.client.stream.readable() => return match r {
                    Ok(()) => Work::Readable,
                    Err(_) => Work::Gone,
                },
                () = self.cancel.slot.shutdown(&self.shared.shutting_down) => {}
                () = super::listen::mail(self.listening.as_deref()) => {}
                _ = expired(&mut self.idle_timer), if idle.is_some() => {
                    return self.send_fatal(idle_timeout_expired(self.global(), idle)).await;
                }
            }
        }
    }

    /// Active, before a server: reads until the client sends something that needs one,
    /// answering what needs none. A message no client may send is refused here, before any
    /// server is taken for it.
    pub(super) async fn wait_for_work(&mut self) -> Work {
        loop {
            match Header::peek(&self.client.buf, self.settings.max_message) {
                Err(e) => return self.send_fatal(protocol_violation(e.to_string())).await,
                Ok(Some(h)) if h.tag == frontend::TERMINATE => {
                    // Nothing after a Terminate counts. Emptied, the read buffer goes back
                    // to the workspace for the next client (see `active`) instead of being
                    // freed with this one: in a connection storm, where every client ends
                    // this way, that was a 4 KiB allocation per login.
                    self.client.buf.clear();
                    return Work::Gone;
                }
                Ok(Some(h)) if !frontend::is_session_message(h.tag) => {
                    return self.send_fatal(unexpected_message(h.tag)).await;
                }
                Ok(Some(h)) => match self.listen_command(h) {
                    Some(cmd) => {
                        Box::pin(self.run_listen(&cmd, TxStatus::Idle)).await;
                        if self.client.flush().await.is_err() {
                            return Work::Gone;
                        }
                        if self.client.buf.is_empty() {
                            return Work::Answered;
                        }
                        continue;
                    }
                    None => match self.answer_locally() {
                        Local::NeedServer => return Work::Message,
                        Local::Answered => {
                            if self.client.flush().await.is_err() {
                                return Work::Gone;
                            }
                            if self.client.buf.is_empty() {
                                return Work::Answered;
                            }
                            continue;
                        }
                        Local::NeedMore => {}
                    },
                },
                Ok(None) => {}
            }
            // Idle found the client readable, so this read almost always completes at once:
            // try it before setting up the select (the shutdown watch, the idle timer), and
            // without a read future where the socket allows.
            let now = match self.client.try_read_now() {
                Some(Poll::Ready(r)) => Some(r),
                Some(Poll::Pending) => None,
                None => read_into(&mut self.client.stream, &mut self.client.buf).now_or_never(),
            };
            match now {
                Some(Ok(0) | Err(_)) => return Work::Gone,
                Some(Ok(_)) => continue,
                None => {}
            }
            if self.shutting_down() {
                return self.send_fatal(shutdown_error()).await;
            }
            let idle = self.arm_idle_timer();
            tokio::select! {
                r = read_into(&mut self.client.stream, &mut self.client.buf) => match r {
                    Ok(0) | Err(_) => return Work::Gone,
                    Ok(_) => {}
                },
                () = self.cancel.slot.shutdown(&self.shared.shutting_down) => {}
                _ = expired(&mut self.idle_timer), if idle.is_some() => {
                    return self.send_fatal(idle_timeout_expired(self.global(), idle)).await;
                }
            }
        }
    }

    /// Arms client_idle_timeout's timer for a wait that starts now; returns the setting.
    fn arm_idle_timer(&mut self) -> Option<Duration> {
        let idle = self.settings.client_idle_timeout;
        if let Some(d) = idle {
            let at = tokio::time::Instant::now() + d;
            match &mut self.idle_timer {
                Some(timer) => timer.as_mut().reset(at),
                None => self.idle_timer = Some(Box::pin(upstream::timer::sleep_until(at))),
            }
        }
        idle
    }

    /// client_idle_timeout expired while the client was parked: tell it (see `crate::park`).
    pub(super) async fn idle_expired(&mut self) {
        let e = idle_timeout_expired(self.global(), self.settings.client_idle_timeout);
        self.send_fatal(e).await;
    }

    /// Tells an idle client why it must go. Sent from inside the Idle state rather than
    /// returned, and boxed: an error and its send, carried in the Idle state's future, would
    /// take room in every client's task.
    async fn send_fatal(&mut self, e: PgError) -> Work {
        if e.code == SqlState::PROTOCOL_VIOLATION {
            GlobalStats::bump(&self.global().protocol_errors);
            tracing::warn!("closing client: {}", e.message);
        }
        self.client.send_error(&e).await;
        Work::Gone
    }

    /// Outside a transaction, a batch of only Close (of a named statement), Parse (of a named
    /// statement this pool's servers have parsed for clients like this one), Flush and Sync
    /// needs no server: drivers close a statement whenever they drop it (tokio-postgres does),
    /// and many prepare each statement on its own round trip before using it (libpq's
    /// PQprepare). Answering here saves a checkout and a round trip, keeps such housekeeping
    /// off server connections that may be failing, and a client that prepares while other
    /// clients hold every server needs none (see `prepared::KnownStatements`).
    fn answer_locally(&mut self) -> Local {
        if self.settings.max_prepared_statements == 0 {
            return Local::NeedServer;
        }
        let buf = &self.client.buf;
        let mut pos = 0;
        // Where each Close's statement name is, and each Parse's statement, in batch order.
        let mut answers: Vec<LocalAnswer> = Vec::new();
        let end = loop {
            let rest = buf.get(pos..).unwrap_or_default();
            let h = match Header::peek(rest, self.settings.max_message) {
                Ok(Some(h)) if rest.len() >= h.total() => h,
                // An incomplete message: the rest of this batch, unless it is one that streams
                // (a request for a server in any case).
                Ok(Some(h)) if h.body_len <= WHOLE_LIMIT && !answers.is_empty() => {
                    return Local::NeedMore
                }
                Ok(None) if !answers.is_empty() => return Local::NeedMore,
                _ => return Local::NeedServer,
            };
            let body = rest.get(HEADER_LEN..h.total()).unwrap_or_default();
            match h.tag {
                frontend::CLOSE => match frontend::statement_ref(h.tag, body) {
                    Ok(r) if r.name.is_some_and(|n| !n.is_empty()) => {
                        answers.push(LocalAnswer::Close {
                            at: pos + HEADER_LEN + r.prefix_len,
                            len: r.name.map_or(0, <[u8]>::len),
                        });
                    }
                    _ => return Local::NeedServer,
                },
                frontend::PARSE => {
                    // The unnamed statement (most extended-protocol queries) is the server's
                    // to parse; a malformed Parse is the Active state's to refuse.
                    let Ok((name, _)) = frontend::parse_parse(body) else {
                        return Local::NeedServer;
                    };
                    if name.is_empty() {
                        return Local::NeedServer;
                    }
                    let rest = body.get(name.len() + 1..).unwrap_or_default();
                    let stmt = Statement::new(Bytes::copy_from_slice(rest));
                    if !self
                        .entry
                        .known_statements
                        .contains(self.params.fingerprint(), &stmt.global)
                    {
                        return Local::NeedServer;
                    }
                    answers.push(LocalAnswer::Parse {
                        at: pos + HEADER_LEN,
                        len: name.len(),
                        stmt: Arc::new(stmt),
                    });
                }
                // Flush: the client wants the replies so far, and no ReadyForQuery.
                frontend::FLUSH => break (pos + h.total(), false),
                frontend::SYNC => break (pos + h.total(), true),
                _ => return Local::NeedServer,
            }
            pos += h.total();
            if pos == buf.len() {
                return Local::NeedMore;
            }
        };
        let (end, sync) = end;
        let batch = self.client.buf.split_to(end).freeze();
        for answer in answers {
            match answer {
                LocalAnswer::Close { at, len } => {
                    self.statements
                        .remove(batch.get(at..at + len).unwrap_or_default());
                    backend::write_close_complete(&mut self.client.out);
                }
                LocalAnswer::Parse { at, len, stmt } => {
                    PoolStats::add(&self.entry.stats.client_parse_count, 1);
                    self.statements.insert(batch.slice(at..at + len), stmt);
                    backend::write_parse_complete(&mut self.client.out);
                }
            }
        }
        if sync {
            backend::write_ready_for_query(&mut self.client.out, TxStatus::Idle);
        }
        Local::Answered
    }
}

/// A message type a logged-in client may not send.
pub(super) fn unexpected_message(tag: u8) -> PgError {
    protocol_violation(format!(
        "invalid frontend message type {tag} ({:?})",
        tag as char
    ))
}

/// Counts and logs an expired client_idle_timeout; the error the client is told.
fn idle_timeout_expired(global: &GlobalStats, idle: Option<Duration>) -> PgError {
    GlobalStats::bump(&global.timeouts_client_idle);
    tracing::info!("client_idle_timeout expired");
    PgError::fatal(
        SqlState::IDLE_SESSION_TIMEOUT,
        format!(
            "client_idle_timeout ({}) expired",
            fmt_duration(idle.unwrap_or_default())
        ),
    )
}

/// Waits for a boxed timer; pending forever without one.
async fn expired(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.as_mut().await,
        None => std::future::pending().await,
    }
}

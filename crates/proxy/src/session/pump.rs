//! The Active state with a server: stream both ways until the transaction ends or something
//! breaks. Only I/O and the rewriting of prepared-statement names happen here; every message
//! forwarded is told to the ledger, which decides where the transaction ends.
//!
//! Messages stream through before they are whole, both ways, except the few the pooler must
//! read: ReadyForQuery, ParameterStatus, CommandComplete, ParseComplete and CloseComplete from
//! the server (and ErrorResponse in pools that must write); Describe, Close and small Query and
//! Parse messages from the client, and the start of each Bind. A client's large Query or Parse
//! streams too, so a 40 MiB query costs no 40 MiB buffer (its text is not scanned for session
//! state, so the server is reset after it, as if it had left some).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BufMut;
use proto::backend;
use proto::error::{PgError, SqlState};
use proto::frame::{self, move_bytes, Forwarded, Header, Want, HEADER_LEN};
use proto::frontend;
use stats::{GlobalStats, PoolStats};
use upstream::CloseReason;

use super::idle::{unexpected_message, WHOLE_LIMIT};
use super::timers::{self, Timer, TimerSettings, CANCEL_GRACE};
use super::{protocol_violation, server_lost, Held, Session, Step};
use crate::fmt_duration;
use crate::ledger::{Expect, Handover, Received, Sent, Verdict};
use crate::params::tracked_name;
use crate::prepared::Statement;
use crate::read_into;
use crate::scan;
use crate::settings::PoolMode;

/// SQLSTATE of "cannot execute … in a read-only transaction".
const READ_ONLY_SQL_TRANSACTION: &str = "25006";

/// How much of a Bind's body is read before it is forwarded: enough for its portal and
/// statement names (PostgreSQL's names are at most 63 bytes).
const BIND_PREFIX: usize = 4096;

/// How the pump handles each client message type: see the module comment.
fn want_from_client(h: &Header, body: &[u8], prepared: bool) -> Want {
    let small = h.body_len <= WHOLE_LIMIT;
    match h.tag {
        frontend::QUERY if small => Want::Whole,
        frontend::PARSE if small => Want::Whole,
        // A large Parse: its first byte says whether it names a statement (kept, so whole).
        frontend::PARSE => match body.first() {
            None => Want::Prefix(1),
            Some(0) => Want::Stream,
            Some(_) if prepared => Want::Whole,
            Some(_) => Want::Stream,
        },
        frontend::BIND => Want::Prefix(h.body_len.min(BIND_PREFIX)),
        frontend::DESCRIBE | frontend::CLOSE => Want::Whole,
        // Terminate, and what no client may send: the header is enough to act.
        t if t == frontend::TERMINATE || !frontend::is_session_message(t) => Want::Prefix(0),
        _ => Want::Stream,
    }
}

/// How the pump handles each server message type: see the module comment.
fn want_from_server(h: &Header, watch_read_only: bool) -> Want {
    if streams_from_server(h.tag, watch_read_only) {
        return Want::Stream;
    }
    match h.tag {
        // Bare headers; one with a body is a broken server (see `scan_server`).
        backend::PARSE_COMPLETE | backend::CLOSE_COMPLETE if h.body_len > 0 => Want::Prefix(0),
        _ => Want::Whole,
    }
}

/// The server messages the pump forwards unread (the rest it reads whole first).
#[inline]
fn streams_from_server(tag: u8, watch_read_only: bool) -> bool {
    match tag {
        backend::READY_FOR_QUERY
        | backend::PARAMETER_STATUS
        | backend::COMMAND_COMPLETE
        | backend::PARSE_COMPLETE
        | backend::CLOSE_COMPLETE => false,
        // Its SQLSTATE may say the host was demoted (25006).
        backend::ERROR_RESPONSE => !watch_read_only,
        _ => true,
    }
}

impl Session {
    /// The client's socket broke while it held a server (not a close: an error, such as a
    /// reset, or ETIMEDOUT when keepalive or client_tcp_user_timeout gave up on a host that
    /// vanished). Said at warn, because the transaction it had open is about to be rolled back.
    fn client_lost(&self, h: &Held, e: &std::io::Error) {
        GlobalStats::bump(&self.global().clients_lost);
        tracing::warn!(
            server = h.server.id(),
            transaction = ?h.ledger.status(),
            "client connection lost while holding a server ({e}); its work is abandoned"
        );
    }

    /// Active: stream both ways until the transaction ends or something breaks.
    pub(super) async fn pump(&mut self, h: &mut Held) -> Step {
        let timer_settings = TimerSettings::of(&self.settings, self.mode == PoolMode::Session);
        loop {
            if h.restore_due
                && h.ledger.ready_owed() == 0
                && !h.ledger.batch_open()
                && h.ledger.status() != backend::TxStatus::Failed
            {
                // The server owes nothing and has the client's next statement not yet: put the
                // startup values a RESET took away back before it runs. Inside a transaction
                // the SET is part of it, as the RESET was.
                h.restore_due = false;
                let status = h.ledger.status();
                if let Err(e) = self.sync_params_in(&mut h.server, status).await {
                    return Step::Fatal(e);
                }
            }
            // Client → server. What was scanned before a malformed message still goes: the
            // ledger counts it as sent. Whatever happens, nothing is left in the scratch
            // buffers, which the next transaction (of any client) reuses.
            let scanned = self.scan_client(h);
            if !self.scratch.to_server.is_empty() {
                PoolStats::add(
                    &self.entry.stats.bytes_received,
                    self.scratch.to_server.len() as u64,
                );
                let written = h.server.write_all(&self.scratch.to_server).await;
                self.scratch.to_server.clear();
                if let Err(e) = written {
                    self.scratch.to_client.clear();
                    h.server.mark_broken(CloseReason::ServerLost);
                    return Step::Fatal(server_lost(&e.to_string()));
                }
            }
            match scanned {
                Ok(true) => {
                    self.scratch.to_client.clear();
                    return Step::ClientGone;
                }
                Ok(false) => {}
                Err(e) => {
                    self.scratch.to_client.clear();
                    return Step::ClientError(e);
                }
            }
            if let Some(cmd) = h.listen.take() {
                Box::pin(self.run_listen(&cmd, h.ledger.status())).await;
                if self.client.flush().await.is_err() {
                    return Step::ClientGone;
                }
            }

            // Server → client: what came before a broken message still goes to the client.
            let scanned = self.scan_server(h);
            if matches!(scanned, Ok(true)) {
                // Before the client sees the ReadyForQuery: a client that has its answer finds
                // its transaction in SHOW STATS.
                self.count_transaction(h);
            }
            if !self.scratch.to_client.is_empty() {
                PoolStats::add(
                    &self.entry.stats.bytes_sent,
                    self.scratch.to_client.len() as u64,
                );
                let written = self.client.stream.send(&self.scratch.to_client).await;
                self.scratch.to_client.clear();
                if let Err(e) = written {
                    self.client_lost(h, &e);
                    return Step::ClientGone;
                }
            }
            let done = match scanned {
                Ok(d) => d,
                Err(e) => {
                    h.server.mark_broken(CloseReason::ServerProtocolError);
                    return Step::Fatal(e);
                }
            };
            if done {
                if self.mode == PoolMode::Statement && h.ledger.status() != backend::TxStatus::Idle
                {
                    return Step::Fatal(PgError::fatal(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "transaction blocks are not allowed in statement pooling mode (pool_mode = statement)",
                    ));
                }
                return Step::TxDone;
            }

            // Wait for more from either side, or for the first timer that applies.
            let (_, deadline) = timers::next_timer(&h.ledger, &h.clock, &timer_settings);
            if let Some(d) = deadline {
                self.scratch.alarm.arm(d);
            }
            // In this order, not tokio's random one: a timer that is due is never starved by a
            // server streaming a long result, and when the server's reply is what woke the
            // task (the common case) the client's quiet socket is not polled (and its waker
            // re-registered) for nothing. Neither side starves the other: each turn of the loop
            // moves everything read, and a server waits for the client only when it has
            // nothing to send.
            tokio::select! {
                biased;
                _ = self.scratch.alarm.fired(), if deadline.is_some() => {
                    // The alarm may ring early (it was armed for a deadline that has since
                    // moved on): act only on a timer that is really due.
                    let (timer, deadline) = timers::next_timer(&h.ledger, &h.clock, &timer_settings);
                    if deadline.is_some_and(|d| d <= Instant::now()) {
                        if let Some(step) = self.on_timer(h, timer).await {
                            return step;
                        }
                    }
                }
                r = h.server.read() => {
                    if let Err(e) = r {
                        h.server.mark_broken(CloseReason::ServerLost);
                        return Step::Fatal(server_lost(&e.to_string()));
                    }
                    h.clock.last_server_byte = Instant::now();
                }
                r = read_into(&mut self.client.stream, &mut self.client.buf) => {
                    match r {
                        Ok(0) => return Step::ClientGone,
                        Err(e) => {
                            self.client_lost(h, &e);
                            return Step::ClientGone;
                        }
                        Ok(_) => {}
                    }
                    h.clock.last_client_byte = Instant::now();
                }
            }
        }
    }

    /// Handles a fired timer; `Some` ends the transaction.
    async fn on_timer(&mut self, h: &mut Held, timer: Timer) -> Option<Step> {
        let s = self.settings.clone();
        let fatal = |code, setting: &str, d: Option<Duration>, what: &str| {
            Some(Step::Fatal(PgError::fatal(
                code,
                format!(
                    "{setting} ({}) expired{what}",
                    fmt_duration(d.unwrap_or_default())
                ),
            )))
        };
        match timer {
            Timer::None => None,
            Timer::IdleTransaction => {
                h.server.mark_broken(CloseReason::IdleTransactionTimeout);
                GlobalStats::bump(&self.global().timeouts_idle_transaction);
                tracing::info!("idle_transaction_timeout expired");
                fatal(
                    SqlState::IDLE_IN_TRANSACTION_TIMEOUT,
                    "idle_transaction_timeout",
                    s.idle_transaction_timeout,
                    "",
                )
            }
            Timer::ClientIdle => {
                h.server.mark_broken(CloseReason::ClientIdleTimeout);
                GlobalStats::bump(&self.global().timeouts_client_idle);
                tracing::info!("client_idle_timeout expired");
                fatal(
                    SqlState::IDLE_SESSION_TIMEOUT,
                    "client_idle_timeout",
                    s.client_idle_timeout,
                    "",
                )
            }
            Timer::Query => {
                GlobalStats::bump(&self.global().timeouts_query);
                tracing::warn!(
                    server = h.server.id(),
                    "query_timeout expired; cancelling the query"
                );
                PgError::notice(format!(
                    "query_timeout ({}) expired: Breakwater is cancelling the query",
                    fmt_duration(s.query_timeout.unwrap_or_default())
                ))
                .write(&mut self.scratch.to_client);
                let target = h.server.cancel_target();
                h.clock.cancel_sent = Some(Instant::now());
                if target.send(CANCEL_GRACE).await.is_err() {
                    // Not confirmed: it may still arrive, during the next client's query.
                    // The client still gets its answer if one comes; the server is not kept.
                    h.server.mark_broken(CloseReason::QueryTimeout);
                }
                None
            }
            Timer::CancelGrace => {
                h.server.mark_broken(CloseReason::QueryTimeout);
                fatal(
                    SqlState::QUERY_CANCELED,
                    "query_timeout",
                    s.query_timeout,
                    " and the server did not answer the cancel; closing the server connection",
                )
            }
            Timer::Unresponsive => {
                if h.server.socket_looks_dead() {
                    GlobalStats::bump(&self.global().timeouts_server_unresponsive);
                    h.server.mark_broken(CloseReason::Unresponsive);
                    tracing::warn!(
                        server = h.server.id(),
                        "server unresponsive with a dead socket; dropping it"
                    );
                    return fatal(
                        SqlState::CONNECTION_FAILURE,
                        "server_unresponsive_timeout",
                        s.server_unresponsive_timeout,
                        ": the server stopped answering and its socket looks dead",
                    );
                }
                // A healthy long query: everything acknowledged. Look again later.
                h.clock.last_server_byte = Instant::now();
                None
            }
        }
    }

    /// Moves what the client sent from its buffer to `to_server`, rewriting named prepared
    /// statements, and tells the ledger. Returns whether the client sent Terminate.
    fn scan_client(&mut self, h: &mut Held) -> Result<bool, PgError> {
        let max = self.settings.max_message;
        let prepared = self.settings.max_prepared_statements > 0;
        loop {
            let next = h.ledger.client.next(
                &mut self.client.buf,
                &mut self.scratch.to_server,
                max,
                |hdr, body| want_from_client(hdr, body, prepared),
            );
            let sent = match next.map_err(|e| protocol_violation(e.to_string()))? {
                Forwarded::NeedMore => return Ok(false),
                Forwarded::Finished => continue,
                Forwarded::Streamed(hdr) => {
                    if matches!(hdr.tag, frontend::QUERY | frontend::PARSE) {
                        // Too large to scan before it goes: assume the worst.
                        h.ledger.mark_session_state();
                        h.advisory_unknown = true;
                    }
                    match Sent::from_tag(hdr.tag) {
                        Some(sent) => sent,
                        None => return Err(unexpected_message(hdr.tag)),
                    }
                }
                Forwarded::Prefix(hdr) => match hdr.tag {
                    frontend::TERMINATE => return Ok(true),
                    frontend::BIND => self.forward_bind(h, hdr)?,
                    // A large Parse whose first byte is in now: decide again.
                    frontend::PARSE => continue,
                    tag => return Err(unexpected_message(tag)),
                },
                Forwarded::Whole(hdr) if hdr.tag == frontend::QUERY => {
                    let text = self
                        .client
                        .buf
                        .get(HEADER_LEN..hdr.total())
                        .unwrap_or_default();
                    if let Some(cmd) = self.listen_in_transaction(h, hdr, text) {
                        bytes::Buf::advance(&mut self.client.buf, hdr.total());
                        h.listen = Some(cmd);
                        return Ok(false);
                    }
                    if scan::text_may_leave_state(text) {
                        h.ledger.mark_session_state();
                        h.advisory_unknown |= scan::text_mentions_advisory(text);
                    }
                    self.watch_reset(h, text);
                    move_bytes(
                        &mut self.client.buf,
                        &mut self.scratch.to_server,
                        hdr.total(),
                    );
                    Sent::Query
                }
                Forwarded::Whole(hdr) => {
                    let msg = frame::take_whole(&mut self.client.buf, hdr);
                    match hdr.tag {
                        frontend::PARSE => self.forward_parse(h, &msg.body)?,
                        frontend::DESCRIBE => self.forward_describe(h, &msg.body)?,
                        _ => self.forward_close(&msg.body)?,
                    }
                }
            };
            if matches!(sent, Sent::Query | Sent::Sync | Sent::FunctionCall) {
                // The client's bytes arrived at this wake-up (or the checkout just now).
                h.clock.query_since.get_or_insert(h.clock.last_client_byte);
            }
            if let Some(skipped) = h.ledger.on_client(sent) {
                self.forget(h, &skipped);
            }
            h.ledger.emit_synthetic(&mut self.scratch.to_client);
        }
    }

    /// A statement that reset parameters the startup packet set has completed. The server now
    /// has its own defaults; PostgreSQL would have the startup values, so the client is told
    /// those (as the ParameterStatus PostgreSQL would send) and the server gets them before
    /// the client's next statement. Unreported parameters (statement_timeout from `options`,
    /// search_path before PostgreSQL 18) say nothing when reset, and a reported one whose
    /// default happens to equal its last value says nothing either: the server's value of
    /// each is forgotten, so the sync SETs it whatever it is.
    fn reset_done(&mut self, target: scan::Reset, h: &mut Held) {
        let names: Vec<&'static str> = self
            .params
            .startup_names()
            .filter(|n| target.covers(n))
            .collect();
        match &target {
            scan::Reset::All => h.server.client_reset_params(true, &names),
            scan::Reset::One(name) => h.server.client_reset_params(false, &[name.as_str()]),
        }
        for name in names {
            if let Some(value) = self.params.restore_startup(name) {
                backend::write_parameter_status(&mut self.scratch.to_client, name, &value);
            }
        }
        h.restore_due = true;
    }

    /// Notes a statement that puts parameters the client's startup packet set back to their
    /// defaults, so that its replies can be corrected (see `scan_server`).
    fn watch_reset(&self, h: &mut Held, sql: &[u8]) {
        if let Some(target) = scan::reset_target(sql) {
            if self.params.reset_touches_startup(&target) {
                h.reset = Some(target);
            }
        }
    }

    /// A whole Parse: a named one is recorded for this client and sent under its global name,
    /// unless the server has it already (then Breakwater answers ParseComplete itself).
    fn forward_parse(&mut self, h: &mut Held, body: &bytes::Bytes) -> Result<Sent, PgError> {
        let (name, sql) =
            frontend::parse_parse(body).map_err(|e| protocol_violation(e.to_string()))?;
        if scan::text_may_leave_state(sql) {
            h.ledger.mark_session_state();
            h.advisory_unknown |= scan::text_mentions_advisory(sql);
        }
        self.watch_reset(h, sql);
        if name.is_empty() || self.settings.max_prepared_statements == 0 {
            frame::write_message(&mut self.scratch.to_server, frontend::PARSE, |b| {
                b.extend_from_slice(body)
            });
            return Ok(Sent::Parse {
                hide: false,
                prepared: None,
            });
        }
        let client_name = body.slice(..name.len());
        let stmt = Arc::new(Statement::new(body.slice(name.len() + 1..)));
        PoolStats::add(&self.entry.stats.client_parse_count, 1);
        self.statements.insert(client_name.clone(), stmt.clone());
        if h.server.prepared_mut().contains(&stmt.global) {
            return Ok(Sent::Answered(backend::PARSE_COMPLETE));
        }
        Ok(self.prepare_on_server(h, &stmt, Some(client_name)))
    }

    /// The start of a Bind (at least its portal and statement names): a statement this client
    /// prepared is bound under its global name, parsed on this server first if it lacks it; the
    /// rest of the message (the parameters) streams.
    fn forward_bind(&mut self, h: &mut Held, hdr: Header) -> Result<Sent, PgError> {
        PoolStats::add(&self.entry.stats.bind_count, 1);
        let available = self.client.buf.len().saturating_sub(HEADER_LEN);
        let prefix = self
            .client
            .buf
            .get(HEADER_LEN..HEADER_LEN + available.min(hdr.body_len))
            .unwrap_or_default();
        let r = frontend::statement_ref(frontend::BIND, prefix)
            .map_err(|e| protocol_violation(e.to_string()))?;
        let stmt = self.client_statement(r.name);
        let (prefix_len, end) = (r.prefix_len, r.end());
        match stmt {
            Some(stmt) => {
                // A prepared RESET runs at each Execute, long after its Parse, and so does a
                // statement that takes an advisory lock or makes a temp table: the Parse that
                // flagged it may have been in an earlier transaction (drivers prepare in one
                // round trip and execute in the next).
                self.watch_reset(h, &stmt.rest);
                if stmt.may_leave_state {
                    h.ledger.mark_session_state();
                    h.advisory_unknown |= stmt.mentions_advisory;
                }
                self.ensure_prepared(h, &stmt);
                let name_len = end - prefix_len - 1;
                let len = hdr.body_len - name_len + stmt.global.len() + 4;
                let out = &mut self.scratch.to_server;
                out.put_u8(frontend::BIND);
                out.put_u32(u32::try_from(len).map_err(|_| protocol_violation("Bind too large"))?);
                out.extend_from_slice(
                    self.client
                        .buf
                        .get(HEADER_LEN..HEADER_LEN + prefix_len)
                        .unwrap_or_default(),
                );
                frame::put_cstr(out, &stmt.global);
                bytes::Buf::advance(&mut self.client.buf, HEADER_LEN + end);
            }
            // Unnamed, or a name this client never prepared: the server answers.
            None => {
                move_bytes(
                    &mut self.client.buf,
                    &mut self.scratch.to_server,
                    HEADER_LEN + end,
                );
            }
        }
        h.ledger.client.skip(hdr.body_len - end);
        Ok(Sent::Bind)
    }

    /// A Describe of a statement this client prepared asks under its global name (parsed on
    /// this server first if it lacks it).
    fn forward_describe(&mut self, h: &mut Held, body: &[u8]) -> Result<Sent, PgError> {
        let r = frontend::statement_ref(frontend::DESCRIBE, body)
            .map_err(|e| protocol_violation(e.to_string()))?;
        let stmt = self.client_statement(r.name);
        match stmt {
            Some(stmt) => {
                // A prepared RESET runs at each Execute, long after its Parse.
                let sql = stmt.rest.split(|b| *b == 0).next().unwrap_or_default();
                self.watch_reset(h, sql);
                self.ensure_prepared(h, &stmt);
                frame::write_message(&mut self.scratch.to_server, frontend::DESCRIBE, |b| {
                    b.extend_from_slice(body.get(..r.prefix_len).unwrap_or_default());
                    frame::put_cstr(b, &stmt.global);
                });
            }
            None => frame::write_message(&mut self.scratch.to_server, frontend::DESCRIBE, |b| {
                b.extend_from_slice(body)
            }),
        }
        Ok(Sent::Describe)
    }

    /// A Close of a statement this client prepared is answered by Breakwater: the shared
    /// server statement stays, only this client's name for it goes.
    fn forward_close(&mut self, body: &[u8]) -> Result<Sent, PgError> {
        let r = frontend::statement_ref(frontend::CLOSE, body)
            .map_err(|e| protocol_violation(e.to_string()))?;
        match r.name {
            Some(n) if !n.is_empty() && self.settings.max_prepared_statements > 0 => {
                self.statements.remove(n);
                Ok(Sent::Answered(backend::CLOSE_COMPLETE))
            }
            _ => {
                frame::write_message(&mut self.scratch.to_server, frontend::CLOSE, |b| {
                    b.extend_from_slice(body)
                });
                Ok(Sent::Close { hide: false })
            }
        }
    }

    /// The statement a Bind, Describe or Close names, if this client prepared it under that
    /// name (the unnamed statement, and every name while prepared statements are off, are the
    /// server's own).
    fn client_statement(&self, name: Option<&[u8]>) -> Option<Arc<Statement>> {
        match name {
            Some(n) if !n.is_empty() && self.settings.max_prepared_statements > 0 => {
                self.statements.get(n).cloned()
            }
            _ => None,
        }
    }

    /// Before a Bind or Describe of `stmt`: parses it on this server first if it lacks it.
    fn ensure_prepared(&mut self, h: &mut Held, stmt: &Arc<Statement>) {
        if !h.server.prepared_mut().contains(&stmt.global) {
            let parse = self.prepare_on_server(h, stmt, None);
            if let Some(e) = h.ledger.on_client(parse) {
                self.forget(h, &e);
            }
        }
    }

    /// Writes a Parse of `stmt` under its global name, closing the least recently used statement
    /// first when the connection is at `max_prepared_statements`, and returns it for the
    /// ledger. `client_name` is set when the client itself sent this Parse (its ParseComplete is
    /// the client's); otherwise it is injected before a Bind or Describe and its reply hidden.
    fn prepare_on_server(
        &mut self,
        h: &mut Held,
        stmt: &Arc<Statement>,
        client_name: Option<bytes::Bytes>,
    ) -> Sent {
        if let Some(evicted) = h
            .server
            .prepared_mut()
            .insert(stmt.global.clone(), self.settings.max_prepared_statements)
        {
            frontend::write_close_statement(&mut self.scratch.to_server, &evicted);
            if let Some(e) = h.ledger.on_client(Sent::Close { hide: true }) {
                // Skipped after an error: the server keeps the evicted statement (see
                // `on_server`), so it is reset at the end of the transaction.
                if is_eviction(&e) {
                    h.ledger.mark_session_state();
                }
                self.forget(h, &e);
            }
        }
        frontend::write_parse(&mut self.scratch.to_server, &stmt.global, &stmt.rest);
        PoolStats::add(&self.entry.stats.server_parse_count, 1);
        let hide = client_name.is_none();
        Sent::Parse {
            hide,
            prepared: Some((client_name.unwrap_or_default(), stmt.global.clone())),
        }
    }

    /// A Parse the server did not run (refused, or skipped after an error): it holds no such
    /// statement, and the client's name for it means nothing.
    fn forget(&mut self, h: &mut Held, e: &Expect) {
        if let Expect::Parse {
            prepared: Some((name, global)),
            ..
        } = e
        {
            h.server.prepared_mut().remove(global);
            self.statements.forget_if(name, global);
            self.entry
                .known_statements
                .forget(self.params.fingerprint(), global);
        }
    }

    /// Moves what the server sent to `to_client`, hiding replies to Breakwater's own requests
    /// and adding synthetic ones, and returns whether the transaction ended: an idle
    /// ReadyForQuery with nothing owed. It stops right after that ReadyForQuery; anything
    /// behind it is not this client's.
    pub(super) fn scan_server(&mut self, h: &mut Held) -> Result<bool, PgError> {
        let max = h.server.max_message();
        let watch = self.watch_read_only;
        loop {
            // A result's rows (and whatever else would stream unread and leave the ledger as
            // it is) go in one copy; the loop below handles the message that ends the run.
            h.ledger.pass_server_run(
                h.server.buf_mut(),
                &mut self.scratch.to_client,
                max,
                |tag| streams_from_server(tag, watch),
            );
            let next = h.ledger.server.next(
                h.server.buf_mut(),
                &mut self.scratch.to_client,
                max,
                |hdr, _| want_from_server(hdr, watch),
            );
            let hdr = match next.map_err(|e| server_lost(&e.to_string()))? {
                Forwarded::NeedMore => return Ok(false),
                Forwarded::Finished => {
                    // Replies Breakwater owes after this message go now.
                    h.ledger.emit_synthetic(&mut self.scratch.to_client);
                    continue;
                }
                Forwarded::Streamed(hdr) => {
                    // Never hidden: only ParseComplete and CloseComplete are, and they are read
                    // whole.
                    self.on_server(h, Received::Other(hdr.tag));
                    h.ledger.emit_synthetic(&mut self.scratch.to_client);
                    continue;
                }
                Forwarded::Prefix(hdr) => {
                    return Err(server_lost(&format!(
                        "a '{}' message with a body of {} bytes",
                        hdr.tag as char, hdr.body_len
                    )))
                }
                Forwarded::Whole(hdr) => hdr,
            };
            // Read in place: the message is copied to the client (or dropped) only once.
            let body = h
                .server
                .buf_mut()
                .get(HEADER_LEN..hdr.total())
                .unwrap_or_default();
            let seen = inspect(hdr.tag, body, watch)?;
            let received = match seen {
                Inspected::Ready(status) => Received::Ready(status),
                _ => Received::Other(hdr.tag),
            };
            if self.on_server(h, received) == Verdict::Hide {
                bytes::Buf::advance(h.server.buf_mut(), hdr.total());
                h.ledger.emit_synthetic(&mut self.scratch.to_client);
                continue;
            }
            let mut boundary = false;
            let ready = matches!(seen, Inspected::Ready(_));
            match seen {
                Inspected::Ready(status) => {
                    h.clock.cancel_sent = None;
                    // PostgreSQL reports changed parameters just before ReadyForQuery, after
                    // the CommandComplete: the reset is over only here.
                    h.reset = None;
                    let stats = &self.entry.stats;
                    PoolStats::add(&stats.query_count, 1);
                    // The server's bytes arrived at this wake-up: its time is the answer's.
                    let now = h.clock.last_server_byte;
                    if let Some(t) = h.clock.query_since.take() {
                        let took = now.saturating_duration_since(t);
                        PoolStats::add(&stats.query_time_us, took.as_micros() as u64);
                    }
                    if h.ledger.ready_owed() > 0 {
                        h.clock.query_since = Some(now);
                    }
                    let statement_mode_done = self.mode == PoolMode::Statement
                        && h.ledger.ready_owed() == 0
                        && !h.ledger.batch_open();
                    if statement_mode_done && status != backend::TxStatus::Idle {
                        // Hold back this ReadyForQuery: the client must see the refusal as the
                        // answer to the statement that opened a transaction.
                        bytes::Buf::advance(h.server.buf_mut(), hdr.total());
                        return Ok(true);
                    }
                    boundary = statement_mode_done;
                }
                Inspected::Param(k, v) => {
                    let reset = match (&h.reset, tracked_name(&k)) {
                        (Some(r), Some(t)) => r.covers(t) && self.params.startup_value(t).is_some(),
                        _ => false,
                    };
                    if reset {
                        // The reset's report of the server's default: the client was told its
                        // startup value at the CommandComplete, and the server is made to
                        // match before the client's next statement.
                        h.server.client_changed_param(&k, &v);
                        bytes::Buf::advance(h.server.buf_mut(), hdr.total());
                        h.ledger.emit_synthetic(&mut self.scratch.to_client);
                        continue;
                    }
                    if let Some(t) = tracked_name(&k) {
                        self.params.set(t, &v);
                    }
                    if k == "in_hot_standby" || k == "default_transaction_read_only" {
                        // The server's role may have changed under us (a promotion, a reload).
                        self.entry.pool.role_suspect();
                    }
                    h.server.client_changed_param(&k, &v);
                }
                Inspected::ReadOnlyRefused => {
                    tracing::info!(server = h.server.id(), "server refused a write (25006) in a read-write pool; re-checking host roles");
                    self.entry.pool.role_suspect();
                }
                Inspected::Command {
                    leaves_state,
                    drops_statements,
                    discards_all,
                } => {
                    if discards_all {
                        self.discarded_all();
                    }
                    if leaves_state {
                        h.ledger.mark_session_state();
                    }
                    if let Some(target) = &h.reset {
                        self.reset_done(target.clone(), h);
                    }
                    if drops_statements {
                        // The server dropped every prepared statement, ours included.
                        h.server.prepared_mut().clear();
                        self.statements.clear();
                    }
                }
                Inspected::Other => {}
            }
            move_bytes(h.server.buf_mut(), &mut self.scratch.to_client, hdr.total());
            h.ledger.emit_synthetic(&mut self.scratch.to_client);
            if ready && (boundary || h.ledger.handover() == Handover::Clean) {
                return Ok(true);
            }
        }
    }

    /// Tells the ledger of a server message, forgetting the statements an error undid and
    /// learning the ones a ParseComplete made.
    fn on_server(&mut self, h: &mut Held, received: Received) -> Verdict {
        let statements = &mut self.statements;
        let cache = h.server.prepared_mut();
        let known = &self.entry.known_statements;
        let fingerprint = self.params.fingerprint();
        let cap = self.settings.max_prepared_statements;
        let mut eviction_skipped = false;
        let verdict = h.ledger.on_server(
            received,
            |e| {
                if let Expect::Parse {
                    prepared: Some((name, global)),
                    ..
                } = e
                {
                    cache.remove(global);
                    statements.forget_if(name, global);
                    known.forget(fingerprint, global);
                }
                eviction_skipped |= is_eviction(e);
            },
            |global| known.insert(fingerprint, &global, cap),
        );
        if eviction_skipped {
            // The eviction's Close did not run (an error earlier in the batch made the server
            // skip it): the server still holds a statement the cache no longer lists, and a
            // later Parse of the same text would fail with 42P05. Resetting the server at the
            // end of the transaction empties both.
            h.ledger.mark_session_state();
        }
        verdict
    }
}

/// The Close Breakwater sends for a statement it evicts from a full cache.
fn is_eviction(e: &Expect) -> bool {
    matches!(e, Expect::Close { hide: true })
}

/// What the pump learnt from a server message it read whole.
enum Inspected {
    Ready(backend::TxStatus),
    /// A ParameterStatus: name and value.
    Param(String, String),
    /// An ErrorResponse saying the server is read-only (25006), in a pool that must write.
    ReadOnlyRefused,
    Command {
        leaves_state: bool,
        drops_statements: bool,
        discards_all: bool,
    },
    Other,
}

fn inspect(tag: u8, body: &[u8], watch_read_only: bool) -> Result<Inspected, PgError> {
    Ok(match tag {
        backend::READY_FOR_QUERY => Inspected::Ready(
            backend::parse_ready_for_query(body).map_err(|e| server_lost(&e.to_string()))?,
        ),
        backend::PARAMETER_STATUS => {
            let (k, v) =
                backend::parse_parameter_status(body).map_err(|e| server_lost(&e.to_string()))?;
            Inspected::Param(k.to_owned(), v.to_owned())
        }
        backend::ERROR_RESPONSE
            if watch_read_only
                && proto::error::parse_error_fields(body)
                    .is_ok_and(|f| f.code == READ_ONLY_SQL_TRANSACTION) =>
        {
            Inspected::ReadOnlyRefused
        }
        backend::COMMAND_COMPLETE => {
            let tag = backend::command_tag(body);
            Inspected::Command {
                leaves_state: scan::tag_leaves_state(tag),
                drops_statements: tag == b"DEALLOCATE ALL" || tag == b"DISCARD ALL",
                discards_all: tag == b"DISCARD ALL",
            }
        }
        _ => Inspected::Other,
    })
}

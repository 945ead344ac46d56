//! The state machine of one logged-in client.
//!
//! ```text
//!            first message            idle ReadyForQuery, nothing owed (transaction mode)
//!   Idle ─────────────────► Active ───────────────────────────────────────────► Idle
//!    │  (checkout, sync)      │ client gone: roll back and return, or close the server
//!    │                        │ server gone / protocol error: close server, FATAL to client
//!    └─ Terminate / timeout / shutdown ──► end
//! ```
//! In Active, bytes stream both ways. Only message headers are read, except the few messages
//! that decide where a transaction ends or what state it leaves: ReadyForQuery, ParameterStatus,
//! CommandComplete (server side) and Query, Parse, Sync, FunctionCall, Terminate (client side).
//! Everything else is forwarded as it arrives, even before the whole message is in.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::backend;
use proto::error::{PgError, SqlState};
use proto::frame::{self, HEADER_LEN};
use proto::frontend;
use stats::PoolStats;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use upstream::{discard, CheckoutError, ConnectError, PooledServer, QueryError};

use crate::cancel::Registration;
use crate::client::{fmt_duration, ClientConn};
use crate::params::{tracked_name, ClientParams};
use crate::scan;
use crate::settings::{PoolMode, ProxySettings};
use crate::{internal_timeout, read_into, PoolEntry, Shared};

/// A server this client holds, and what the protocol still owes on it.
struct Held {
    server: PooledServer,
    /// ReadyForQuery messages still to come: one per Query, Sync and FunctionCall sent.
    owed: u32,
    /// Extended-protocol messages were sent since the last Sync.
    batch_open: bool,
    /// Transaction status from the last ReadyForQuery.
    status: u8,
    /// Bytes of a client message still to forward unexamined (a large CopyData or Bind).
    client_skip: usize,
    /// Bytes of a server message still to forward unexamined (a large DataRow).
    server_skip: usize,
    /// The client left session state on the server: reset it before anyone else gets it.
    dirty: bool,
    since: Instant,
    query_since: Option<Instant>,
}

impl Held {
    fn new(server: PooledServer) -> Held {
        Held {
            server,
            owed: 0,
            batch_open: false,
            status: b'I',
            client_skip: 0,
            server_skip: 0,
            dirty: false,
            since: Instant::now(),
            query_since: None,
        }
    }

    /// At a transaction boundary the server can serve someone else.
    fn at_boundary(&self) -> bool {
        self.owed == 0 && !self.batch_open && self.status == b'I' && self.client_skip == 0 && self.server_skip == 0
    }
}

enum Step {
    /// The transaction ended; the server is idle and owes nothing.
    TxDone,
    /// The client disconnected (or sent Terminate).
    ClientGone,
    /// Tell the client this and close; the server (if held) is not reusable.
    Fatal(PgError),
}

enum Work {
    Message,
    Gone,
    Fatal(PgError),
}

pub(crate) struct Session<'a> {
    settings: &'a ProxySettings,
    client: ClientConn,
    entry: Arc<PoolEntry>,
    params: ClientParams,
    cancel: Registration<'a>,
    mode: PoolMode,
    shutdown: watch::Receiver<bool>,
}

impl<'a> Session<'a> {
    pub fn new(
        shared: &'a Shared,
        settings: &'a ProxySettings,
        client: ClientConn,
        entry: Arc<PoolEntry>,
        params: ClientParams,
        cancel: Registration<'a>,
    ) -> Self {
        let mode = entry.route.pool_mode;
        Session {
            settings,
            client,
            entry,
            params,
            cancel,
            mode,
            shutdown: shared.shutdown.subscribe(),
        }
    }

    pub async fn run(&mut self) {
        let stats = self.entry.stats.clone();
        PoolStats::gauge(&stats.cl_idle, 1);
        let mut held = match self.welcome().await {
            Ok(h) => h,
            Err(e) => {
                PoolStats::gauge(&stats.cl_idle, -1);
                self.client.send_error(&e).await;
                return;
            }
        };
        loop {
            let h = match held.as_mut() {
                Some(h) => h,
                None => {
                    match self.wait_for_work().await {
                        Work::Message => {}
                        Work::Gone => break,
                        Work::Fatal(e) => {
                            self.client.send_error(&e).await;
                            break;
                        }
                    }
                    match self.checkout().await {
                        Ok(server) => held.insert(Held::new(server)),
                        Err(e) => {
                            self.client.send_error(&e).await;
                            break;
                        }
                    }
                }
            };
            PoolStats::gauge(&stats.cl_idle, -1);
            PoolStats::gauge(&stats.cl_active, 1);
            let step = self.pump(h).await;
            PoolStats::gauge(&stats.cl_active, -1);
            PoolStats::gauge(&stats.cl_idle, 1);
            match step {
                Step::TxDone => {
                    let shutting_down = *self.shutdown.borrow();
                    if self.mode == PoolMode::Session && !shutting_down {
                        continue;
                    }
                    if let Some(h) = held.take() {
                        self.release(h).await;
                    }
                    if shutting_down {
                        self.client.send_error(&shutdown_error()).await;
                        break;
                    }
                }
                Step::ClientGone => {
                    if let Some(h) = held.take() {
                        self.abandon(h).await;
                    }
                    break;
                }
                Step::Fatal(e) => {
                    if let Some(h) = held.take() {
                        self.cancel.slot.set(None).await;
                        discard(h.server);
                    }
                    tracing::warn!(code = e.code.0, "closing client: {}", e.message);
                    self.client.send_error(&e).await;
                    break;
                }
            }
        }
        PoolStats::gauge(&stats.cl_idle, -1);
        if let Some(h) = held.take() {
            self.abandon(h).await;
        }
        let _ = self.client.stream.shutdown().await;
    }

    /// Tells the client its session parameters, cancel key and readiness. The parameters come
    /// from the pool's cached welcome when the client asked for nothing that needs a server to
    /// canonicalise; otherwise one server round trip answers (and, in session mode, that server
    /// stays with the client).
    async fn welcome(&mut self) -> Result<Option<Held>, PgError> {
        let cached = match self.entry.welcome.lock() {
            Ok(w) => w.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let mut held = None;
        let server_params = match cached.filter(|w| self.resolvable(w)) {
            Some(w) => w,
            None => {
                let mut server = self.checkout_raw().await?;
                if server.pristine {
                    if let Ok(mut w) = self.entry.welcome.lock() {
                        *w = Some(server.params().to_vec());
                    }
                }
                self.sync_params(&mut server).await?;
                let p = server.params().to_vec();
                if self.mode == PoolMode::Session {
                    self.cancel.slot.set(Some(server.cancel_target())).await;
                    held = Some(Held::new(server));
                }
                p
            }
        };
        self.params.complete_from(&server_params);
        for (name, value) in &server_params {
            let value = tracked_name(name)
                .and_then(|t| self.params.get(t))
                .unwrap_or(value);
            backend::write_parameter_status(&mut self.client.out, name, value);
        }
        backend::write_backend_key_data(&mut self.client.out, self.cancel.pid, self.cancel.key);
        backend::write_ready_for_query(&mut self.client.out, b'I');
        if self.client.flush().await.is_err() {
            return Err(PgError::fatal(SqlState::CONNECTION_FAILURE, "client went away during login"));
        }
        Ok(held)
    }

    /// Can the client's startup parameters be answered from the cached welcome without asking a
    /// server for their canonical spelling?
    fn resolvable(&self, welcome: &[(String, String)]) -> bool {
        self.params.reported.iter().all(|(name, value)| {
            let server = welcome.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
            match server {
                Some(v) if v == value => true,
                // The server echoes short printable application names unchanged.
                Some(_) if *name == "application_name" => {
                    value.len() < 64 && value.bytes().all(|b| (0x20..0x7f).contains(&b))
                }
                Some(_) => false,
                None => true,
            }
        })
    }

    /// Idle: wait until the client sends something that needs a server.
    async fn wait_for_work(&mut self) -> Work {
        loop {
            if self.client.buf.len() >= HEADER_LEN {
                if let Err(e) = frame::message_len(&self.client.buf, self.settings.max_message) {
                    return Work::Fatal(PgError::fatal(SqlState::PROTOCOL_VIOLATION, e.to_string()));
                }
                return match self.client.buf[0] {
                    frontend::TERMINATE => Work::Gone,
                    _ => Work::Message,
                };
            }
            if *self.shutdown.borrow() {
                return Work::Fatal(shutdown_error());
            }
            let idle = self.settings.client_idle_timeout;
            tokio::select! {
                r = read_into(&mut self.client.stream, &mut self.client.buf) => match r {
                    Ok(0) | Err(_) => return Work::Gone,
                    Ok(_) => {}
                },
                _ = self.shutdown.changed() => {}
                _ = sleep_opt(idle) => {
                    return Work::Fatal(PgError::fatal(
                        SqlState::IDLE_SESSION_TIMEOUT,
                        format!("client_idle_timeout ({}) expired", fmt_duration(idle.unwrap_or_default())),
                    ));
                }
            }
        }
    }

    async fn checkout_raw(&mut self) -> Result<PooledServer, PgError> {
        let stats = &self.entry.stats;
        PoolStats::gauge(&stats.cl_waiting, 1);
        let start = Instant::now();
        let result = self.entry.pool.checkout(self.settings.query_wait_timeout).await;
        PoolStats::gauge(&stats.cl_waiting, -1);
        PoolStats::add(&stats.wait_time_us, start.elapsed().as_micros() as u64);
        PoolStats::add(&stats.wait_count, 1);
        result.map_err(|e| {
            tracing::warn!(error = %e, "no server connection for client");
            checkout_error(e)
        })
    }

    async fn checkout(&mut self) -> Result<PooledServer, PgError> {
        let mut server = self.checkout_raw().await?;
        self.sync_params(&mut server).await?;
        self.cancel.slot.set(Some(server.cancel_target())).await;
        Ok(server)
    }

    /// Makes the server's session parameters match this client's; no round trip when they
    /// already do.
    async fn sync_params(&mut self, server: &mut PooledServer) -> Result<(), PgError> {
        let Some(sql) = self.params.sync_sql(server.params(), &server.applied) else {
            return Ok(());
        };
        server.pristine = false;
        let result = tokio::time::timeout(internal_timeout(self.settings), server.simple_query(&sql)).await;
        match result {
            Ok(Ok(())) => {
                server.applied = self.params.unreported(server.params());
                for (name, value) in self.params.reported.iter_mut() {
                    if let Some(v) = server.param(name) {
                        if v != value {
                            *value = v.to_owned();
                        }
                    }
                }
                Ok(())
            }
            Ok(Err(QueryError::Server(f))) => {
                server.broken = true;
                Err(PgError::fatal(SqlState::INVALID_PARAMETER_VALUE, format!("could not apply session parameters: {}", f.message)))
            }
            Ok(Err(e)) => {
                server.broken = true;
                Err(PgError::fatal(SqlState::CONNECTION_FAILURE, format!("server connection failed while applying session parameters: {e}")))
            }
            Err(_) => {
                server.broken = true;
                Err(PgError::fatal(SqlState::CONNECTION_FAILURE, "server did not answer while applying session parameters"))
            }
        }
    }

    /// Active: stream both ways until the transaction ends or something breaks.
    async fn pump(&mut self, h: &mut Held) -> Step {
        loop {
            // Client → server.
            let (n, terminate) = self.scan_client(h);
            if n > 0 {
                let chunk = self.client.buf.split_to(n);
                PoolStats::add(&self.entry.stats.bytes_received, n as u64);
                if let Err(e) = h.server.write_all(&chunk).await {
                    h.server.broken = true;
                    return Step::Fatal(server_lost(&e.to_string()));
                }
            }
            if terminate {
                return Step::ClientGone;
            }
            if let Err(e) = self.check_client_frame() {
                return Step::Fatal(e);
            }

            // Server → client.
            let (m, done) = match self.scan_server(h) {
                Ok(r) => r,
                Err(e) => return Step::Fatal(e),
            };
            if m > 0 {
                let chunk = h.server.buf.split_to(m);
                PoolStats::add(&self.entry.stats.bytes_sent, m as u64);
                if self.client.stream.write_all(&chunk).await.is_err() {
                    return Step::ClientGone;
                }
            }
            if done {
                if self.mode == PoolMode::Statement && h.status != b'I' {
                    return Step::Fatal(PgError::fatal(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "transaction blocks are not allowed in statement pooling mode (pool_mode = statement)",
                    ));
                }
                return Step::TxDone;
            }

            // Wait for more from either side.
            let idle_in_tx = h.owed == 0 && h.status != b'I';
            let timeout = if idle_in_tx {
                self.settings.idle_transaction_timeout
            } else if h.owed == 0 && self.mode == PoolMode::Session {
                self.settings.client_idle_timeout
            } else {
                None
            };
            tokio::select! {
                r = h.server.read() => {
                    if let Err(e) = r {
                        h.server.broken = true;
                        return Step::Fatal(server_lost(&e.to_string()));
                    }
                }
                r = read_into(&mut self.client.stream, &mut self.client.buf) => {
                    match r {
                        Ok(0) | Err(_) => return Step::ClientGone,
                        Ok(_) => {}
                    }
                }
                _ = sleep_opt(timeout) => {
                    let d = fmt_duration(timeout.unwrap_or_default());
                    return Step::Fatal(if idle_in_tx {
                        PgError::fatal(SqlState::IDLE_IN_TRANSACTION_TIMEOUT, format!("idle_transaction_timeout ({d}) expired"))
                    } else {
                        PgError::fatal(SqlState::IDLE_SESSION_TIMEOUT, format!("client_idle_timeout ({d}) expired"))
                    });
                }
            }
        }
    }

    /// A client message header announcing more than `max_packet_size` is refused before it is
    /// buffered.
    fn check_client_frame(&self) -> Result<(), PgError> {
        match frame::message_len(&self.client.buf, self.settings.max_message) {
            Ok(_) => Ok(()),
            Err(e) => Err(PgError::fatal(SqlState::PROTOCOL_VIOLATION, e.to_string())),
        }
    }

    /// How many bytes at the front of the client buffer can go to the server now, and whether
    /// the client sent Terminate. Updates what the server will owe.
    fn scan_client(&mut self, h: &mut Held) -> (usize, bool) {
        let buf = &self.client.buf[..];
        let mut pos = 0;
        loop {
            if h.client_skip > 0 {
                let n = h.client_skip.min(buf.len() - pos);
                pos += n;
                h.client_skip -= n;
                if h.client_skip > 0 {
                    return (pos, false);
                }
            }
            let rest = &buf[pos..];
            if rest.len() < HEADER_LEN {
                return (pos, false);
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len < 4 || len > self.settings.max_message {
                // Leave it for check_client_frame to refuse.
                return (pos, false);
            }
            match tag {
                frontend::QUERY | frontend::PARSE => {
                    let Some(body) = rest.get(HEADER_LEN..len + 1) else {
                        return (pos, false);
                    };
                    if tag == frontend::QUERY {
                        h.owed += 1;
                        h.query_since.get_or_insert_with(Instant::now);
                    } else {
                        h.batch_open = true;
                    }
                    if !h.dirty && scan::text_may_leave_state(body) {
                        h.dirty = true;
                    }
                    pos += len + 1;
                }
                frontend::SYNC | frontend::FUNCTION_CALL => {
                    h.owed += 1;
                    if tag == frontend::SYNC {
                        h.batch_open = false;
                    }
                    h.query_since.get_or_insert_with(Instant::now);
                    pos += HEADER_LEN;
                    h.client_skip = len - 4;
                }
                frontend::TERMINATE => return (pos, true),
                frontend::COPY_DATA | frontend::COPY_DONE | frontend::COPY_FAIL => {
                    pos += HEADER_LEN;
                    h.client_skip = len - 4;
                }
                _ => {
                    // Bind, Describe, Execute, Close, Flush: part of an extended batch.
                    h.batch_open = true;
                    pos += HEADER_LEN;
                    h.client_skip = len - 4;
                }
            }
        }
    }

    /// How many bytes at the front of the server buffer go to the client now, and whether they
    /// end the transaction (an idle ReadyForQuery with nothing owed). Scanning stops right after
    /// that ReadyForQuery: anything behind it is not this client's.
    fn scan_server(&mut self, h: &mut Held) -> Result<(usize, bool), PgError> {
        let max = h.server.max_message;
        let mut pos = 0;
        loop {
            if h.server_skip > 0 {
                let n = h.server_skip.min(h.server.buf.len() - pos);
                pos += n;
                h.server_skip -= n;
                if h.server_skip > 0 {
                    return Ok((pos, false));
                }
            }
            let rest = &h.server.buf[pos..];
            if rest.len() < HEADER_LEN {
                return Ok((pos, false));
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len < 4 || len > max {
                return Err(server_lost(&format!("invalid message length {len} from server")));
            }
            match tag {
                backend::READY_FOR_QUERY | backend::PARAMETER_STATUS | backend::COMMAND_COMPLETE => {
                    let Some(body) = rest.get(HEADER_LEN..len + 1) else {
                        return Ok((pos, false));
                    };
                    let start = pos;
                    pos += len + 1;
                    match tag {
                        backend::READY_FOR_QUERY => {
                            h.status = backend::parse_ready_for_query(body)
                                .map_err(|e| server_lost(&e.to_string()))?;
                            h.owed = h.owed.saturating_sub(1);
                            if self.mode == PoolMode::Statement && h.status != b'I' {
                                // Hold back this ReadyForQuery: the client must see the refusal
                                // as the answer to the statement that opened a transaction.
                                return Ok((start, true));
                            }
                            let stats = &self.entry.stats;
                            PoolStats::add(&stats.query_count, 1);
                            if let Some(t) = h.query_since.take() {
                                PoolStats::add(&stats.query_time_us, t.elapsed().as_micros() as u64);
                            }
                            if h.owed > 0 {
                                h.query_since = Some(Instant::now());
                            }
                            if h.at_boundary() || (self.mode == PoolMode::Statement && h.owed == 0 && !h.batch_open) {
                                return Ok((pos, true));
                            }
                        }
                        backend::PARAMETER_STATUS => {
                            let (k, v) = backend::parse_parameter_status(body)
                                .map_err(|e| server_lost(&e.to_string()))?;
                            if let Some(t) = tracked_name(k) {
                                self.params.set(t, v);
                            }
                            let (k, v) = (k.to_owned(), v.to_owned());
                            h.server.set_param(&k, &v);
                            h.server.pristine = false;
                        }
                        _ => {
                            if !h.dirty && scan::tag_leaves_state(backend::command_tag(body)) {
                                h.dirty = true;
                            }
                        }
                    }
                }
                _ => {
                    pos += HEADER_LEN;
                    h.server_skip = len - 4;
                }
            }
        }
    }

    /// Gives a server back at a transaction boundary, resetting it first if the client left
    /// session state (or always, in session mode).
    async fn release(&mut self, mut h: Held) {
        self.cancel.slot.set(None).await;
        let stats = &self.entry.stats;
        PoolStats::add(&stats.xact_count, 1);
        PoolStats::add(&stats.xact_time_us, h.since.elapsed().as_micros() as u64);
        if h.dirty || self.mode == PoolMode::Session {
            PoolStats::add(&stats.server_resets, 1);
            let reset = tokio::time::timeout(
                internal_timeout(self.settings),
                h.server.simple_query(&self.settings.server_reset_query),
            )
            .await;
            match reset {
                Ok(Ok(())) => h.server.applied.clear(),
                Ok(Err(e)) => {
                    tracing::warn!(server = h.server.id, error = %e, "server_reset_query failed; closing the server connection");
                    discard(h.server);
                    return;
                }
                Err(_) => {
                    tracing::warn!(server = h.server.id, "server_reset_query timed out; closing the server connection");
                    discard(h.server);
                    return;
                }
            }
        }
        if h.server.broken || !h.server.buf.is_empty() {
            discard(h.server);
        }
        // Dropping the object returns it to the pool.
    }

    /// The client left while holding a server. Nothing it started may outlive it: an idle
    /// transaction is rolled back and the server verified idle; anything less certain (a query
    /// still running, a half-sent message) closes the server connection.
    async fn abandon(&mut self, mut h: Held) {
        if h.owed > 0 {
            // Stop the running query now rather than when the server next writes to a closed
            // socket; the server connection is closed either way.
            let target = h.server.cancel_target();
            self.cancel.slot.set(None).await;
            let _ = target.send(Duration::from_secs(2)).await;
            discard(h.server);
            return;
        }
        if h.client_skip > 0 || h.server_skip > 0 || h.batch_open || !h.server.buf.is_empty() {
            self.cancel.slot.set(None).await;
            discard(h.server);
            return;
        }
        if h.status != b'I' {
            let rollback = tokio::time::timeout(internal_timeout(self.settings), h.server.simple_query("ROLLBACK")).await;
            if !matches!(rollback, Ok(Ok(()))) {
                self.cancel.slot.set(None).await;
                discard(h.server);
                return;
            }
            h.status = b'I';
        }
        self.release(h).await;
    }
}

fn shutdown_error() -> PgError {
    PgError::fatal(SqlState::ADMIN_SHUTDOWN, "Breakwater is shutting down")
}

fn server_lost(detail: &str) -> PgError {
    PgError::fatal(SqlState::CONNECTION_FAILURE, format!("server connection lost: {detail}"))
}

/// Turns a failed checkout into what the client is told.
fn checkout_error(e: CheckoutError) -> PgError {
    match e {
        CheckoutError::WaitTimeout { .. } => PgError::fatal(SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH, e.to_string()),
        CheckoutError::Connect(ConnectError::Refused { ref fields, .. }) => {
            let code = match fields.code.as_str() {
                "28P01" => SqlState::INVALID_PASSWORD,
                "28000" => SqlState::INVALID_AUTHORIZATION,
                "3D000" => SqlState::INVALID_CATALOG_NAME,
                "53300" => SqlState::TOO_MANY_CONNECTIONS,
                "57P03" => SqlState::CANNOT_CONNECT_NOW,
                _ => SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH,
            };
            PgError::fatal(code, e.to_string())
        }
        CheckoutError::Connect(_) => PgError::fatal(SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH, e.to_string()),
        CheckoutError::Closed { .. } => PgError::fatal(SqlState::CANNOT_CONNECT_NOW, e.to_string()),
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

//! The client side up to a logged-in session: first packets (SSLRequest and TLS, direct TLS,
//! GSSENC refusal, cancel, startup), routing, authentication against the auth_file or the client
//! certificate, and the welcome messages. Everything here, the TLS handshake included, runs
//! under `client_login_timeout`, so a slow or silent client cannot hold a slot forever.
//!
//! Plaintext never crosses into TLS: bytes a client sent after its SSLRequest and before the
//! handshake (CVE-2021-23214) are a protocol violation, not the start of the encrypted stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use proto::auth::{md5_salt, md5_verify, ScramServer, ScramVerifier, Secret, ServerCredential};
use proto::backend;
use proto::error::{PgError, SqlState};
use proto::frame::Message;
use proto::frontend;
use proto::startup::{self, StartupParams, StartupRequest};
use stats::{GlobalStats, PoolStats};
use tokio::time::Instant;
use tracing::Instrument;
use upstream::{SslMode, Stream};

use crate::admission::{AddrSlot, Refusal};
use crate::client_conn::ClientConn;
use crate::params::ClientParams;
use crate::registry::NewClient;
use crate::session::Session;
use crate::settings::{AuthType, ProxySettings};
use crate::tls::ALPN_POSTGRESQL;
use crate::{fmt_duration, read_into, ClientSlot, Peer, PoolEntry, Shared, ADMIN_DATABASES};

/// A client that logged in to the admin database; the binary runs the console on it.
pub struct AdminLogin {
    pub stream: Stream,
    /// Bytes the client already sent after its startup packet.
    pub buf: BytesMut,
    pub user: String,
    /// In `admin_users` (may run everything) rather than only `stats_users`.
    pub is_admin: bool,
    pub peer: Peer,
    pub client_id: u64,
}

/// Largest message accepted before login completes (passwords, SASL messages).
const MAX_LOGIN_MESSAGE: usize = 16 * 1024;

/// Why a client connection ended before or during login.
pub(crate) enum LoginEnd {
    /// Send this error, then close.
    Refuse(PgError),
    /// As `Refuse`, but the caller has logged it already, or chose not to (a refusal storm).
    Quiet(PgError),
    /// The client went away or broke the protocol beyond answering.
    Gone,
}

/// One whole message during login.
async fn read_login_message(client: &mut ClientConn) -> Result<Message, LoginEnd> {
    match client.read_message(MAX_LOGIN_MESSAGE).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(protocol_violation(e.to_string())),
        Err(_) => Err(LoginEnd::Gone),
    }
}

fn protocol_violation(what: String) -> LoginEnd {
    LoginEnd::Refuse(PgError::fatal(SqlState::PROTOCOL_VIOLATION, what))
}

/// Not an `async fn`, and owning what it needs: the login future is boxed here, with the
/// arguments moved into it, so the client's task (a tokio task is as large as its future,
/// rounded up to 128 bytes) keeps no copy of them, nor room for the login, nor a borrow that
/// would make its caller keep one, while the session runs. The connection's places under
/// max_client_conn and the per-source cap go into the login too, and from there into the
/// session, which gives them back when it is dropped.
pub(crate) fn serve(
    shared: Arc<Shared>,
    stream: Stream,
    peer: Peer,
    inherited: bool,
) -> impl std::future::Future<Output = Option<AdminLogin>> + Send + 'static {
    let id = shared.next_client_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("client", id, addr = %peer, db = tracing::field::Empty, user = tracing::field::Empty);
    let count = shared.clients.fetch_add(1, Ordering::Relaxed) + 1;
    GlobalStats::bump(&shared.stats.clients_total);
    // Counted at accept, like `count`, and held with it for the connection's life.
    let addr_slot = shared
        .admission
        .connect(peer.0.map(|a| a.ip()), Instant::now());
    let arrival = Arrival {
        count,
        addr_count: addr_slot.count,
    };
    let places = (ClientSlot(shared.clone()), addr_slot);
    let login = Box::pin(log_in(shared, stream, peer, inherited, id, arrival, places));
    async move {
        // Bound by a `let`, so the login's result (an admin login is large) does not stay in
        // the task while the session runs.
        let session = match login.await {
            LoggedIn::Session(session) => session,
            LoggedIn::Admin(login) => return Some(login),
            LoggedIn::Ended => return None,
        };
        // Dropping the session unlists the client, closes its socket and gives its places
        // back.
        // `None`: parked; the park resumes it in a task of its own (see `crate::park`).
        drop(session.run().await);
        None
    }
    .instrument(span)
}

/// What was counted when the connection was accepted: open client connections in all, and
/// from this source (0 when the source is not tracked).
#[derive(Clone, Copy)]
pub(crate) struct Arrival {
    count: usize,
    addr_count: usize,
}

/// How a login ended.
enum LoggedIn {
    /// A client of a pooled database, listed in SHOW CLIENTS until the session is dropped.
    Session(Box<Session>),
    Admin(AdminLogin),
    /// Refused, cancelled, or gone; whatever there was to say has been said.
    Ended,
}

/// Everything up to a logged-in session: TLS, startup, authentication, routing, registration.
async fn log_in(
    shared: Arc<Shared>,
    stream: Stream,
    peer: Peer,
    inherited: bool,
    id: u64,
    arrival: Arrival,
    open_places: (ClientSlot, AddrSlot),
) -> LoggedIn {
    let shared = &shared;
    let settings = shared.settings();
    stream.tune_accepted(&settings.client_liveness, inherited);
    let deadline = settings.client_login_timeout.map(|t| Instant::now() + t);

    // Small to start: most clients sit idle most of the time, and buffers grow on demand.
    let mut buf = BytesMut::with_capacity(1024);
    let (stream, opened) = open(shared, &settings, stream, &mut buf, deadline).await;
    let Some(stream) = stream else {
        // The TLS handshake took the connection with it; nothing can be said in the clear.
        match opened {
            Err(LoginEnd::Refuse(err)) => {
                GlobalStats::bump(&shared.stats.login_failures);
                tracing::info!(code = err.code.0, "login refused: {}", err.message);
            }
            _ => tracing::debug!("client left during the TLS handshake"),
        }
        return LoggedIn::Ended;
    };
    let mut client = ClientConn {
        id,
        stream,
        buf,
        out: BytesMut::with_capacity(512),
        shared: shared.clone(),
    };
    // Filled by a login that takes places under client caps; an out-parameter rather than part
    // of `Login`, whose session variant is already the large one.
    let mut places = None;
    let result = match opened {
        Ok(opening) => {
            // Not boxed on its own: all of log_in is (see `serve`), and is freed after login.
            // Pinned where it is made and awaited through a reference: handed to `within` by
            // value, the login's future was copied into the timeout, into its wrapper and into
            // this future's state, one `memcpy` of its whole size each time.
            let login = std::pin::pin!(login(
                shared,
                &settings,
                &mut client,
                peer,
                arrival,
                opening,
                &mut places,
            ));
            within(deadline, login)
                .await
                .unwrap_or_else(|()| Err(login_timeout_expired(shared, &settings)))
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(Login::Session(entry, startup, params)) => {
            // The client's span is an info span: below that level it is disabled, and finding
            // it (a dispatcher lookup) and recording into it cost a login for nothing.
            if tracing::level_enabled!(tracing::Level::INFO) {
                let span = tracing::Span::current();
                span.record("db", startup.database());
                span.record("user", startup.user());
            }
            let application_name = startup.get("application_name").unwrap_or("");
            if settings.log_connections {
                tracing::info!(application_name, tls = client.stream.is_tls(), "login");
            } else {
                tracing::debug!(tls = client.stream.is_tls(), "login");
            }
            PoolStats::add(&entry.stats.client_logins, 1);
            // The peer's address came with accept(2); only the local one costs a syscall.
            let local = client.stream.tcp().and_then(|s| s.local_addr().ok());
            let row = shared.registry.register(NewClient {
                id: client.id,
                user: startup.user(),
                database: startup.database(),
                remote: peer.0,
                local,
                application_name: application_name.to_owned(),
                kill: client.stream.shutdown_handle(),
            });
            let mut session = Session::new(shared, settings, client, entry, params, row);
            session.places = places;
            session.open = Some(open_places);
            LoggedIn::Session(Box::new(session))
        }
        Ok(Login::Admin { user, is_admin }) => LoggedIn::Admin(AdminLogin {
            stream: client.stream,
            buf: client.buf,
            user,
            is_admin,
            peer,
            client_id: client.id,
        }),
        Ok(Login::Cancelled) => LoggedIn::Ended,
        Err(LoginEnd::Refuse(err)) => {
            GlobalStats::bump(&shared.stats.login_failures);
            tracing::info!(code = err.code.0, "login refused: {}", err.message);
            client.send_error(&err).await;
            LoggedIn::Ended
        }
        Err(LoginEnd::Quiet(err)) => {
            GlobalStats::bump(&shared.stats.login_failures);
            client.send_error(&err).await;
            LoggedIn::Ended
        }
        Err(LoginEnd::Gone) => {
            tracing::debug!("client left during login");
            LoggedIn::Ended
        }
    }
}

/// `max_client_conn_per_addr` and `client_login_rate_per_addr`: decided after the startup
/// packet (so the refusal can be an ErrorResponse the client shows) and before authentication
/// or any server work, so a refused login costs a hash lookup.
fn admit_source(shared: &Shared, peer: Peer, arrival: Arrival) -> Result<(), LoginEnd> {
    if arrival.addr_count == 0 {
        return Ok(());
    }
    let verdict =
        shared
            .admission
            .login(peer.0.map(|a| a.ip()), arrival.addr_count, Instant::now());
    let Some(refusal) = verdict.refusal else {
        return Ok(());
    };
    GlobalStats::bump(match refusal {
        Refusal::Connections { .. } => &shared.stats.refused_client_conn_per_addr,
        Refusal::Rate { .. } => &shared.stats.refused_client_login_rate,
    });
    let source = peer.0.map(|a| a.ip().to_string()).unwrap_or_default();
    let message = refusal.message(&source);
    if verdict.log {
        // At most once a second per source; the counter has every refusal.
        tracing::warn!("login refused: {message}");
    }
    Err(LoginEnd::Quiet(PgError::fatal(
        SqlState::TOO_MANY_CONNECTIONS,
        message,
    )))
}

/// Runs `f` until `deadline` (client_login_timeout); `Err` when it passed first.
///
/// Not an `async fn`: that would keep `f` twice, once as its argument and once inside the
/// timeout it awaits (the login's future was 1.6 KB, kept twice in every login's allocation
/// and copied at each move).
fn within<F: std::future::Future>(
    deadline: Option<Instant>,
    f: F,
) -> impl std::future::Future<Output = Result<F::Output, ()>> {
    use futures_util::future::{Either, FutureExt};
    match deadline {
        Some(d) => Either::Left(upstream::timer::timeout_at(d, f).map(|r| r.map_err(|_| ()))),
        None => Either::Right(f.map(Ok)),
    }
}

fn login_timeout_expired(shared: &Shared, settings: &ProxySettings) -> LoginEnd {
    GlobalStats::bump(&shared.stats.timeouts_client_login);
    let t = settings.client_login_timeout.unwrap_or_default();
    LoginEnd::Refuse(PgError::fatal(
        SqlState::PROTOCOL_VIOLATION,
        format!(
            "client_login_timeout ({}) expired during login",
            fmt_duration(t)
        ),
    ))
}

/// The first TLS record type: a handshake. No PostgreSQL startup packet starts with it (its
/// length would be over 369 MB), so it marks direct TLS (PostgreSQL 17 `sslnegotiation=direct`).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What a client asked for once encryption is settled.
pub(crate) enum Opening {
    Startup(StartupParams),
    Cancel { pid: i32, key: i32 },
}

/// The packets before the StartupMessage: direct TLS, SSLRequest and the handshake,
/// GSSENCRequest, or a CancelRequest. Owns the stream because a TLS handshake consumes the TCP
/// stream; gives it back (possibly encrypted) unless a handshake failed or timed out, when
/// nothing more can be said to the client. Bytes after the opening packet stay in `buf`.
async fn open(
    shared: &Shared,
    settings: &ProxySettings,
    mut stream: Stream,
    buf: &mut BytesMut,
    deadline: Option<Instant>,
) -> (Option<Stream>, Result<Opening, LoginEnd>) {
    let tls = &settings.client_tls;
    let acceptor = tls.current();
    if let (Some(config), Stream::Tcp(tcp)) = (&acceptor, &stream) {
        // Peek, not read: a TLS ClientHello must reach rustls whole.
        let mut first = [0u8; 1];
        match within(deadline, tcp.peek(&mut first)).await {
            Err(()) => return (Some(stream), Err(login_timeout_expired(shared, settings))),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(stream), Err(LoginEnd::Gone)),
            Ok(Ok(_)) => {}
        }
        if first[0] == TLS_HANDSHAKE_RECORD {
            let config = config.clone();
            let Stream::Tcp(tcp) = stream else {
                return (Some(stream), Err(LoginEnd::Gone));
            };
            // Boxed here and below, for TLS clients only: inline, the handshake's future was
            // 2.7 of the 3.5 KB of every login's future, plaintext logins included.
            stream = match Box::pin(handshake(shared, settings, tcp, config, deadline)).await {
                Ok(s) => s,
                Err(e) => return (None, Err(e)),
            };
            // As PostgreSQL 17: direct TLS is only for clients that say they speak PostgreSQL
            // inside it, so a TLS client of some other protocol cannot be confused with one.
            let alpn_ok = match &stream {
                Stream::TlsFromClient(s) => s.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL),
                _ => false,
            };
            if !alpn_ok {
                GlobalStats::bump(&shared.stats.protocol_errors);
                return (
                    Some(stream),
                    Err(protocol_violation(
                        "received direct TLS connection request without ALPN protocol \"postgresql\""
                            .into(),
                    )),
                );
            }
        }
    }
    // PostgreSQL answers one SSLRequest and one GSSENCRequest per connection; a client that
    // asks again is broken or probing (10,000 GSSENCRequests got 10,000 answers).
    let mut ssl_asked = false;
    let mut gss_asked = false;
    loop {
        let req = match startup::take_startup(buf) {
            Ok(Some(r)) => r,
            Ok(None) => match within(deadline, read_into(&mut stream, buf)).await {
                Err(()) => return (Some(stream), Err(login_timeout_expired(shared, settings))),
                Ok(Ok(0)) | Ok(Err(_)) => return (Some(stream), Err(LoginEnd::Gone)),
                Ok(Ok(_)) => continue,
            },
            Err(e) => {
                GlobalStats::bump(&shared.stats.protocol_errors);
                return (
                    Some(stream),
                    Err(protocol_violation(format!("invalid startup packet: {e}"))),
                );
            }
        };
        let again = match req {
            StartupRequest::Ssl => std::mem::replace(&mut ssl_asked, true),
            StartupRequest::GssEnc => std::mem::replace(&mut gss_asked, true),
            _ => false,
        };
        if again {
            GlobalStats::bump(&shared.stats.protocol_errors);
            return (
                Some(stream),
                Err(protocol_violation(
                    "more than one SSLRequest or GSSENCRequest of a kind on one connection".into(),
                )),
            );
        }
        match req {
            StartupRequest::Ssl if stream.is_tls() => {
                GlobalStats::bump(&shared.stats.protocol_errors);
                return (
                    Some(stream),
                    Err(protocol_violation(
                        "SSLRequest on a connection that is already encrypted".into(),
                    )),
                );
            }
            StartupRequest::Ssl => {
                let (tcp, config) = match (stream, &acceptor) {
                    (Stream::Tcp(tcp), Some(config)) => (tcp, config.clone()),
                    // TLS off, or a Unix socket: the client may go on in plaintext.
                    (other, _) => {
                        stream = other;
                        if stream.send(b"N").await.is_err() {
                            return (Some(stream), Err(LoginEnd::Gone));
                        }
                        if let Some(e) = pipelined_after_negotiation(shared, buf, "SSL") {
                            return (Some(stream), Err(e));
                        }
                        continue;
                    }
                };
                if !buf.is_empty() {
                    // Whatever follows an SSLRequest before the handshake was sent in the clear
                    // and could have been injected by a man in the middle: never treat it as
                    // part of the encrypted session (CVE-2021-23214).
                    GlobalStats::bump(&shared.stats.protocol_errors);
                    return (
                        Some(Stream::Tcp(tcp)),
                        Err(protocol_violation(
                            "received unencrypted data after SSL request".into(),
                        )),
                    );
                }
                let mut tcp_stream = Stream::Tcp(tcp);
                if tcp_stream.send(b"S").await.is_err() {
                    return (Some(tcp_stream), Err(LoginEnd::Gone));
                }
                let Stream::Tcp(tcp) = tcp_stream else {
                    return (Some(tcp_stream), Err(LoginEnd::Gone));
                };
                stream = match Box::pin(handshake(shared, settings, tcp, config, deadline)).await {
                    Ok(s) => s,
                    Err(e) => return (None, Err(e)),
                };
            }
            StartupRequest::GssEnc => {
                // No GSSAPI encryption: the client may go on with SSLRequest or in plaintext.
                if stream.send(b"N").await.is_err() {
                    return (Some(stream), Err(LoginEnd::Gone));
                }
                if let Some(e) = pipelined_after_negotiation(shared, buf, "GSSAPI") {
                    return (Some(stream), Err(e));
                }
            }
            StartupRequest::Cancel { pid, key } => {
                // Allowed in the clear whatever client_tls_sslmode says: the key is a random
                // secret and older libpq sends cancels without TLS.
                return (Some(stream), Ok(Opening::Cancel { pid, key }));
            }
            StartupRequest::Unsupported { version } => {
                return (
                    Some(stream),
                    Err(LoginEnd::Refuse(PgError::fatal(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        format!(
                            "unsupported frontend protocol {}.{}: Breakwater speaks protocol 3.0",
                            version >> 16,
                            version & 0xffff
                        ),
                    ))),
                );
            }
            StartupRequest::Startup(p) => {
                if tls.mode.requires_tls() && matches!(stream, Stream::Tcp(_)) {
                    return (
                        Some(stream),
                        Err(LoginEnd::Refuse(PgError::fatal(
                            SqlState::INVALID_AUTHORIZATION,
                            format!(
                                "SSL required: client_tls_sslmode = \"{}\" refuses unencrypted connections",
                                tls.mode
                            ),
                        ))),
                    );
                }
                return (Some(stream), Ok(Opening::Startup(p)));
            }
        }
    }
}

/// A client must wait for the answer to its SSLRequest or GSSENCRequest before it goes on, so
/// bytes already here were sent blind, perhaps by someone in the middle: refused, as
/// PostgreSQL does, even when the answer was "go on in plaintext".
fn pipelined_after_negotiation(shared: &Shared, buf: &BytesMut, kind: &str) -> Option<LoginEnd> {
    if buf.is_empty() {
        return None;
    }
    GlobalStats::bump(&shared.stats.protocol_errors);
    Some(protocol_violation(format!(
        "received unencrypted data after {kind} request"
    )))
}

/// The TLS handshake with a client, bounded by what is left of client_login_timeout.
async fn handshake(
    shared: &Shared,
    settings: &ProxySettings,
    tcp: tokio::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    deadline: Option<Instant>,
) -> Result<Stream, LoginEnd> {
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    match within(deadline, accept).await {
        Ok(Ok(tls)) => Ok(Stream::TlsFromClient(Box::new(tls))),
        Ok(Err(e)) => {
            GlobalStats::bump(&shared.stats.protocol_errors);
            Err(LoginEnd::Refuse(PgError::fatal(
                SqlState::PROTOCOL_VIOLATION,
                format!(
                    "TLS handshake failed (client_tls_sslmode = \"{}\"): {e}",
                    settings.client_tls.mode
                ),
            )))
        }
        Err(()) => Err(login_timeout_expired(shared, settings)),
    }
}

// Made once per login and taken apart at once: boxing the session variant would be one more
// allocation per login (bounded in benches/harness/tests/alloc_per_txn.rs) to save a move.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Login {
    Session(Arc<PoolEntry>, StartupParams, ClientParams),
    Admin { user: String, is_admin: bool },
    Cancelled,
}

async fn login(
    shared: &Arc<Shared>,
    settings: &ProxySettings,
    client: &mut ClientConn,
    peer: Peer,
    arrival: Arrival,
    opening: Opening,
    places: &mut Option<Box<crate::caps::Places>>,
) -> Result<Login, LoginEnd> {
    let startup = match opening {
        Opening::Startup(p) => p,
        Opening::Cancel { pid, key } => {
            GlobalStats::bump(&shared.stats.cancel_requests);
            // Boxed, as the exchanges below: forwarding a cancel connects to the server, and
            // inline its future made every login's 1.1 KB larger; cancels are few.
            let sent = Box::pin(shared.registry.cancel(pid, key, Duration::from_secs(5))).await;
            tracing::debug!(sent, "cancel request");
            return Ok(Login::Cancelled);
        }
    };
    admit_source(shared, peer, arrival)?;
    if arrival.count > settings.max_client_conn {
        GlobalStats::bump(&shared.stats.refused_max_client_conn);
        return Err(LoginEnd::Refuse(PgError::fatal(
            SqlState::TOO_MANY_CONNECTIONS,
            format!(
                "no more connections allowed (max_client_conn = {})",
                settings.max_client_conn
            ),
        )));
    }
    let params = ClientParams::from_startup(startup.params())
        .map_err(|e| LoginEnd::Refuse(PgError::fatal(e.sqlstate(), e.to_string())))?;
    negotiate_protocol_version(client, &startup);

    // PostgreSQL's clientcert=verify-full: the certificate is the user's, whatever auth_type.
    if settings.client_tls.mode == SslMode::VerifyFull && client.stream.is_tls() {
        certificate_names_user(client, startup.user())?;
    }
    // Authentication comes before anything is said about the database, so that names cannot be
    // enumerated by someone without a password: an unknown or disabled database is only
    // reported to a client that has proved who it is.
    // The route is looked for first (its auth_query may be needed) and reported after.
    let is_admin_db = ADMIN_DATABASES.contains(&startup.database());
    let route = (!is_admin_db)
        .then(|| settings.resolve(startup.database()))
        .flatten();
    let login_credential =
        authenticate(shared, settings, client, startup.user(), route.as_deref()).await?;
    let route = if is_admin_db {
        None
    } else {
        Some(route.ok_or_else(|| {
            LoginEnd::Refuse(PgError::fatal(
                SqlState::INVALID_CATALOG_NAME,
                format!(
                    "no such database: \"{}\" (not in [databases])",
                    startup.database()
                ),
            ))
        })?)
    };
    if !is_admin_db && shared.switches().is_disabled(startup.database()) {
        return Err(LoginEnd::Refuse(PgError::fatal(
            SqlState::CANNOT_CONNECT_NOW,
            format!(
                "database \"{}\" is disabled (DISABLE in the admin console; ENABLE lifts it)",
                startup.database()
            ),
        )));
    }
    backend::write_auth_ok(&mut client.out);

    if is_admin_db {
        let listed = |users: &[String]| users.iter().any(|u| u == startup.user());
        let is_admin = listed(&settings.admin_users);
        if !is_admin && !listed(&settings.stats_users) {
            return Err(LoginEnd::Refuse(PgError::fatal(
                SqlState::INVALID_AUTHORIZATION,
                format!(
                    "user \"{}\" is not in admin_users or stats_users",
                    startup.user()
                ),
            )));
        }
        client.flush().await.map_err(|_| LoginEnd::Gone)?;
        return Ok(Login::Admin {
            user: startup.user().to_owned(),
            is_admin,
        });
    }
    let Some(route) = route else {
        return Err(LoginEnd::Gone);
    };
    *places = take_places(shared, settings, &route, startup.user())?;
    let server_user = route.user.as_deref().unwrap_or(startup.user());
    let renew = login_credential
        .looked_up
        .then(|| login_credential.credential.clone())
        .flatten()
        .filter(|_| server_user == startup.user());
    let entry = shared.pool_for(settings, &route, server_user, login_credential.credential);
    if let Some(cred) = renew {
        entry.pool.renew_credential(cred);
    }
    Ok(Login::Session(entry, startup, params))
}

/// A place under each client cap that applies to this login (max_user_client_connections for
/// its user, max_db_client_connections for its database), or 53300 naming the cap. Checked
/// before the pool is touched: a refused login costs no server work. `None` when no cap
/// applies, so that an uncapped login counts nothing.
fn take_places(
    shared: &Shared,
    settings: &ProxySettings,
    route: &crate::DatabaseRoute,
    user: &str,
) -> Result<Option<Box<crate::caps::Places>>, LoginEnd> {
    let user_cap = settings.users.max_user_client_connections(user);
    let db_cap = Some(route.max_db_client_connections).filter(|n| *n > 0);
    if user_cap.is_none() && db_cap.is_none() {
        return Ok(None);
    }
    let refuse = |counter: &std::sync::atomic::AtomicU64, message: String| {
        GlobalStats::bump(counter);
        LoginEnd::Refuse(PgError::fatal(SqlState::TOO_MANY_CONNECTIONS, message))
    };
    let mut places = crate::caps::Places::default();
    if let Some(max) = user_cap {
        places._user = Some(shared.user_clients.take(user, max).ok_or_else(|| {
            refuse(
                &shared.stats.refused_max_user_client_connections,
                format!(
                    "no more connections allowed for user \"{user}\" (max_user_client_connections = {max})"
                ),
            )
        })?);
    }
    if let Some(max) = db_cap {
        places._db = Some(shared.db_clients.take(&route.name, max).ok_or_else(|| {
            refuse(
                &shared.stats.refused_max_db_client_connections,
                format!(
                    "no more connections allowed to database \"{}\" (max_db_client_connections = {max})",
                    route.name
                ),
            )
        })?);
    }
    Ok(Some(Box::new(places)))
}

/// Breakwater speaks protocol 3.0. A client asking for a newer 3.x (libpq 18 with
/// `max_protocol_version`) or for `_pq_.*` extensions is told so and goes on at 3.0 without
/// them, as PostgreSQL does; the message leads the first authentication request.
fn negotiate_protocol_version(client: &mut ClientConn, startup: &StartupParams) {
    if startup.minor_version == 0 && startup.protocol_options().next().is_none() {
        return;
    }
    let unsupported: Vec<&str> = startup.protocol_options().map(|(name, _)| name).collect();
    tracing::debug!(
        minor = startup.minor_version,
        options = ?unsupported,
        "protocol negotiated down to 3.0"
    );
    backend::write_negotiate_protocol_version(&mut client.out, 0, &unsupported);
}

fn bad_password(user: &str) -> LoginEnd {
    LoginEnd::Refuse(PgError::fatal(
        SqlState::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    ))
}

/// What a login proved that lets Breakwater log in to the server as the client's user.
struct LoginCredential {
    /// SCRAM keys from a SCRAM login (so an auth_file or auth_query verifier is enough), or
    /// the looked-up md5 hash or password.
    credential: Option<ServerCredential>,
    /// The secret came from auth_query: it replaces what the pool had, since the role's
    /// password may have changed since.
    looked_up: bool,
}

/// Checks the client's password as `auth_type` says, against the auth_file or, for a user
/// not in it, the secret auth_query finds in `route`'s database.
async fn authenticate(
    shared: &Shared,
    settings: &ProxySettings,
    client: &mut ClientConn,
    user: &str,
    route: Option<&crate::DatabaseRoute>,
) -> Result<LoginCredential, LoginEnd> {
    let own = settings.userlist.get(user);
    let looked = match (own, route) {
        (None, Some(r))
            if r.auth_query.is_some()
                && matches!(settings.auth_type, AuthType::Md5 | AuthType::ScramSha256) =>
        {
            // Boxed: the lookup's future (a server connect inside) would otherwise make every
            // login's future, which is allocated whole per client, several KiB larger.
            let looked = Box::pin(shared.auth_lookups.secret(shared, settings, r, user))
                .await
                .map_err(|_| lookup_failed(user))?;
            Some(looked)
        }
        _ => None,
    };
    let Some(looked) = looked else {
        let credential = check_password(shared, settings, client, user, own, false).await?;
        return Ok(LoginCredential {
            credential,
            looked_up: false,
        });
    };
    if settings.auth_type == AuthType::Md5
        && !matches!(looked.secret.as_deref(), Some(Secret::Scram(_)))
    {
        if let Some(r) = route {
            return Box::pin(md5_looked_up(shared, settings, client, user, r, looked)).await;
        }
    }
    let secret = looked.secret.as_deref();
    let checked = check_password(shared, settings, client, user, secret, true).await;
    if let Err(LoginEnd::Refuse(e)) = &checked {
        if e.code == SqlState::INVALID_PASSWORD {
            shared.auth_lookups.password_check_failed(&looked, user);
        }
    }
    let keys = checked?;
    // SCRAM keys when the client proved them; else what the secret itself logs in with.
    let credential = keys.or_else(|| match secret {
        Some(Secret::Md5(hash)) => Some(ServerCredential::Md5Hash(*hash)),
        Some(Secret::Plain(p)) => Some(ServerCredential::Password(p.clone())),
        _ => None,
    });
    Ok(LoginCredential {
        credential,
        looked_up: true,
    })
}

/// An md5 login against a looked-up secret. The client's answer depends only on the password
/// and our salt, so when it does not match an answer old enough to be dropped (see
/// `auth_query::RECHECK_AFTER`) the secret is looked up once more and the same answer checked
/// against it: a client whose password just changed gets in on its first try. (SCRAM cannot do
/// this: a new verifier has a new salt, which the client has already used.)
async fn md5_looked_up(
    shared: &Shared,
    settings: &ProxySettings,
    client: &mut ClientConn,
    user: &str,
    route: &crate::DatabaseRoute,
    looked: crate::auth_query::Looked,
) -> Result<LoginCredential, LoginEnd> {
    let salt = md5_salt();
    backend::write_auth_md5(&mut client.out, salt);
    client.flush().await.map_err(|_| LoginEnd::Gone)?;
    let msg = read_login_message(client).await?;
    let response = expect_password(&msg)?;
    let verified = |secret: Option<&Secret>| {
        let credential = match secret? {
            Secret::Md5(hash) => ServerCredential::Md5Hash(*hash),
            Secret::Plain(p) => ServerCredential::Password(p.clone()),
            Secret::Scram(_) => return None,
        };
        secret
            .filter(|s| md5_verify(user, s, salt, response))
            .map(|_| LoginCredential {
                credential: Some(credential),
                looked_up: true,
            })
    };
    if let Some(ok) = verified(looked.secret.as_deref()) {
        return Ok(ok);
    }
    if shared.auth_lookups.password_check_failed(&looked, user) {
        let again = Box::pin(shared.auth_lookups.secret(shared, settings, route, user))
            .await
            .map_err(|_| lookup_failed(user))?;
        if let Some(ok) = verified(again.secret.as_deref()) {
            return Ok(ok);
        }
    }
    Err(bad_password(user))
}

/// A lookup that found no answer: the client may try again; the log says why.
fn lookup_failed(user: &str) -> LoginEnd {
    LoginEnd::Quiet(PgError::fatal(
        SqlState::CONNECTION_FAILURE,
        format!("could not look up the password of user \"{user}\" (auth_query failed; the pooler's log says why)"),
    ))
}

/// Runs the exchange `auth_type` asks for against `secret` (`None`: no such user, which looks
/// exactly like a wrong password). `looked_up` secrets change with the database, so they are
/// never put in the plaintext-verifier cache, and an md5 one under SCRAM is refused like a
/// wrong password rather than named.
async fn check_password(
    shared: &Shared,
    settings: &ProxySettings,
    client: &mut ClientConn,
    user: &str,
    secret: Option<&Secret>,
    looked_up: bool,
) -> Result<Option<ServerCredential>, LoginEnd> {
    match settings.auth_type {
        AuthType::Trust => {
            if secret.is_none() && !settings.userlist.is_empty() {
                return Err(LoginEnd::Refuse(PgError::fatal(
                    SqlState::INVALID_AUTHORIZATION,
                    format!("user \"{user}\" is not in the auth_file"),
                )));
            }
            Ok(None)
        }
        AuthType::Cert => certificate_names_user(client, user).map(|()| None),
        // The exchanges are boxed: inline, the largest of them set the size of every login's
        // future (allocated whole and moved at each step), trust logins' included. One
        // allocation is nothing beside the exchange's own hashing.
        AuthType::Md5 => match secret {
            Some(Secret::Scram(v)) => Box::pin(scram(client, user, v.clone(), true)).await,
            other => Box::pin(md5(client, user, other)).await,
        },
        AuthType::ScramSha256 => {
            let (verifier, known) = match secret {
                Some(Secret::Scram(v)) => (v.clone(), true),
                Some(Secret::Plain(p)) if looked_up => (ScramVerifier::from_password(p), true),
                Some(Secret::Plain(p)) => (shared.scram_verifier_for_plain(user, p), true),
                Some(Secret::Md5(_)) if looked_up => {
                    tracing::warn!(user, "auth_query returned an md5 hash, which cannot be used with auth_type = scram-sha-256; refused as a wrong password");
                    (unknown_user_verifier(), false)
                }
                Some(Secret::Md5(_)) => {
                    return Err(LoginEnd::Refuse(PgError::fatal(
                        SqlState::INVALID_PASSWORD,
                        format!("user \"{user}\" has an md5 password in the auth_file, which cannot be used with auth_type = scram-sha-256"),
                    )))
                }
                // Run the exchange against a throwaway verifier so an unknown user looks exactly
                // like a wrong password.
                None => (unknown_user_verifier(), false),
            };
            let keys = Box::pin(scram(client, user, verifier, known)).await?;
            Ok(keys)
        }
    }
}

/// The md5 exchange against the auth_file's `secret` (`None`: no such user).
async fn md5(
    client: &mut ClientConn,
    user: &str,
    secret: Option<&Secret>,
) -> Result<Option<ServerCredential>, LoginEnd> {
    let salt = md5_salt();
    backend::write_auth_md5(&mut client.out, salt);
    client.flush().await.map_err(|_| LoginEnd::Gone)?;
    let msg = read_login_message(client).await?;
    let response = expect_password(&msg)?;
    match secret {
        Some(s) if md5_verify(user, s, salt, response) => Ok(None),
        _ => Err(bad_password(user)),
    }
}

fn unknown_user_verifier() -> ScramVerifier {
    ScramVerifier::from_password_with(
        &rand::random::<u64>().to_string(),
        b"breakwater-nouser",
        4096,
    )
}

/// The client certificate (verified against client_tls_ca_file during the handshake) has the
/// user name as its CN.
fn certificate_names_user(client: &ClientConn, user: &str) -> Result<(), LoginEnd> {
    let refuse = |why: &str| {
        LoginEnd::Refuse(PgError::fatal(
            SqlState::INVALID_AUTHORIZATION,
            format!("certificate authentication failed for user \"{user}\": {why}"),
        ))
    };
    let Some(cert) = client.stream.client_certificate() else {
        return Err(refuse(
            "no client certificate (it needs TLS with client_tls_sslmode = verify-ca or verify-full)",
        ));
    };
    match crate::tls::common_name(cert) {
        Some(cn) if cn == user => Ok(()),
        Some(cn) => Err(refuse(&format!("the certificate's CN is \"{cn}\""))),
        None => Err(refuse("the certificate has no usable CN")),
    }
}

fn expect_password(msg: &Message) -> Result<&[u8], LoginEnd> {
    if msg.tag != frontend::PASSWORD {
        return Err(protocol_violation(format!(
            "expected a password message, got message type '{}'",
            msg.tag as char
        )));
    }
    frontend::parse_password(&msg.body).map_err(|e| protocol_violation(e.to_string()))
}

async fn scram(
    client: &mut ClientConn,
    user: &str,
    verifier: ScramVerifier,
    known: bool,
) -> Result<Option<ServerCredential>, LoginEnd> {
    let server_key = verifier.server_key;
    let mut server = ScramServer::new(verifier);
    backend::write_auth_sasl(&mut client.out, &["SCRAM-SHA-256"]);
    client.flush().await.map_err(|_| LoginEnd::Gone)?;

    let msg = read_login_message(client).await?;
    if msg.tag != frontend::PASSWORD {
        return Err(protocol_violation("expected SASLInitialResponse".into()));
    }
    let (mechanism, data) = frontend::parse_sasl_initial_response(&msg.body)
        .map_err(|e| protocol_violation(e.to_string()))?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(protocol_violation(format!(
            "unsupported SASL mechanism \"{mechanism}\""
        )));
    }
    let first = server
        .client_first(&data)
        .map_err(|e| protocol_violation(format!("SCRAM: {e}")))?;
    backend::write_auth_sasl_continue(&mut client.out, &first);
    client.flush().await.map_err(|_| LoginEnd::Gone)?;

    let msg = read_login_message(client).await?;
    if msg.tag != frontend::PASSWORD {
        return Err(protocol_violation("expected SASLResponse".into()));
    }
    let fin = match server.client_final(&msg.body) {
        Ok(f) if known => f,
        _ => return Err(bad_password(user)),
    };
    backend::write_auth_sasl_final(&mut client.out, &fin);
    Ok(server
        .client_key()
        .map(|client_key| ServerCredential::ScramKeys {
            client_key,
            server_key,
        }))
}

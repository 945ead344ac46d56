//! Errors of the server side: opening a connection ([`ConnectError`], each variant naming the
//! host, setting or phase) and queries Breakwater runs on its own account ([`QueryError`]).

use std::io;
use std::time::Duration;

use proto::error::ErrorFields;
use proto::FrameError;
use stats::{CloseReason, Phase};

use crate::role::{Role, TargetSessionAttrs};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not resolve host \"{host}\": {source}")]
    Dns { host: String, source: io::Error },
    #[error("dns_timeout ({timeout:?}) expired resolving \"{host}\"")]
    DnsTimeout { host: String, timeout: Duration },
    #[error(transparent)]
    BreakerOpen(#[from] crate::host::BreakerOpen),
    #[error("server_connect_timeout ({timeout:?}) expired connecting to {addr}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("could not connect to server {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("server_connect_timeout ({timeout:?}) expired during the TLS handshake with server \"{host}\" ({addr})")]
    TlsTimeout {
        host: String,
        addr: String,
        timeout: Duration,
    },
    #[error("TLS with server \"{host}\" ({addr}): {source}")]
    Tls {
        host: String,
        addr: String,
        source: crate::tls::TlsError,
    },
    #[error("server_login_timeout ({timeout:?}) expired logging in to {addr}")]
    LoginTimeout { addr: String, timeout: Duration },
    /// The server sent an ErrorResponse during login; its SQLSTATE is passed on to the client.
    #[error("server {addr} refused login: {fields}")]
    Refused { addr: String, fields: ErrorFields },
    #[error("cannot log in to server {addr} as \"{user}\": {reason}")]
    Auth {
        addr: String,
        user: String,
        reason: String,
    },
    /// The server asked for a method `server_require_auth` does not allow: nothing was sent.
    #[error("server {addr} asked for {method} authentication, which server_require_auth = \"{policy}\" does not allow: {why}")]
    AuthNotAllowed {
        addr: String,
        method: crate::AuthMethod,
        policy: crate::RequireAuth,
        why: &'static str,
    },
    /// `server_auth = "rds_iam"` and no token could be signed (no AWS credentials in time).
    #[error("cannot log in to server {host} as \"{user}\" with RDS IAM authentication: {source}")]
    RdsIamToken {
        host: String,
        user: String,
        source: crate::rds_iam::TokenError,
    },
    #[error("protocol error from server {addr}: {source}")]
    Protocol { addr: String, source: FrameError },
    #[error("server {addr} closed the connection during login: {source}")]
    Io { addr: String, source: io::Error },
    /// The server is up but not what `target_session_attrs` asks for.
    #[error("server {host} is a {role}, which target_session_attrs = {wanted} does not accept")]
    WrongRole {
        host: String,
        role: Role,
        wanted: TargetSessionAttrs,
    },
    #[error("could not read the role of server {addr}: {source}")]
    RoleCheck { addr: String, source: QueryError },
    /// A host skipped because it is backing off after failures (another host may serve).
    #[error("upstream {host} is backing off after failed connection attempts; next attempt in {retry_in:?}")]
    Backoff { host: String, retry_in: Duration },
    /// No host of a list served; the client keeps waiting while Breakwater keeps looking.
    #[error("no host of database \"{database}\" ({hosts}) can serve target_session_attrs = {wanted} right now; last: {last}")]
    NoMatchingHost {
        database: String,
        hosts: String,
        wanted: TargetSessionAttrs,
        last: Box<ConnectError>,
    },
    /// Every slot of a shared cap (`max_db_connections`, `max_server_connections`, the fleet
    /// budget) was in use while a server of the set came free: the checkout tries again, and
    /// may take that server instead of waiting for a slot it does not need.
    #[error("every slot of a connection cap is in use")]
    CapBusy,
    /// The database's `connect_query` failed on a new connection, which was closed.
    #[error("connect_query failed on {addr}: {source}")]
    ConnectQuery { addr: String, source: QueryError },
}

/// An error from a query Breakwater runs on its own account.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("server error: {0}")]
    Server(ErrorFields),
    #[error("server connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error from server: {0}")]
    Protocol(#[from] FrameError),
    #[error("server left the transaction open (status {0:?}) after an internal query")]
    NotIdle(char),
    #[error("an internal query returned no row")]
    NoRow,
}

impl ConnectError {
    /// The phase an attempt failed in, and whether by timeout, for the host's counters.
    pub fn phase(&self) -> Option<(Phase, bool)> {
        Some(match self {
            ConnectError::Dns { .. } => (Phase::Dns, false),
            ConnectError::DnsTimeout { .. } => (Phase::Dns, true),
            ConnectError::ConnectTimeout { .. } => (Phase::Connect, true),
            ConnectError::Connect { .. } | ConnectError::Tls { .. } => (Phase::Connect, false),
            ConnectError::TlsTimeout { .. } => (Phase::Connect, true),
            ConnectError::LoginTimeout { .. } => (Phase::Login, true),
            ConnectError::Refused { .. }
            | ConnectError::Auth { .. }
            | ConnectError::AuthNotAllowed { .. }
            | ConnectError::RdsIamToken { .. }
            | ConnectError::Protocol { .. }
            | ConnectError::Io { .. }
            | ConnectError::RoleCheck { .. } => (Phase::Login, false),
            ConnectError::BreakerOpen(_)
            | ConnectError::WrongRole { .. }
            | ConnectError::Backoff { .. }
            | ConnectError::NoMatchingHost { .. }
            | ConnectError::CapBusy
            | ConnectError::ConnectQuery { .. } => return None,
        })
    }

    /// Did the server answer that it is up but full or not yet ready (53300 too many
    /// connections, 57P03 cannot connect now)? That asks for back-off, not for failing clients.
    pub fn server_is_busy(&self) -> bool {
        matches!(self, ConnectError::Refused { fields, .. } if fields.code == "53300" || fields.code == "57P03")
    }

    /// Will trying again soon not help? (Wrong password, no such database: the client should
    /// hear it now rather than wait out query_wait_timeout.)
    pub fn is_permanent(&self) -> bool {
        match self {
            ConnectError::Refused { fields, .. } => {
                fields.code.starts_with("28") || fields.code == "3D000"
            }
            ConnectError::Auth { .. }
            | ConnectError::AuthNotAllowed { .. }
            | ConnectError::BreakerOpen(_) => true,
            // The query itself is wrong (or the server refuses it): every new connection will
            // fail the same way, so the client hears it now. A lost connection may not recur.
            ConnectError::ConnectQuery { source, .. } => matches!(source, QueryError::Server(_)),
            ConnectError::Tls { source, .. } => source.is_permanent(),
            _ => false,
        }
    }
}

impl QueryError {
    /// Why a connection whose internal query failed this way is not reused.
    pub fn close_reason(&self) -> CloseReason {
        match self {
            QueryError::Io(_) => CloseReason::ServerLost,
            QueryError::Server(_)
            | QueryError::Protocol(_)
            | QueryError::NotIdle(_)
            | QueryError::NoRow => CloseReason::ServerProtocolError,
        }
    }
}

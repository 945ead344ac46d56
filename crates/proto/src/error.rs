//! ErrorResponse and NoticeResponse: the one place where an error becomes bytes for a client.

use bytes::BytesMut;

use crate::frame::{put_cstr, write_message, Reader};
use crate::FrameError;

/// The SQLSTATEs Breakwater itself raises (names as in PostgreSQL's errcodes.txt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqlState(pub &'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const CONNECTION_EXCEPTION: SqlState = SqlState("08000");
    pub const SQLCLIENT_UNABLE_TO_ESTABLISH: SqlState = SqlState("08001");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    pub const INVALID_CATALOG_NAME: SqlState = SqlState("3D000");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const QUERY_CANCELED: SqlState = SqlState("57014");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    pub const IDLE_IN_TRANSACTION_TIMEOUT: SqlState = SqlState("25P03");
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState("57P05");
    pub const ACTIVE_SQL_TRANSACTION: SqlState = SqlState("25001");
    pub const INVALID_PARAMETER_VALUE: SqlState = SqlState("22023");
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    pub const UNDEFINED_OBJECT: SqlState = SqlState("42704");
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// An error (or notice) Breakwater reports to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    pub severity: Severity,
    pub code: SqlState,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn new(severity: Severity, code: SqlState, message: impl Into<String>) -> Self {
        PgError {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// An error after which the connection is closed.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    /// An error the session survives.
    pub fn error(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn notice(message: impl Into<String>) -> Self {
        Self::new(Severity::Notice, SqlState("00000"), message)
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Appends an ErrorResponse (or NoticeResponse for notices and warnings).
    pub fn write(&self, buf: &mut BytesMut) {
        let tag = match self.severity {
            Severity::Error | Severity::Fatal => b'E',
            Severity::Notice | Severity::Warning => b'N',
        };
        write_message(buf, tag, |b| {
            let sev = self.severity.as_str().as_bytes();
            field(b, b'S', sev);
            field(b, b'V', sev);
            field(b, b'C', self.code.0.as_bytes());
            field(b, b'M', self.message.as_bytes());
            if let Some(d) = &self.detail {
                field(b, b'D', d.as_bytes());
            }
            if let Some(h) = &self.hint {
                field(b, b'H', h.as_bytes());
            }
            b.extend_from_slice(&[0]);
        });
    }
}

fn field(b: &mut BytesMut, code: u8, value: &[u8]) {
    b.extend_from_slice(&[code]);
    put_cstr(b, value);
}

/// The fields of an ErrorResponse the pooler looks at (from a server's message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

pub fn parse_error_fields(body: &[u8]) -> Result<ErrorFields, FrameError> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut out = ErrorFields::default();
    loop {
        let code = r.u8()?;
        if code == 0 {
            return Ok(out);
        }
        let value = String::from_utf8_lossy(r.cstr()?).into_owned();
        match code {
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.code = value,
            b'M' => out.message = value,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::take_message;

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        PgError::fatal(
            SqlState::INVALID_PASSWORD,
            "password authentication failed for user \"a\"",
        )
        .with_hint("check the auth_file")
        .write(&mut buf);
        let m = take_message(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(m.tag, b'E');
        let f = parse_error_fields(&m.body).unwrap();
        assert_eq!(f.severity, "FATAL");
        assert_eq!(f.code, "28P01");
        assert!(f.message.contains("password authentication failed"));
    }

    #[test]
    fn notices_use_the_notice_tag() {
        let mut buf = BytesMut::new();
        PgError::notice("hello").write(&mut buf);
        assert_eq!(buf[0], b'N');
    }
}

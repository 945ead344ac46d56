//! Backend messages: the ones Breakwater writes to clients (it plays the server during login and
//! in the admin console) and the few server messages it parses (login, ParameterStatus,
//! BackendKeyData, ReadyForQuery).

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{put_cstr, write_message, FrameError, Reader};

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const DATA_ROW: u8 = b'D';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const NO_DATA: u8 = b'n';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';

/// Text type OID, used for every admin console column.
pub const TEXT_OID: u32 = 25;
pub const INT8_OID: u32 = 20;
pub const INT4_OID: u32 = 23;

/// What a server asks for during login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    Cleartext,
    Md5 {
        salt: [u8; 4],
    },
    Sasl {
        mechanisms: Vec<String>,
    },
    SaslContinue(Bytes),
    SaslFinal(Bytes),
    /// Kerberos, GSS, SSPI …: methods a pooler cannot do on a client's behalf.
    Unsupported(i32),
}

pub fn parse_auth(body: &Bytes) -> Result<AuthRequest, FrameError> {
    let mut r = Reader::new(body, "Authentication");
    Ok(match r.i32()? {
        0 => AuthRequest::Ok,
        3 => AuthRequest::Cleartext,
        5 => AuthRequest::Md5 { salt: r.array()? },
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr_utf8()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m.to_owned());
            }
            AuthRequest::Sasl { mechanisms }
        }
        11 => AuthRequest::SaslContinue(body.slice(4..)),
        12 => AuthRequest::SaslFinal(body.slice(4..)),
        other => AuthRequest::Unsupported(other),
    })
}

pub fn parse_parameter_status(body: &[u8]) -> Result<(&str, &str), FrameError> {
    let mut r = Reader::new(body, "ParameterStatus");
    Ok((r.cstr_utf8()?, r.cstr_utf8()?))
}

pub fn parse_backend_key_data(body: &[u8]) -> Result<(i32, i32), FrameError> {
    let mut r = Reader::new(body, "BackendKeyData");
    Ok((r.i32()?, r.i32()?))
}

/// A session's transaction status, as a ReadyForQuery reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (queries are refused until it ends).
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn as_byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// The transaction status of a ReadyForQuery.
pub fn parse_ready_for_query(body: &[u8]) -> Result<TxStatus, FrameError> {
    match body {
        [b] => TxStatus::from_byte(*b),
        _ => None,
    }
    .ok_or(FrameError::Malformed {
        what: "ReadyForQuery",
    })
}

/// The column values of a DataRow (`None` for NULL), borrowed from the body.
pub fn parse_data_row(body: &[u8]) -> Result<Vec<Option<&[u8]>>, FrameError> {
    let mut r = Reader::new(body, "DataRow");
    let n = r.i16()?;
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        out.push(if len < 0 {
            None
        } else {
            Some(r.bytes(len as usize)?)
        });
    }
    Ok(out)
}

/// The command tag of a CommandComplete, without the NUL.
pub fn command_tag(body: &[u8]) -> &[u8] {
    body.strip_suffix(&[0]).unwrap_or(body)
}

pub fn write_auth_ok(buf: &mut BytesMut) {
    write_message(buf, AUTHENTICATION, |b| b.put_i32(0));
}

pub fn write_auth_cleartext(buf: &mut BytesMut) {
    write_message(buf, AUTHENTICATION, |b| b.put_i32(3));
}

pub fn write_auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(5);
        b.extend_from_slice(&salt);
    });
}

pub fn write_auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(10);
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn write_auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(11);
        b.extend_from_slice(data);
    });
}

pub fn write_auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, AUTHENTICATION, |b| {
        b.put_i32(12);
        b.extend_from_slice(data);
    });
}

/// NegotiateProtocolVersion: the newest minor version of protocol 3 spoken here, and the
/// `_pq_.*` startup options not understood.
pub fn write_negotiate_protocol_version(buf: &mut BytesMut, minor: u16, unsupported: &[&str]) {
    write_message(buf, NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(i32::from(minor));
        b.put_i32(unsupported.len() as i32);
        for name in unsupported {
            put_cstr(b, name.as_bytes());
        }
    });
}

pub fn write_parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    write_message(buf, PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn write_backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    write_message(buf, BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn write_ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    write_message(buf, READY_FOR_QUERY, |b| b.put_u8(status.as_byte()));
}

pub fn write_command_complete(buf: &mut BytesMut, tag: &str) {
    write_message(buf, COMMAND_COMPLETE, |b| put_cstr(b, tag.as_bytes()));
}

pub fn write_empty_query_response(buf: &mut BytesMut) {
    write_message(buf, EMPTY_QUERY_RESPONSE, |_| {});
}

pub fn write_parse_complete(buf: &mut BytesMut) {
    write_message(buf, PARSE_COMPLETE, |_| {});
}

pub fn write_close_complete(buf: &mut BytesMut) {
    write_message(buf, CLOSE_COMPLETE, |_| {});
}

/// RowDescription with one column per `(name, type oid)`, all in text format.
pub fn write_row_description(buf: &mut BytesMut, columns: &[(&str, u32)]) {
    write_message(buf, ROW_DESCRIPTION, |b| {
        b.put_i16(columns.len() as i16);
        for (name, oid) in columns {
            put_cstr(b, name.as_bytes());
            b.put_i32(0); // table oid
            b.put_i16(0); // column number
            b.put_u32(*oid);
            b.put_i16(-1); // type size
            b.put_i32(-1); // type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow in text format; `None` is SQL NULL.
pub fn write_data_row<'a>(buf: &mut BytesMut, values: impl IntoIterator<Item = Option<&'a [u8]>>) {
    write_message(buf, b'D', |b| {
        let count_at = b.len();
        b.put_i16(0);
        let mut n: i16 = 0;
        for v in values {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.extend_from_slice(v);
                }
                None => b.put_i32(-1),
            }
            n += 1;
        }
        if let Some(field) = b.get_mut(count_at..count_at + 2) {
            field.copy_from_slice(&n.to_be_bytes());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::take_message;

    fn one(buf: &mut BytesMut) -> crate::Message {
        take_message(buf, 1 << 20).unwrap().unwrap()
    }

    #[test]
    fn auth_requests_round_trip() {
        let mut b = BytesMut::new();
        write_auth_md5(&mut b, [1, 2, 3, 4]);
        write_auth_sasl(&mut b, &["SCRAM-SHA-256"]);
        write_auth_sasl_continue(&mut b, b"r=abc");
        write_auth_ok(&mut b);
        let want = [
            AuthRequest::Md5 { salt: [1, 2, 3, 4] },
            AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()],
            },
            AuthRequest::SaslContinue(Bytes::from_static(b"r=abc")),
            AuthRequest::Ok,
        ];
        for w in want {
            assert_eq!(parse_auth(&one(&mut b).body).unwrap(), w);
        }
    }

    #[test]
    fn status_messages_parse() {
        let mut b = BytesMut::new();
        write_parameter_status(&mut b, "TimeZone", "UTC");
        write_backend_key_data(&mut b, 42, -7);
        write_ready_for_query(&mut b, TxStatus::InTransaction);
        assert_eq!(
            parse_parameter_status(&one(&mut b).body).unwrap(),
            ("TimeZone", "UTC")
        );
        assert_eq!(parse_backend_key_data(&one(&mut b).body).unwrap(), (42, -7));
        assert_eq!(
            parse_ready_for_query(&one(&mut b).body).unwrap(),
            TxStatus::InTransaction
        );
        assert!(parse_ready_for_query(b"X").is_err());
    }

    #[test]
    fn data_rows_round_trip_with_nulls() {
        let mut b = BytesMut::new();
        write_data_row(&mut b, [Some(&b"t"[..]), None, Some(&b""[..])]);
        let msg = one(&mut b);
        assert_eq!(msg.tag, DATA_ROW);
        assert_eq!(
            parse_data_row(&msg.body).unwrap(),
            vec![Some(&b"t"[..]), None, Some(&b""[..])]
        );
        assert!(parse_data_row(&[0, 1, 0, 0, 0, 9]).is_err());
    }
}

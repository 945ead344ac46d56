//! Frontend messages: what clients send that the pooler inspects, and what Breakwater sends to
//! servers on its own account (login, parameter sync, reset, cancel).

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{put_cstr, write_message, FrameError, Reader};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const TERMINATE: u8 = b'X';
/// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
pub const PASSWORD: u8 = b'p';

pub fn write_query(buf: &mut BytesMut, sql: &str) {
    write_message(buf, QUERY, |b| put_cstr(b, sql.as_bytes()));
}

pub fn write_sync(buf: &mut BytesMut) {
    write_message(buf, SYNC, |_| {});
}

pub fn write_terminate(buf: &mut BytesMut) {
    write_message(buf, TERMINATE, |_| {});
}

pub fn write_password(buf: &mut BytesMut, password: &[u8]) {
    write_message(buf, PASSWORD, |b| put_cstr(b, password));
}

pub fn write_sasl_initial_response(buf: &mut BytesMut, mechanism: &str, data: &[u8]) {
    write_message(buf, PASSWORD, |b| {
        put_cstr(b, mechanism.as_bytes());
        b.put_i32(data.len() as i32);
        b.extend_from_slice(data);
    });
}

pub fn write_sasl_response(buf: &mut BytesMut, data: &[u8]) {
    write_message(buf, PASSWORD, |b| b.extend_from_slice(data));
}

/// A PasswordMessage body: the password (or md5 response) without its NUL.
pub fn parse_password(body: &[u8]) -> Result<&[u8], FrameError> {
    Reader::new(body, "PasswordMessage").cstr()
}

/// A SASLInitialResponse: the chosen mechanism and the client-first-message.
pub fn parse_sasl_initial_response(body: &Bytes) -> Result<(String, Bytes), FrameError> {
    let mut r = Reader::new(body, "SASLInitialResponse");
    let mechanism = r.cstr_utf8()?.to_owned();
    let len = r.i32()?;
    let rest = r.rest();
    if len < 0 || rest.len() != len as usize {
        return Err(FrameError::Malformed {
            what: "SASLInitialResponse",
        });
    }
    let start = body.len() - rest.len();
    Ok((mechanism, body.slice(start..)))
}

/// The SQL text of a Query message.
pub fn parse_query(body: &[u8]) -> Result<&[u8], FrameError> {
    Reader::new(body, "Query").cstr()
}

/// The statement name and SQL text of a Parse message.
pub fn parse_parse(body: &[u8]) -> Result<(&[u8], &[u8]), FrameError> {
    let mut r = Reader::new(body, "Parse");
    Ok((r.cstr()?, r.cstr()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::take_message;

    #[test]
    fn sasl_initial_response_round_trips() {
        let mut b = BytesMut::new();
        write_sasl_initial_response(&mut b, "SCRAM-SHA-256", b"n,,n=,r=x");
        let m = take_message(&mut b, 1024).unwrap().unwrap();
        let (mech, data) = parse_sasl_initial_response(&m.body).unwrap();
        assert_eq!(
            (mech.as_str(), &data[..]),
            ("SCRAM-SHA-256", &b"n,,n=,r=x"[..])
        );
    }

    #[test]
    fn sasl_initial_response_with_a_lying_length_is_refused() {
        let mut body = BytesMut::new();
        put_cstr(&mut body, b"SCRAM-SHA-256");
        body.put_i32(100);
        body.extend_from_slice(b"short");
        assert!(parse_sasl_initial_response(&body.freeze()).is_err());
    }

    #[test]
    fn query_and_parse_text_are_found() {
        assert_eq!(parse_query(b"select 1\0").unwrap(), b"select 1");
        assert_eq!(
            parse_parse(b"s1\0select $1\0\0\0").unwrap(),
            (&b"s1"[..], &b"select $1"[..])
        );
        assert!(parse_query(b"no nul").is_err());
    }
}

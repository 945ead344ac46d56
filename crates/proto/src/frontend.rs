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

/// Is `tag` a message a logged-in client may send? Anything else (a server's message type, a
/// type byte of 0 such as an SSLRequest sent after login, a password after login, garbage) is a
/// protocol violation that must not reach a server: PostgreSQL would end the whole connection.
pub fn is_session_message(tag: u8) -> bool {
    matches!(
        tag,
        QUERY
            | PARSE
            | BIND
            | DESCRIBE
            | EXECUTE
            | CLOSE
            | SYNC
            | FLUSH
            | FUNCTION_CALL
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | TERMINATE
    )
}

/// Where a Bind, Describe or Close body names a prepared statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementRef<'a> {
    /// Bytes of the body before the name (a Bind's portal name, a Describe's or Close's `S`).
    pub prefix_len: usize,
    /// The statement's name; `None` when the message refers to a portal.
    pub name: Option<&'a [u8]>,
}

impl StatementRef<'_> {
    /// Bytes of the body up to and including the name's terminator.
    pub fn end(&self) -> usize {
        self.prefix_len + self.name.map_or(0, |n| n.len() + 1)
    }
}

/// Finds the statement a Bind (portal name, then statement name), Describe or Close (`S` or
/// `P`, then a name) refers to. `body` may be only the start of a Bind's body.
pub fn statement_ref(tag: u8, body: &[u8]) -> Result<StatementRef<'_>, FrameError> {
    let what = match tag {
        BIND => "Bind",
        DESCRIBE => "Describe",
        _ => "Close",
    };
    let mut r = Reader::new(body, what);
    if tag == BIND {
        let portal = r.cstr()?;
        return Ok(StatementRef {
            prefix_len: portal.len() + 1,
            name: Some(r.cstr()?),
        });
    }
    match r.u8()? {
        b'S' => Ok(StatementRef {
            prefix_len: 1,
            name: Some(r.cstr()?),
        }),
        b'P' => Ok(StatementRef {
            prefix_len: 1,
            name: None,
        }),
        _ => Err(FrameError::Malformed { what }),
    }
}

/// A Parse of statement `name`, with `rest` the body after the name (query text, parameter
/// count and types) as a client sent it.
pub fn write_parse(buf: &mut BytesMut, name: &[u8], rest: &[u8]) {
    write_message(buf, PARSE, |b| {
        put_cstr(b, name);
        b.extend_from_slice(rest);
    });
}

/// A Close of prepared statement `name`.
pub fn write_close_statement(buf: &mut BytesMut, name: &[u8]) {
    write_message(buf, CLOSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, name);
    });
}

pub fn write_query(buf: &mut BytesMut, sql: &str) {
    write_message(buf, QUERY, |b| put_cstr(b, sql.as_bytes()));
}

/// A Parse of the unnamed statement from `sql`, parameter types left to the server.
pub fn write_parse_unnamed(buf: &mut BytesMut, sql: &str) {
    write_message(buf, PARSE, |b| {
        put_cstr(b, b"");
        put_cstr(b, sql.as_bytes());
        b.put_i16(0);
    });
}

/// A Bind of the unnamed portal to the unnamed statement, every parameter and result in text;
/// `None` is NULL.
pub fn write_bind_text(buf: &mut BytesMut, params: &[Option<&[u8]>]) {
    write_message(buf, BIND, |b| {
        put_cstr(b, b"");
        put_cstr(b, b"");
        b.put_i16(0);
        b.put_i16(i16::try_from(params.len()).unwrap_or(i16::MAX));
        for p in params.iter().take(i16::MAX as usize) {
            match p {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    b.extend_from_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(0);
    });
}

/// An Execute of the unnamed portal, all rows.
pub fn write_execute_unnamed(buf: &mut BytesMut) {
    write_message(buf, EXECUTE, |b| {
        put_cstr(b, b"");
        b.put_i32(0);
    });
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
    fn statement_refs_are_found_in_bind_describe_and_close() {
        type Found<'a> = Option<(usize, Option<&'a [u8]>)>;
        let cases: &[(u8, &[u8], Found)] = &[
            (BIND, b"portal\0stmt\0\0\0", Some((7, Some(b"stmt")))),
            (BIND, b"\0\0rest", Some((1, Some(b"")))),
            (BIND, b"\0stmt", None),
            (DESCRIBE, b"Sname\0", Some((1, Some(b"name")))),
            (DESCRIBE, b"Pportal\0", Some((1, None))),
            (CLOSE, b"S\0", Some((1, Some(b"")))),
            (CLOSE, b"Xname\0", None),
            (CLOSE, b"", None),
        ];
        for (tag, body, want) in cases {
            let got = statement_ref(*tag, body)
                .ok()
                .map(|r| (r.prefix_len, r.name));
            assert_eq!(got, *want, "{} {:?}", *tag as char, body);
        }
        let r = statement_ref(BIND, b"p\0s1\0rest").unwrap();
        assert_eq!(r.end(), 5);
    }

    #[test]
    fn parse_and_close_are_written_as_a_client_would() {
        let mut b = BytesMut::new();
        write_parse(&mut b, b"s1", b"select $1\0\0\0");
        write_close_statement(&mut b, b"s1");
        let p = take_message(&mut b, 1024).unwrap().unwrap();
        assert_eq!(p.tag, PARSE);
        assert_eq!(
            parse_parse(&p.body).unwrap(),
            (&b"s1"[..], &b"select $1"[..])
        );
        let c = take_message(&mut b, 1024).unwrap().unwrap();
        assert_eq!((c.tag, &c.body[..]), (CLOSE, &b"Ss1\0"[..]));
    }

    #[test]
    fn only_session_messages_are_valid_after_login() {
        for tag in *b"QPBDECSHFdcfX" {
            assert!(is_session_message(tag), "{}", tag as char);
        }
        for tag in [0, b'!', b'T', b'Z', b'p', b'R', 0xff] {
            assert!(!is_session_message(tag), "{tag}");
        }
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

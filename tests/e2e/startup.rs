//! A client's first packets, as PostgreSQL treats them: protocol negotiation, one SSLRequest and
//! one GSSENCRequest at most and nothing pipelined after them, startup parameters checked at
//! login, and no word about the database before the password. Raw sockets, because no driver
//! sends these on purpose.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

const V3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// The backend messages in `bytes`, as (type, body); a trailing partial message is dropped.
fn messages(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while bytes.len() >= 5 {
        let len = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        let Some(body) = bytes.get(5..1 + len) else {
            break;
        };
        out.push((bytes[0], body.to_vec()));
        bytes = &bytes[1 + len..];
    }
    out
}

/// Reads messages until a ReadyForQuery, an ErrorResponse, or the close (bounded).
async fn read_until_ready_or_error(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
    read_until(s, |t| t == b'Z' || t == b'E').await
}

/// Reads messages until one whose type satisfies `stop`, or the close (bounded).
async fn read_until(s: &mut TcpStream, stop: impl Fn(u8) -> bool) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let msgs = messages(&got);
        if msgs.iter().any(|(t, _)| stop(*t)) {
            return msgs;
        }
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return msgs,
        }
    }
}

fn code_of(msgs: &[(u8, Vec<u8>)]) -> Option<String> {
    let (_, body) = msgs.iter().find(|(t, _)| *t == b'E')?;
    let mut e = vec![b'E'];
    e.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    e.extend_from_slice(body);
    error_code(&e)
}

fn request(code: u32) -> Vec<u8> {
    let mut r = 8u32.to_be_bytes().to_vec();
    r.extend_from_slice(&code.to_be_bytes());
    r
}

async fn send(port: u16, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

#[tokio::test]
async fn a_newer_3x_protocol_and_pq_options_are_negotiated_down_to_3_0() {
    let env = start("auth_type = \"trust\"", "");
    let port = env.pooler.port();
    let packet = startup(
        &[
            ("user", "app"),
            ("database", "app"),
            ("_pq_.test_extension", "on"),
        ],
        V3 + 2,
    );
    let mut s = send(port, &packet).await;
    let msgs = read_until_ready_or_error(&mut s).await;
    let (tag, body) = &msgs[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion first: {msgs:?}");
    assert_eq!(&body[..8], &[0, 0, 0, 0, 0, 0, 0, 1], "3.0, one option");
    assert_eq!(&body[8..], b"_pq_.test_extension\0");
    assert_eq!(msgs[1].0, b'R', "then authentication goes on");
    assert_eq!(msgs.last().unwrap().0, b'Z', "{msgs:?}");
    // A plain 3.0 startup gets no negotiation.
    let mut s = raw_startup(port).await;
    let msgs = read_until_ready_or_error(&mut s).await;
    assert!(msgs.iter().all(|(t, _)| *t != b'v'), "{msgs:?}");
    // A new major version is still refused.
    let mut s = send(port, &startup(&[("user", "app")], 4 << 16)).await;
    assert_eq!(
        error_code(&read_all(&mut s).await).as_deref(),
        Some("0A000")
    );
}

#[tokio::test]
async fn an_unknown_database_is_reported_only_after_the_password() {
    let env = start("", "");
    let port = env.pooler.port();
    // Before any password, an unknown database and a known one look the same: a SASL request.
    for db in ["app", "no_such_db"] {
        let mut s = send(port, &startup(&[("user", "app"), ("database", db)], V3)).await;
        let msgs = read_until(&mut s, |_| true).await;
        assert_eq!(msgs.first().map(|m| m.0), Some(b'R'), "{db}: {msgs:?}");
        assert!(msgs.iter().all(|(t, _)| *t != b'E'), "{db}: {msgs:?}");
    }
    let wrong = connect(&env.pooler.conn_string("app", "wrong", "no_such_db")).await;
    assert_eq!(sqlstate(wrong), "28P01");
    let nobody = connect(&env.pooler.conn_string("nobody", "x", "no_such_db")).await;
    assert_eq!(sqlstate(nobody), "28P01");
    let right = connect(&env.pooler.conn_string("app", "app_pw", "no_such_db")).await;
    assert_eq!(sqlstate(right), "3D000");
}

#[tokio::test]
async fn bytes_pipelined_after_an_ssl_or_gssenc_request_are_refused_with_08p01() {
    let env = start("auth_type = \"trust\"", "");
    let port = env.pooler.port();
    for code in [SSL_REQUEST, GSSENC_REQUEST] {
        let mut bytes = request(code);
        bytes.extend_from_slice(&startup(&[("user", "app"), ("database", "app")], V3));
        let mut s = send(port, &bytes).await;
        let got = read_all(&mut s).await;
        assert_eq!(got.first(), Some(&b'N'), "{code}");
        assert_eq!(error_code(&got[1..]).as_deref(), Some("08P01"), "{code}");
        assert!(
            !got.windows(5).any(|w| w == [b'R', 0, 0, 0, 8]),
            "the pipelined startup must not be answered"
        );
    }
}

#[tokio::test]
async fn a_second_negotiation_of_a_kind_is_fatal() {
    let env = start("auth_type = \"trust\"", "");
    let port = env.pooler.port();
    for code in [SSL_REQUEST, GSSENC_REQUEST] {
        let mut s = send(port, &request(code)).await;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        s.write_all(&request(code)).await.unwrap();
        let got = read_all(&mut s).await;
        assert_eq!(
            error_code(&got).as_deref(),
            Some("08P01"),
            "{code}: {got:?}"
        );
    }
    // One of each is still fine (libpq's gssencmode=prefer then sslmode=prefer).
    let mut s = send(port, &request(GSSENC_REQUEST)).await;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    s.write_all(&request(SSL_REQUEST)).await.unwrap();
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&startup(&[("user", "app"), ("database", "app")], V3))
        .await
        .unwrap();
    let msgs = read_until_ready_or_error(&mut s).await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{msgs:?}");
}

#[tokio::test]
async fn an_unknown_startup_parameter_is_refused_at_login() {
    let env = start("auth_type = \"trust\"", "");
    let port = env.pooler.port();
    let login = |extra: (&'static str, &'static str)| {
        startup(&[("user", "app"), ("database", "app"), extra], V3)
    };
    // Twice: the second login must not be waved through on the pool's cached welcome.
    for _ in 0..2 {
        let mut s = send(port, &login(("no_such_setting", "1"))).await;
        let msgs = read_until_ready_or_error(&mut s).await;
        assert_eq!(code_of(&msgs).as_deref(), Some("42704"), "{msgs:?}");
        assert!(msgs.iter().all(|(t, _)| *t != b'Z'), "{msgs:?}");
    }
    // A known one logs in, and so does the next client with it (from the pool's memory).
    for _ in 0..2 {
        let mut s = send(port, &login(("extra_float_digits", "2"))).await;
        let msgs = read_until_ready_or_error(&mut s).await;
        assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{msgs:?}");
    }
    // A bad value is refused too, with PostgreSQL's code for it.
    let mut s = send(port, &login(("extra_float_digits", "many"))).await;
    let msgs = read_until_ready_or_error(&mut s).await;
    assert_eq!(code_of(&msgs).as_deref(), Some("22023"), "{msgs:?}");
}

#[tokio::test]
async fn replication_takes_a_boolean_or_database() {
    let env = start("auth_type = \"trust\"", "");
    let port = env.pooler.port();
    for (value, want) in [
        ("maybe", Some("22023")),
        ("true", Some("0A000")),
        ("off", None),
    ] {
        let packet = startup(
            &[("user", "app"), ("database", "app"), ("replication", value)],
            V3,
        );
        let mut s = send(port, &packet).await;
        let msgs = read_until_ready_or_error(&mut s).await;
        assert_eq!(code_of(&msgs).as_deref(), want, "{value}: {msgs:?}");
    }
}

#[tokio::test]
async fn a_startup_packet_may_be_10000_bytes_after_its_length_word() {
    let env = start("auth_type = \"trust\"", "");
    let port = env.pooler.port();
    let sized = |body: usize| {
        let base = startup(
            &[("user", "app"), ("database", "app"), ("search_path", "")],
            V3,
        );
        let pad = body + 4 - base.len();
        startup(
            &[
                ("user", "app"),
                ("database", "app"),
                ("search_path", &"a".repeat(pad)),
            ],
            V3,
        )
    };
    let max = sized(10_000);
    assert_eq!(max.len(), 10_004);
    let mut s = send(port, &max).await;
    let msgs = read_until_ready_or_error(&mut s).await;
    assert_eq!(msgs.last().map(|m| m.0), Some(b'Z'), "{msgs:?}");
    let mut s = send(port, &sized(10_001)).await;
    assert_eq!(
        error_code(&read_all(&mut s).await).as_deref(),
        Some("08P01")
    );
}

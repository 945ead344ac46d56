//! Wire protocol coverage: extended protocol and pipelining, COPY, large results, cancel, and
//! malformed input from clients.

use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use futures_util::{future::join_all, SinkExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

#[tokio::test]
async fn pipelined_extended_queries_get_their_own_answers_in_order() {
    let env = start("", "pool_size = 2\n");
    let c = env.client().await;
    let stmt = c.prepare("SELECT $1::int * 2").await.unwrap();
    // tokio-postgres pipelines concurrent requests on one connection.
    let futures = (0..50i32).map(|i| {
        let c = &c;
        let stmt = &stmt;
        async move { c.query_one(stmt, &[&i]).await.unwrap().get::<_, i32>(0) }
    });
    let got = join_all(futures).await;
    assert_eq!(got, (0..50).map(|i| i * 2).collect::<Vec<_>>());
}

#[tokio::test]
async fn errors_inside_a_transaction_leave_it_aborted_until_rollback_and_the_server_is_reused() {
    let env = start("", "pool_size = 1\n");
    let c = env.client().await;
    c.batch_execute("BEGIN").await.unwrap();
    assert!(c.batch_execute("SELECT 1/0").await.is_err());
    assert_eq!(sqlstate(c.query_one("SELECT 1", &[]).await), "25P02");
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        c.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0),
        3
    );
    // Empty queries and notices pass through.
    c.batch_execute("").await.unwrap();
    c.batch_execute("DO $$ BEGIN RAISE NOTICE 'hello'; END $$")
        .await
        .unwrap();
}

#[tokio::test]
async fn copy_in_and_out_move_100k_rows_intact() {
    let env = start("", "pool_size = 2\n");
    let c = env.client().await;
    c.batch_execute("CREATE TABLE copy_t (id int, name text)")
        .await
        .unwrap();
    let sink = c.copy_in("COPY copy_t FROM STDIN").await.unwrap();
    let mut data = BytesMut::new();
    for i in 0..100_000 {
        data.put_slice(format!("{i}\trow-{i}\n").as_bytes());
    }
    let mut sink = Box::pin(sink);
    sink.send(data.freeze()).await.unwrap();
    let rows = sink.as_mut().finish().await.unwrap();
    assert_eq!(rows, 100_000);
    let sum: i64 = c
        .query_one("SELECT sum(id)::bigint FROM copy_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, (0..100_000i64).sum::<i64>());

    let stream = c.copy_out("COPY copy_t TO STDOUT").await.unwrap();
    let chunks: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(stream).await;
    let mut out = Vec::new();
    for ch in chunks {
        out.extend_from_slice(&ch.unwrap());
    }
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 100_000);
    assert!(text.contains("99999\trow-99999\n"));
    // The connection is usable afterwards (the server went back at the right moment).
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn a_20_mb_result_arrives_whole() {
    let env = start("", "pool_size = 2\n");
    let c = env.client().await;
    let rows = c
        .query(
            "SELECT i, repeat('x', 1000) FROM generate_series(1, 20000) i",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 20_000);
    let total: usize = rows.iter().map(|r| r.get::<_, String>(1).len()).sum();
    assert_eq!(total, 20_000_000);
    let one_big: String = c
        .query_one("SELECT repeat('y', 20000000)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(one_big.len(), 20_000_000);
}

#[tokio::test]
async fn cancel_stops_a_running_query_within_a_second() {
    let env = start("", "pool_size = 2\n");
    let c = env.client().await;
    let token = c.cancel_token();
    let started = Instant::now();
    let query =
        tokio::spawn(async move { c.query_one("SELECT pg_sleep(10)", &[]).await.map(|_| ()) });
    let direct = env.direct().await;
    wait_for_active_query(&direct, "SELECT pg_sleep(10)").await;
    let cancel_sent = Instant::now();
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let r = query.await.unwrap();
    assert_eq!(sqlstate(r), "57014");
    assert!(
        cancel_sent.elapsed() < Duration::from_secs(1),
        "cancel took {:?}",
        cancel_sent.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(9));
}

#[tokio::test]
async fn ssl_and_gssenc_requests_are_answered_n_and_the_client_may_continue_in_plaintext() {
    let env = start("auth_type = \"trust\"", "");
    let mut s = TcpStream::connect(("127.0.0.1", env.pooler.port()))
        .await
        .unwrap();
    for code in [80_877_103u32, 80_877_104] {
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        s.write_all(&req).await.unwrap();
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
    }
    s.write_all(&startup(&[("user", "app"), ("database", "app")], 196_608))
        .await
        .unwrap();
    let mut buf = vec![0u8; 9];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf[0], b'R', "expected AuthenticationOk");
    assert_eq!(&buf[5..9], &[0, 0, 0, 0]);
}

#[tokio::test]
async fn malformed_startups_get_a_clear_error_and_a_close() {
    let env = start("auth_type = \"trust\"", "");
    let port = env.pooler.port();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("protocol 2", startup(&[("user", "app")], 131_072), "0A000"),
        (
            "replication",
            startup(
                &[
                    ("user", "app"),
                    ("database", "app"),
                    ("replication", "true"),
                ],
                196_608,
            ),
            "0A000",
        ),
        ("huge length", vec![0x7f, 0, 0, 0, 0, 3, 0, 0], "08P01"),
        (
            "length below minimum",
            vec![0, 0, 0, 2, 0, 3, 0, 0],
            "08P01",
        ),
        ("no user", startup(&[("database", "app")], 196_608), "08P01"),
    ];
    for (what, bytes, code) in cases {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        let got = read_all(&mut s).await;
        assert_eq!(
            error_code(&got).as_deref(),
            Some(code),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // And the pooler still serves others.
    let c = env.pooler.connect("app", "", "app").await.unwrap();
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn an_oversized_message_after_login_is_refused_with_08p01_before_it_is_buffered() {
    let env = start("auth_type = \"trust\"\nmax_packet_size = 65536", "");
    let mut s = raw_login(env.pooler.port()).await;
    // A Query announcing 1 GB.
    s.write_all(&[b'Q', 0x40, 0, 0, 0]).await.unwrap();
    let reply = read_all(&mut s).await;
    assert_eq!(
        error_code(&reply).as_deref(),
        Some("08P01"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_client_login_timeout() {
    // With tcp_defer_accept (the default on Linux) the kernel would hold a client that sends
    // nothing for 45 s before the pooler sees it; the login timer is for the rest.
    let env = start(
        "auth_type = \"trust\"\nclient_login_timeout = \"1s\"\ntcp_defer_accept = false",
        "",
    );
    let mut s = TcpStream::connect(("127.0.0.1", env.pooler.port()))
        .await
        .unwrap();
    let started = Instant::now();
    let got = read_all(&mut s).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(error_code(&got).as_deref(), Some("08P01"));
}

/// The pids of the pool's server connections, as PostgreSQL sees them, with their states.
async fn app_backend_states(direct: &tokio_postgres::Client) -> Vec<(i32, String)> {
    let rows = direct
        .query(
            "SELECT pid, coalesce(state, '') FROM pg_stat_activity WHERE datname = 'app' AND usename = 'app' AND backend_type = 'client backend' ORDER BY pid",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test]
async fn messages_no_client_may_send_get_08p01_and_never_reach_a_server() {
    let env = start("auth_type = \"trust\"\ndefault_pool_size = 1", "");
    let direct = env.direct().await;
    // One server, warm, that every test client below would be given.
    env.client().await.simple_query("SELECT 1").await.unwrap();
    let before = app_backend_states(&direct).await;
    assert_eq!(before.len(), 1);
    let bad: [&[u8]; 5] = [
        &[b'!', 0, 0, 0, 4],
        // A server's message type (RowDescription).
        &[b'T', 0, 0, 0, 6, 0, 0],
        // An SSLRequest after login: its type byte is 0.
        &[0, 0, 0, 8, 4, 210, 22, 47],
        // A password after login.
        &[b'p', 0, 0, 0, 7, b'p', b'w', 0],
        &[b'Z', 0, 0, 0, 5, b'I'],
    ];
    for round in 0..16 {
        for msg in bad {
            let mut s = raw_login(env.pooler.port()).await;
            s.write_all(msg).await.unwrap();
            let reply = read_all(&mut s).await;
            assert_eq!(
                error_code(&reply).as_deref(),
                Some("08P01"),
                "round {round}, {msg:?}: {:?}",
                String::from_utf8_lossy(&reply)
            );
        }
    }
    // The same server, never handed any of it (PostgreSQL would have ended it).
    assert_eq!(app_backend_states(&direct).await, before);
    let log = env.pooler.log();
    assert!(log.contains("invalid frontend message type"), "{log}");
}

#[tokio::test]
async fn a_malformed_message_inside_a_transaction_rolls_it_back_and_keeps_the_server() {
    let env = start("auth_type = \"trust\"\ndefault_pool_size = 1", "");
    let direct = env.direct().await;
    let mut s = raw_login(env.pooler.port()).await;
    let mut begin = BytesMut::new();
    begin.put_u8(b'Q');
    begin.put_i32(4 + 6);
    begin.extend_from_slice(b"BEGIN\0");
    s.write_all(&begin).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'T']) {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("BEGIN's reply")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let inside = app_backend_states(&direct).await;
    assert_eq!(inside.len(), 1);
    assert_eq!(inside[0].1, "idle in transaction");
    s.write_all(&[b'!', 0, 0, 0, 4]).await.unwrap();
    let reply = read_all(&mut s).await;
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"));
    // Rolled back and kept: the same backend, idle, serves the next client.
    testkit::wait_until("the server to be rolled back", WAIT, || async {
        app_backend_states(&direct).await == vec![(inside[0].0, "idle".to_owned())]
    })
    .await
    .unwrap();
    let c = env.client().await;
    let pid: i32 = c
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid, inside[0].0);
}

/// VmRSS or VmHWM of a process, in KiB.
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn large_queries_stream_through_without_the_pooler_holding_them() {
    const MIB: usize = 1024 * 1024;
    let env = start("", "");
    // Warm: the pool's servers and the clients' first buffers exist before the baseline.
    let clients = join_all((0..4).map(|_| env.client())).await;
    for c in &clients {
        c.simple_query("SELECT 1").await.unwrap();
    }
    let pid = env.pooler.pid();
    let baseline = memory_kib(pid, "VmRSS:");
    let literal = "x".repeat(40 * MIB);
    let sql = format!("SELECT length('{literal}')");
    let results = join_all(clients.iter().map(|c| c.simple_query(&sql))).await;
    for r in results {
        let rows = r.unwrap();
        let row = rows
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                _ => None,
            })
            .expect("a row");
        assert_eq!(row.get(0), Some("41943040"));
    }
    // Four 40 MiB queries buffered whole would have taken 160 MiB or more at their peak.
    let peak = memory_kib(pid, "VmHWM:");
    eprintln!("pooler RSS: {baseline} KiB before, peak {peak} KiB");
    assert!(
        peak < baseline + 48 * 1024,
        "peak RSS {peak} KiB against a baseline of {baseline} KiB"
    );
    // And nothing of them is kept.
    let after = memory_kib(pid, "VmRSS:");
    assert!(
        after < baseline + 16 * 1024,
        "RSS {after} KiB after, {baseline} KiB before"
    );
}

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
    let env = start("auth_type = \"trust\"\nclient_login_timeout = \"1s\"", "");
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

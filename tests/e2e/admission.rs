//! Admission control per source address: a retrying job on one source address cannot crowd out
//! the clients on others, and costs the database nothing.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::common::*;

/// Connects through the pooler from `source` (any 127.x.y.z is local on Linux loopback).
async fn connect_from(
    source: &str,
    port: u16,
    conn: &str,
) -> Result<Client, tokio_postgres::Error> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    // Binding before connecting picks a port without looking at the destination: without
    // SO_REUSEADDR a port still in TIME_WAIT from the last thousand attempts can be refused.
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(
            format!("{source}:0")
                .parse::<SocketAddr>()
                .expect("address"),
        )
        .expect("bind the source address");
    let stream = socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("TCP connect to the pooler");
    let config: tokio_postgres::Config = conn.parse().expect("connection string");
    let (client, connection) = config.connect_raw(stream, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn refusal(e: &tokio_postgres::Error) -> Option<(String, String)> {
    e.as_db_error()
        .map(|d| (d.code().code().to_owned(), d.message().to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_reconnecting_in_a_tight_loop_is_refused_while_other_clients_keep_working() {
    raise_fd_limit();
    // md5, not SCRAM: the clients' own PBKDF2 (a debug build of tokio-postgres) would be the
    // bottleneck of the loop; the limit is decided before authentication either way.
    let env = start(
        "client_login_rate_per_addr = 200\nauth_type = \"md5\"",
        "pool_size = 10\n",
    );
    let port = env.pooler.port();
    let conn = env.conn_string();
    let direct = env.direct().await;
    // Warm the pool, then note when the storm began: no backend of `app` may start after it.
    let warm: Vec<_> = futures_util::future::join_all((0..10).map(|_| async {
        let c = env.client().await;
        c.simple_query("SELECT pg_sleep(0.05)").await.unwrap();
        c
    }))
    .await;
    drop(warm);
    let storm_began: std::time::SystemTime = direct
        .query_one("SELECT now()::timestamptz", &[])
        .await
        .unwrap()
        .get(0);
    let run = Duration::from_secs(3);
    let began = Instant::now();
    let until = began + run;
    // On a loaded machine the loops may not reach the rate at first: they go on (up to 10 s)
    // until the bucket has refused something.
    let noisy_limit = began + Duration::from_secs(10);
    let refused_any = Arc::new(AtomicBool::new(false));

    // The noisy job: four loops on 127.0.0.2, each paced at one login every 4 ms.
    let noisy = (0..4).map(|_| {
        let conn = conn.clone();
        let refused_any = refused_any.clone();
        tokio::spawn(async move {
            let (mut admitted, mut refused, mut other) = (0u32, 0u32, Vec::new());
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let go_on = || {
                let now = Instant::now();
                now < until || (now < noisy_limit && !refused_any.load(Ordering::Relaxed))
            };
            while go_on() {
                tick.tick().await;
                match connect_from("127.0.0.2", port, &conn).await {
                    Ok(c) => {
                        admitted += 1;
                        let _ = c.simple_query("SELECT 1").await;
                    }
                    Err(e) => match refusal(&e) {
                        Some((code, msg)) if code == "53300" => {
                            assert!(msg.contains("client_login_rate_per_addr = 200"), "{msg}");
                            assert!(msg.contains("retry in"), "{msg}");
                            refused += 1;
                            refused_any.store(true, Ordering::Relaxed);
                        }
                        _ => other.push(e.to_string()),
                    },
                }
            }
            (admitted, refused, other, Instant::now())
        })
    });
    let noisy: Vec<_> = noisy.collect();

    // The quiet clients: 50 on 127.0.0.1, each logging in, querying and leaving every 0.5 s.
    let quiet: Vec<_> = (0..50)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut times = Vec::new();
                while Instant::now() < until {
                    let t0 = Instant::now();
                    let c = connect_from("127.0.0.1", port, &conn)
                        .await
                        .expect("a quiet client's login");
                    c.simple_query("SELECT 1")
                        .await
                        .expect("a quiet client's query");
                    times.push(t0.elapsed());
                    drop(c);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                times
            })
        })
        .collect();

    let (mut admitted, mut refused) = (0, 0);
    let mut noisy_ran = Duration::ZERO;
    for n in noisy {
        let (a, r, other, ended) = n.await.unwrap();
        noisy_ran = noisy_ran.max(ended - began);
        assert!(other.is_empty(), "noisy client saw other errors: {other:?}");
        admitted += a;
        refused += r;
    }
    let mut times: Vec<Duration> = Vec::new();
    for q in quiet {
        times.extend(q.await.expect("a quiet client failed"));
    }
    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    eprintln!(
        "noisy 127.0.0.2: {} attempts in {noisy_ran:?} ({} admitted, {refused} refused); \
         quiet 127.0.0.1: {} login+query cycles, p50 {:?}, p99 {:?}, max {:?}",
        admitted + refused,
        admitted,
        times.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    // The bucket held: one second's burst plus the rate, over the run.
    assert!(refused > 0, "nothing was refused");
    let bucket = 200 + 200 * (noisy_ran.as_secs() as u32 + 1);
    assert!(admitted <= bucket, "{admitted} logins admitted");

    // The database saw no new connection during the storm.
    let started_since: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND usename = 'app' \
             AND backend_start >= $1",
            &[&storm_began],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(started_since, 0, "backends opened during the storm");
    assert!(app_backends(&direct).await <= 10);

    // A line a second per source, not a line a refusal.
    let log = env.pooler.log();
    let lines = log.matches("too many logins from 127.0.0.2").count();
    assert!(
        (1..=noisy_ran.as_secs() as usize + 2).contains(&lines),
        "{lines} log lines for {refused} refusals"
    );
}

#[tokio::test]
async fn a_source_over_its_connection_cap_is_refused_until_one_of_its_connections_closes() {
    let env = start("max_client_conn_per_addr = 2", "pool_size = 2\n");
    let port = env.pooler.port();
    let conn = env.conn_string();
    let one = connect_from("127.0.0.3", port, &conn).await.unwrap();
    let two = connect_from("127.0.0.3", port, &conn).await.unwrap();
    let err = connect_from("127.0.0.3", port, &conn).await.unwrap_err();
    let (code, msg) = refusal(&err).expect("an ErrorResponse");
    assert_eq!(code, "53300");
    assert!(msg.contains("max_client_conn_per_addr = 2"), "{msg}");
    assert!(msg.contains("127.0.0.3"), "{msg}");
    // Another source is not affected.
    let other = connect_from("127.0.0.4", port, &conn).await.unwrap();
    other.simple_query("SELECT 1").await.unwrap();
    // Once one closes (the pooler notices the hang-up), the source may connect again.
    drop(one);
    testkit::wait_until("a third connection from 127.0.0.3", WAIT, || {
        let conn = conn.clone();
        async move { connect_from("127.0.0.3", port, &conn).await.is_ok() }
    })
    .await
    .unwrap();
    two.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_with_five_waiting_clients_is_served_between_the_turns_of_one_with_five_hundred() {
    use futures_util::StreamExt;
    raise_fd_limit();
    // md5 rather than SCRAM: 500 logins of a debug build's PBKDF2 would dominate the test.
    // One runtime and one server: the order checked is the queue's. With two servers the
    // sequence numbers are the order in which the servers ran the transactions, not the order
    // the queue granted turns: on two loaded cores one backend process went unscheduled for
    // 8 ms after Breakwater had forwarded its quiet client's query, in turn, and the other
    // server ran 21 noisy transactions meanwhile ([2, 5, 7, 9, 24]; with a runtime per core the
    // runtime's thread stalled the same way). With one server, the next turn is granted only
    // once the last transaction is over, so the numbers are the grants' order. The unit tests
    // in upstream's `slots/tests.rs` cover turns across runtimes.
    let env = start("auth_type = \"md5\"\nworkers = 1", "pool_size = 1\n");
    let port = env.pooler.port();
    let conn = env.conn_string();
    let direct = env.direct().await;
    // The server hands out numbers in the order it runs the transactions.
    direct
        .batch_execute("CREATE SEQUENCE served_order; GRANT USAGE ON SEQUENCE served_order TO app")
        .await
        .unwrap();
    let admin = connect(&env.pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .expect("admin console");

    // Everyone logs in first (a login may need a server), then a client on a third source
    // holds the server in an open transaction so that the others queue.
    let logins = |source: &'static str, n: usize| {
        let conn = conn.clone();
        futures_util::stream::iter(0..n)
            .map(move |_| {
                let conn = conn.clone();
                async move { connect_from(source, port, &conn).await.expect("login") }
            })
            .buffer_unordered(16)
            .collect::<Vec<Client>>()
    };
    let noisy = logins("127.0.0.2", 500).await;
    let quiet = logins("127.0.0.3", 5).await;
    let holder = connect_from("127.0.0.4", port, &conn).await.expect("login");
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let serve = |c: Client| {
        tokio::spawn(async move {
            // The simple protocol: one round trip, one turn (query_one would take two).
            let rows = c
                .simple_query("SELECT nextval('served_order')")
                .await
                .expect("a queued client's transaction");
            drop(c);
            first_value(rows)
                .and_then(|v| v.parse::<i64>().ok())
                .expect("a number")
        })
    };
    // The noisy source's 500 queue first, all of them, and only then the quiet source's 5.
    let noisy: Vec<_> = noisy.into_iter().map(serve).collect();
    testkit::wait_until("500 clients waiting", WAIT, || async {
        cl_waiting(&admin).await == 500
    })
    .await
    .unwrap();
    let quiet: Vec<_> = quiet.into_iter().map(serve).collect();
    testkit::wait_until("505 clients waiting", WAIT, || async {
        cl_waiting(&admin).await == 505
    })
    .await
    .unwrap();
    holder.batch_execute("COMMIT").await.unwrap();

    let mut quiet_order = Vec::new();
    for q in quiet {
        quiet_order.push(q.await.expect("quiet client"));
    }
    let mut noisy_order = Vec::new();
    for n in noisy {
        noisy_order.push(n.await.expect("noisy client"));
    }
    quiet_order.sort();
    eprintln!("the quiet source's clients were served as transactions {quiet_order:?} of 505");
    // Round robin between the two sources: the noisy source's line was first in the
    // rotation, so it has the first turn and the quiet clients every other one after it.
    // First come first served would put them at 501..=505, behind every noisy client.
    assert_eq!(
        quiet_order,
        vec![2, 4, 6, 8, 10],
        "the quiet source did not take every other turn"
    );
    // Every client was served, and nobody is counted as waiting any more.
    let mut all: Vec<i64> = quiet_order.iter().chain(&noisy_order).copied().collect();
    all.sort();
    assert_eq!(all, (1..=505).collect::<Vec<i64>>());
    assert_eq!(cl_waiting(&admin).await, 0);
}

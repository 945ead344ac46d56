//! Storm shield against a misbehaving network: the test kit's fault-injecting proxy sits
//! between Breakwater and a real PostgreSQL.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use testkit::{ByteFault, ConnectFault, FaultProxy, PgCluster, Pooler};

use crate::common::*;

/// A cluster, a fault proxy in front of it, and Breakwater pointed at the proxy.
struct Faulty {
    pooler: Pooler,
    proxy: FaultProxy,
    pg: PgCluster,
}

fn faulty(pooler_extra: &str, db_extra: &str) -> Faulty {
    let pg = PgCluster::start().unwrap();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).unwrap();
    let port = testkit::free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\n{pooler_extra}\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n{db_extra}\n",
        proxy.port()
    );
    let pooler = Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)]).unwrap();
    Faulty { pooler, proxy, pg }
}

fn pooler_for_port(upstream_port: u16, pooler_extra: &str) -> Pooler {
    let port = testkit::free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\n{pooler_extra}\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {upstream_port}\nuser = \"app\"\n"
    );
    Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)]).unwrap()
}

/// A client that leaves while a cap (max_db_connections) holds back the connect its checkout
/// needs is let go at once: no connect is under way yet, so nothing would be wasted.
#[tokio::test]
async fn a_client_that_leaves_while_a_cap_holds_its_connect_back_is_let_go() {
    use tokio::io::AsyncWriteExt;
    let f = faulty(
        "auth_type = \"trust\"\nquery_wait_timeout = \"60s\"\nadmin_users = [\"admin\"]",
        "user = \"app\"\npool_size = 2\nmax_db_connections = 1\n",
    );
    // One client holds the database's only connection, in a transaction.
    let a = f.pooler.connect("app", "", "app").await.unwrap();
    a.batch_execute("BEGIN").await.unwrap();
    // A second needs a connection of its own, which the cap holds back.
    let mut b = raw_login(f.pooler.port()).await;
    b.write_all(&query_message("SELECT 1")).await.unwrap();
    let admin = f
        .pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .unwrap();
    testkit::wait_until("the second client to wait", WAIT, || async {
        cl_waiting(&admin).await == 1
    })
    .await
    .unwrap();
    drop(b);
    testkit::wait_until("the client that left to leave the queue", WAIT, || async {
        cl_waiting(&admin).await == 0
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", f.pooler.log()));
    a.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        f.proxy.attempts(),
        1,
        "no connect was made for the client that left"
    );
}

/// A client that leaves mid-query has the query cancelled, and the server is kept if it then
/// finishes in time. But a cancel the database does not confirm may still arrive later, during
/// the next client's query: a server with one is closed, not handed on.
#[tokio::test]
async fn a_server_whose_cancel_was_not_confirmed_is_not_handed_on() {
    use tokio::io::AsyncWriteExt;
    let f = faulty(
        "auth_type = \"trust\"\nquery_wait_timeout = \"20s\"",
        "user = \"app\"\npool_size = 1\n",
    );
    let direct = f.pg.connect("postgres", "postgres", "app").await.unwrap();
    // A query that outlives its client.
    let mut a = raw_login(f.pooler.port()).await;
    a.write_all(&query_message("SELECT pg_sleep(1)"))
        .await
        .unwrap();
    testkit::wait_until("the query to run", WAIT, || async {
        direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(1)' AND state = 'active'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await
    .unwrap();
    // The cancel's connection is accepted and never answered.
    f.proxy.set_connect(ConnectFault::Blackhole);
    let before = f.proxy.attempts();
    drop(a);
    testkit::wait_until("the cancel's connection", WAIT, || async {
        f.proxy.attempts() == before + 1
    })
    .await
    .unwrap();
    f.proxy.set_connect(ConnectFault::None);
    // The next client waits for the pool's one server, which finished its query meanwhile.
    let b = f.pooler.connect("app", "", "app").await.unwrap();
    b.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        f.proxy.attempts(),
        before + 2,
        "the server whose cancel was not confirmed was handed on: {}",
        f.pooler.log()
    );
}

/// A connect that was under way when the operator ran RECONNECT belongs to the old epoch: it
/// is retired like the connections that were open, not kept as if it had started after.
#[tokio::test]
async fn a_connect_under_way_at_reconnect_is_retired_with_the_old_epoch() {
    let f = faulty(
        "auth_type = \"trust\"\nquery_wait_timeout = \"20s\"\nadmin_users = [\"admin\"]",
        "user = \"app\"\npool_size = 1\n",
    );
    f.proxy
        .set_connect(ConnectFault::Latency(Duration::from_millis(1500)));
    // Logging in needs a server: the client's login starts the pool's first connect.
    let conn = f.pooler.conn_string("app", "", "app");
    let login = tokio::spawn(async move { connect(&conn).await.unwrap() });
    testkit::wait_until("the pooler to be connecting", WAIT, || async {
        f.proxy.logging_in() == 1
    })
    .await
    .unwrap();
    let admin = f
        .pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .unwrap();
    admin.simple_query("RECONNECT app").await.unwrap();
    let app = login.await.unwrap();
    f.proxy.set_connect(ConnectFault::None);
    assert_eq!(f.proxy.attempts(), 1);
    app.simple_query("SELECT 1").await.unwrap();
    assert_eq!(
        f.proxy.attempts(),
        2,
        "the connection opened across RECONNECT was reused: {}",
        f.pooler.log()
    );
}

#[tokio::test]
async fn a_blackholed_connect_is_abandoned_at_server_connect_timeout() {
    let (port, _listener, _fillers) = blackholed_port();
    // One failure opens the breaker; a client with query_wait_timeout left waits for its probes
    // (each abandoned at server_connect_timeout) and is then told why no server came.
    let pooler = pooler_for_port(port, "server_connect_timeout = \"1s\"\nserver_breaker_threshold = 1\nquery_wait_timeout = \"3s\"");
    let started = Instant::now();
    let err = pooler
        .connect("app", "app_pw", "app")
        .await
        .expect_err("nothing answers");
    let took = started.elapsed();
    eprintln!(
        "measured: client told after {took:?} (query_wait_timeout 3s, server_connect_timeout 1s)"
    );
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08001");
    assert!(
        db.message().contains("server_connect_timeout (1s) expired"),
        "the timeout names the last connect error: {}",
        db.message()
    );
    assert!(
        took >= Duration::from_millis(2900) && took <= Duration::from_millis(4500),
        "client waited {took:?}"
    );
    assert!(
        pooler.log().contains("server_connect_timeout (1s) expired"),
        "{}",
        pooler.log()
    );
}

#[tokio::test]
async fn a_client_waiting_on_a_blackholed_host_is_told_after_query_wait_timeout_and_why() {
    let (port, _listener, _fillers) = blackholed_port();
    let pooler = pooler_for_port(port, "server_connect_timeout = \"1s\"\nserver_breaker_threshold = 0\nquery_wait_timeout = \"2500ms\"");
    let started = Instant::now();
    let err = pooler.connect("app", "app_pw", "app").await.unwrap_err();
    let took = started.elapsed();
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert!(
        msg.contains("query_wait_timeout") && msg.contains("server_connect_timeout"),
        "{msg}"
    );
    assert!(
        took >= Duration::from_millis(2400) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test]
async fn a_server_silent_during_login_is_abandoned_at_server_login_timeout() {
    // No SSLRequest (server_tls_sslmode defaults to prefer): its answer is part of the connect
    // phase, and this test is about a server that accepted the connection and then went silent.
    let f = faulty("server_login_timeout = \"1s\"\nserver_breaker_threshold = 0\nquery_wait_timeout = \"2500ms\"\nserver_tls_sslmode = \"disable\"", "");
    f.proxy.set_connect(ConnectFault::Blackhole);
    let started = Instant::now();
    let err = f.pooler.connect("app", "app_pw", "app").await.unwrap_err();
    let took = started.elapsed();
    eprintln!(
        "measured: silent login abandoned, client told after {took:?}; attempts {}",
        f.proxy.attempts()
    );
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("server_login_timeout (1s) expired"), "{msg}");
    assert!(
        took >= Duration::from_millis(2400) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Attempts were paced: with 1s per attempt and back-off, only a few in 2.5s.
    assert!(f.proxy.attempts() <= 4, "{} attempts", f.proxy.attempts());
}

#[tokio::test]
async fn a_connection_frozen_mid_query_is_dropped_and_other_clients_are_unaffected() {
    let f = faulty("query_timeout = \"2s\"", "pool_size = 2\n");
    let a = f.pooler.connect("app", "app_pw", "app").await.unwrap();
    let started = Instant::now();
    let stuck = tokio::spawn(async move { a.batch_execute("SELECT pg_sleep(1)").await });
    let direct = f.pg.connect("postgres", "postgres", "app").await.unwrap();
    wait_for_active_query(&direct, "SELECT pg_sleep(1)").await;
    // Every existing connection goes silent, without FIN or RST. (No other server connection
    // exists yet: an idle one frozen too would be handed to the next client and only found out
    // by query_timeout or server_check_delay.)
    f.proxy.drop_all_silently();
    // Another client is served on a fresh connection meanwhile.
    let c = f.pooler.connect("app", "app_pw", "app").await.unwrap();
    assert_eq!(
        c.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );
    // The frozen one gets an error once query_timeout and the cancel grace have passed.
    let r = tokio::time::timeout(Duration::from_secs(10), stuck)
        .await
        .expect("the frozen client hung")
        .unwrap();
    assert!(r.is_err());
    let took = started.elapsed();
    eprintln!("measured: frozen connection's client told after {took:?} (query_timeout 2s + 2s cancel grace)");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(7),
        "{took:?}"
    );
}

/// A client that gives up while its checkout is opening a server connection (connects are
/// slow: that is when clients give up) does not take the half-made connection with it: the
/// database has accepted it and begun a backend. The connect finishes, the server goes to the
/// pool unused, and the next client is served by it without another attempt.
#[tokio::test]
async fn a_connect_in_progress_outlives_the_client_that_gave_up_on_it() {
    let f = faulty(
        "auth_type = \"trust\"\nquery_wait_timeout = \"20s\"",
        "user = \"app\"\n",
    );
    f.proxy
        .set_connect(ConnectFault::Latency(Duration::from_millis(1500)));
    // Logging in needs a server (the pool has none yet, nor its welcome).
    let s = raw_startup(f.pooler.port()).await;
    testkit::wait_until("the pooler to be connecting", WAIT, || async {
        f.proxy.logging_in() == 1
    })
    .await
    .unwrap();
    drop(s);
    testkit::wait_until("the connect to finish", WAIT, || async {
        f.pooler.log().contains("server connection opened")
    })
    .await
    .unwrap();
    f.proxy.set_connect(ConnectFault::None);
    let c = f.pooler.connect("app", "", "app").await.unwrap();
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    assert_eq!(f.proxy.attempts(), 1, "the first connection was not reused");
    assert!(
        f.pooler
            .log()
            .contains("client left while waiting for a server"),
        "{}",
        f.pooler.log()
    );
}

#[tokio::test]
async fn a_database_restart_under_200_looping_clients_never_exceeds_the_connect_concurrency() {
    let mut f = faulty(
        // Fast retries to keep the test short; no breaker, which is tested on its own.
        "auth_type = \"trust\"\nserver_connect_concurrency = 3\nserver_login_retry = \"50ms\"\nserver_login_retry_max = \"1s\"\nserver_breaker_threshold = 0\nquery_wait_timeout = \"30s\"\nmax_client_conn = 500",
        "pool_size = 20\n",
    );
    let conn = f.pooler.conn_string("app", "", "app");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Clients that have had a query answered before the restart.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let conn = conn.clone();
            let stop = stop.clone();
            let running = running.clone();
            tokio::spawn(async move {
                let mut done_after_restart = 0;
                let mut answered = false;
                let mut c = connect(&conn).await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(40);
                while done_after_restart < 3 {
                    assert!(Instant::now() < deadline, "client {i} never recovered");
                    match c.simple_query("SELECT 1").await {
                        Ok(_) if stop.load(std::sync::atomic::Ordering::Relaxed) => {
                            done_after_restart += 1
                        }
                        Ok(_) => {
                            if !answered {
                                answered = true;
                                running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        // Its server died with the database: reconnect, as an application would.
                        Err(_) => c = connect(&conn).await.unwrap(),
                    }
                }
            })
        })
        .collect();
    // Every client is logged in and looping through the pool before the database goes away.
    testkit::wait_until(
        "every client to have a query answered",
        Duration::from_secs(30),
        || async {
            tasks.iter().any(|t| t.is_finished())
                || running.load(std::sync::atomic::Ordering::Relaxed) == tasks.len()
        },
    )
    .await
    .unwrap();
    f.proxy.reset_peak();
    f.pg.restart();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a client hung")
            .unwrap();
    }
    let peak = f.proxy.peak_logging_in();
    eprintln!(
        "measured: peak concurrent logins during the restart: {peak} (limit 3), attempts {}",
        f.proxy.attempts()
    );
    assert!(
        (1..=3).contains(&peak),
        "peak concurrent logins {peak} with server_connect_concurrency = 3"
    );
}

#[tokio::test]
async fn a_warm_pool_serves_a_burst_of_500_clients_without_paying_connect_latency() {
    raise_fd_limit();
    let f = faulty(
        "auth_type = \"trust\"\nmax_client_conn = 1000",
        "user = \"app\"\npool_size = 10\nmin_pool_size = 10\n",
    );
    let direct = f.pg.connect("postgres", "postgres", "app").await.unwrap();
    testkit::wait_until("10 warm connections", WAIT, || async {
        app_backends(&direct).await == 10
    })
    .await
    .unwrap();
    f.proxy
        .set_connect(ConnectFault::Latency(Duration::from_secs(2)));
    let attempts_before = f.proxy.attempts();
    let conn = f.pooler.conn_string("app", "", "app");
    let started = Instant::now();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let c = connect(&conn).await.unwrap();
                let t = Instant::now();
                let rows = c.simple_query(&format!("SELECT {i}")).await.unwrap();
                let value = rows.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                });
                assert_eq!(value, Some(i.to_string()));
                t.elapsed()
            })
        })
        .collect();
    let mut waits = Vec::new();
    for t in tasks {
        waits.push(t.await.unwrap());
    }
    waits.sort();
    let median = waits[waits.len() / 2];
    eprintln!(
        "measured: 500-client burst: median wait {median:?}, max {:?}, new server connections {}",
        waits[waits.len() - 1],
        f.proxy.attempts() - attempts_before
    );
    assert!(
        median < Duration::from_secs(2),
        "median query wait {median:?} paid the connect latency"
    );
    assert_eq!(
        f.proxy.attempts(),
        attempts_before,
        "no new server connections were needed"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn server_lifetime_recycling_of_a_full_pool_is_spread_over_time() {
    let f = faulty(
        "server_lifetime = \"3s\"\nserver_idle_timeout = \"0\"",
        "user = \"app\"\npool_size = 10\nmin_pool_size = 10\n",
    );
    let direct = f.pg.connect("postgres", "postgres", "app").await.unwrap();
    testkit::wait_until("10 warm connections", WAIT, || async {
        app_backends(&direct).await == 10
    })
    .await
    .unwrap();
    let first: Vec<i32> = direct
        .query("SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Wait until every original connection was replaced, noting when each replacement started.
    testkit::wait_until("the whole pool recycled", Duration::from_secs(15), || async {
        let rows = direct
            .query("SELECT pid FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'", &[])
            .await
            .unwrap();
        rows.iter().all(|r| !first.contains(&r.get::<_, i32>(0))) && rows.len() == 10
    })
    .await
    .unwrap();
    let starts: Vec<f64> = direct
        .query(
            "SELECT extract(epoch FROM backend_start)::float8 FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let spread = starts.iter().cloned().fold(f64::MIN, f64::max)
        - starts.iter().cloned().fold(f64::MAX, f64::min);
    eprintln!("measured: 10 lifetime replacements spread over {spread:.3}s");
    assert!(
        spread >= 0.2,
        "all {} replacements opened within {spread:.3}s",
        starts.len()
    );
    let _ = ByteFault::None;
}

#[tokio::test]
async fn min_pool_size_warms_server_connect_concurrency_connections_at_a_time() {
    let pg = PgCluster::start().unwrap();
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port()))).unwrap();
    // Every connect takes a second from the start, so warming is all slow connects.
    proxy.set_connect(ConnectFault::Latency(Duration::from_secs(1)));
    let port = testkit::free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nserver_connect_concurrency = 4\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"app\"\npool_size = 8\nmin_pool_size = 8\n",
        proxy.port()
    );
    let started = Instant::now();
    let _pooler = Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)]).unwrap();
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    testkit::wait_until("8 warm connections", Duration::from_secs(30), || async {
        app_backends(&direct).await == 8
    })
    .await
    .unwrap();
    let peak = proxy.peak_logging_in();
    eprintln!(
        "measured: 8 warm connections with 1 s connects in {:?}, peak concurrent logins {peak}",
        started.elapsed()
    );
    // Serial warming never has two logins at once; the limit caps them at four.
    assert!((2..=4).contains(&peak), "peak concurrent logins {peak}");
}

/// Issue 20's restart drill, small: `pg_ctl restart -m immediate` under 50 looping clients,
/// with the default storm settings (no shortened back-off). Only transactions in flight at the
/// crash fail — at most one per server connection — every client is served again, a new client
/// is served once PostgreSQL is back, and no more than server_connect_concurrency (4) logins
/// are ever in flight. The timings are benches/ business (`restart-drill`); the deadlines here
/// are only there so that nothing can hang.
#[tokio::test]
async fn a_crash_restart_under_50_looping_clients_fails_only_the_transactions_in_flight() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
    use std::sync::Arc;
    let Faulty { pooler, proxy, pg } = faulty(
        "auth_type = \"trust\"\nlog_connections = false\nlog_disconnections = false",
        "pool_size = 10\n",
    );
    let conn = pooler.conn_string("app", "", "app");
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    let crashed = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let (conn, crashed, failed, answered) = (
                conn.clone(),
                crashed.clone(),
                failed.clone(),
                answered.clone(),
            );
            tokio::spawn(async move {
                let mut c = connect(&conn).await.unwrap();
                let mut counted = false;
                let mut after_crash = 0;
                let deadline = Instant::now() + Duration::from_secs(60);
                while after_crash < 3 {
                    assert!(Instant::now() < deadline, "client {i} never recovered");
                    match c.simple_query("SELECT 1").await {
                        Ok(_) if crashed.load(Relaxed) => after_crash += 1,
                        Ok(_) if !counted => {
                            counted = true;
                            answered.fetch_add(1, Relaxed);
                        }
                        Ok(_) => {}
                        // Its server died with the database: a new connection, as
                        // applications make.
                        Err(_) => {
                            failed.fetch_add(1, Relaxed);
                            c = connect(&conn).await.unwrap();
                        }
                    }
                }
            })
        })
        .collect();
    testkit::wait_until("every client to be served", WAIT * 3, || async {
        answered.load(Relaxed) == tasks.len() || tasks.iter().any(|t| t.is_finished())
    })
    .await
    .unwrap();
    let servers: i64 = direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed.load(Relaxed), 0, "failures before the crash");
    proxy.reset_peak();
    crashed.store(true, Relaxed);
    // The clients keep looping on this runtime while the restart blocks another thread.
    let pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.try_restart_immediate().map(|()| pg)
    })
    .await
    .unwrap()
    .unwrap();
    // PostgreSQL accepts connections: a new client is served, waiting for a server if need be.
    let new_client = tokio::time::timeout(WAIT, async {
        let c = connect(&conn).await?;
        c.simple_query("SELECT 1").await
    })
    .await
    .expect("a new client waited 10 s after PostgreSQL was back");
    assert!(new_client.is_ok(), "{new_client:?}");
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(90), t)
            .await
            .expect("a client hung")
            .unwrap();
    }
    let (failed, peak) = (failed.load(Relaxed), proxy.peak_logging_in());
    eprintln!(
        "measured: {failed} failed transactions with {servers} server connections at the crash; \
         peak logins in flight {peak}; connect attempts {}",
        proxy.attempts()
    );
    assert!(
        failed as i64 <= servers,
        "{failed} transactions failed, more than the {servers} server connections at the crash"
    );
    assert!((1..=4).contains(&peak), "{peak} logins in flight at once");
    drop(pg);
}

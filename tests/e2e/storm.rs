//! Storm shield: bounded waits, fast failure when the database is known down, recovery.

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::common::*;

#[tokio::test]
async fn a_thousand_silent_clients_are_closed_at_client_login_timeout_while_real_clients_work() {
    raise_fd_limit();
    // The pooler's own defence, without the kernel's (tcp_defer_accept would hold these
    // clients for 45 s before the pooler saw them: see the test after this one).
    let env = start(
        "client_login_timeout = \"2s\"\nmax_client_conn = 2000\ntcp_defer_accept = false",
        "pool_size = 2\n",
    );
    let port = env.pooler.port();
    let t0 = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..1000 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    let opened = Instant::now();
    let connecting = opened - t0;
    // Real clients are served meanwhile.
    let c = env.client().await;
    for i in 0..20i32 {
        let v: i32 = c.query_one("SELECT $1::int", &[&i]).await.unwrap().get(0);
        assert_eq!(v, i);
    }
    assert!(
        opened.elapsed() < Duration::from_millis(1500),
        "real clients were slowed down"
    );
    // Every silent client is closed, not before the timeout and not long after.
    let mut closed_at = Vec::new();
    for mut s in silent {
        let mut buf = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(r.is_ok(), "a silent client was never closed");
        closed_at.push(t0.elapsed());
    }
    let first = closed_at.iter().min().unwrap();
    let last = closed_at.iter().max().unwrap();
    assert!(
        *first >= Duration::from_millis(1900),
        "closed too early: {first:?}"
    );
    assert!(
        *last < connecting + Duration::from_secs(4),
        "closed too late: {last:?} (connecting took {connecting:?})"
    );
}

/// With tcp_defer_accept (the default on Linux), connections that send nothing never become
/// clients: they hold no max_client_conn place, so a real client still gets in. One that
/// speaks at last is then served like any other.
#[tokio::test]
async fn with_tcp_defer_accept_silent_connections_take_no_client_place() {
    let env = start("max_client_conn = 2", "");
    let port = env.pooler.port();
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // Without the option these twenty would hold both places, and this login would be
    // refused with 53300.
    let c = env.client().await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    // A silent one speaks: it is accepted then, and asked for its password.
    let mut s = silent.pop().unwrap();
    use tokio::io::AsyncWriteExt;
    s.write_all(&startup(&[("user", "app"), ("database", "app")], 196_608))
        .await
        .unwrap();
    let reply = tokio::time::timeout(WAIT, s.read_u8()).await;
    assert_eq!(
        reply.ok().and_then(Result::ok),
        Some(b'R'),
        "an authentication request for the connection that spoke"
    );
}

#[tokio::test]
async fn query_timeout_cancels_a_runaway_query_and_the_pool_keeps_serving() {
    let env = start("query_timeout = \"1s\"", "pool_size = 1\n");
    let c = env.client().await;
    let started = Instant::now();
    let err = c.batch_execute("SELECT pg_sleep(20)").await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(
        err.as_db_error()
            .map(|d| d.code().code().to_owned())
            .as_deref(),
        Some("57014"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // The same client and the single server go on.
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_failures_fails_clients_fast_and_closes_after_recovery() {
    let mut pg = testkit::PgCluster::start().unwrap();
    pg.stop();
    let pooler = start_pooler(
        &pg,
        "server_breaker_threshold = 3\nserver_login_retry = \"20ms\"\nserver_login_retry_max = \"500ms\"\nquery_wait_timeout = \"5s\"",
        "pool_size = 2\n",
        USERLIST,
    );
    // The first client waits while attempts fail, until the breaker opens.
    let started = Instant::now();
    assert_eq!(
        sqlstate(pooler.connect("app", "app_pw", "app").await),
        "57P03"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // While open, clients fail fast.
    let started = Instant::now();
    let err = pooler.connect("app", "app_pw", "app").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    let msg = err.as_db_error().unwrap().message().to_owned();
    assert!(msg.contains("circuit breaker open"), "{msg}");
    // The database comes back; a probe closes the breaker and clients are served again.
    pg.restart();
    testkit::wait_until("the breaker closes", Duration::from_secs(10), || async {
        match pooler.connect("app", "app_pw", "app").await {
            Ok(c) => c.query_one("SELECT 1", &[]).await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn clients_wait_through_a_database_restart_and_all_succeed_afterwards() {
    let mut env = start("query_wait_timeout = \"20s\"\nserver_login_retry = \"50ms\"\nserver_login_retry_max = \"1s\"", "pool_size = 5\n");
    // 50 clients logged in and idle.
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(env.client().await);
    }
    env.pg.stop();
    let waiting: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(async move {
                // The first attempt may hit a connection that died with the server; the client
                // then reconnects, as applications do.
                for _ in 0..3 {
                    if let Ok(r) = c.query_one("SELECT $1::int", &[&(i as i32)]).await {
                        return Ok(r.get::<_, i32>(0));
                    }
                    if c.is_closed() {
                        return Err("closed");
                    }
                }
                Err("failed")
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await; // the outage
    env.pg.restart();
    let mut ok = 0;
    for (i, w) in waiting.into_iter().enumerate() {
        if let Ok(v) = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("no client may hang")
            .unwrap()
        {
            assert_eq!(v, i as i32);
            ok += 1;
        }
    }
    // Clients whose idle connection died with the server may have been closed; those that were
    // waiting for a server are all served.
    assert!(
        ok >= 40,
        "only {ok} of 50 clients were served after the restart"
    );
    let c = env.client().await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}

/// A full database (`53300 too many connections`, here the role's CONNECTION LIMIT) means
/// "back off", not "fail every client": the servers the pool has serve the clients in turn,
/// and the breaker stays closed — with the default settings.
#[tokio::test]
async fn a_database_answering_53300_serves_every_client_through_the_connections_it_allows() {
    let env = start(
        "log_connections = false\nlog_disconnections = false",
        "pool_size = 8\n",
    );
    let direct = env.direct().await;
    direct
        .batch_execute("ALTER ROLE app CONNECTION LIMIT 2")
        .await
        .unwrap();
    let clients: Vec<_> = logged_in_clients(16, &env).await;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                for _ in 0..5 {
                    c.simple_query("SELECT pg_sleep(0.05)").await?;
                }
                Ok::<_, tokio_postgres::Error>(())
            })
        })
        .collect();
    for t in tasks {
        let r = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a client hung")
            .unwrap();
        assert!(r.is_ok(), "a client failed: {r:?}");
    }
    let log = env.pooler.log();
    assert!(
        log.contains("53300"),
        "the database never said it was full:\n{log}"
    );
    let admin = connect(&env.pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .unwrap();
    let mut opens = None;
    for m in admin.simple_query("SHOW HOSTS").await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            opens = r.try_get("breaker_opens").ok().flatten().map(str::to_owned);
        }
    }
    assert_eq!(opens.as_deref(), Some("0"), "the breaker opened");
}

/// `n` clients logged in through the pooler.
async fn logged_in_clients(n: usize, env: &Env) -> Vec<tokio_postgres::Client> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(env.client().await);
    }
    clients
}

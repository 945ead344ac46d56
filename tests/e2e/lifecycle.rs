//! Nothing leaks, nothing hangs: clients and servers that die, and shutdown.

use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test]
async fn a_client_killed_mid_transaction_leaves_no_rows_and_no_locks_behind() {
    let env = start("", "pool_size = 1\n");
    let direct = env.direct().await;
    direct
        .batch_execute(
            "CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1); GRANT ALL ON t TO app;",
        )
        .await
        .unwrap();
    {
        let a = env.client().await;
        a.batch_execute("BEGIN; INSERT INTO t VALUES (2); SELECT * FROM t WHERE id = 1 FOR UPDATE")
            .await
            .unwrap();
        // Dropping the client closes its socket mid-transaction.
    }
    let b = env.client().await;
    // The lock on row 1 must be free (NOWAIT fails at once if it is not).
    b.batch_execute("BEGIN; SELECT * FROM t WHERE id = 1 FOR UPDATE NOWAIT; COMMIT")
        .await
        .unwrap();
    let n: i64 = b
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "the killed client's insert is visible");
}

/// psql running `sql` through the pooler as a real process, to be killed with SIGKILL: its
/// socket then closes without a Terminate.
fn killable_psql(env: &Env, sql: &str) -> std::process::Child {
    psql_command(env.pooler.port(), "app", "app_pw", "app", &["-c", sql])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test]
async fn a_client_killed_during_a_long_query_releases_its_locks_promptly() {
    let env = start("", "pool_size = 2\n");
    let direct = env.direct().await;
    direct
        .batch_execute(
            "CREATE TABLE l (id int primary key); INSERT INTO l VALUES (1); GRANT ALL ON l TO app;",
        )
        .await
        .unwrap();
    let mut psql = killable_psql(
        &env,
        "BEGIN; SELECT * FROM l FOR UPDATE; SELECT pg_sleep(30)",
    );
    wait_for_active_query(&direct, "%pg_sleep(30)").await;
    psql.kill().unwrap();
    psql.wait().unwrap();
    let started = Instant::now();
    let b = env.client().await;
    b.batch_execute("SET lock_timeout = '5s'; BEGIN; SELECT * FROM l FOR UPDATE; COMMIT")
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A client that vanishes mid-query (an application timing out, a killed process) does not
/// cost a server connection: its query is cancelled, its transaction rolled back, and the same
/// backend serves the next client. Closing it would make the pool open another, a fork and a
/// login on a database that is often slow already when clients give up.
#[tokio::test]
async fn a_client_killed_mid_query_hands_its_server_back_rolled_back() {
    let env = start("", "pool_size = 1\n");
    let direct = env.direct().await;
    direct
        .batch_execute(
            "CREATE TABLE k (id int primary key); INSERT INTO k VALUES (1); GRANT ALL ON k TO app;",
        )
        .await
        .unwrap();
    let mut psql = killable_psql(&env, "BEGIN; INSERT INTO k VALUES (2); SELECT pg_sleep(30)");
    wait_for_active_query(&direct, "%pg_sleep(30)").await;
    let pid: i32 = direct
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(30)' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    psql.kill().unwrap();
    psql.wait().unwrap();
    // The same backend, idle outside a transaction: cancelled, rolled back, kept.
    testkit::wait_until("the backend to be idle again", WAIT, || async {
        let state: Option<String> = direct
            .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
            .await
            .unwrap()
            .map(|r| r.get(0));
        assert!(state.is_some(), "the backend was closed");
        state.as_deref() == Some("idle")
    })
    .await
    .unwrap();
    assert_kept_and_rolled_back(&env, "k", pid, 1).await;
}

/// The next client is served by backend `pid` (kept, not replaced) and counts `rows` rows in
/// `table`: what the client that went away wrote was rolled back.
async fn assert_kept_and_rolled_back(env: &Env, table: &str, pid: i32, rows: i64) {
    let b = env.client().await;
    let row = b
        .query_one(
            &format!("SELECT pg_backend_pid(), count(*) FROM {table}"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i32>(0),
        pid,
        "the server connection was replaced"
    );
    assert_eq!(
        row.get::<_, i64>(1),
        rows,
        "the departed client's insert is visible"
    );
}

/// A client host that vanishes without a FIN or RST (power lost, cable pulled) while its
/// transaction holds a lock: client keepalive and client_tcp_user_timeout make the kernel give
/// up on the socket, and the server is rolled back and reused. Without them the transaction
/// (and its lock) would stay until the database's own timeouts, by default never. The client
/// runs in a network namespace whose link is then cut with DROP rules, so nothing at all
/// reaches Breakwater; the settings are shortened from the defaults (10 s idle, 20 s) to keep
/// the test short.
#[tokio::test]
async fn a_client_host_that_vanishes_mid_transaction_has_its_locks_released_by_keepalive() {
    if let Some(why) = testkit::NetNs::unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    let ns = testkit::NetNs::create().expect("network namespace");
    let pg = testkit::PgCluster::start().expect("start postgres");
    let pooler = start_pooler(
        &pg,
        &format!(
            "listen_addr = \"127.0.0.1,{}\"\nclient_tcp_keepidle = \"1s\"\n\
             client_tcp_keepintvl = \"1s\"\nclient_tcp_user_timeout = \"3s\"\n",
            ns.host_ip()
        ),
        "pool_size = 1\n",
        USERLIST,
    );
    let env = Env { pooler, pg };
    let direct = env.direct().await;
    direct
        .batch_execute("CREATE TABLE gone (id int); GRANT ALL ON gone TO app;")
        .await
        .unwrap();

    let mut psql = tokio::process::Command::from({
        let mut cmd = ns.command(testkit::pg_bin("psql").unwrap());
        cmd.args(["-X", "-At", "-h", &ns.host_ip().to_string()])
            .args([
                "-p",
                &env.pooler.port().to_string(),
                "-U",
                "app",
                "-d",
                "app",
            ])
            .env("PGPASSWORD", "app_pw")
            .env("PGCONNECT_TIMEOUT", "10");
        cmd
    })
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .kill_on_drop(true)
    .spawn()
    .unwrap();
    // Kept open: psql waits on it for more, as an application between statements.
    let mut stdin = psql.stdin.take().unwrap();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    stdin
        .write_all(
            b"BEGIN;\nINSERT INTO gone VALUES (1);\nLOCK TABLE gone;\nSELECT pg_backend_pid();\n",
        )
        .await
        .unwrap();
    let mut lines = tokio::io::BufReader::new(psql.stdout.take().unwrap()).lines();
    let pid: i32 = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.next_line().await.unwrap().expect("psql's output");
            if let Ok(pid) = line.trim().parse() {
                return pid;
            }
        }
    })
    .await
    .expect("psql to take the lock");
    let quiet_since = Instant::now();
    ns.cut().unwrap();

    let locks = "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'gone' AND l.mode = 'AccessExclusiveLock'";
    testkit::wait_until(
        "the vanished client's lock to be released",
        WAIT * 2,
        || async { direct.query_one(locks, &[]).await.unwrap().get::<_, i64>(0) == 0 },
    )
    .await
    .unwrap();
    let took = quiet_since.elapsed();
    // Not before the socket can have given up (three 1 s probes unanswered under a 3 s user
    // timeout), and the WAIT bound above is the "not much after".
    assert!(
        took >= Duration::from_secs(2),
        "released after {took:?}: by what?"
    );

    // Rolled back, and the same backend serves the next client.
    assert_kept_and_rolled_back(&env, "gone", pid, 0).await;
    let log = env.pooler.log();
    assert!(
        log.contains("client connection lost while holding a server") && log.contains("timed out"),
        "no log line names why the client went:\n{log}"
    );
    let _ = psql.kill().await;
}

#[tokio::test]
async fn a_terminated_backend_gives_its_client_an_error_and_the_pool_recovers() {
    let env = start("", "pool_size = 1\n");
    let direct = env.direct().await;
    let a = env.client().await;
    a.batch_execute("BEGIN").await.unwrap();
    let pid: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    assert!(
        a.query_one("SELECT 1", &[]).await.is_err(),
        "the client must see its server die"
    );
    let b = env.client().await;
    assert_eq!(
        b.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
        2
    );
}

#[tokio::test]
async fn an_idle_server_closed_by_the_database_is_dropped_before_it_is_handed_out() {
    let env = start("", "pool_size = 1\n");
    let direct = env.direct().await;
    let a = env.client().await;
    let pid = terminate_serving_backend(&a, &direct).await;
    // The same client's next transaction gets a fresh server, with no error.
    let pid2: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid, pid2);
}

#[tokio::test]
async fn client_idle_timeout_closes_clients_idle_since_login_or_since_their_last_transaction() {
    let env = start("client_idle_timeout = \"1s\"", "");
    let fresh = env.client().await;
    let worked = env.client().await;
    let started = Instant::now();
    // A local answer (tokio-postgres closes the statement it prepares for a one-off query)
    // and a transaction: both leave the client idle again, and the clock starts over.
    worked.query_one("SELECT 1", &[]).await.unwrap();
    worked.simple_query("SELECT 1").await.unwrap();
    let last_work = Instant::now();
    let deadline = started + Duration::from_secs(10);
    while !(fresh.is_closed() && worked.is_closed()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if fresh.is_closed() {
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(900), "closed after {took:?}");
        }
        if worked.is_closed() {
            let idle = last_work.elapsed();
            assert!(
                idle >= Duration::from_millis(900),
                "closed {idle:?} after its last query"
            );
        }
    }
    let took = last_work.elapsed();
    assert!(
        fresh.is_closed() && worked.is_closed(),
        "still open after {took:?}"
    );
    assert!(
        took < Duration::from_secs(4),
        "closed only {took:?} after going idle"
    );
    // The pool is unharmed: a new client works.
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn sigint_lets_a_running_transaction_finish_tells_idle_clients_and_exits_zero() {
    let mut env = start("shutdown_timeout = \"20s\"", "pool_size = 2\n");
    let a = env.client().await;
    let idle = env.client().await;
    a.batch_execute("BEGIN; SELECT 1").await.unwrap();
    env.pooler.signal(libc::SIGINT);
    // New clients are refused once shutdown began.
    testkit::wait_until("new connections are refused", WAIT, || async {
        env.pooler.connect("app", "app_pw", "app").await.is_err()
    })
    .await
    .unwrap();
    // The idle client is told and closed without saying anything first: shutdown wakes its
    // session.
    testkit::wait_until("the idle client is closed", WAIT, || async {
        idle.is_closed()
    })
    .await
    .unwrap();
    assert!(idle.query_one("SELECT 1", &[]).await.is_err());
    // The transaction in flight may still finish.
    a.batch_execute("SELECT 2; COMMIT").await.unwrap();
    let status = env.pooler.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn check_rejects_a_bad_config_with_a_message_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pooler.toml");
    std::fs::write(&path, "[pooler]\nauth_type = \"trust\"\nlisten_prot = 5\n").unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listen_prot"), "{err}");
    std::fs::write(&path, "[pooler]\nauth_type = \"trust\"\n").unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Pool behaviour: multiplexing in transaction mode, the pool size cap, session and statement
//! modes, warm connections and waiting.

use std::time::{Duration, Instant};

use crate::common::*;

#[tokio::test]
async fn two_hundred_clients_share_five_server_connections_with_correct_results() {
    let env = start("", "pool_size = 5\n");
    let direct = env.direct().await;
    direct
        .batch_execute("CREATE TABLE counter (id int primary key, n int); INSERT INTO counter VALUES (1, 0); GRANT ALL ON counter TO app;")
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..200i32 {
        let conn = env.conn_string();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&conn).await.expect("connect");
            for j in 0..5i32 {
                let tx = c.transaction().await.unwrap();
                tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
                    .await
                    .unwrap();
                let echo: i32 = tx
                    .query_one("SELECT $1::int", &[&(i * 100 + j)])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(echo, i * 100 + j, "a client got someone else's answer");
                tx.commit().await.unwrap();
            }
        }));
    }
    let mut peak = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        peak = peak.max(app_backends(&direct).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let n: i32 = direct
        .query_one("SELECT n FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1000);
    assert!(peak <= 5, "saw {peak} server connections for a pool of 5");
    assert!(app_backends(&direct).await <= 5);
}

#[tokio::test]
async fn session_mode_keeps_state_for_the_session_and_resets_it_for_the_next_client() {
    let env = start("pool_mode = \"session\"", "pool_size = 1\n");
    let a = env.client().await;
    a.batch_execute("SET statement_timeout = '12345ms'; CREATE TEMP TABLE mine (x int)")
        .await
        .unwrap();
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    // State persists across transactions within the session.
    let st: String = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(st, "12345ms");
    a.execute("INSERT INTO mine VALUES (1)", &[]).await.unwrap();
    drop(a);

    let b = env.client().await;
    let pid_b: i32 = b
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(pid_a, pid_b, "pool_size = 1 must reuse the same server");
    let st: String = b
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        st, "0",
        "server_reset_query must clear the previous session's SET"
    );
    assert!(
        b.execute("SELECT * FROM mine", &[]).await.is_err(),
        "temp table leaked"
    );
}

#[tokio::test]
async fn statement_mode_refuses_multi_statement_transactions() {
    let env = start("pool_mode = \"statement\"", "pool_size = 2\n");
    let c = env.client().await;
    assert_eq!(
        c.query_one("SELECT 7", &[]).await.unwrap().get::<_, i32>(0),
        7
    );
    let err = c.batch_execute("BEGIN").await.unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert!(
        db.message().contains("statement pooling mode"),
        "{}",
        db.message()
    );
    // The server was not left inside the transaction for someone else.
    let direct = env.direct().await;
    testkit::wait_until("no server left idle in transaction", WAIT, || async {
        let n: i64 = direct
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND state LIKE 'idle in transaction%'", &[])
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await
    .unwrap();
    let c2 = env.client().await;
    assert_eq!(
        c2.query_one("SELECT 8", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        8
    );
}

#[tokio::test]
async fn pgbench_select_only_64_clients_on_a_pool_of_8_has_no_failures() {
    let env = start("", "pool_size = 8\n");
    let (_, err, ok) = pgbench(&env, &["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i failed: {err}");
    for mode in ["simple", "extended"] {
        let (out, err, ok) = pgbench(
            &env,
            &["-S", "-M", mode, "-c", "64", "-j", "2", "-t", "200"],
        );
        assert!(ok, "pgbench -M {mode} failed: {err}\n{out}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        assert!(
            out.contains(&format!(
                "number of transactions actually processed: {}/{}",
                64 * 200,
                64 * 200
            )),
            "{out}"
        );
    }
    let backends = app_backends(&env.direct().await).await;
    assert!(
        backends <= 8,
        "{backends} server connections for a pool of 8"
    );
}

#[tokio::test]
async fn min_pool_size_connections_are_opened_at_start() {
    let env = start("", "user = \"app\"\nmin_pool_size = 3\npool_size = 5\n");
    let direct = env.direct().await;
    testkit::wait_until("3 warm server connections", WAIT, || async {
        app_backends(&direct).await == 3
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn query_wait_timeout_fails_a_waiting_client_with_a_message_naming_the_setting() {
    let env = start("query_wait_timeout = \"1s\"", "pool_size = 1\n");
    let holder = env.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = env.client().await;
    let started = Instant::now();
    let err = waiter.query_one("SELECT 1", &[]).await.unwrap_err();
    let waited = started.elapsed();
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| err.to_string());
    assert!(
        msg.contains("query_wait_timeout") && msg.contains("\"app\""),
        "{msg}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "failed too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "failed too late: {waited:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
}

/// server_unresponsive_timeout counts from when the server was asked, not from its last
/// byte: a client that sat in a transaction for longer than the timeout and then sends a
/// query must get its answer, not have its server declared dead the moment it asks.
#[tokio::test]
async fn a_client_idle_in_a_transaction_longer_than_server_unresponsive_timeout_can_commit() {
    let env = start("server_unresponsive_timeout = \"200ms\"", "");
    let c = env.client().await;
    c.batch_execute("CREATE TEMP TABLE t (n int); BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    // The client thinks for a while, as applications do inside a transaction.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for _ in 0..5 {
        let n: i64 = c
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
    }
    c.batch_execute("COMMIT").await.unwrap();
}

/// A waiting checkout shares its session's alarm, which an earlier transaction may have left
/// armed for an earlier deadline (server_unresponsive_timeout): when it rings, the checkout
/// must keep waiting until its own query_wait_timeout, not fail early.
#[tokio::test]
async fn a_waiting_client_is_not_failed_early_by_an_alarm_armed_for_another_deadline() {
    let env = start(
        "query_wait_timeout = \"1500ms\"\nserver_unresponsive_timeout = \"200ms\"",
        "pool_size = 1\n",
    );
    // Three transactions at once leave three spare workspaces whose alarms are armed for
    // server_unresponsive_timeout (the wait for each reply), now long past.
    let mut warm = Vec::new();
    for _ in 0..3 {
        let c = env.client().await;
        warm.push(tokio::spawn(async move {
            c.simple_query("SELECT pg_sleep(0.05)").await.map(|_| c)
        }));
    }
    let mut warmed = Vec::new();
    for w in warm {
        warmed.push(w.await.unwrap().unwrap());
    }
    let holder = &warmed[0];
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let waiter = &warmed[1];
    let started = Instant::now();
    let err = waiter.simple_query("SELECT 1").await.unwrap_err();
    let waited = started.elapsed();
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| err.to_string());
    assert!(msg.contains("query_wait_timeout"), "{msg}");
    assert!(
        waited >= Duration::from_millis(1400),
        "failed before query_wait_timeout: {waited:?}"
    );
    holder.batch_execute("COMMIT").await.unwrap();
}

/// SHOW POOLS' cl_waiting for `database`: clients waiting for a server.
async fn cl_waiting(admin: &tokio_postgres::Client, database: &str) -> i64 {
    admin
        .simple_query("SHOW POOLS")
        .await
        .expect("SHOW POOLS")
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some(database) => {
                r.get("cl_waiting").and_then(|v| v.parse::<i64>().ok())
            }
            _ => None,
        })
        .sum()
}

#[tokio::test]
async fn waiting_clients_are_served_when_a_transaction_ends() {
    let env = start("", "pool_size = 1\n");
    let holder = env.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let conn = env.conn_string();
    let waiter = tokio::spawn(async move {
        let c = connect(&conn).await.unwrap();
        c.query_one("SELECT 5", &[]).await.unwrap().get::<_, i32>(0)
    });
    let admin = env
        .pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    // Until the pool lists the waiter as waiting (or it has finished, which the assertion
    // below reports).
    testkit::wait_until("the waiter to wait for a server", WAIT, || async {
        waiter.is_finished() || cl_waiting(&admin, "app").await >= 1
    })
    .await
    .unwrap();
    assert!(
        !waiter.is_finished(),
        "the waiter must wait while the only server is in a transaction"
    );
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap(),
        5
    );
}

/// A client that leaves while queued for a server is taken out of the queue then, not when a
/// server frees up: its request must not run for nobody (an application that timed out has
/// likely retried it elsewhere), nor hold up the clients behind it. Both ways out: closing the
/// socket, and a Terminate with the socket left open.
#[tokio::test]
async fn a_client_that_leaves_while_queued_is_never_served() {
    use tokio::io::AsyncWriteExt;
    let env = start("auth_type = \"trust\"", "pool_size = 1\n");
    env.direct()
        .await
        .batch_execute("CREATE TABLE left_t (n int); GRANT ALL ON left_t TO app")
        .await
        .unwrap();
    let admin = env
        .pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    let holder = env.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();

    for (round, say_goodbye) in [false, true].into_iter().enumerate() {
        let mut s = raw_login(env.pooler.port()).await;
        s.write_all(&query_message(&format!(
            "INSERT INTO left_t VALUES ({round})"
        )))
        .await
        .unwrap();
        testkit::wait_until("the client to queue", WAIT, || async {
            cl_waiting(&admin, "app").await == 1
        })
        .await
        .unwrap();
        let kept_open = if say_goodbye {
            s.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
            Some(s)
        } else {
            drop(s);
            None
        };
        // Noticed while the holder still has the only server.
        testkit::wait_until("the queue to let the client go", WAIT, || async {
            cl_waiting(&admin, "app").await == 0
        })
        .await
        .unwrap();
        drop(kept_open);
    }
    holder.batch_execute("COMMIT").await.unwrap();
    // Behind them in the queue, had they stayed: their inserts would have run first.
    let n: i64 = holder
        .query_one("SELECT count(*) FROM left_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a request of a client that had left was run");
    assert_eq!(
        env.pooler
            .log()
            .matches("client left while waiting for a server")
            .count(),
        2,
        "{}",
        env.pooler.log()
    );
}

#[tokio::test]
async fn clients_can_connect_over_the_unix_socket() {
    let sock_dir = tempfile::tempdir().unwrap();
    let extra = format!("unix_socket_dir = \"{}\"", sock_dir.path().display());
    let env = start(&extra, "pool_size = 2\n");
    let out = std::process::Command::new(testkit::pg_bin("psql").unwrap())
        .args(["-X", "-At", "-h"])
        .arg(sock_dir.path())
        .args([
            "-p",
            &env.pooler.port().to_string(),
            "-U",
            "app",
            "-d",
            "app",
            "-c",
            "SELECT 40 + 2",
        ])
        .env("PGPASSWORD", "app_pw")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

#[tokio::test]
async fn a_client_waiting_for_a_server_is_told_why_after_query_wait_notify() {
    use futures_util::StreamExt;
    use tokio_postgres::{AsyncMessage, NoTls};

    let env = start("query_wait_notify = \"100ms\"", "pool_size = 1\n");
    let holder = env.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // A client whose notices the test sees.
    let (waiter, mut connection) = tokio_postgres::connect(&env.conn_string(), NoTls)
        .await
        .unwrap();
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notice(n) = m {
                let _ = tx.send(n.message().to_owned());
            }
        }
    });
    let query = tokio::spawn(async move {
        waiter
            .query_one("SELECT 2", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    let notice = tokio::time::timeout(WAIT, notices.recv())
        .await
        .expect("a notice while waiting")
        .expect("the connection is open");
    assert!(
        notice.contains("waiting for a server connection to database \"app\" (1 of 1 in use"),
        "{notice}"
    );
    assert!(!query.is_finished(), "the query waits for the held server");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(query.await.unwrap().unwrap(), 2);
}

#[tokio::test]
async fn per_database_server_defaults_and_connect_query_prepare_every_new_server_connection() {
    let env = start(
        "",
        "pool_size = 3\n\
         application_name = \"orders\"\n\
         timezone = \"Asia/Tokyo\"\n\
         client_encoding = \"LATIN1\"\n\
         connect_query = \"INSERT INTO opened SELECT pg_backend_pid(), \
           current_setting('application_name'), current_setting('TimeZone'), \
           current_setting('client_encoding')\"\n",
    );
    let direct = env.direct().await;
    direct
        .batch_execute(
            "CREATE TABLE opened (pid int, app text, tz text, enc text); \
             GRANT INSERT ON opened TO app",
        )
        .await
        .unwrap();
    // Three clients at once, each holding a server for a moment: three connections opened.
    let clients = futures_util::future::join_all((0..3).map(|_| env.client())).await;
    futures_util::future::join_all(
        clients
            .iter()
            .map(|c| c.batch_execute("BEGIN; SELECT pg_sleep(0.2); COMMIT")),
    )
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .unwrap();
    // A client that set none of them sees the database's defaults; its own client_encoding
    // (tokio-postgres always asks for UTF8) still wins.
    let show = |what: &'static str| {
        let c = &clients[0];
        async move { first_value(c.simple_query(&format!("SHOW {what}")).await.unwrap()) }
    };
    assert_eq!(show("TimeZone").await.as_deref(), Some("Asia/Tokyo"));
    assert_eq!(show("application_name").await.as_deref(), Some("orders"));
    assert_eq!(show("client_encoding").await.as_deref(), Some("UTF8"));

    // connect_query ran once on each server connection, after login with the startup
    // parameters, before any client used it.
    let rows = direct
        .query(
            "SELECT o.pid, o.app, o.tz, o.enc, a.pid IS NOT NULL FROM opened o \
             LEFT JOIN pg_stat_activity a ON a.pid = o.pid AND a.usename = 'app' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let backends = app_backends(&direct).await;
    assert_eq!(rows.len() as i64, backends, "one row per server connection");
    assert!(backends >= 2, "{backends} server connections");
    for r in &rows {
        let (app, tz, enc): (String, String, String) = (r.get(1), r.get(2), r.get(3));
        assert_eq!(
            (app.as_str(), tz.as_str(), enc.as_str()),
            ("orders", "Asia/Tokyo", "LATIN1")
        );
        assert!(
            r.get::<_, bool>(4),
            "the connection that ran it is the pooled one"
        );
    }
}

#[tokio::test]
async fn a_failing_connect_query_closes_the_new_connection_and_the_client_hears_why() {
    let env = start("", "connect_query = \"SELECT * FROM no_such_table\"\n");
    let direct = env.direct().await;
    let started = Instant::now();
    let err = connect(&env.conn_string())
        .await
        .map(|_| ())
        .expect_err("the login needs a server, and none can be prepared");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "08001", "{db:?}");
    assert!(
        db.message().contains("connect_query") && db.message().contains("no_such_table"),
        "{}",
        db.message()
    );
    // At once, not after query_wait_timeout: the query will fail on every connection.
    assert!(started.elapsed() < Duration::from_secs(30));
    // The connection is gone, and the close was counted and logged with its reason.
    testkit::wait_until("the server connection to close", WAIT, || async {
        app_backends(&direct).await == 0
    })
    .await
    .unwrap();
    let admin = connect(&env.pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .unwrap();
    let closes = admin.simple_query("SHOW SERVER_CLOSES").await.unwrap();
    let counted = closes.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => {
            r.get("database") == Some("app")
                && r.get("reason") == Some("connect_query_failed")
                && r.get("closes") == Some("1")
        }
        _ => false,
    });
    assert!(counted, "SHOW SERVER_CLOSES: {closes:?}");
    assert!(env.pooler.log().contains("connect_query_failed"));
}

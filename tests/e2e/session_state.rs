//! Session state in transaction mode: parameters follow the client, and state a client leaves
//! on a server never reaches the next client.

use crate::common::*;

#[tokio::test]
async fn set_temp_table_and_advisory_lock_inside_a_transaction_do_not_reach_the_next_client() {
    let env = start("", "pool_size = 1\n");
    let a = env.client().await;
    a.batch_execute(
        "BEGIN; SET statement_timeout = '4321ms'; CREATE TEMP TABLE leak (x int); SELECT pg_advisory_lock(42); COMMIT",
    )
    .await
    .unwrap();
    let pid_a: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(a);

    // Simple protocol only: this test is about session state, not prepared statements.
    let b = env.client().await;
    let one = |rows| first_value(rows).unwrap();
    let pid_b = one(b.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_eq!(
        pid_a.to_string(),
        pid_b,
        "pool_size = 1 serves both clients from one server"
    );
    assert_eq!(
        one(b.simple_query("SHOW statement_timeout").await.unwrap()),
        "0"
    );
    assert!(
        b.simple_query("SELECT * FROM leak").await.is_err(),
        "temp table leaked"
    );
    let got = one(b
        .simple_query("SELECT pg_try_advisory_lock(42)")
        .await
        .unwrap());
    assert_eq!(got, "t", "advisory lock leaked to the next client");
}

/// Drivers prepare a statement in one round trip and execute it in the next, so the Parse that
/// names the advisory lock function or the temp table is not in the transaction that runs it.
/// What it leaves must still be seen: the lock pins the client to its server and goes with the
/// client, and the temp table does not reach the next client.
#[tokio::test]
async fn a_prepared_statement_that_leaves_state_when_it_runs_later_is_still_seen() {
    let env = start("", "pool_size = 1\n");
    let direct = env.direct().await;
    let a = env.client().await;
    // tokio-postgres: Parse + Describe + Sync, then Bind + Execute + Sync.
    a.query_one("SELECT pg_advisory_lock($1)", &[&7i64])
        .await
        .unwrap();
    drop(a);
    // The lock went with its client: another session can take it.
    testkit::wait_until("the lock to be released with its client", WAIT, || async {
        let got: bool = direct
            .query_one("SELECT pg_try_advisory_lock(7)", &[])
            .await
            .unwrap()
            .get(0);
        if got {
            direct
                .execute("SELECT pg_advisory_unlock(7)", &[])
                .await
                .unwrap();
        }
        got
    })
    .await
    .unwrap();

    let a = env.client().await;
    a.execute("CREATE TEMP TABLE leak2 AS SELECT 1 AS x", &[])
        .await
        .unwrap();
    drop(a);
    let b = env.client().await;
    assert!(
        b.simple_query("SELECT * FROM leak2").await.is_err(),
        "temp table leaked"
    );
}

#[tokio::test]
async fn parameters_a_client_sets_follow_it_across_servers_and_never_leak() {
    let env = start("", "pool_size = 2\n");
    let conn = format!(
        "{} options='-c statement_timeout=7s' application_name=alpha",
        env.conn_string()
    );
    let a = connect(&conn).await.unwrap();
    let b = env.client().await;
    // Hold one server in b's transaction so a's queries move between servers over time.
    for _ in 0..5 {
        let st: String = a
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(st, "7s");
        let app: String = a
            .query_one("SHOW application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(app, "alpha");
        let st_b: String = b
            .query_one("SHOW statement_timeout", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(st_b, "0", "a's startup option leaked to b");
        let app_b: String = b
            .query_one("SHOW application_name", &[])
            .await
            .unwrap()
            .get(0);
        assert_ne!(app_b, "alpha");
    }
    a.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let tz_b: String = b.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
    assert_ne!(tz_b, "Asia/Tokyo");
    for _ in 0..3 {
        let tz: String = a.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
        assert_eq!(tz, "Asia/Tokyo");
    }
}

#[tokio::test]
async fn psql_sees_canonical_session_parameters_at_login() {
    let env = start("", "pool_size = 2\n");
    let out = psql(
        env.pooler.port(),
        "app",
        "app_pw",
        "app",
        &[
            "-At",
            "-c",
            "SHOW client_encoding",
            "-c",
            "SHOW application_name",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines, vec!["UTF8", "psql"]);
}

/// Issue 17 item 6: in transaction mode a session advisory lock stays with the client that
/// took it. Its server is pinned to it across transactions (another client cannot get that
/// server, nor the lock), until the client releases the lock; then the server is reset and
/// serves others again.
#[tokio::test]
async fn a_session_advisory_lock_pins_its_client_to_the_server_until_released() {
    let env = start("", "pool_size = 2\n");
    let one = |rows| first_value(rows).unwrap();
    let a = env.client().await;
    let b = env.client().await;
    assert_eq!(
        one(a
            .simple_query("SELECT pg_advisory_lock(4242)")
            .await
            .unwrap()),
        ""
    );
    let pid_a = one(a.simple_query("SELECT pg_backend_pid()").await.unwrap());
    // Other clients keep working on the other server, and do not get a's lock.
    for _ in 0..5 {
        assert_eq!(
            one(b
                .simple_query("SELECT pg_try_advisory_lock(4242)")
                .await
                .unwrap()),
            "f",
            "a's session advisory lock was released behind its back"
        );
        assert_ne!(
            one(b.simple_query("SELECT pg_backend_pid()").await.unwrap()),
            pid_a,
            "another client was handed the server holding a's lock"
        );
        // a's transactions stay on the server holding its lock.
        assert_eq!(
            one(a.simple_query("SELECT pg_backend_pid()").await.unwrap()),
            pid_a
        );
    }
    assert_eq!(
        one(a
            .simple_query("SELECT pg_advisory_unlock(4242)")
            .await
            .unwrap()),
        "t"
    );
    assert_eq!(
        one(b
            .simple_query("SELECT pg_try_advisory_lock(4242)")
            .await
            .unwrap()),
        "t",
        "released: anyone may take it"
    );
    assert_eq!(
        one(b
            .simple_query("SELECT pg_advisory_unlock(4242)")
            .await
            .unwrap()),
        "t"
    );
    // Unpinned, a's server serves others again: with b in a transaction on one server, a
    // third client gets the other one.
    b.batch_execute("BEGIN").await.unwrap();
    let c = env.client().await;
    let pid_c = one(tokio::time::timeout(
        std::time::Duration::from_secs(10),
        c.simple_query("SELECT pg_backend_pid()"),
    )
    .await
    .expect("a's server was still pinned after the unlock")
    .unwrap());
    let pid_b = one(b.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(pid_b, pid_c);
    b.batch_execute("COMMIT").await.unwrap();
}

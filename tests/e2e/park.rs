//! Idle clients parked without a task of their own (crates/proxy/src/park.rs): a parked client
//! is served as before when it speaks again, and is noticed at once when it leaves, is killed,
//! or Breakwater shuts down.

use std::time::Duration;

use tokio_postgres::Client;

use crate::common::*;

fn start_with_metrics(extra: &str) -> (Env, u16) {
    let mport = testkit::free_port();
    let env = start(
        &format!("{extra}\n[metrics]\nlisten = \"127.0.0.1:{mport}\""),
        "",
    );
    (env, mport)
}

/// `breakwater_clients_parked` now (the series is published once a second).
async fn parked(mport: u16) -> f64 {
    let (_, body) = http_status(mport, "/metrics").await;
    series(&body, "breakwater_clients_parked ").unwrap_or(-1.0)
}

async fn wait_parked(mport: u16, n: f64, what: &str) {
    testkit::wait_until(what, WAIT, || async { parked(mport).await == n })
        .await
        .unwrap();
}

async fn select(c: &Client, v: i32) -> i32 {
    tokio::time::timeout(WAIT, c.query_one("SELECT $1::int4", &[&v]))
        .await
        .expect("no answer")
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn an_idle_client_parks_and_its_next_query_resumes_it_with_its_session_intact() {
    let (env, mport) = start_with_metrics("");
    let c = env.client().await;
    c.batch_execute("SET application_name = 'parked_app'")
        .await
        .unwrap();
    assert_eq!(select(&c, 1).await, 1);
    wait_parked(mport, 1.0, "the idle client to park").await;
    // Parked, it is still an idle client in SHOW CLIENTS.
    let admin = connect(&env.pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .unwrap();
    let rows = admin.simple_query("SHOW CLIENTS").await.unwrap();
    let states: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("state").map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(states, ["idle"], "{states:?}");
    // Its next statements work, in and out of a transaction, with its parameters kept.
    assert_eq!(select(&c, 2).await, 2);
    c.batch_execute("BEGIN; CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (7)")
        .await
        .unwrap();
    let name: String = c
        .query_one("SELECT current_setting('application_name')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "parked_app");
    c.batch_execute("ROLLBACK").await.unwrap();
    // And it parks again once idle.
    wait_parked(mport, 1.0, "the client to park again").await;
    assert_eq!(select(&c, 3).await, 3);
}

#[tokio::test]
async fn a_parked_client_that_closes_or_is_killed_is_gone_at_once() {
    let (env, mport) = start_with_metrics("");
    let leaver = env.client().await;
    let victim = env.client().await;
    let stays = env.client().await;
    for c in [&leaver, &victim, &stays] {
        select(c, 1).await;
    }
    wait_parked(mport, 3.0, "three idle clients to park").await;
    let admin = connect(&env.pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .unwrap();
    drop(leaver);
    testkit::wait_until("the closed client to leave SHOW CLIENTS", WAIT, || async {
        show_clients(&admin).await.len() == 2
    })
    .await
    .unwrap();
    let victim_id = *show_clients(&admin).await.iter().min().unwrap();
    admin
        .simple_query(&format!("KILL_CLIENT {victim_id}"))
        .await
        .unwrap();
    testkit::wait_until("the killed client to be closed", WAIT, || async {
        victim.is_closed()
    })
    .await
    .unwrap();
    wait_parked(mport, 1.0, "only the remaining client parked").await;
    assert_eq!(select(&stays, 4).await, 4);
}

/// The ids in SHOW CLIENTS.
async fn show_clients(admin: &Client) -> Vec<u64> {
    admin
        .simple_query("SHOW CLIENTS")
        .await
        .unwrap()
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get("id").and_then(|v| v.parse().ok()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn sigint_closes_parked_clients_and_exits_zero() {
    let (mut env, mport) = start_with_metrics("shutdown_timeout = \"20s\"");
    let parked_client = env.client().await;
    select(&parked_client, 1).await;
    wait_parked(mport, 1.0, "the idle client to park").await;
    env.pooler.signal(libc::SIGINT);
    testkit::wait_until("the parked client to be closed", WAIT, || async {
        parked_client.is_closed()
    })
    .await
    .unwrap();
    let status = env.pooler.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_parked_client_is_closed_when_its_client_idle_timeout_expires_not_before() {
    let (env, mport) = start_with_metrics("client_idle_timeout = \"4s\"");
    let c = env.client().await;
    select(&c, 1).await;
    let last_work = std::time::Instant::now();
    wait_parked(mport, 1.0, "the idle client to park").await;
    assert!(!c.is_closed(), "closed after {:?}", last_work.elapsed());
    testkit::wait_until("the parked client to be closed", WAIT, || async {
        c.is_closed()
    })
    .await
    .unwrap();
    let idle = last_work.elapsed();
    // The timeout runs from the end of its last transaction, parked or not.
    assert!(idle >= Duration::from_millis(3900), "closed after {idle:?}");
    assert!(idle < Duration::from_secs(8), "closed only after {idle:?}");
    wait_parked(mport, 0.0, "no client parked").await;
    // It was told why: a new client sees the timeout counted.
    let (_, body) = http_status(mport, "/metrics").await;
    assert_eq!(
        series(
            &body,
            "breakwater_timeouts_total{kind=\"client_idle_timeout\"}"
        ),
        Some(1.0),
        "{body}"
    );
}

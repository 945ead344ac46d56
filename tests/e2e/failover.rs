//! Host lists and failover: a primary and a streaming standby from the test kit, Breakwater in
//! front with `hosts = [primary, standby]`, and clients that must follow the writer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testkit::{free_port, wait_until, PgCluster, PgOptions, Pooler};
use tokio_postgres::Client;

use crate::common::*;

/// A primary with table `t`, and a standby that has replayed it.
fn primary_and_standby() -> (PgCluster, PgCluster) {
    // A standby needs max_connections at least the primary's.
    let opts = PgOptions {
        max_connections: 150,
        ..PgOptions::default()
    };
    let primary = PgCluster::start_with(opts.clone()).expect("start primary");
    primary
        .psql(
            "app",
            "CREATE TABLE t (id bigserial PRIMARY KEY, client int NOT NULL, seq int NOT NULL);\n\
             GRANT ALL ON t TO app; GRANT ALL ON SEQUENCE t_id_seq TO app;",
        )
        .expect("create table");
    let standby = PgCluster::start_standby_of(&primary, opts).expect("start standby");
    let deadline = Instant::now() + Duration::from_secs(20);
    while standby.psql("app", "SELECT count(*) FROM t").is_err() {
        assert!(Instant::now() < deadline, "standby never replayed table t");
        std::thread::sleep(Duration::from_millis(50));
    }
    (primary, standby)
}

/// Breakwater with `app` (read-write) and `app_ro` (read-only), both over `hosts`.
fn pooler_for(hosts: &[u16], pooler_extra: &str) -> Pooler {
    let port = free_port();
    let hosts: Vec<String> = hosts.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let hosts = hosts.join(", ");
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\n\
         default_pool_size = 10\nquery_wait_timeout = \"20s\"\nserver_connect_timeout = \"2s\"\n\
         server_role_check_interval = \"1s\"\n{pooler_extra}\n\
         [databases.app]\nhosts = [{hosts}]\ntarget_session_attrs = \"read-write\"\n\
         [databases.app_ro]\ndbname = \"app\"\nhosts = [{hosts}]\ntarget_session_attrs = \"read-only\"\n"
    );
    Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)]).expect("start breakwater")
}

/// (in recovery, server port) of the server a client is served by.
async fn served_by(c: &Client) -> (bool, i32) {
    let row = c
        .query_one("SELECT pg_is_in_recovery(), inet_server_port()", &[])
        .await
        .expect("ask the server who it is");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn read_write_and_read_only_pools_pick_the_primary_and_the_standby() {
    let (primary, standby) = primary_and_standby();
    // The standby first: the read-write pool must skip it.
    let pooler = pooler_for(&[standby.port(), primary.port()], "");
    let rw = pooler
        .connect("app", "app_pw", "app")
        .await
        .expect("connect app");
    let ro = pooler
        .connect("app", "app_pw", "app_ro")
        .await
        .expect("connect app_ro");
    for _ in 0..5 {
        assert_eq!(served_by(&rw).await, (false, primary.port() as i32));
        assert_eq!(served_by(&ro).await, (true, standby.port() as i32));
    }
    rw.execute("INSERT INTO t (client, seq) VALUES (0, 0)", &[])
        .await
        .expect("write through the read-write pool");
    let err = ro
        .execute("INSERT INTO t (client, seq) VALUES (0, 1)", &[])
        .await
        .expect_err("the read-only pool is on the standby");
    assert_eq!(
        err.as_db_error().map(|d| d.code().code()),
        Some("25006"),
        "{err}"
    );
}

/// What one writer saw: (client, seq) of each commit reported successful, and when.
type Commits = Arc<Mutex<Vec<(i32, i32, Instant)>>>;

async fn writer(
    conn: String,
    id: i32,
    commits: Commits,
    stop: Arc<AtomicBool>,
) -> Result<(), String> {
    // No single step may hang: every call is bounded well inside the test's budget.
    const STEP: Duration = Duration::from_secs(25);
    let mut client: Option<Client> = None;
    let mut seq = 0i32;
    while !stop.load(Ordering::Relaxed) {
        let c = match client.take() {
            Some(c) if !c.is_closed() => c,
            _ => match tokio::time::timeout(STEP, connect(&conn)).await {
                Err(_) => return Err(format!("client {id}: connect hung")),
                Ok(Err(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(Ok(c)) => c,
            },
        };
        seq += 1;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &seq];
        let insert = c.execute("INSERT INTO t (client, seq) VALUES ($1, $2)", &params);
        match tokio::time::timeout(STEP, insert).await {
            Err(_) => return Err(format!("client {id}: insert {seq} hung")),
            Ok(Ok(_)) => {
                commits
                    .lock()
                    .map_err(|e| e.to_string())?
                    .push((id, seq, Instant::now()));
            }
            // Lost with the old primary; whether it committed is unknown, so it is not counted.
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        client = Some(c);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promoted_standby_within_seconds_and_every_reported_commit_is_durable() {
    raise_fd_limit();
    let (mut primary, standby) = primary_and_standby();
    let pooler = pooler_for(&[primary.port(), standby.port()], "");
    let conn = pooler.conn_string("app", "app_pw", "app");
    const CLIENTS: i32 = 100;
    let commits: Commits = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (1..=CLIENTS)
        .map(|id| tokio::spawn(writer(conn.clone(), id, commits.clone(), stop.clone())))
        .collect();
    let count = |c: &Commits| c.lock().map(|v| v.len()).unwrap_or(0);
    wait_until("writers to get going", WAIT, || async {
        count(&commits) >= 500
    })
    .await
    .expect("writers");

    let stopping = Instant::now();
    // Fast shutdown: sessions are terminated, and the standby receives all WAL before the
    // primary exits, so nothing acknowledged is lost.
    tokio::task::block_in_place(|| primary.stop());
    let stopped = Instant::now();
    tokio::task::block_in_place(|| standby.promote()).expect("promote the standby");
    let promoted = Instant::now();

    // Every client writes again.
    let resumed = wait_until(
        "every client to write again",
        Duration::from_secs(20),
        || async {
            let v = match commits.lock() {
                Ok(v) => v,
                Err(_) => return false,
            };
            let mut seen = std::collections::HashSet::new();
            for (id, _, at) in v.iter() {
                if *at > stopped {
                    seen.insert(*id);
                }
            }
            seen.len() == CLIENTS as usize
        },
    )
    .await;
    let first_after = commits.lock().ok().and_then(|v| {
        v.iter()
            .map(|(_, _, at)| *at)
            .filter(|at| *at > stopped)
            .min()
    });
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let r = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a writer hung after stop")
            .expect("writer task panicked");
        if let Err(e) = r {
            panic!("{e}");
        }
    }
    if let Err(e) = resumed {
        panic!("{e:#}");
    }
    let first_after = first_after.expect("a write after the failover");
    let stop_to_write = first_after - stopping;
    eprintln!(
        "failover: primary stop took {:?}, promote {:?}; first successful write {:?} after the \
         stop began ({:?} after promote returned)",
        stopped - stopping,
        promoted - stopped,
        stop_to_write,
        first_after.saturating_duration_since(promoted),
    );
    assert!(
        first_after.saturating_duration_since(promoted) < Duration::from_secs(5),
        "writes resumed {:?} after the promote",
        first_after.saturating_duration_since(promoted)
    );

    // Every commit a client was told about is on the new primary.
    let reported: Vec<(i32, i32)> = commits
        .lock()
        .map(|v| v.iter().map(|(c, s, _)| (*c, *s)).collect())
        .unwrap_or_default();
    let direct = standby
        .connect("postgres", "postgres", "app")
        .await
        .expect("connect to the new primary");
    let rows = direct
        .query("SELECT client, seq FROM t", &[])
        .await
        .expect("read t");
    let durable: std::collections::HashSet<(i32, i32)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let lost: Vec<_> = reported.iter().filter(|k| !durable.contains(k)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} reported commits are missing on the new primary, e.g. {:?}",
        lost.len(),
        reported.len(),
        &lost[..lost.len().min(5)]
    );
    eprintln!(
        "failover: {} reported commits, all on the new primary",
        reported.len()
    );
}

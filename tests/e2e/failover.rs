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

/// Breakwater with `app` (read-write), `app_ro` (read-only) and `app_any`, all over `hosts`.
fn pooler_for(hosts: &[u16], pooler_extra: &str) -> Pooler {
    let port = free_port();
    let hosts: Vec<String> = hosts.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let hosts = hosts.join(", ");
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\n\
         default_pool_size = 10\nquery_wait_timeout = \"20s\"\nserver_connect_timeout = \"2s\"\n\
         {pooler_extra}\n\
         [databases.app]\nhosts = [{hosts}]\ntarget_session_attrs = \"read-write\"\n\
         [databases.app_ro]\ndbname = \"app\"\nhosts = [{hosts}]\ntarget_session_attrs = \"read-only\"\n\
         [databases.app_any]\ndbname = \"app\"\nhosts = [{hosts}]\n"
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
    let pooler = pooler_for(
        &[standby.port(), primary.port()],
        "server_role_check_interval = \"1s\"",
    );
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

/// Inserts in a loop, reconnecting when its connection is lost; returns how many inserts failed.
async fn writer(
    conn: String,
    id: i32,
    commits: Commits,
    stop: Arc<AtomicBool>,
) -> Result<u32, String> {
    // No single step may hang: every call is bounded well inside the test's budget.
    const STEP: Duration = Duration::from_secs(25);
    let mut client: Option<Client> = None;
    let mut seq = 0i32;
    let mut failed = 0;
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
            Ok(Err(_)) => {
                failed += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        client = Some(c);
    }
    Ok(failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_follow_a_promoted_standby_within_seconds_and_every_reported_commit_is_durable() {
    raise_fd_limit();
    let (mut primary, standby) = primary_and_standby();
    let pooler = pooler_for(
        &[primary.port(), standby.port()],
        "server_role_check_interval = \"1s\"",
    );
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
    // A while without any writer: clients must wait for one, not fail.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let promoting = Instant::now();
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
    let mut failed = 0;
    for w in writers {
        let r = tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("a writer hung after stop")
            .expect("writer task panicked");
        match r {
            Ok(n) => failed += n,
            Err(e) => panic!("{e}"),
        }
    }
    // Only transactions running on the old primary when it stopped fail (at most one per
    // server connection of the pool); clients that were waiting for a server just wait.
    assert!(failed <= 20, "{failed} inserts failed");
    if let Err(e) = resumed {
        panic!("{e:#}");
    }
    let first_after = first_after.expect("a write after the failover");
    let stop_to_write = first_after - stopping;
    let promote_to_write = first_after.saturating_duration_since(promoting);
    eprintln!(
        "failover: primary stop took {:?}, then 1s without a writer, promote {:?}; first \
         successful write {stop_to_write:?} after the stop began, {promote_to_write:?} after \
         the promote began; {failed} inserts failed",
        stopped - stopping,
        promoted - promoting,
    );
    assert!(
        promote_to_write < Duration::from_secs(3),
        "writes resumed {promote_to_write:?} after the promote began"
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

#[tokio::test]
async fn clients_wait_while_the_only_host_is_read_only_and_write_once_it_is_writable_again() {
    let pg = PgCluster::start().expect("start postgres");
    pg.psql("app", "CREATE TABLE w (x int); GRANT ALL ON w TO app;")
        .expect("create table");
    let pooler = pooler_for(&[pg.port()], "server_role_check_interval = \"200ms\"");
    let c = pooler
        .connect("app", "app_pw", "app")
        .await
        .expect("connect");
    c.execute("INSERT INTO w VALUES (1)", &[])
        .await
        .expect("first write");
    let admin = pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    let servers = show_named(&admin, "SERVERS").await;
    assert_eq!(servers.len(), 1, "{servers:?}");
    let idle_pid = servers[0]["remote_pid"].clone();

    pg.psql(
        "postgres",
        "ALTER SYSTEM SET default_transaction_read_only = on; SELECT pg_reload_conf();",
    )
    .expect("make the server read-only");
    // The probe notices, and the idle connection opened while the host was writable is retired.
    wait_until("the probe to notice the read-only host", WAIT, || async {
        pooler.log().contains("upstream host changed role")
    })
    .await
    .unwrap();
    wait_until("the idle connection to be retired", WAIT, || async {
        !show_named(&admin, "SERVERS")
            .await
            .iter()
            .any(|r| r["remote_pid"] == idle_pid)
    })
    .await
    .unwrap();
    let write = tokio::spawn(async move {
        let r = c.execute("INSERT INTO w VALUES (2)", &[]).await;
        (r.map_err(|e| e.to_string()), Instant::now())
    });
    // The write waits: a new connection found the host read-only, and the client is queued.
    wait_until(
        "the write to wait for a read-write server",
        WAIT,
        || async {
            write.is_finished()
                || (pooler.log().contains("no upstream host can serve the pool")
                    && show_named(&admin, "POOLS")
                        .await
                        .iter()
                        .any(|r| r["database"] == "app" && r["cl_waiting"] != "0"))
        },
    )
    .await
    .unwrap();
    // ...and keeps waiting through a few more searches (server_login_retry is 250 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !write.is_finished(),
        "the write did not wait for a read-write server"
    );
    let asked_writable = Instant::now();
    pg.psql(
        "postgres",
        "ALTER SYSTEM RESET default_transaction_read_only; SELECT pg_reload_conf();",
    )
    .expect("make the server writable");
    let writable = Instant::now();
    let (r, done) = tokio::time::timeout(Duration::from_secs(5), write)
        .await
        .expect("the write hung")
        .expect("task");
    r.expect("the write succeeds on the writable server");
    assert!(
        done - writable < Duration::from_secs(2),
        "{:?}",
        done - writable
    );
    assert!(
        done > asked_writable,
        "the write finished before the server was made writable"
    );
    assert_eq!(pg.psql("app", "SELECT count(*) FROM w").unwrap(), "2");
}

/// The rows of a console SHOW.
async fn show_rows(admin: &Client, what: &str) -> Vec<tokio_postgres::SimpleQueryRow> {
    admin
        .simple_query(&format!("SHOW {what}"))
        .await
        .expect("SHOW")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// The rows of a console SHOW, as column name → text.
async fn show_named(admin: &Client, what: &str) -> Vec<std::collections::HashMap<String, String>> {
    show_rows(admin, what)
        .await
        .iter()
        .map(|r| {
            r.columns()
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name().to_owned(), r.get(i).unwrap_or_default().to_owned()))
                .collect()
        })
        .collect()
}

/// The rows of a console SHOW, as text.
async fn show(admin: &Client, what: &str) -> Vec<Vec<String>> {
    show_rows(admin, what)
        .await
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get(i).unwrap_or_default().to_owned())
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn a_drill_makes_breakwater_treat_a_host_as_down_until_it_ends_by_itself() {
    let (primary, standby) = primary_and_standby();
    let pooler = pooler_for(
        &[primary.port(), standby.port()],
        // A short back-off cap, so the primary is retried soon after the drill ends.
        "allow_drills = true\nserver_login_retry_max = \"500ms\"",
    );
    let rw = pooler
        .connect("app", "app_pw", "app")
        .await
        .expect("connect app");
    let any = pooler
        .connect("app", "app_pw", "app_any")
        .await
        .expect("connect app_any");
    assert_eq!(served_by(&rw).await, (false, primary.port() as i32));
    assert_eq!(served_by(&any).await, (false, primary.port() as i32));
    let admin = pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    let target = format!("127.0.0.1:{}", primary.port());
    let bad = admin
        .simple_query(&format!("DRILL {target} melt FOR 2s"))
        .await
        .expect_err("unknown mode");
    assert!(bad.to_string().contains("usage") || format!("{bad:?}").contains("usage"));
    admin
        .simple_query(&format!("DRILL app {target} refuse FOR 2s"))
        .await
        .expect("DRILL");
    let started = Instant::now();
    let hosts = show(&admin, "HOSTS").await;
    let row = hosts
        .iter()
        .find(|r| r.first() == Some(&target))
        .expect("the drilled host in SHOW HOSTS");
    assert!(row.contains(&"refuse".to_owned()), "{row:?}");

    // A pool that takes any role moves to the next host at once...
    assert_eq!(served_by(&any).await, (true, standby.port() as i32));
    assert!(started.elapsed() < Duration::from_secs(1));
    // ...a read-write one waits for the drill to end by itself, then is back on the primary.
    assert_eq!(served_by(&rw).await, (false, primary.port() as i32));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "{waited:?}"
    );
    let hosts = show(&admin, "HOSTS").await;
    let row = hosts
        .iter()
        .find(|r| r.first() == Some(&target))
        .expect("host row");
    assert!(!row.contains(&"refuse".to_owned()), "{row:?}");
}

#[tokio::test]
async fn drills_are_refused_unless_allowed() {
    let pg = PgCluster::start().expect("start postgres");
    let pooler = pooler_for(&[pg.port()], "");
    let admin = pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    let err = admin
        .simple_query(&format!("DRILL 127.0.0.1:{} refuse FOR 5s", pg.port()))
        .await
        .expect_err("drills are off by default");
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains("allow_drills"), "{err:?}");
}

#[tokio::test]
async fn a_host_that_stops_answering_tcp_costs_one_connect_timeout_then_is_skipped() {
    let pg = PgCluster::start().expect("start postgres");
    let (dead, _listener, _fillers) = blackholed_port();
    // The dead host is listed first, so every new server connection would try it first; one
    // failure opens its breaker (the default threshold waits for several).
    let pooler = pooler_for(&[dead, pg.port()], "server_breaker_threshold = 1");
    let started = Instant::now();
    let first = pooler
        .connect("app", "app_pw", "app_any")
        .await
        .expect("connect app_any");
    assert_eq!(served_by(&first).await, (false, pg.port() as i32));
    let took = started.elapsed();
    eprintln!("measured: first query served after {took:?} (server_connect_timeout 2s)");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "the first connection waits out one connect attempt on the dead host: {took:?}"
    );

    // Four clients at once need four more server connections: none of them waits on the dead
    // host again while its breaker is open.
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(
            pooler
                .connect("app", "app_pw", "app_any")
                .await
                .expect("connect"),
        );
    }
    let served = futures_util::future::join_all(clients.iter().map(|c| async move {
        c.simple_query("SELECT pg_sleep(0.3)").await.expect("query");
        served_by(c).await
    }))
    .await;
    let took = started.elapsed();
    assert!(
        served.iter().all(|s| *s == (false, pg.port() as i32)),
        "{served:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "new server connections skip the dead host: {took:?}"
    );

    let admin = pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    let hosts = show(&admin, "HOSTS").await;
    let dead_name = format!("127.0.0.1:{dead}");
    let row = hosts
        .iter()
        .find(|r| r.first() == Some(&dead_name))
        .expect("the dead host in SHOW HOSTS");
    // host, breaker, attempts, successes, failures_dns, failures_connect, failures_login,
    // timeouts_dns, timeouts_connect, ...
    assert_eq!(row[1], "open", "{row:?}");
    assert_eq!(row[3], "0", "{row:?}");
    assert_eq!(row[8], "1", "one connect attempt timed out: {row:?}");
}

#[tokio::test]
async fn service_resumes_within_a_second_of_a_drills_end_with_the_default_back_off() {
    let pg = PgCluster::start().expect("start postgres");
    // The default server_login_retry / _max and breaker threshold: nothing shortened.
    let pooler = pooler_for(&[pg.port()], "allow_drills = true");
    let client = pooler
        .connect("app", "app_pw", "app_any")
        .await
        .expect("connect");
    client.simple_query("SELECT 1").await.expect("served");
    let admin = pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    admin
        .simple_query(&format!("DRILL 127.0.0.1:{} refuse FOR 5s", pg.port()))
        .await
        .expect("DRILL");
    let drill_started = Instant::now();
    // The pooled connection is not reused during the drill, and every connect is refused; the
    // client has query_wait_timeout left, so it waits rather than fails.
    client
        .simple_query("SELECT 1")
        .await
        .expect("served once the drill ended");
    let served = drill_started.elapsed();
    let after_end = served.saturating_sub(Duration::from_secs(5));
    eprintln!("measured: served {after_end:?} after the drill's end");
    assert!(
        served >= Duration::from_millis(4900),
        "served during the drill: {served:?}"
    );
    assert!(
        after_end < Duration::from_millis(1500),
        "the drill's refusals left back-off behind: served {after_end:?} after its end"
    );
}

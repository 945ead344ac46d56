//! The fleet budget: four Breakwater processes share one database's connection budget through
//! advisory locks, against one real PostgreSQL.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::{PgCluster, Pooler};
use tokio_postgres::SimpleQueryMessage;

use crate::common::*;

const BUDGET: i64 = 12;
const PROCESSES: usize = 4;

fn start_fleet(pg: &PgCluster) -> Vec<Pooler> {
    start_processes(pg, PROCESSES, BUDGET)
}

fn start_processes(pg: &PgCluster, processes: usize, budget: i64) -> Vec<Pooler> {
    (0..processes)
        .map(|_| {
            start_pooler(
                pg,
                &format!(
                    "fleet_budget = {budget}\nfleet_min_share = 1\nfleet_release_delay = \"1s\""
                ),
                &format!("pool_size = {budget}\n"),
                USERLIST,
            )
        })
        .collect()
}

/// SHOW FLEET's `held` and `fleet_total` for database `app` on one pooler.
async fn fleet_row(pooler: &Pooler) -> (i64, Option<i64>) {
    let (held, total, _) = fleet_status(pooler).await;
    (held, total)
}

/// SHOW FLEET's `held`, `fleet_total` and `connected` for database `app` on one pooler.
async fn fleet_status(pooler: &Pooler) -> (i64, Option<i64>, bool) {
    let admin = connect(&pooler.conn_string("admin", "admin_pw", "breakwater"))
        .await
        .expect("admin login");
    let msgs = admin.simple_query("SHOW FLEET").await.expect("SHOW FLEET");
    for m in msgs {
        if let SimpleQueryMessage::Row(r) = m {
            if r.get("database") == Some("app") {
                let held = r.get("held").and_then(|v| v.parse().ok()).unwrap_or(-1);
                let total = r.get("fleet_total").and_then(|v| v.parse().ok());
                return (held, total, r.get("connected") == Some("yes"));
            }
        }
    }
    (0, None, false)
}

/// Clients looping `SELECT pg_sleep(0.02)` through one pooler until `stop`; failures counted.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    failures: Arc<AtomicU64>,
    queries: Arc<AtomicU64>,
}

fn load(pooler: &Pooler, clients: usize) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let queries = Arc::new(AtomicU64::new(0));
    let conn = pooler.conn_string("app", "app_pw", "app");
    let tasks = (0..clients)
        .map(|_| {
            let (stop, failures, queries, conn) = (
                stop.clone(),
                failures.clone(),
                queries.clone(),
                conn.clone(),
            );
            tokio::spawn(async move {
                let c = match connect(&conn).await {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("load client login failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match c.simple_query("SELECT pg_sleep(0.02)").await {
                        Ok(_) => queries.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("load query failed: {e}");
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    Load {
        stop,
        tasks,
        failures,
        queries,
    }
}

impl Load {
    /// Stops the clients; returns (queries, failures).
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.queries.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
        )
    }
}

/// Samples the role's backends every 100 ms until stopped; returns the most seen.
fn sample_backends(pg: &PgCluster) -> (Arc<AtomicBool>, tokio::task::JoinHandle<i64>) {
    sample_backends_every(pg, Duration::from_millis(100))
}

fn sample_backends_every(
    pg: &PgCluster,
    period: Duration,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<i64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let conn = pg.conn_string("postgres", "postgres", "app");
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let direct = connect(&conn).await.expect("direct connection");
        let mut most = 0;
        let mut tick = tokio::time::interval(period);
        while !flag.load(Ordering::Relaxed) {
            tick.tick().await;
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' \
                     AND backend_type = 'client backend'",
                    &[],
                )
                .await
                .expect("count backends")
                .get(0);
            most = most.max(n);
        }
        most
    });
    (stop, task)
}

async fn wait_held(pooler: &Pooler, at_least: i64, what: &str) -> Duration {
    let t0 = Instant::now();
    testkit::wait_until(what, Duration::from_secs(15), || async {
        fleet_row(pooler).await.0 >= at_least
    })
    .await
    .unwrap();
    t0.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_share_a_budget_of_twelve_borrow_idle_slots_and_take_a_dead_ones() {
    let pg = PgCluster::start().expect("start postgres");
    let mut poolers = start_fleet(&pg);
    let (sampling, sampler) = sample_backends(&pg);

    // Uneven: 12, 6, 2 and 0 clients.
    let loads: Vec<Load> = [12, 6, 2, 0]
        .iter()
        .zip(&poolers)
        .map(|(n, p)| load(p, *n))
        .collect();
    // Every slot is taken between them, and no more.
    testkit::wait_until("the fleet to hold its whole budget", WAIT, || async {
        fleet_row(&poolers[0]).await.1 == Some(BUDGET)
    })
    .await
    .unwrap();
    // Operators can tell the control connections apart in pg_stat_activity: one per process
    // with clients (a process opens it with its database's first pool), and they are the
    // sessions that hold the slots' advisory locks.
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    let named = || async {
        let row = direct
            .query_one(
                "SELECT (SELECT count(*) FROM pg_stat_activity \
                         WHERE application_name = 'breakwater fleet'), \
                        (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
                         WHERE l.locktype = 'advisory' \
                           AND a.application_name IS DISTINCT FROM 'breakwater fleet')",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    testkit::wait_until(
        "three control connections named 'breakwater fleet'",
        WAIT,
        || async { named().await.0 == 3 },
    )
    .await
    .unwrap();
    assert_eq!(
        named().await.1,
        0,
        "advisory locks held by sessions not named 'breakwater fleet'"
    );
    drop(direct);
    // A process that found the fleet full gets its min share from those over theirs.
    let shares_at = Instant::now();
    testkit::wait_until(
        "every process with clients to hold its min share",
        WAIT,
        || async {
            for p in &poolers[..3] {
                if fleet_row(p).await.0 < 1 {
                    return false;
                }
            }
            true
        },
    )
    .await
    .unwrap();
    let shares_took = shares_at.elapsed();
    let mut uneven = Vec::new();
    for p in &poolers {
        uneven.push(fleet_row(p).await.0);
    }
    let (mut queries, mut failures) = (0, 0);
    for l in loads {
        let (q, f) = l.finish().await;
        queries += q;
        failures += f;
    }

    // A burst on the idle process borrows the slots the others stop using.
    let burst = load(&poolers[3], 12);
    let borrowed = wait_held(&poolers[3], 8, "the bursting process to borrow slots").await;

    // kill -9 of the process holding most: PostgreSQL frees its locks; another takes them.
    let (q, f) = burst.finish().await;
    queries += q;
    failures += f;
    let heir = load(&poolers[0], 12);
    let killed_at = Instant::now();
    poolers[3].signal(libc::SIGKILL);
    let taken = wait_held(&poolers[0], 8, "another process to take a dead one's slots").await;
    let since_kill = killed_at.elapsed();
    let (q, f) = heir.finish().await;
    queries += q;
    failures += f;

    sampling.store(true, Ordering::Relaxed);
    let most = sampler.await.unwrap();
    eprintln!(
        "fleet: held with 12/6/2/0 clients {uneven:?} (min shares after {shares_took:?}); burst borrowed 8 slots in {borrowed:?}; \
         after kill -9 another held 8 in {taken:?} ({since_kill:?} after the kill); \
         most backends of the role {most}; {queries} queries, {failures} failures"
    );
    assert!(
        most <= BUDGET + PROCESSES as i64,
        "{most} backends of the role (budget {BUDGET} + {PROCESSES} control connections)"
    );
    assert_eq!(failures, 0, "clients failed");
    poolers.clear();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_postgresql_restart_the_fleet_reconnects_and_keeps_its_budget() {
    const RESTART_BUDGET: i64 = 6;
    let mut pg = PgCluster::start().expect("start postgres");
    let poolers = start_processes(&pg, 2, RESTART_BUDGET);
    let before: Vec<Load> = poolers.iter().map(|p| load(p, 6)).collect();
    testkit::wait_until("the fleet to hold its budget", WAIT, || async {
        fleet_row(&poolers[0]).await.1 == Some(RESTART_BUDGET)
    })
    .await
    .unwrap();
    for l in before {
        // Clients lose their servers in the restart; only the budget's behaviour after it
        // is under test.
        l.finish().await;
    }

    let restarted_at = Instant::now();
    tokio::task::block_in_place(|| pg.restart());
    let (sampling, sampler) = sample_backends(&pg);
    let after: Vec<Load> = poolers.iter().map(|p| load(p, 6)).collect();
    testkit::wait_until(
        "both control connections back and the budget held again",
        Duration::from_secs(20),
        || async {
            let a = fleet_status(&poolers[0]).await;
            let b = fleet_status(&poolers[1]).await;
            a.2 && b.2 && a.1 == Some(RESTART_BUDGET)
        },
    )
    .await
    .unwrap();
    let recovered = restarted_at.elapsed();
    let (mut queries, mut failures) = (0, 0);
    for l in after {
        let (q, f) = l.finish().await;
        queries += q;
        failures += f;
    }
    sampling.store(true, Ordering::Relaxed);
    let most = sampler.await.unwrap();
    eprintln!(
        "fleet after a restart: budget held again {recovered:?} after the restart began; \
         most backends of the role {most}; {queries} queries, {failures} failures"
    );
    assert!(most <= RESTART_BUDGET + 2, "{most} backends of the role");
    assert_eq!(failures, 0, "clients failed after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_lost_its_control_connection_gives_its_share_back_before_it_reconnects() {
    // Four slots: the process that stays takes every slot freed in one step.
    const SMALL_BUDGET: i64 = 4;
    let pg = PgCluster::start().expect("start postgres");
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    let control_pids = || async {
        direct
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'breakwater fleet'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<i32>>()
    };
    // The one that will lose its control connection starts alone, so its control backend is
    // the only one; then the other joins and gets its min share from it.
    let cut = start_processes(&pg, 1, SMALL_BUDGET).remove(0);
    let cut_load = load(&cut, 6);
    testkit::wait_until("the first process to hold the budget", WAIT, || async {
        fleet_row(&cut).await.0 == SMALL_BUDGET
    })
    .await
    .unwrap();
    let pids = control_pids().await;
    assert_eq!(pids.len(), 1, "one control connection: {pids:?}");
    let stays = start_processes(&pg, 1, SMALL_BUDGET).remove(0);
    let stays_load = load(&stays, 6);
    wait_held(&stays, 1, "the second process to get its min share").await;

    // Sampled often: the overshoot this guards against lasted one server's transaction.
    let (sampling, sampler) = sample_backends_every(&pg, Duration::from_millis(5));
    let killed: bool = direct
        .query_one("SELECT pg_terminate_backend($1)", &[&pids[0]])
        .await
        .unwrap()
        .get(0);
    assert!(killed, "control connection terminated");
    // The other takes the freed slots; the cut one comes back, finds none and asks for its
    // min share, which the other gives back.
    wait_held(
        &stays,
        SMALL_BUDGET - 1,
        "the other process to take the freed slots",
    )
    .await;
    testkit::wait_until(
        "the cut process back, holding its min share again",
        Duration::from_secs(15),
        || async {
            let (held, _, connected) = fleet_status(&cut).await;
            connected && held >= 1 && control_pids().await.len() == 2
        },
    )
    .await
    .unwrap();
    sampling.store(true, Ordering::Relaxed);
    let most = sampler.await.unwrap();
    let (q1, f1) = cut_load.finish().await;
    let (q2, f2) = stays_load.finish().await;
    eprintln!(
        "fleet after a lost control connection: most backends of the role {most}; \
         {} queries, {} failures",
        q1 + q2,
        f1 + f2
    );
    assert!(
        most <= SMALL_BUDGET + 2,
        "{most} backends of the role (budget {SMALL_BUDGET} + 2 control connections)"
    );
    assert_eq!(f1 + f2, 0, "clients failed");
}

//! The restart drill of issue 20: `pg_ctl restart -m immediate` (a crash, then WAL replay)
//! several times under hundreds of looping clients, with Breakwater's default storm settings.
//! For each restart it measures
//!
//! - how long after PostgreSQL accepts connections again the first *new* client (a fresh
//!   connection to the pooler, then `SELECT 1`) is served;
//! - how many client transactions failed, next to how many server connections the pool had
//!   when the database went away (only those in flight should fail: at most one each);
//! - the most server logins in flight at once (against `server_connect_concurrency`).
//!
//! The pooler reaches PostgreSQL through the test kit's fault proxy, with no fault set: it only
//! counts connections and logins in flight. While PostgreSQL is down, the proxy accepts and then
//! closes at once, where PostgreSQL's port would refuse; to the pooler both are an immediate
//! failure. A measurement, not a test: it asserts nothing and prints a markdown table.
//!
//! `cargo run --release -p breakwater-bench --bin restart-drill -- --help`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use testkit::{free_port, FaultProxy, PgCluster, PgOptions, Pooler};
use tokio_postgres::NoTls;

#[derive(Parser, Debug)]
#[command(
    name = "restart-drill",
    about = "pg_ctl restart -m immediate under many looping clients: time to serve a new client, failed transactions, logins in flight"
)]
struct Cli {
    /// Looping clients (each runs SELECT 1 back to back through the pooler).
    #[arg(long, default_value_t = 500)]
    clients: usize,
    /// Restarts, one after another.
    #[arg(long, default_value_t = 3)]
    restarts: usize,
    /// pool_size of the database (server connections).
    #[arg(long, default_value_t = 20)]
    pool_size: usize,
    /// Steady running before each restart and after each recovery.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// The breakwater binary (default: target/release/breakwater; build it first).
    #[arg(long)]
    breakwater: Option<PathBuf>,
}

/// What the clients saw, shared by their tasks.
#[derive(Default)]
struct Seen {
    stop: AtomicBool,
    served: AtomicU64,
    /// When each failed transaction failed.
    failed: Mutex<Vec<Instant>>,
    /// Failed reconnects to the pooler after a failure.
    reconnect_failures: AtomicU64,
    /// When the prober's new clients were served.
    probes: Mutex<Vec<Instant>>,
}

async fn connect(conn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A client as an application runs one: a query, again and again; after an error, a new
/// connection.
async fn looping_client(conn: String, seen: Arc<Seen>) {
    let mut client = None;
    while !seen.stop.load(Relaxed) {
        let Some(c) = &client else {
            match connect(&conn).await {
                Ok(c) => client = Some(c),
                Err(_) => {
                    seen.reconnect_failures.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            continue;
        };
        match c.simple_query("SELECT 1").await {
            Ok(_) => {
                seen.served.fetch_add(1, Relaxed);
            }
            Err(_) => {
                if let Ok(mut f) = seen.failed.lock() {
                    f.push(Instant::now());
                }
                client = None;
            }
        }
    }
}

/// New clients, one after another: each connects, runs SELECT 1 and leaves.
async fn prober(conn: String, seen: Arc<Seen>) {
    while !seen.stop.load(Relaxed) {
        let served = async {
            let c = connect(&conn).await.ok()?;
            c.simple_query("SELECT 1").await.ok()
        };
        if tokio::time::timeout(Duration::from_secs(30), served)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            if let Ok(mut p) = seen.probes.lock() {
                p.push(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The postmaster's start time, read over a direct connection: a new value means the restarted
/// server answered (an old backend answering in the instant before the crash does not count).
async fn postmaster_start(pg_conn: &str) -> Option<String> {
    let c = connect(pg_conn).await.ok()?;
    let row = c
        .query_one("SELECT pg_postmaster_start_time()::text", &[])
        .await
        .ok()?;
    row.try_get(0).ok()
}

struct Round {
    servers: i64,
    failed: usize,
    reconnect_failures: u64,
    down_for: Duration,
    first_new_client_after_ready: Option<Duration>,
    peak_logins: usize,
    attempts: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bin = cli
        .breakwater
        .clone()
        .unwrap_or_else(|| root.join("target/release/breakwater"));
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: run `cargo build --release -p breakwater` first, or pass --breakwater",
        bin.display()
    );
    let mut pg = PgCluster::start_with(PgOptions {
        max_connections: (cli.pool_size as u32 + 20).max(100),
        ..Default::default()
    })?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], pg.port())))?;
    let port = free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_type = \"trust\"\nmax_client_conn = {}\n\
         log_connections = false\nlog_disconnections = false\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\nuser = \"app\"\npassword = \"app_pw\"\n\
         pool_size = {}\n",
        cli.clients + 100,
        proxy.port(),
        cli.pool_size
    );
    let pooler = Pooler::start(&bin, port, &config, &[]).context("starting breakwater")?;
    let conn = format!("host=127.0.0.1 port={port} user=app dbname=app connect_timeout=30");
    let pg_conn = pg.conn_string("app", "app_pw", "app");

    let seen = Arc::new(Seen::default());
    let mut tasks: Vec<_> = (0..cli.clients)
        .map(|_| tokio::spawn(looping_client(conn.clone(), seen.clone())))
        .collect();
    tasks.push(tokio::spawn(prober(conn.clone(), seen.clone())));
    eprintln!(
        "== {} clients looping through pool_size {}; settling {:?}",
        cli.clients, cli.pool_size, cli.settle
    );
    tokio::time::sleep(cli.settle).await;

    let mut rounds = Vec::new();
    for i in 1..=cli.restarts {
        let before = postmaster_start(&pg_conn).await;
        // Over a connection of its own, which dies with the server.
        let servers: i64 = match connect(&pg_conn).await {
            Ok(d) => d
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .map(|r| r.get(0))
                .unwrap_or(-1),
            Err(_) => -1,
        };
        let failed_before = seen.failed.lock().map(|f| f.len()).unwrap_or(0);
        let reconnects_before = seen.reconnect_failures.load(Relaxed);
        let attempts_before = proxy.attempts();
        proxy.reset_peak();
        let crash = Instant::now();
        eprintln!("== restart {i}: pg_ctl restart -m immediate with {servers} server connections");
        let restart = tokio::task::spawn_blocking(move || {
            let r = pg.try_restart_immediate();
            (pg, r)
        });
        // PostgreSQL is back when a connection reaches the new postmaster; it was accepting
        // by the time that attempt began, give or take the 2 ms between attempts, so the
        // attempt's start is when it counts as back (erring towards a longer wait after it).
        let ready = loop {
            let attempt = Instant::now();
            if let Some(now) = postmaster_start(&pg_conn).await {
                if Some(&now) != before.as_ref() {
                    break attempt;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            anyhow::ensure!(
                crash.elapsed() < Duration::from_secs(120),
                "PostgreSQL did not come back"
            );
        };
        let (back, restarted) = restart.await?;
        pg = back;
        restarted?;
        // Wait for a new client to be served after PostgreSQL was back, then settle.
        let deadline = Instant::now() + Duration::from_secs(120);
        let first = loop {
            let first = seen
                .probes
                .lock()
                .ok()
                .and_then(|p| p.iter().copied().find(|t| *t > ready));
            if first.is_some() || Instant::now() > deadline {
                break first;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        tokio::time::sleep(cli.settle).await;
        rounds.push(Round {
            servers,
            failed: seen.failed.lock().map(|f| f.len()).unwrap_or(0) - failed_before,
            reconnect_failures: seen.reconnect_failures.load(Relaxed) - reconnects_before,
            down_for: ready - crash,
            first_new_client_after_ready: first.map(|t| t - ready),
            peak_logins: proxy.peak_logging_in(),
            attempts: proxy.attempts() - attempts_before,
        });
    }
    seen.stop.store(true, Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }

    println!(
        "\n{} clients, pool_size {}, default storm settings (server_connect_concurrency 4, server_login_retry 250ms)\n",
        cli.clients, cli.pool_size
    );
    println!("| restart | server connections at the crash | failed transactions | failed reconnects | crash → PostgreSQL accepting | PostgreSQL accepting → first new client served | most logins in flight | connect attempts |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} | {} ms | {} | {} | {} |",
            i + 1,
            r.servers,
            r.failed,
            r.reconnect_failures,
            r.down_for.as_millis(),
            r.first_new_client_after_ready
                .map(|d| format!("{} ms", d.as_millis()))
                .unwrap_or_else(|| "never (120 s)".into()),
            r.peak_logins,
            r.attempts
        );
    }
    println!(
        "\ntransactions served in all: {}",
        seen.served.load(Relaxed)
    );
    drop(pooler);
    Ok(())
}

//! `breakwater stats`: a live tail of the admin console for a terminal. Connects like psql
//! (`-h -p -U -d`, `PGPASSWORD`), polls SHOW POOLS and SHOW LATENCY every interval and prints
//! one compact line per pool with rates computed between polls, until Ctrl-C.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::{NoTls, SimpleQueryMessage};

#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct TailArgs {
    /// Breakwater host.
    #[arg(short = 'h', long, default_value = "127.0.0.1")]
    host: String,
    /// Breakwater port.
    #[arg(short = 'p', long, default_value_t = 6432)]
    port: u16,
    /// An admin_users or stats_users name (default: $PGUSER, else $USER).
    #[arg(short = 'U', long = "username")]
    user: Option<String>,
    /// The admin database.
    #[arg(short = 'd', long = "dbname", default_value = "breakwater")]
    dbname: String,
    /// Time between lines, e.g. "1s", "500ms".
    #[arg(short = 'i', long, default_value = "1s")]
    interval: String,
    /// Stop after this many intervals (default: until interrupted).
    #[arg(short = 'n', long)]
    count: Option<u64>,
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
}

/// Totals of one pool at one poll.
#[derive(Debug, Clone, Default)]
struct Sample {
    xacts: u64,
    queries: u64,
    waits: u64,
    wait_us: u64,
    errors: u64,
}

fn get(row: &tokio_postgres::SimpleQueryRow, col: &str) -> String {
    row.get(col).unwrap_or("").to_owned()
}

fn num(row: &tokio_postgres::SimpleQueryRow, col: &str) -> u64 {
    row.get(col).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn rows(msgs: Vec<SimpleQueryMessage>) -> Vec<tokio_postgres::SimpleQueryRow> {
    msgs.into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

fn ms(us: u64) -> String {
    if us >= 10_000 {
        format!("{}ms", us / 1000)
    } else {
        format!("{:.1}ms", us as f64 / 1000.0)
    }
}

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    let interval = crate::config::parse_timeout(&args.interval)
        .map_err(anyhow::Error::msg)?
        .0
        .unwrap_or(Duration::from_secs(1));
    let user = args
        .user
        .or_else(|| std::env::var("PGUSER").ok())
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "admin".into());
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&args.host)
        .port(args.port)
        .user(&user)
        .dbname(&args.dbname)
        .application_name("breakwater stats")
        .connect_timeout(Duration::from_secs(10));
    if let Ok(pw) = std::env::var("PGPASSWORD") {
        cfg.password(pw);
    }
    let (client, conn) = cfg.connect(NoTls).await.with_context(|| {
        format!(
            "cannot connect to the admin console at {}:{} as {user}",
            args.host, args.port
        )
    })?;
    let conn = tokio::spawn(conn);
    let mut prev: HashMap<(String, String), (Instant, Sample)> = HashMap::new();
    let mut tick = upstream::timer::interval(interval);
    let mut n = 0u64;
    let header = crate::say!(
        "{:<8} {:<24} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9} {:>9} {:>6}",
        "time",
        "pool",
        "cl_act",
        "cl_wait",
        "sv_act",
        "sv_idle",
        "tps",
        "qps",
        "wait_avg",
        "wait_p99",
        "errors"
    );
    // A reader that went away (`breakwater stats | head`) ends the tail.
    let mut reading = header;
    while reading {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let pools = rows(client.simple_query("SHOW POOLS").await?);
        let latency = rows(client.simple_query("SHOW LATENCY").await?);
        let now = Instant::now();
        let clock = crate::clock_hms();
        for p in &pools {
            let key = (get(p, "database"), get(p, "user"));
            let lat = latency
                .iter()
                .find(|l| get(l, "database") == key.0 && get(l, "user") == key.1);
            let sample = lat
                .map(|l| Sample {
                    xacts: num(l, "xact_count"),
                    queries: num(l, "query_count"),
                    waits: num(l, "wait_count"),
                    wait_us: num(l, "wait_time"),
                    errors: num(l, "wait_timeouts")
                        + num(l, "connects_refused")
                        + num(l, "connect_timeouts")
                        + num(l, "login_timeouts"),
                })
                .unwrap_or_default();
            let (tps, qps, wait_avg, errors) = match prev.get(&key) {
                Some((t, s)) => {
                    let secs = now.duration_since(*t).as_secs_f64().max(1e-6);
                    let waits = sample.waits.saturating_sub(s.waits);
                    (
                        (sample.xacts.saturating_sub(s.xacts) as f64 / secs).round() as u64,
                        (sample.queries.saturating_sub(s.queries) as f64 / secs).round() as u64,
                        sample
                            .wait_us
                            .saturating_sub(s.wait_us)
                            .checked_div(waits)
                            .unwrap_or(0),
                        sample.errors.saturating_sub(s.errors),
                    )
                }
                None => (0, 0, 0, 0),
            };
            let p99 = lat.map(|l| num(l, "wait_p99_us")).unwrap_or(0);
            let shown = crate::say!(
                "{:<8} {:<24} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>9} {:>9} {:>6}",
                clock,
                format!("{}/{}", key.0, key.1),
                get(p, "cl_active"),
                get(p, "cl_waiting"),
                get(p, "sv_active"),
                get(p, "sv_idle"),
                tps,
                qps,
                ms(wait_avg),
                ms(p99),
                errors
            );
            reading &= shown;
            prev.insert(key, (now, sample));
        }
        if pools.is_empty() {
            reading &= crate::say!("{clock} (no pools yet)");
        }
        n += 1;
        if args.count.is_some_and(|c| n >= c) {
            break;
        }
    }
    drop(client);
    let _ = conn.await;
    Ok(())
}

//! Memory per idle client: open N client connections to a pooler that each finish login (trust
//! auth: StartupMessage in, ReadyForQuery out) and then sit there, and read the pooler's RSS.
//!
//! Clients are spread over several loopback source addresses (127.0.0.2 …) so that 50k of them do
//! not run out of ephemeral ports, and close with a RST (SO_LINGER 0) so no TIME_WAIT is left to
//! get in the way of the next pooler's clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::procfs;
use crate::targets::{DB, USER};

const SOURCE_ADDRESSES: u8 = 8;
/// Logins in flight at once: well under PgBouncer's listen backlog (128), so no SYN is dropped
/// and retried a second later.
const CONCURRENT_LOGINS: usize = 64;
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// For the warm-up client and the responsiveness probe: tokio-postgres bounds only the TCP
/// connect, and a pooler out of file descriptors accepts nothing while the kernel completes
/// the handshake, so a login can wait forever without this.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct MemPoint {
    pub target: String,
    pub clients: usize,
    pub baseline_rss_kib: u64,
    pub rss_kib: u64,
    /// (rss - baseline) / clients.
    pub kib_per_client: f64,
    /// A new client's login + `SELECT 1` while the idle ones are held: is the pooler responsive?
    /// None when it got no answer within PROBE_TIMEOUT.
    pub login_select_ms: Option<f64>,
    /// `SHOW POOLS` on the admin console (database `pgbouncer`, a new connection) while the idle
    /// clients are held: the operator's view must stay quick. None when it got no answer
    /// within PROBE_TIMEOUT.
    pub admin_show_ms: Option<f64>,
    /// File descriptors the pooler holds with these clients connected (from /proc/PID/fd).
    pub pooler_fds: Option<usize>,
    pub open_secs: f64,
    pub error: Option<String>,
}

/// How long the clients sit idle before the pooler's RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// Opens idle clients up to each count in `counts` (ascending) on the pooler at `port` whose
/// process is `pid`, measuring after each step. Stops at the first step that cannot be reached.
pub async fn measure(
    target: &str,
    port: u16,
    pid: u32,
    counts: &[usize],
    fd_limit: u64,
) -> Vec<MemPoint> {
    let mut points = Vec::new();
    // A first client warms the pool (one server connection, the runtime's threads) so the
    // baseline holds everything that does not grow with the number of clients.
    let warm = match login_and_select(port).await {
        Ok((client, _)) => client,
        Err(e) => {
            points.push(failed(target, 0, 0, format!("warm-up client: {e:#}")));
            return points;
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = procfs::rss_kib(pid).unwrap_or(0);

    let mut held: Vec<TcpStream> = Vec::new();
    for &n in counts {
        // Our side and the pooler's side each need one fd per client, plus some slack.
        if n as u64 + 1000 > fd_limit {
            points.push(failed(
                target,
                n,
                baseline,
                format!("skipped: RLIMIT_NOFILE is {fd_limit}, too low for {n} clients"),
            ));
            break;
        }
        let started = Instant::now();
        if let Err(e) = open_clients(port, held.len(), n, &mut held).await {
            // Still worth knowing: what the clients that did get in cost.
            let reached = held.len();
            if reached > 0 {
                let rss = procfs::rss_kib(pid).unwrap_or(0);
                points.push(MemPoint {
                    target: target.to_owned(),
                    clients: reached,
                    baseline_rss_kib: baseline,
                    rss_kib: rss,
                    kib_per_client: rss.saturating_sub(baseline) as f64 / reached as f64,
                    login_select_ms: None,
                    admin_show_ms: None,
                    pooler_fds: procfs::open_fds(pid),
                    open_secs: started.elapsed().as_secs_f64(),
                    error: None,
                });
            }
            points.push(failed(
                target,
                n,
                baseline,
                format!("failed after {reached} clients: {e:#}"),
            ));
            break;
        }
        let open_secs = started.elapsed().as_secs_f64();
        // Let the pooler finish whatever the logins left behind (freed buffers, timers) first,
        // and let the clients be idle long enough for Breakwater to park them (one to two
        // seconds, see crates/proxy/src/park.rs): these are idle clients, not fresh logins.
        tokio::time::sleep(IDLE_SETTLE).await;
        let rss = procfs::rss_kib(pid).unwrap_or(0);
        let pooler_fds = procfs::open_fds(pid);
        let login_select_ms = login_and_select(port).await.ok().map(|(_, ms)| ms);
        let admin_show_ms = admin_show_pools(port).await.ok();
        points.push(MemPoint {
            target: target.to_owned(),
            clients: n,
            baseline_rss_kib: baseline,
            rss_kib: rss,
            kib_per_client: rss.saturating_sub(baseline) as f64 / n as f64,
            login_select_ms,
            admin_show_ms,
            pooler_fds,
            open_secs,
            error: None,
        });
    }
    drop(held);
    drop(warm);
    points
}

fn failed(target: &str, clients: usize, baseline: u64, error: String) -> MemPoint {
    MemPoint {
        target: target.to_owned(),
        clients,
        baseline_rss_kib: baseline,
        rss_kib: 0,
        kib_per_client: 0.0,
        login_select_ms: None,
        admin_show_ms: None,
        pooler_fds: None,
        open_secs: 0.0,
        error: Some(error),
    }
}

/// Opens clients number `from..to`, each logged in, and adds them to `held`.
async fn open_clients(
    port: u16,
    from: usize,
    to: usize,
    held: &mut Vec<TcpStream>,
) -> anyhow::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_LOGINS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in from..to {
        let permit = permits.clone().acquire_owned().await?;
        tasks.spawn(async move {
            let result = tokio::time::timeout(LOGIN_TIMEOUT, idle_login(port, i)).await;
            drop(permit);
            match result {
                Ok(r) => r,
                Err(_) => bail!("login timed out after {LOGIN_TIMEOUT:?}"),
            }
        });
        // Collect finished logins as we go so an early failure stops us early.
        while let Some(done) = tasks.try_join_next() {
            held.push(done??);
        }
    }
    while let Some(done) = tasks.join_next().await {
        held.push(done??);
    }
    Ok(())
}

/// Connects from 127.0.0.(2 + i mod 8), sends a StartupMessage and reads until ReadyForQuery.
async fn idle_login(port: u16, i: usize) -> anyhow::Result<TcpStream> {
    let source = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCE_ADDRESSES as usize) as u8);
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut stream = socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .with_context(|| format!("connecting from {source}"))?;
    // Deprecated because a non-zero linger blocks the dropping thread; zero never blocks, it
    // sends a RST at once.
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO))?;
    stream.set_nodelay(true)?;

    let mut startup = BytesMut::with_capacity(64);
    startup.put_u32(0);
    startup.put_u32(196_608); // protocol 3.0
    for (k, v) in [("user", USER), ("database", DB)] {
        startup.put_slice(k.as_bytes());
        startup.put_u8(0);
        startup.put_slice(v.as_bytes());
        startup.put_u8(0);
    }
    startup.put_u8(0);
    let len = startup.len() as u32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    stream.write_all(&startup).await?;

    let mut buf = BytesMut::with_capacity(1024);
    loop {
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < len + 1 {
                break;
            }
            let tag = buf[0];
            let body = buf.split_to(len + 1);
            match tag {
                b'R' => {
                    let code = body
                        .get(5..9)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_be_bytes);
                    if code != Some(0) {
                        bail!("the pooler asked for authentication ({code:?}); expected trust");
                    }
                }
                b'E' => bail!(
                    "login refused: {}",
                    String::from_utf8_lossy(&body[5..]).replace('\0', " ")
                ),
                b'Z' => return Ok(stream),
                _ => {}
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("the pooler closed the connection during login");
        }
    }
}

/// A tokio-postgres client that logs in and runs `SELECT 1`; returns it and the milliseconds
/// that took.
async fn login_and_select(port: u16) -> anyhow::Result<(tokio_postgres::Client, f64)> {
    tokio::time::timeout(PROBE_TIMEOUT, login_and_select_unbounded(port))
        .await
        .with_context(|| format!("no login + SELECT 1 within {PROBE_TIMEOUT:?}"))?
}

async fn login_and_select_unbounded(port: u16) -> anyhow::Result<(tokio_postgres::Client, f64)> {
    let started = Instant::now();
    let conn = format!("host=127.0.0.1 port={port} user={USER} dbname={DB} connect_timeout=10");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.simple_query("SELECT 1").await?;
    Ok((client, started.elapsed().as_secs_f64() * 1e3))
}

/// Connects to the admin console and runs `SHOW POOLS`; returns the milliseconds from connect
/// to the last row.
async fn admin_show_pools(port: u16) -> anyhow::Result<f64> {
    let probe = async {
        let started = Instant::now();
        let conn =
            format!("host=127.0.0.1 port={port} user={USER} dbname=pgbouncer connect_timeout=10");
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let rows = client.simple_query("SHOW POOLS").await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        drop(client);
        let _ = connection.await;
        if !rows
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        {
            bail!("SHOW POOLS returned no rows");
        }
        anyhow::Ok(ms)
    };
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .with_context(|| format!("no answer to SHOW POOLS within {PROBE_TIMEOUT:?}"))?
}

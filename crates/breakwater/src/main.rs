//! The `breakwater` daemon: CLI, config, listeners, signals, maintenance and shutdown. It wires
//! the crates together and owns every long-lived task: the admin console on logins to the admin
//! database, SIGHUP and RELOAD, the stats log line, the Prometheus exporter, and the
//! `breakwater stats` tail.

mod blocks;
mod config;
mod health;
mod http;
mod import;
mod listen;
mod notify;
mod operator;
mod pgbouncer;
mod scrape;
mod shards;
mod shutdown;
mod tail;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use admin::ShutdownMode;
use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::FutureExt;
use proxy::{Peer, Proxy};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use upstream::Stream;

use crate::config::{Config, Layers};

/// glibc, with tokio's 256-byte blocks (a task, a socket's registration) packed apart: see
/// `blocks.rs`.
#[global_allocator]
static ALLOCATOR: blocks::Allocator = blocks::Allocator;
use crate::health::Health;
use crate::operator::Daemon;

/// PostgreSQL connection pooler: transaction pooling over a warm pool, with bounded connects.
#[derive(Debug, Parser)]
#[command(name = "breakwater", version, about)]
struct Cli {
    /// Config file (TOML) [default: pooler.toml in the working directory; with an upstream URL,
    /// only if it exists; also BREAKWATER_CONFIG].
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Pool one database with no config file: postgres://user:password@host:port/dbname.
    /// Clients log in as that user with that password, to that database name. Also
    /// BREAKWATER_UPSTREAM, or DATABASE_URL when there is no config file.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Set a [pooler] key (or metrics.listen) over the file and BREAKWATER_<KEY> variables;
    /// repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Validate the config (files it names, and the listen address) and exit; shows every
    /// setting that is not the default and where it came from.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print live stats from a running Breakwater's admin console, one line per pool per
    /// interval, until Ctrl-C (connection options as psql: -h -p -U -d, PGPASSWORD).
    Stats(tail::TailArgs),
    /// Convert a pgbouncer.ini (and its userlist.txt) into a pooler.toml, and report key by key
    /// what was mapped, what behaves differently and what has no equivalent.
    ImportPgbouncer {
        /// PgBouncer's config file; %include is followed.
        ini: PathBuf,
        /// The auth_file to use (default: the one pgbouncer.ini names).
        userlist: Option<PathBuf>,
        /// Where to write the TOML.
        #[arg(short = 'o', long, default_value = "pooler.toml")]
        output: PathBuf,
        /// Overwrite the output file if it exists.
        #[arg(long)]
        force: bool,
    },
}

fn import_pgbouncer(
    ini: &std::path::Path,
    userlist: Option<&std::path::Path>,
    output: &std::path::Path,
    force: bool,
) -> ExitCode {
    if output.exists() && !force {
        eprintln!(
            "breakwater import-pgbouncer: {} exists; use --force to overwrite it or -o to write elsewhere",
            output.display()
        );
        return ExitCode::from(2);
    }
    let imported = match import::import(ini, userlist, output) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("breakwater import-pgbouncer: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = std::fs::write(output, &imported.toml) {
        eprintln!(
            "breakwater import-pgbouncer: cannot write {}: {e}",
            output.display()
        );
        return ExitCode::from(2);
    }
    {
        use std::io::Write;
        // A reader that went away misses the report, not the config written above.
        let _ = std::io::stdout()
            .lock()
            .write_all(imported.report.as_bytes());
    }
    match imported.valid {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(1),
    }
}

/// Writes one line to stdout and says whether it got there. A reader that went away
/// (`breakwater --check | head -1`, a stats tail piped into `head`) is not worth a panic, which
/// is what `println!` does on a broken pipe: the line is dropped and the caller can stop.
/// SIGPIPE stays ignored (Rust's default), so the daemon never dies of a peer's reset.
pub(crate) fn say_line(line: std::fmt::Arguments<'_>) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_fmt(line)
        .and_then(|()| out.write_all(b"\n"))
        .is_ok()
}

/// [`say_line`] with `format!`'s arguments.
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::say_line(format_args!($($arg)*))
    };
}
pub(crate) use say;

/// `HH:MM:SS` in UTC, for the stats tail.
pub(crate) fn clock_hms() -> String {
    admin::show::timestamp(std::time::SystemTime::now())
        .get(11..)
        .unwrap_or_default()
        .to_owned()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Stats(args)) = cli.command {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("breakwater stats: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match rt.block_on(tail::run(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("breakwater stats: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::ImportPgbouncer {
        ini,
        userlist,
        output,
        force,
    }) = &cli.command
    {
        return import_pgbouncer(ini, userlist.as_deref(), output, *force);
    }
    let layers = match Layers::gather(cli.config, cli.upstream, &cli.set, std::env::vars()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("breakwater: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::load(&layers) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("breakwater: {e}");
            // A first run with nothing configured: say what would be enough.
            if matches!(&e, config::ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
                && layers.upstream.is_none()
            {
                eprintln!(
                    "breakwater: give a config file with -c FILE (pooler.toml.example shows every key), or pool one database with --upstream postgres://user:password@host:5432/dbname"
                );
            }
            return ExitCode::from(2);
        }
    };
    if cli.check {
        for w in &config.warnings {
            say!("warning: {w}");
        }
        // A busy port or an address this host does not have fails here, not at start.
        let p = &config.file.pooler;
        let bound = listen::addresses(&p.listen_addr, p.listen_port).and_then(|addrs| {
            listen::bind_all(&addrs, config.file.pooler.so_reuseport, None, false)
        });
        if let Err(e) = bound {
            eprintln!(
                "breakwater: {}: pooler.listen_addr / listen_port: {e}",
                config.path.display()
            );
            return ExitCode::from(2);
        }
        say!(
            "{}: ok ({} databases, {} users)",
            config.path.display(),
            config.file.databases.len(),
            config.userlist.len()
        );
        // Layering order: defaults < file < BREAKWATER_* < --upstream and --set.
        let rows = config.non_default();
        if !rows.is_empty() {
            say!("not default:");
            let width = rows
                .iter()
                .map(|(k, v, _)| k.len() + v.len())
                .max()
                .unwrap_or(0);
            for (key, value, origin) in rows {
                let pad = width.saturating_sub(key.len() + value.len());
                if !say!("  {key} = {value}{:pad$}   ({origin})", "") {
                    break;
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match config.file.pooler.log_format {
        // Colour only for a person at a terminal: escape codes in a log file or a container's
        // log stream make it hard to grep, and every client's span keeps its fields formatted.
        config::LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_target(false)
            .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
        // One JSON object per line, with the client/server span's fields, for log pipelines.
        config::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_target(false)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
    for w in &config.warnings {
        tracing::warn!("config: {w}");
    }
    raise_fd_limit();
    let workers = match config.file.pooler.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    // The control runtime: maintenance, health, metrics, the fleet, and every timer a shard
    // makes (`upstream::timer`), so it outlives the shards.
    let (rt, shards) = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| {
            let shards = shards::Shards::start(workers, rt.handle())?;
            Ok((rt, shards))
        }) {
        Ok(both) => both,
        Err(e) => {
            eprintln!("breakwater: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(run(config, shards.handles().cloned().collect()));
    // Client tasks still running (shutdown_timeout expired) end with their shards' runtimes,
    // before the control runtime whose wheel holds their timers.
    shards.stop();
    drop(rt);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, shards: Vec<tokio::runtime::Handle>) -> anyhow::Result<()> {
    let p = &config.file.pooler;
    let addrs = listen::addresses(&p.listen_addr, p.listen_port)
        .map_err(|e| anyhow::anyhow!("listen_addr \"{}\": {e}", p.listen_addr))?;
    let mut tcp = Vec::with_capacity(addrs.len());
    // Client sockets inherit these from the listening socket (Linux); see `accept_loop`.
    let tuned = cfg!(target_os = "linux").then(|| config.proxy_settings().client_liveness);
    for l in listen::bind_all(&addrs, p.so_reuseport, tuned.as_ref(), p.tcp_defer_accept)
        .map_err(anyhow::Error::msg)?
    {
        tcp.push(BoundListener::Tcp(l));
    }
    let unix = match config.unix_socket_path() {
        Some(path) => {
            // A stale file from a crash, or the socket of a process we are taking over from:
            // either way new clients should reach us.
            let _ = std::fs::remove_file(&path);
            let l = std::os::unix::net::UnixListener::bind(&path)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            tracing::info!(path = %path.display(), "listening on unix socket");
            Some((BoundListener::Unix(l), path))
        }
        None => None,
    };
    let addr = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let unix_socket = unix.as_ref().map(|(_, path)| {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        (path.clone(), id)
    });
    // Now, not at the first signal: a signal before this would kill the process outright.
    let mut signals = shutdown::Signals::install();
    tracing::info!(%addr, databases = config.file.databases.len(), version = env!("CARGO_PKG_VERSION"), "breakwater listening");

    let proxy = Arc::new(Proxy::new(config.proxy_settings()));
    let daemon = Daemon::new(proxy.clone(), config.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let health = Health::new();

    if let Some(listen) = &config.file.metrics.listen {
        let addr: std::net::SocketAddr = listen
            .parse()
            .with_context(|| format!("metrics.listen = \"{listen}\""))?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .context("cannot install the metrics recorder")?;
        stats::export::describe();
        tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
        tasks.spawn(health.clone().heartbeat());
        tasks.spawn(publish_metrics(daemon.clone(), handle.clone()));
        tasks.spawn(http::serve(
            listener,
            Arc::new(http::Endpoints {
                daemon: daemon.clone(),
                health: health.clone(),
                metrics: handle,
            }),
        ));
    }
    health.set_listening();
    tasks.spawn(maintenance(proxy.clone(), stop_rx.clone()));
    tasks.spawn(stats_period(daemon.clone(), stop_rx.clone()));
    // Installed here, not in the task: a SIGHUP between READY=1 and the task's first poll
    // would otherwise meet the default action and end the process.
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    tasks.spawn(reload_on_sighup(hup, daemon.clone(), stop_rx.clone()));
    // Every shard accepts on every listening socket; the sockets themselves close once the
    // last shard's accept loop has stopped.
    for bound in tcp.iter().chain(unix.as_ref().map(|(l, _)| l)) {
        for shard in &shards {
            let listener = Listener::for_shard(bound, shard).context("cannot listen")?;
            tasks.spawn_on(
                accept_loop(listener, daemon.clone(), stop_rx.clone(), tuned),
                shard,
            );
        }
    }
    drop(tcp);
    drop(unix);
    notify::ready();

    let mut shutdown_cmd = daemon.shutdown.subscribe();
    let (mut mode, signalled) = tokio::select! {
        sig = signals.next() => (sig.first_mode(), true),
        m = shutdown_cmd.wait_for(Option::is_some) => match m {
            Ok(m) => (m.unwrap_or(ShutdownMode::WaitForServers), false),
            Err(_) => (ShutdownMode::WaitForServers, false),
        },
    };
    health.set_shutting_down();
    notify::stopping();
    let deadline = config
        .shutdown_timeout()
        .map(|d| tokio::time::Instant::now() + d);
    // SIGTERM keeps the door open a little longer: whatever still routes here (a Service that
    // has not yet seen /readyz fail, an app reconnecting) gets in rather than refused.
    if let (ShutdownMode::WaitForClients, true, Some(delay)) =
        (mode, signalled, config.shutdown_accept_delay())
    {
        tracing::info!(
            ?delay,
            "shutting down: still accepting for shutdown_accept_delay"
        );
        tokio::select! {
            _ = upstream::timer::sleep(delay) => {}
            sig = signals.next() => mode = shutdown::escalate(mode, sig),
        }
    }
    tracing::info!(
        clients = proxy.client_count(),
        ?mode,
        "shutting down: no new clients"
    );
    let _ = stop_tx.send(true);
    loop {
        match mode {
            ShutdownMode::Immediate => break,
            // Idle clients are told at once; running transactions may finish.
            ShutdownMode::WaitForServers => proxy.begin_shutdown(),
            // Clients leave by themselves; nobody is told to go.
            ShutdownMode::WaitForClients => {}
        }
        if proxy.client_count() == 0 {
            break;
        }
        let expired = async {
            match deadline {
                Some(d) => upstream::timer::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = proxy.wait_clients_gone() => break,
            sig = signals.next() => {
                mode = shutdown::escalate(mode, sig);
                tracing::info!(?mode, clients = proxy.client_count(), "shutdown tightened");
            }
            _ = expired => {
                tracing::warn!(
                    clients = proxy.client_count(),
                    "shutdown_timeout expired; closing remaining clients"
                );
                break;
            }
        }
    }
    // Whoever is left is disconnected: their tasks end when the shards' runtimes stop, after
    // this returns, and their servers are closed, not returned.
    proxy.begin_shutdown();
    proxy.close_pools();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some((path, ours)) = unix_socket {
        remove_socket_if_ours(&path, ours);
    }
    tracing::info!("bye");
    Ok(())
}

/// Removes our Unix socket file, unless a process that took over the port (so_reuseport, a
/// rolling restart) has bound a new one at the same path since.
fn remove_socket_if_ours(path: &std::path::Path, ours: Option<(u64, u64)>) {
    use std::os::unix::fs::MetadataExt;
    let now = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    if now.is_some() && now == ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Opens warm connections up to `min_pool_size` and closes idle ones past their timeouts.
async fn maintenance(proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    // Often enough that lifetime jitter spreads reconnects, cheap enough not to matter.
    let mut tick = upstream::timer::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => proxy.maintain().await,
            _ = stop.changed() => return,
        }
    }
}

/// Takes the `stats_period` tick behind SHOW STATS' averages and logs the stats line.
async fn stats_period(daemon: Arc<Daemon>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Some(line) = daemon.rotate() {
            if daemon.config().file.pooler.log_stats {
                tracing::info!("{line}");
            }
        }
        // Re-read each time: RELOAD and SET may change the period.
        let period = daemon.config().stats_period();
        tokio::select! {
            _ = upstream::timer::sleep(period) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Copies snapshots into the metrics registry; the data path never touches it. Runs until
/// exit, through shutdown, so a scrape during a drain still sees the clients leave.
async fn publish_metrics(
    daemon: Arc<Daemon>,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) {
    let mut tick = upstream::timer::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        daemon.publish_metrics();
        // The exporter's own listener did this; without it, nothing else would.
        handle.run_upkeep();
    }
}

/// SIGHUP re-reads the config file and auth_file, as RELOAD does.
async fn reload_on_sighup(
    hup: std::io::Result<tokio::signal::unix::Signal>,
    daemon: Arc<Daemon>,
    mut stop: watch::Receiver<bool>,
) {
    let Ok(mut hup) = hup else {
        tracing::error!("cannot install the SIGHUP handler; use RELOAD in the admin console");
        return;
    };
    loop {
        tokio::select! {
            r = hup.recv() => {
                if r.is_none() {
                    return;
                }
                tracing::info!("SIGHUP received: reloading config");
                notify::reloading();
                // Errors are logged by reload and the running config stays.
                let _ = daemon.reload();
                notify::ready();
            }
            _ = stop.changed() => return,
        }
    }
}

/// A socket clients connect to, registered with one shard's runtime. Every shard accepts on
/// its own duplicate of each listening socket (one socket, so `so_reuseport` means what it
/// did: nobody else may bind the port unless asked), and serves what it accepts itself: a
/// client's task and its socket's registration start on the thread that runs them, with no
/// hand-off from another runtime (about 4 400 instructions per login; see benches/README.md).
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// A duplicate of `bound` (the same socket) registered with `shard`'s runtime, for that
    /// shard's accept loop.
    fn for_shard(
        bound: &BoundListener,
        shard: &tokio::runtime::Handle,
    ) -> std::io::Result<Listener> {
        // Entering the shard's runtime registers the duplicate with its reactor, not ours.
        let _in_shard = shard.enter();
        Ok(match bound {
            BoundListener::Tcp(l) => Listener::Tcp(TcpListener::from_std(l.try_clone()?)?),
            BoundListener::Unix(l) => Listener::Unix(UnixListener::from_std(l.try_clone()?)?),
        })
    }

    async fn accept(&self) -> std::io::Result<(Stream, Peer)> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                (Stream::Tcp(s), Peer(Some(addr)))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                (Stream::Unix(s), Peer(None))
            }
        })
    }
}

/// A bound, non-blocking listening socket not registered with any runtime yet.
enum BoundListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// Accepts clients until shutdown; their tasks run on this shard with it.
///
/// A client's task is not kept here (a `JoinSet` entry was 64 bytes of every idle client's
/// memory): shutdown waits for the client count instead (see `run`), and tasks still running
/// when the shards stop end with their runtimes.
async fn accept_loop(
    listener: Listener,
    daemon: Arc<Daemon>,
    mut stop: watch::Receiver<bool>,
    tuned: Option<upstream::TcpLiveness>,
) {
    // One wait for the stop signal across every accept: a `changed()` made per accept joined
    // and left the watch channel's waiter list each time. `biased`, stop first: no random
    // branch order per accept, and a storm of connections cannot keep the stop from being
    // seen.
    let stopped = stop.changed();
    tokio::pin!(stopped);
    // What the listening socket's clients inherit: set at bind (`listen::bind`), and again
    // here after a reload changed it. `None`: nothing is inherited (a Unix socket, or not
    // Linux), and each client's socket is set on its own.
    let mut tuned = match listener {
        Listener::Tcp(_) => tuned,
        Listener::Unix(_) => None,
    };
    loop {
        let accepted = tokio::select! {
            biased;
            _ = &mut stopped => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let inherited = match (&listener, tuned) {
                    (Listener::Tcp(l), Some(was)) => {
                        let now = daemon.proxy.client_liveness();
                        if now != was {
                            // This client connected before the listener changed: it is tuned
                            // on its own. One that connected just before this line and is
                            // still queued keeps the previous values, as one that logged in
                            // before the reload does.
                            if let Err(e) = now.apply_exactly(l) {
                                tracing::warn!(error = %e, "cannot set client socket options on the listening socket");
                            }
                            tuned = Some(now);
                        }
                        now == was
                    }
                    _ => false,
                };
                drop(tokio::spawn(serve(daemon.clone(), stream, peer, inherited)))
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                upstream::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Not an `async fn`: the session's future is made here, taking the stream and the peer, so
/// the client's task does not keep room for them as well (an `async fn` keeps its arguments
/// for as long as it runs).
fn serve(
    daemon: Arc<Daemon>,
    stream: Stream,
    peer: Peer,
    inherited: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    // `map`, not an async block awaiting it: a block would keep the session's future twice,
    // once as what it captured and once as what it awaits. The console runs in a task of its
    // own: awaited here, every client's task would keep room for an admin login.
    daemon
        .proxy
        .serve(stream, peer, inherited)
        .map(move |login| {
            if let Some(login) = login {
                tokio::spawn(admin_console(daemon, login));
            }
        })
}

/// Runs the admin console on a login to the admin database.
async fn admin_console(daemon: Arc<Daemon>, login: proxy::AdminLogin) {
    stats::GlobalStats::bump(&daemon.proxy.global_stats().admin_logins);
    let span =
        tracing::info_span!("admin", id = login.client_id, user = %login.user, addr = %login.peer);
    let me = admin::ConsoleUser {
        user: login.user,
        is_admin: login.is_admin,
        client_id: login.client_id,
        server_version: format!("16.0 (Breakwater {})", env!("CARGO_PKG_VERSION")),
    };
    let run = admin::serve(login.stream, login.buf, me, &*daemon);
    if let Err(e) = tracing::Instrument::instrument(run, span).await {
        tracing::debug!(error = %e, "admin console connection ended");
    }
}

/// Every client and server connection is a file descriptor: raise the soft limit to the hard
/// one so max_client_conn, not a default of 1024, decides how many clients fit.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

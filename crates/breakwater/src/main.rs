//! The `breakwater` daemon: CLI, config, listeners, signals, maintenance and shutdown. It wires
//! the crates together and owns every long-lived task.

mod config;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use proxy::{Peer, Proxy};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use upstream::Stream;

use crate::config::Config;

/// PostgreSQL connection pooler: transaction pooling over a warm pool, with bounded connects.
#[derive(Debug, Parser)]
#[command(name = "breakwater", version, about)]
struct Cli {
    /// Config file (TOML).
    #[arg(short = 'c', long = "config", default_value = "pooler.toml")]
    config: PathBuf,
    /// Validate the config (and auth_file) and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("breakwater: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!(
            "{}: ok ({} databases, {} users in auth_file)",
            cli.config.display(),
            config.file.databases.len(),
            config.userlist.len()
        );
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    raise_fd_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.file.pooler.workers > 0 {
        rt.worker_threads(config.file.pooler.workers);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("breakwater: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let p = &config.file.pooler;
    let addr = format!("{}:{}", p.listen_addr, p.listen_port);
    let tcp = TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let unix = match config.unix_socket_path() {
        Some(path) => {
            let _ = std::fs::remove_file(&path);
            let l = UnixListener::bind(&path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            tracing::info!(path = %path.display(), "listening on unix socket");
            Some((l, path))
        }
        None => None,
    };
    tracing::info!(%addr, databases = config.file.databases.len(), version = env!("CARGO_PKG_VERSION"), "breakwater listening");

    let proxy = Arc::new(Proxy::new(config.proxy_settings()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    tasks.spawn(maintenance(proxy.clone(), stop_rx.clone()));
    tasks.spawn(accept_tcp(tcp, proxy.clone(), stop_rx.clone()));
    if let Some((l, _)) = unix {
        tasks.spawn(accept_unix(l, proxy.clone(), stop_rx.clone()));
    }

    wait_for_stop_signal().await;
    tracing::info!(
        clients = proxy.client_count(),
        "shutting down: no new clients; running transactions may finish"
    );
    let _ = stop_tx.send(true);
    proxy.begin_shutdown();
    let deadline = config.shutdown_timeout();
    let drained = async {
        while proxy.client_count() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    match deadline {
        Some(d) => {
            if tokio::time::timeout(d, drained).await.is_err() {
                tracing::warn!(
                    clients = proxy.client_count(),
                    "shutdown_timeout expired; closing remaining clients"
                );
            }
        }
        None => drained.await,
    }
    proxy.close_pools();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if let Some(path) = config.unix_socket_path() {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("bye");
    Ok(())
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Opens warm connections up to `min_pool_size` and closes idle ones past their timeouts.
async fn maintenance(proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    // Often enough that lifetime jitter spreads reconnects, cheap enough not to matter.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => proxy.maintain().await,
            _ = stop.changed() => return,
        }
    }
}

async fn accept_tcp(listener: TcpListener, proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    let mut clients = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        while clients.try_join_next().is_some() {}
        match accepted {
            Ok((s, addr)) => {
                let proxy = proxy.clone();
                clients.spawn(
                    async move { serve(proxy, Stream::Tcp(s), Peer(addr.to_string())).await },
                );
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drain(clients).await;
}

async fn accept_unix(listener: UnixListener, proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    let mut clients = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => break,
        };
        while clients.try_join_next().is_some() {}
        match accepted {
            Ok((s, _)) => {
                let proxy = proxy.clone();
                clients
                    .spawn(async move { serve(proxy, Stream::Unix(s), Peer("unix".into())).await });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drain(clients).await;
}

/// Client tasks end by themselves once shutdown is signalled (idle ones at once, active ones at
/// the end of their transaction); the accept task owns them until then.
async fn drain(mut clients: JoinSet<()>) {
    while clients.join_next().await.is_some() {}
}

async fn serve(proxy: Arc<Proxy>, stream: Stream, peer: Peer) {
    if let Some(admin) = proxy.serve(stream, peer).await {
        admin_console(admin).await;
    }
}

/// Placeholder until the admin console lands: tell the operator plainly.
async fn admin_console(mut admin: proxy::AdminLogin) {
    use tokio::io::AsyncWriteExt;
    let mut out = bytes::BytesMut::new();
    proto::PgError::fatal(
        proto::SqlState::FEATURE_NOT_SUPPORTED,
        "the admin console is not available in this build",
    )
    .write(&mut out);
    let _ = admin.stream.write_all(&out).await;
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

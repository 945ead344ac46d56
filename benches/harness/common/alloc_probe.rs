//! Counting the allocations Breakwater's own threads make, with Breakwater running in-process
//! on a real PostgreSQL: shared by the `alloc_per_txn` benchmark (the table) and the
//! `alloc_per_txn` test (CI's bound). Each includes this file with `#[path]`, so each binary
//! gets its own `#[global_allocator]`.
//!
//! Only threads of the pooler's runtime are counted: its `on_thread_start` flags them, so the
//! client (tokio-postgres, on another runtime) and the test harness cost nothing here. It
//! measures; it never changes the pooler — the settings are built the way the binary's config
//! builds them, with the binary's defaults.

#![allow(dead_code)] // Each includer uses a different part.

use std::alloc::{GlobalAlloc, Layout, System};
use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use proxy::{AuthType, DatabaseRoute, PoolMode, Proxy, ProxySettings};
use tokio::net::TcpListener;

// ---------------------------------------------------------------------------------------------
// The allocator
// ---------------------------------------------------------------------------------------------

thread_local! {
    /// Set on the pooler runtime's threads, and only there.
    static POOLER_THREAD: Cell<bool> = const { Cell::new(false) };
    /// Set while this thread records a backtrace: the capture's own allocations are not counted.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

static COUNT: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);
/// While set, each counted allocation records its backtrace (up to `MAX_TRACES`).
static TRACING: AtomicBool = AtomicBool::new(false);
static TRACES: Mutex<Vec<Backtrace>> = Mutex::new(Vec::new());
const MAX_TRACES: usize = 20_000;

/// The system allocator, counting calls (alloc, alloc_zeroed and realloc) and the bytes asked
/// for on pooler threads.
pub struct PoolerThreadAlloc;

// SAFETY: every call is forwarded to the system allocator unchanged; we only count. The thread
// locals are const-initialized `Cell<bool>`s without destructors, so reading them never
// allocates, and `try_with` covers a thread that is being torn down.
unsafe impl GlobalAlloc for PoolerThreadAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: PoolerThreadAlloc = PoolerThreadAlloc;

fn record(size: usize) {
    let counted = POOLER_THREAD.try_with(Cell::get).unwrap_or(false)
        && !IN_HOOK.try_with(Cell::get).unwrap_or(true);
    if !counted {
        return;
    }
    COUNT.fetch_add(1, Ordering::Relaxed);
    BYTES.fetch_add(size as u64, Ordering::Relaxed);
    if TRACING.load(Ordering::Relaxed) {
        let _ = IN_HOOK.try_with(|h| h.set(true));
        // Unresolved: symbols are looked up once, when the report is printed.
        let trace = Backtrace::force_capture();
        if let Ok(mut traces) = TRACES.lock() {
            if traces.len() < MAX_TRACES {
                traces.push(trace);
            }
        }
        let _ = IN_HOOK.try_with(|h| h.set(false));
    }
}

/// Allocations (count, bytes) by pooler threads since the process started.
pub fn counters() -> (u64, u64) {
    (COUNT.load(Ordering::Relaxed), BYTES.load(Ordering::Relaxed))
}

/// Starts or stops recording a backtrace per counted allocation.
pub fn set_tracing(on: bool) {
    TRACING.store(on, Ordering::Relaxed);
}

/// The recorded allocation sites, most frequent first: (count, the frames of the stack that
/// belong to this workspace's crates, innermost first). Empties the record.
pub fn take_sites() -> Vec<(usize, String)> {
    let traces = match TRACES.lock() {
        Ok(mut t) => std::mem::take(&mut *t),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    let mut sites: HashMap<String, usize> = HashMap::new();
    for trace in traces {
        *sites.entry(workspace_frames(&trace)).or_default() += 1;
    }
    let mut sites: Vec<(usize, String)> = sites.into_iter().map(|(s, n)| (n, s)).collect();
    sites.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    sites
}

/// The frames of a backtrace that name a file under crates/ (Breakwater's own code), innermost
/// first; the innermost also names the call it made (usually the std or library function that
/// allocated).
fn workspace_frames(trace: &Backtrace) -> String {
    // std prints each frame as "N: function", then "at file:line:col" when it knows them.
    let text = format!("{trace}");
    let mut lines = text.lines().map(str::trim).peekable();
    let mut out = Vec::new();
    let mut callee = "";
    while let Some(line) = lines.next() {
        let Some((_, function)) = line.split_once(": ") else {
            continue;
        };
        let at = lines.peek().and_then(|l| l.strip_prefix("at "));
        if let Some((_, file)) = at.and_then(|a| a.rsplit_once("/crates/")) {
            if out.is_empty() {
                out.push(format!("    {file}  ({function} → {callee})"));
            } else {
                out.push(format!("    {file}  ({function})"));
            }
        }
        callee = function;
    }
    if out.is_empty() {
        "    (no frame in crates/: tokio or std on its own)".to_owned()
    } else {
        out.join("\n")
    }
}

// ---------------------------------------------------------------------------------------------
// Breakwater in-process
// ---------------------------------------------------------------------------------------------

/// Breakwater's proxy on its own multi-thread runtime (two workers, as the binary has on this
/// two-core machine), accepting on a loopback port, in transaction mode against `app`.
pub struct InProcPooler {
    pub port: u16,
    proxy: Arc<Proxy>,
    // Last: dropping it stops every task, the accept loop and the sessions with it.
    runtime: tokio::runtime::Runtime,
}

impl InProcPooler {
    pub fn start(cluster: &testkit::PgCluster, pool_size: usize) -> anyhow::Result<InProcPooler> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("breakwater-worker")
            .on_thread_start(|| POOLER_THREAD.with(|f| f.set(true)))
            .enable_all()
            .build()
            .context("starting the pooler runtime")?;
        let proxy = Arc::new(Proxy::new(settings(cluster, pool_size)));
        // `block_on` runs on this (uncounted) thread; the accept loop and every session run on
        // the runtime's flagged workers.
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .context("binding the pooler's port")?;
        let port = listener.local_addr()?.port();
        let accepting = proxy.clone();
        runtime.spawn(async move {
            // As the binary's accept loop does, minus the admin console and shutdown.
            // The session's future is spawned as it is, as the binary does, so the task (and the
            // idle-memory test's count) is the size the binary's is.
            while let Ok((socket, addr)) = listener.accept().await {
                tokio::spawn(
                    // A listener the probe did not tune: the options are set per socket.
                    accepting.serve(
                        upstream::Stream::Tcp(socket),
                        proxy::Peer(Some(addr)),
                        false,
                    ),
                );
            }
        });
        Ok(InProcPooler {
            port,
            proxy,
            runtime,
        })
    }

    /// Clients connected right now.
    pub fn clients(&self) -> usize {
        self.proxy.client_count()
    }

    /// Transactions the pooler has seen end (checkout to release), over all pools.
    pub fn transactions(&self) -> u64 {
        self.proxy
            .pools()
            .iter()
            .map(|p| p.stats.xact_count.load(Ordering::Relaxed))
            .sum()
    }

    /// Checkouts so far and the microseconds clients spent waiting in them, over all pools.
    pub fn checkouts(&self) -> (u64, u64) {
        self.proxy.pools().iter().fold((0, 0), |(n, us), p| {
            (
                n + p.stats.wait_count.load(Ordering::Relaxed),
                us + p.stats.wait_time_us.total_us(),
            )
        })
    }
}

/// What `breakwater`'s config would give for this pooler.toml, with the binary's defaults for
/// everything else:
///
/// ```toml
/// [pooler]
/// pool_mode = "transaction"
/// auth_type = "trust"
/// [databases.app]
/// host = "127.0.0.1"; port = PG; user = "app"; password = "app_pw"; pool_size = POOL
/// ```
///
/// Clients log in with trust: what is measured is the steady state after login. Also unlike
/// the binary: `server_tls_sslmode` is `disable` (the binary's `prefer` falls back to plain
/// against the test kit's server anyway), no tracing subscriber is installed (at the
/// harness's `RUST_LOG=warn` the hot path records nothing either), and the 250 ms maintenance
/// tick does not run (it costs per tick, not per transaction).
fn settings(cluster: &testkit::PgCluster, pool_size: usize) -> ProxySettings {
    let secs = |s| Some(Duration::from_secs(s));
    let route = DatabaseRoute {
        name: "app".to_owned(),
        host: cluster.host().to_owned(),
        port: cluster.port(),
        hosts: vec![(cluster.host().to_owned(), cluster.port())],
        target_session_attrs: Default::default(),
        load_balance_hosts: Default::default(),
        dbname: "app".to_owned(),
        user: Some("app".to_owned()),
        password: Some("app_pw".to_owned()),
        pool_size,
        min_pool_size: 0,
        pool_mode: PoolMode::Transaction,
        max_db_connections: None,
        require_auth: Default::default(),
        server_auth: Default::default(),
        max_db_client_connections: 0,
        reserve_pool_size: 0,
        reserve_pool_timeout: None,
        auto: false,
        fleet: None,
        auth_query: None,
        startup_params: Vec::new(),
        connect_query: None,
    };
    ProxySettings {
        auth_type: AuthType::Trust,
        userlist: Default::default(),
        max_client_conn: 10_000,
        admission: Default::default(),
        admin_users: Vec::new(),
        stats_users: Vec::new(),
        client_login_timeout: secs(60),
        client_idle_timeout: None,
        query_wait_timeout: secs(120),
        idle_transaction_timeout: None,
        query_timeout: None,
        query_wait_notify: secs(5),
        server_unresponsive_timeout: secs(30),
        max_server_connections: None,
        storm: Default::default(),
        server_reset_query: "DISCARD ALL".to_owned(),
        max_message: proto::DEFAULT_MAX_MESSAGE,
        max_prepared_statements: 200,
        server: Default::default(),
        dns: Default::default(),
        client_tls: Default::default(),
        client_liveness: Default::default(),
        databases: vec![route],
        log_connections: false,
        log_disconnections: false,
        users: Default::default(),
        autodb_idle_timeout: None,
        auth_lookup: Default::default(),
    }
}

// ---------------------------------------------------------------------------------------------
// The client side
// ---------------------------------------------------------------------------------------------

/// What one client call sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// `simple_query("SELECT 1")`: Query.
    Simple,
    /// `simple_query` of 100 rows: one Query, 103 messages back (RowDescription, 100
    /// DataRows, CommandComplete, ReadyForQuery). An allocation per server message shows here
    /// as 100 per transaction.
    Rows,
    /// `query(&stmt)` on a statement prepared once per client: Bind, Execute, Sync (the
    /// pooler maps the client's name to its shared server statement).
    Prepared,
    /// `query_typed("SELECT 1")`: unnamed Parse, Bind, Describe, Execute, Sync in one round.
    Unnamed,
    /// `query("SELECT 1")` with a string: tokio-postgres prepares a fresh named statement
    /// (Parse, Describe, Sync), runs it (Bind, Execute, Sync) and closes it (Close, Sync,
    /// answered by the pooler): two pooler transactions per call.
    OneShotNamed,
    /// A new connection per call: startup, login (trust), `SELECT 1`, Terminate. What a
    /// connection storm costs per client, apart from the password check.
    Login,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::Simple,
        Workload::Rows,
        Workload::Prepared,
        Workload::Unnamed,
        Workload::OneShotNamed,
        Workload::Login,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Simple => "simple `SELECT 1`",
            Workload::Rows => "simple, 100 rows",
            Workload::Prepared => "extended, prepared once",
            Workload::Unnamed => "extended, unnamed",
            Workload::OneShotNamed => "extended, one-shot named",
            Workload::Login => "new connection per call",
        }
    }

    pub fn messages(self) -> &'static str {
        match self {
            Workload::Simple => "Q",
            Workload::Rows => "Q (103 back)",
            Workload::Prepared => "B E S",
            Workload::Unnamed => "P B D E S",
            Workload::OneShotNamed => "P D S, B E S, C S",
            Workload::Login => "startup, Q, X",
        }
    }
}

/// One client connection through the pooler, with its statement for [`Workload::Prepared`].
pub struct Client {
    client: tokio_postgres::Client,
    prepared: tokio_postgres::Statement,
    port: u16,
}

pub async fn connect(port: u16, n: usize) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, connection) = open(port).await?;
        tokio::spawn(connection);
        let prepared = client.prepare("SELECT 1").await?;
        clients.push(Client {
            client,
            prepared,
            port,
        });
    }
    Ok(clients)
}

async fn open(
    port: u16,
) -> anyhow::Result<(
    tokio_postgres::Client,
    impl std::future::Future<Output = ()>,
)> {
    let conn = format!("host=127.0.0.1 port={port} user=app password=app_pw dbname=app");
    let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
        .await
        .context("connecting to the in-process pooler")?;
    Ok((client, async move {
        let _ = connection.await;
    }))
}

async fn call(c: &Client, w: Workload) -> anyhow::Result<()> {
    match w {
        Workload::Simple => {
            c.client.simple_query("SELECT 1").await?;
        }
        Workload::Rows => {
            c.client
                .simple_query("SELECT generate_series(1, 100)")
                .await?;
        }
        Workload::Prepared => {
            c.client.query(&c.prepared, &[]).await?;
        }
        Workload::Unnamed => {
            c.client.query_typed("SELECT 1", &[]).await?;
        }
        Workload::OneShotNamed => {
            c.client.query("SELECT 1", &[]).await?;
        }
        Workload::Login => {
            let (client, connection) = open(c.port).await?;
            let connection = tokio::spawn(connection);
            client.simple_query("SELECT 1").await?;
            // Dropping the client sends Terminate; the connection task ends when the pooler
            // closes the socket.
            drop(client);
            connection.await?;
        }
    }
    Ok(())
}

/// Runs `calls` client calls of `w`, spread over `clients` running concurrently.
pub async fn run(clients: &[Client], w: Workload, calls: usize) -> anyhow::Result<()> {
    let per_client = calls.div_ceil(clients.len().max(1));
    let work = clients.iter().map(|c| async move {
        for _ in 0..per_client {
            call(c, w).await?;
        }
        anyhow::Ok(())
    });
    for r in futures_util::future::join_all(work).await {
        r?;
    }
    Ok(())
}

/// Allocations by pooler threads over one measured stretch.
#[derive(Clone, Debug)]
pub struct Sample {
    pub workload: Workload,
    pub clients: usize,
    pub calls: u64,
    /// Transactions the pooler ended (checkouts) in the stretch.
    pub transactions: u64,
    pub allocations: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// Mean time a checkout waited for a server: shows whether clients queued for the pool.
    pub wait_per_checkout: Duration,
}

impl Sample {
    pub fn per_call(&self) -> f64 {
        self.allocations as f64 / self.calls.max(1) as f64
    }
    pub fn per_transaction(&self) -> f64 {
        self.allocations as f64 / self.transactions.max(1) as f64
    }
    pub fn bytes_per_transaction(&self) -> f64 {
        self.bytes as f64 / self.transactions.max(1) as f64
    }
}

/// Warms up with `warmup` calls, then counts the pooler's allocations over `calls` more.
/// The calls are rounded up to a multiple of the client count.
pub async fn measure(
    pooler: &InProcPooler,
    clients: &[Client],
    w: Workload,
    warmup: usize,
    calls: usize,
) -> anyhow::Result<Sample> {
    run(clients, w, warmup).await?;
    // Let the pooler finish what the last replies set off (releases, the Close that dropping a
    // one-shot statement sends) before the counters are read.
    settle(pooler).await;
    let calls = calls.div_ceil(clients.len()) * clients.len();
    let xacts = pooler.transactions();
    let (checkouts, waited_us) = pooler.checkouts();
    let (count, bytes) = counters();
    let started = Instant::now();
    run(clients, w, calls).await?;
    settle(pooler).await;
    let elapsed = started.elapsed();
    let (count2, bytes2) = counters();
    let (checkouts2, waited_us2) = pooler.checkouts();
    Ok(Sample {
        workload: w,
        clients: clients.len(),
        calls: calls as u64,
        transactions: pooler.transactions() - xacts,
        allocations: count2 - count,
        bytes: bytes2 - bytes,
        elapsed,
        wait_per_checkout: Duration::from_micros(
            (waited_us2 - waited_us) / (checkouts2 - checkouts).max(1),
        ),
    })
}

/// Waits until the pooler's transaction count stops moving (a few milliseconds).
async fn settle(pooler: &InProcPooler) {
    let mut last = pooler.transactions();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = pooler.transactions();
        if now == last {
            return;
        }
        last = now;
    }
}

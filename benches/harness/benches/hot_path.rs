//! Micro-benchmarks of the pooler's hot path, on the real `proto` code: finding message
//! boundaries in a server's reply stream, parsing a startup packet, and a server-side SCRAM
//! verification. `cargo bench -p breakwater-bench` (add `-- frame` to run one group).
//!
//! A counting allocator wraps the system one, so the framing benchmarks also report how many
//! allocations scanning a reply costs: the hot path should make none per message.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proto::auth::{ScramClient, ScramServer, ScramVerifier, ServerCredential};
use proto::frame::{message_len, take_message};
use proto::startup::take_startup;
use proto::DEFAULT_MAX_MESSAGE;

struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; we only count.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    f();
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

const ROWS: usize = 1000;

/// What a server sends for a 1000-row SELECT of (int, text): DataRows, CommandComplete,
/// ReadyForQuery — the stream the pooler scans for ReadyForQuery while forwarding it.
fn reply_stream() -> BytesMut {
    let mut buf = BytesMut::new();
    for i in 0..ROWS {
        let id = i.to_string();
        let text = b"some row text of 24 b...";
        let body_len = 2 + 4 + id.len() + 4 + text.len();
        buf.put_u8(b'D');
        buf.put_u32((4 + body_len) as u32);
        buf.put_u16(2);
        buf.put_u32(id.len() as u32);
        buf.put_slice(id.as_bytes());
        buf.put_u32(text.len() as u32);
        buf.put_slice(text);
    }
    let tag = b"SELECT 1000\0";
    buf.put_u8(b'C');
    buf.put_u32((4 + tag.len()) as u32);
    buf.put_slice(tag);
    buf.put_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    buf
}

/// Scans with `message_len` only, as a forwarding loop does: returns the ReadyForQuery status.
fn scan_for_ready(buf: &[u8]) -> Option<u8> {
    let mut at = 0;
    let mut status = None;
    while let Ok(Some(len)) = message_len(&buf[at..], DEFAULT_MAX_MESSAGE) {
        if buf[at] == b'Z' {
            status = buf.get(at + 5).copied();
        }
        at += len;
    }
    status
}

fn take_all(mut buf: BytesMut) -> usize {
    let mut n = 0;
    while let Ok(Some(msg)) = take_message(&mut buf, DEFAULT_MAX_MESSAGE) {
        black_box(&msg);
        n += 1;
    }
    n
}

fn framing(c: &mut Criterion) {
    let stream = reply_stream();
    let messages = ROWS + 2;

    let scan_allocs = allocations_during(|| {
        black_box(scan_for_ready(&stream));
    });
    let copy = BytesMut::from(&stream[..]);
    let take_allocs = allocations_during(|| {
        black_box(take_all(copy));
    });
    println!(
        "allocations for {messages} messages: message_len scan {scan_allocs}, take_message {take_allocs}"
    );

    let mut group = c.benchmark_group("frame");
    group.throughput(Throughput::Elements(messages as u64));
    group.bench_function("message_len scan of 1000 DataRows", |b| {
        b.iter(|| scan_for_ready(black_box(&stream)))
    });
    group.bench_function("take_message of 1000 DataRows", |b| {
        b.iter_batched(
            || BytesMut::from(&stream[..]),
            take_all,
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// A StartupMessage with what libpq-based clients and JDBC typically send.
fn startup_packet() -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(0);
    buf.put_u32(196_608);
    for (k, v) in [
        ("user", "app"),
        ("database", "app"),
        ("application_name", "web-frontend"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("TimeZone", "UTC"),
        ("extra_float_digits", "2"),
    ] {
        buf.put_slice(k.as_bytes());
        buf.put_u8(0);
        buf.put_slice(v.as_bytes());
        buf.put_u8(0);
    }
    buf.put_u8(0);
    let len = buf.len() as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

fn startup(c: &mut Criterion) {
    let packet = startup_packet();
    c.bench_function("startup/take_startup (7 parameters)", |b| {
        b.iter_batched(
            || BytesMut::from(&packet[..]),
            |mut buf| take_startup(&mut buf),
            BatchSize::SmallInput,
        )
    });
}

/// One SCRAM exchange: what the pooler's server side does per client login, with a client that
/// needs no PBKDF2 (it holds the keys), so nearly all the time is the server's verification.
fn exchange(verifier: &ScramVerifier, credential: &ServerCredential) -> Option<ServerCredential> {
    let mut server = ScramServer::new(verifier.clone());
    let mut client = ScramClient::new(credential);
    let server_first = server.client_first(&client.client_first()).ok()?;
    let client_final = client.server_first(&server_first).ok()?;
    let server_final = server.client_final(&client_final).ok()?;
    client.server_final(&server_final).ok()?;
    server.server_credential()
}

fn scram(c: &mut Criterion) {
    let verifier = ScramVerifier::from_password("app_pw");
    let password = ServerCredential::Password("app_pw".to_owned());
    // The keys a client that knows the password proves; recovered from one real exchange.
    let keys = exchange(&verifier, &password).expect("a SCRAM exchange with the right password");

    let mut group = c.benchmark_group("scram");
    group.bench_function(
        "server verification (full exchange, client holds keys)",
        |b| b.iter(|| exchange(&verifier, &keys).expect("exchange")),
    );
    group.sample_size(20);
    group.bench_function(
        "full exchange, client runs PBKDF2 (4096 iterations) like libpq",
        |b| b.iter(|| exchange(&verifier, &password).expect("exchange")),
    );
    group.bench_function("verifier from a plaintext auth_file entry (PBKDF2)", |b| {
        b.iter(|| ScramVerifier::from_password(black_box("app_pw")))
    });
    group.finish();
}

/// Checking a warm server out of a pool and back in, against the test kit's PostgreSQL: what
/// every transaction pays for its server apart from the I/O (deadpool's semaphore and slot
/// list, the recycle hook's liveness check, the in-use flag). Skipped without PostgreSQL.
fn pool(c: &mut Criterion) {
    let pg = match testkit::PgCluster::start() {
        Ok(pg) => pg,
        Err(e) => {
            eprintln!("pool: skipped, no PostgreSQL for the test kit: {e:#}");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let hosts = upstream::Hosts::new(upstream::StormSettings::default());
    let list = Arc::new(upstream::HostList::new(
        hosts.get("127.0.0.1", pg.port()),
        Vec::new(),
        upstream::TargetSessionAttrs::Any,
        upstream::LoadBalanceHosts::Disable,
        Duration::from_millis(100),
    ));
    let target = upstream::ServerTarget {
        database: "app".into(),
        host: "127.0.0.1".into(),
        port: pg.port(),
        dbname: "app".into(),
        user: "app".into(),
        credential: Some(ServerCredential::Password("app_pw".into())),
        require_auth: Default::default(),
        startup_params: Vec::new(),
        connect_query: None,
        server_auth: Default::default(),
    };
    let wait = Some(Duration::from_secs(10));
    let mut alarm = upstream::Alarm::default();
    let connecting = upstream::ConnectFlag::default();
    let pool = rt.block_on(async {
        let pool = upstream::ServerPool::new(
            target,
            upstream::ServerSettings::default(),
            upstream::PoolSizes {
                size: 2,
                min_size: 0,
            },
            list,
            upstream::Limits::default(),
            Arc::new(stats::PoolStats::new("app", "app")),
            Arc::default(),
        );
        // The one login happens here, not in the measurement.
        drop(
            checkout_once(&pool, wait, &mut alarm, &connecting)
                .await
                .expect("first checkout"),
        );
        pool
    });
    c.bench_function("pool/checkout + checkin of a warm server", |b| {
        b.iter(|| {
            rt.block_on(async {
                let server = checkout_once(&pool, wait, &mut alarm, &connecting)
                    .await
                    .expect("checkout");
                drop(server);
            })
        })
    });
    assert_eq!(
        pool.status().size,
        1,
        "one warm server served every checkout: none was dropped or opened again"
    );
}

/// One checkout as a client's would be: started now, no notice timer, the default source.
async fn checkout_once(
    pool: &upstream::ServerPool,
    wait: Option<Duration>,
    alarm: &mut upstream::Alarm,
    connecting: &upstream::ConnectFlag,
) -> Result<upstream::PooledServer, upstream::CheckoutError> {
    pool.checkout(
        std::time::Instant::now(),
        wait,
        None,
        alarm,
        connecting,
        upstream::Source::default(),
    )
    .await
}

criterion_group!(benches, framing, startup, scram, pool);
criterion_main!(benches);

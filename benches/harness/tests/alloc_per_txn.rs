//! CI's guard on the hot path's allocations: Breakwater in-process on a real PostgreSQL, one
//! client, a couple of thousand transactions per case, and a bound on the allocations the
//! pooler's threads make per transaction. The full table is `cargo bench -p breakwater-bench
//! --bench alloc_per_txn` (see benches/README.md).

#[path = "../common/alloc_probe.rs"]
mod alloc_probe;

use alloc_probe::{InProcPooler, Workload};

/// Measured: 0.000 allocations per transaction in each case below, in debug and release builds
/// alike (the reply queue a checkout needs is handed from one transaction to the next). A
/// transaction here carries 5 messages (`SELECT 1`: Query; RowDescription, DataRow,
/// CommandComplete, ReadyForQuery back), 103 (100 rows) or 7 (prepared: Bind, Execute, Sync;
/// BindComplete, DataRow, CommandComplete, ReadyForQuery), so an allocation per message would
/// put these at 5, 103 or 7, and one per transaction at 1. The bound sits at 0.5 so that either
/// fails, while the rare amortized ones (a buffer growing, a tokio slab page) that a couple of
/// thousand transactions share do not.
const MAX_ALLOCATIONS_PER_TRANSACTION: f64 = 0.5;

const WARMUP: usize = 500;
const CALLS: usize = 2_000;

/// The probe's counters are per process: every pooler runtime's threads count into them. So
/// the tests here run one at a time; `cargo test` runs them on parallel threads of one process,
/// and one test's logins then showed up as the other's allocations per transaction (nextest,
/// the README's test command, runs each test in a process of its own).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A PostgreSQL, Breakwater in-process in front of it (pool size 2), a runtime for the client
/// side and one connected client; the first holds the other tests off.
fn start() -> (
    std::sync::MutexGuard<'static, ()>,
    testkit::PgCluster,
    InProcPooler,
    tokio::runtime::Runtime,
    Vec<alloc_probe::Client>,
) {
    let turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cluster = testkit::PgCluster::start().unwrap();
    let pooler = InProcPooler::start(&cluster, 2).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let clients = rt.block_on(alloc_probe::connect(pooler.port, 1)).unwrap();
    (turn, cluster, pooler, rt, clients)
}

#[test]
fn steady_state_transactions_allocate_at_most_once_and_never_per_message() {
    let (_turn, _cluster, pooler, rt, clients) = start();
    for w in [Workload::Simple, Workload::Rows, Workload::Prepared] {
        let s = rt
            .block_on(alloc_probe::measure(&pooler, &clients, w, WARMUP, CALLS))
            .unwrap();
        eprintln!(
            "{}: {} allocations, {} bytes over {} transactions",
            w.name(),
            s.allocations,
            s.bytes,
            s.transactions
        );
        assert_eq!(
            s.transactions,
            CALLS as u64,
            "{}: one pooler transaction per call",
            w.name()
        );
        assert!(
            s.per_transaction() <= MAX_ALLOCATIONS_PER_TRANSACTION,
            "{}: {:.3} allocations per transaction by the pooler's threads (bound {}); \
             `BW_ALLOC_TRACE=1 cargo bench -p breakwater-bench --bench alloc_per_txn` shows where",
            w.name(),
            s.per_transaction(),
            MAX_ALLOCATIONS_PER_TRANSACTION
        );
    }
}

/// Measured (release, 2026-12-06): 17 allocations and about 8 400 bytes per login plus one
/// `SELECT 1` and Terminate, one client at a time. It was 23 (10 400 bytes) while the startup
/// packet was split off its buffer, the login future had a box of its own inside the boxed
/// log_in, and the peer address and the registry's user and database were copied strings; 27
/// while the client's tracked parameters were built by growing a string; 29 and 14 600 bytes
/// before the client's read buffer went back to the workspace on Terminate (a fresh 4 KiB
/// buffer per login); and 38 before the pool's welcome was shared. The bounds catch any of
/// those coming back; a connection storm is made of nothing but logins. 12.0 (debug build,
/// 2026-12-07) once the startup packet was one allocation and the registry took the user and
/// database names by reference.
const MAX_ALLOCATIONS_PER_LOGIN: f64 = 14.0;
/// Bytes: 9 998 after auth_query, LISTEN and fair waiting (2026-12-07); 10 046 – 10 053 after
/// RDS IAM's route and target fields; 7 582 (debug build, 2026-12-07) once the login's future
/// no longer held the password exchanges, the cancel forwarding and a second copy of itself
/// (`within`): 3 208 bytes less in a release build; 7 225 (debug build, 2026-12-07) with the
/// startup packet in one allocation. The bound catches the regressions above (each thousands
/// of bytes), not a field's worth.
const MAX_BYTES_PER_LOGIN: f64 = 8_192.0;

#[test]
fn a_login_allocates_a_bounded_few_times_and_reuses_the_read_buffer() {
    let (_turn, _cluster, pooler, rt, clients) = start();
    let s = rt
        .block_on(alloc_probe::measure(
            &pooler,
            &clients,
            Workload::Login,
            100,
            500,
        ))
        .unwrap();
    eprintln!(
        "logins: {} allocations, {} bytes over {} transactions",
        s.allocations, s.bytes, s.transactions
    );
    assert_eq!(s.transactions, 500, "one pooler transaction per login");
    assert!(
        s.per_transaction() <= MAX_ALLOCATIONS_PER_LOGIN,
        "{:.1} allocations per login (bound {MAX_ALLOCATIONS_PER_LOGIN})",
        s.per_transaction()
    );
    assert!(
        s.bytes_per_transaction() <= MAX_BYTES_PER_LOGIN,
        "{:.0} bytes allocated per login (bound {MAX_BYTES_PER_LOGIN})",
        s.bytes_per_transaction()
    );
}

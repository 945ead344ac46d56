//! CI's guard on what an idle client costs: Breakwater in-process on a real PostgreSQL, a
//! couple of thousand clients that log in (and, in the second case, run one transaction) and
//! then sit idle, and a bound on the heap each one holds, by glibc's own count of the bytes in
//! use (`mallinfo2`, chunk headers included). The harness's memory test (`breakwater-bench
//! --only memory`) measures the same through RSS against PgBouncer.

#[path = "../common/alloc_probe.rs"]
mod alloc_probe;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Measured (2026-12-07, after the idle-memory changes of that morning): 1 278 bytes per idle
/// client after login and 1 242 after a transaction (a 256-byte task, tokio's 256-byte I/O
/// registration, the 320-byte session, the 296-byte SHOW CLIENTS row with the cancel slot,
/// the tracked parameters' values, glibc's chunk headers). 1 796 and 1 722 on 2026-12-06
/// (a 640-byte task), 1 944 and 1 870 while the session carried an empty transaction
/// scratch inline; before idle clients stopped carrying the Active state and read buffers,
/// 6 300 bytes, and 6 000 more after a transaction. The bound leaves room for allocator
/// noise, not for a buffer or a transaction's future per client. (This process uses glibc
/// alone; the binary packs tokio's blocks, see `breakwater::blocks`, which the harness's
/// memory test sees.)
const MAX_BYTES_PER_IDLE_CLIENT: f64 = 1_600.0;

const CLIENTS: usize = 2_000;

fn heap_in_use() -> usize {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    unsafe { libc::mallinfo2().uordblks }
}

/// Sends `packet` and reads until the ReadyForQuery that ends the reply.
fn round_trip(s: &mut TcpStream, packet: &[u8]) {
    s.write_all(packet).unwrap();
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while !(reply.len() >= 6 && reply[reply.len() - 6] == b'Z') {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the pooler closed the connection");
        reply.extend_from_slice(&chunk[..n]);
    }
}

fn idle_client(port: u16, work: bool) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut startup = vec![0, 0, 0, 0, 0, 3, 0, 0];
    for field in ["user", "app", "database", "app", ""] {
        startup.extend_from_slice(field.as_bytes());
        startup.push(0);
    }
    let len = startup.len() as u32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    round_trip(&mut s, &startup);
    if work {
        let sql = b"SELECT 1\0";
        let mut query = vec![b'Q'];
        query.extend_from_slice(&(sql.len() as u32 + 4).to_be_bytes());
        query.extend_from_slice(sql);
        round_trip(&mut s, &query);
    }
    s
}

/// Waits until the pooler has no client left, so what it freed is not counted against the
/// next ones.
fn wait_for_no_clients(pooler: &alloc_probe::InProcPooler) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pooler.clients() > 0 {
        assert!(std::time::Instant::now() < deadline, "clients never left");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the pooler has settled: the last sessions give their login buffers (and, after
/// a transaction, their workspace) back just after the client has read the last
/// ReadyForQuery. Nothing else allocates in this process meanwhile (idle sessions have no
/// timers; the client side is this thread), so the heap in use holding still across
/// consecutive reads means they are done.
fn heap_once_settled() -> usize {
    const STILL_READS: usize = 3;
    let mut last = heap_in_use();
    let mut still = 0;
    testkit::wait_until_blocking(
        "the pooler's heap to stop changing",
        Duration::from_secs(10),
        || {
            let now = heap_in_use();
            still = if now == last { still + 1 } else { 0 };
            last = now;
            still >= STILL_READS
        },
    )
    .unwrap();
    last
}

fn bytes_per_idle_client(pooler: &alloc_probe::InProcPooler, work: bool) -> f64 {
    wait_for_no_clients(pooler);
    let before = heap_once_settled();
    let xacts = pooler.transactions();
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| idle_client(pooler.port, work))
        .collect();
    if work {
        // Every session has given its server back (the workspace follows at once).
        testkit::wait_until_blocking(
            "every client's transaction to end",
            Duration::from_secs(10),
            || pooler.transactions() - xacts >= CLIENTS as u64,
        )
        .unwrap();
    }
    let per_client = (heap_once_settled() as f64 - before as f64) / CLIENTS as f64;
    drop(clients);
    per_client
}

#[test]
fn an_idle_client_holds_no_buffers_and_no_room_for_a_transaction() {
    let cluster = testkit::PgCluster::start().unwrap();
    let pooler = alloc_probe::InProcPooler::start(&cluster, 2).unwrap();
    // Warm-up: the pool's server connection, the runtime, a workspace, the registries.
    drop(idle_client(pooler.port, true));
    for work in [false, true] {
        let per_client = bytes_per_idle_client(&pooler, work);
        let case = if work {
            "after one transaction"
        } else {
            "after login"
        };
        eprintln!("idle {case}: {per_client:.0} bytes of heap per client");
        assert!(
            per_client <= MAX_BYTES_PER_IDLE_CLIENT,
            "idle {case}: {per_client:.0} bytes of heap per client (bound {MAX_BYTES_PER_IDLE_CLIENT})"
        );
    }
}

//! Does Breakwater's hot path allocate per message in steady state? Runs the proxy in-process on
//! a real PostgreSQL and counts the allocations its own threads make per transaction, for
//! simple and extended-protocol queries, with one client and with eight clients on a pool of
//! two (so checkouts wait). The client (tokio-postgres) runs on another runtime and is not
//! counted.
//!
//! `cargo bench -p breakwater-bench --bench alloc_per_txn` (about 20 seconds after the build);
//! `-- --calls 5000` for a shorter run, `-- --only connection` for one workload. With `BW_ALLOC_TRACE=1` it then repeats each case with
//! a backtrace per allocation and prints where in `crates/` they come from.

#[path = "../common/alloc_probe.rs"]
mod alloc_probe;

use alloc_probe::{InProcPooler, Sample, Workload};
use anyhow::Context;

const POOL_SIZE: usize = 2;
const WARMUP: usize = 2_000;
const CALLS: usize = 20_000;
/// Calls per case when tracing: each allocation's backtrace is slow to take.
const TRACE_CALLS: usize = 500;

fn main() -> anyhow::Result<()> {
    let mut calls = CALLS;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    // `cargo bench` passes `--bench`; that and anything else but `--calls` is not ours.
    while let Some(arg) = args.next() {
        if arg == "--calls" {
            calls = args
                .next()
                .context("--calls needs a number")?
                .parse()
                .context("--calls needs a number")?;
        } else if arg == "--only" {
            only = Some(
                args.next()
                    .context("--only needs part of a workload's name")?,
            );
        }
    }
    let trace = std::env::var_os("BW_ALLOC_TRACE").is_some_and(|v| v != "0" && !v.is_empty());

    eprintln!("== starting PostgreSQL");
    let cluster = testkit::PgCluster::start()?;
    let pooler = InProcPooler::start(&cluster, POOL_SIZE)?;
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let mut samples = Vec::new();
    for n_clients in [1, 8] {
        let clients = client_rt.block_on(alloc_probe::connect(pooler.port, n_clients))?;
        for w in Workload::ALL {
            if only.as_deref().is_some_and(|o| !w.name().contains(o)) {
                continue;
            }
            let s =
                client_rt.block_on(alloc_probe::measure(&pooler, &clients, w, WARMUP, calls))?;
            eprintln!(
                "   {:<26} {n_clients} client(s): {:.3} allocations per transaction",
                w.name(),
                s.per_transaction()
            );
            if trace {
                alloc_probe::set_tracing(true);
                let t =
                    client_rt.block_on(alloc_probe::measure(&pooler, &clients, w, 0, TRACE_CALLS));
                alloc_probe::set_tracing(false);
                print_sites(&t?);
            }
            samples.push(s);
        }
    }
    print_table(&samples, calls);
    Ok(())
}

fn print_table(samples: &[Sample], calls: usize) {
    println!(
        "\nAllocations by Breakwater's threads (in-process, transaction mode, pool size {POOL_SIZE}), \
         {calls} calls per case after {WARMUP} warm-up calls:\n"
    );
    println!("| query | messages | clients | pooler txns | allocs / txn | bytes / txn | allocs / call | calls/s | µs waited per checkout |");
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for s in samples {
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.1} | {:.3} | {:.0} | {} |",
            s.workload.name(),
            s.workload.messages(),
            s.clients,
            s.transactions,
            s.per_transaction(),
            s.bytes_per_transaction(),
            s.per_call(),
            s.calls as f64 / s.elapsed.as_secs_f64(),
            s.wait_per_checkout.as_micros(),
        );
    }
}

fn print_sites(s: &Sample) {
    let sites = alloc_probe::take_sites();
    println!(
        "\n{} with {} client(s): {} allocations over {} calls ({} pooler transactions), by site:",
        s.workload.name(),
        s.clients,
        s.allocations,
        s.calls,
        s.transactions
    );
    for (n, site) in sites.iter().take(30) {
        println!("  {n} ×\n{site}");
    }
}

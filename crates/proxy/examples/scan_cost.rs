//! What the session-state detection costs per message: the text scan of a Query/Parse and the
//! CommandComplete tag check. `cargo run --release -p breakwater-proxy --example scan_cost`

use std::hint::black_box;
use std::time::Instant;

use proxy::scan::{tag_leaves_state, text_may_leave_state};

fn per_call(name: &str, n: u32, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    let mut hits = 0u32;
    for _ in 0..n {
        hits += black_box(f()) as u32;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<60} {ns:>7.1} ns/call (hits {hits})");
}

fn main() {
    let n = 5_000_000;
    let select = b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;".to_vec();
    let tpcb = b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;".to_vec();
    let long = b"SELECT o.id, o.created_at, c.name, sum(l.amount) FROM orders o JOIN customers c ON c.id = o.customer_id JOIN lines l ON l.order_id = o.id WHERE o.created_at > now() - interval '1 day' GROUP BY 1, 2, 3 ORDER BY 2 DESC LIMIT 50".to_vec();
    per_call("text scan, pgbench -S query (54 B)", n, || {
        text_may_leave_state(black_box(&select))
    });
    per_call("text scan, pgbench TPC-B update (68 B)", n, || {
        text_may_leave_state(black_box(&tpcb))
    });
    per_call("text scan, 250 B reporting query", n, || {
        text_may_leave_state(black_box(&long))
    });
    per_call("tag check, \"SELECT 1\"", n, || {
        tag_leaves_state(black_box(b"SELECT 1"))
    });
    per_call("tag check, \"SET\"", n, || {
        tag_leaves_state(black_box(b"SET"))
    });
}

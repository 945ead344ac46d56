//! Publishing snapshots to the `metrics` registry (and so to Prometheus). Called from a periodic
//! task in the binary with absolute values, so the data path never touches the registry.

use metrics::{counter, gauge};

use crate::{GlobalSnapshot, HostSnapshot, PoolSnapshot};

/// Server-side gauges for one pool, which live in the pool rather than in [`PoolStats`].
///
/// [`PoolStats`]: crate::PoolStats
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerGauges {
    pub active: u64,
    pub idle: u64,
    pub size: u64,
    pub max_size: u64,
    pub paused: bool,
    /// How long the longest-waiting client has waited, in microseconds.
    pub maxwait_us: u64,
}

fn secs(us: u64) -> f64 {
    us as f64 / 1_000_000.0
}

/// Sets every series of one pool. `earlier` is the snapshot at the start of the current
/// `stats_period`; quantiles are taken over that period (over the lifetime without it).
pub fn publish_pool(s: &PoolSnapshot, earlier: Option<&PoolSnapshot>, servers: &ServerGauges) {
    let labels = [("database", s.database.clone()), ("user", s.user.clone())];
    macro_rules! g {
        ($name:literal, $v:expr) => {
            gauge!($name, &labels).set($v as f64)
        };
        ($name:literal, $v:expr, $k:literal => $kv:literal) => {{
            let mut l = labels.to_vec();
            l.push(($k, $kv.to_string()));
            gauge!($name, &l).set($v as f64)
        }};
    }
    macro_rules! c {
        ($name:literal, $v:expr) => {
            counter!($name, &labels).absolute($v)
        };
        ($name:literal, $v:expr, $k:literal => $kv:literal) => {{
            let mut l = labels.to_vec();
            l.push(($k, $kv.to_string()));
            counter!($name, &l).absolute($v)
        }};
    }
    // The data path counts a waiting client as idle too; here every client is in one state.
    let waiting = s.cl_waiting.max(0);
    g!("breakwater_clients", s.cl_active.max(0), "state" => "active");
    g!("breakwater_clients", waiting, "state" => "waiting");
    g!("breakwater_clients", (s.cl_idle - waiting).max(0), "state" => "idle");
    g!("breakwater_servers", servers.active, "state" => "active");
    g!("breakwater_servers", servers.idle, "state" => "idle");
    g!("breakwater_pool_size", servers.max_size);
    g!("breakwater_pool_paused", u8::from(servers.paused));
    g!(
        "breakwater_client_maxwait_seconds",
        secs(servers.maxwait_us)
    );

    c!("breakwater_transactions_total", s.xact_count);
    c!("breakwater_queries_total", s.query_count);
    c!("breakwater_received_bytes_total", s.bytes_received);
    c!("breakwater_sent_bytes_total", s.bytes_sent);
    c!("breakwater_server_assignments_total", s.wait_count);
    c!("breakwater_client_logins_total", s.client_logins);
    c!("breakwater_server_resets_total", s.server_resets);
    c!("breakwater_client_parses_total", s.client_parse_count);
    c!("breakwater_server_parses_total", s.server_parse_count);
    c!("breakwater_binds_total", s.bind_count);
    c!("breakwater_server_connects_total", s.server_connects, "outcome" => "ok");
    c!("breakwater_server_connects_total", s.connect_refused, "outcome" => "refused");
    c!("breakwater_server_connects_total", s.connect_timeouts, "outcome" => "connect_timeout");
    c!("breakwater_server_connects_total", s.login_timeouts, "outcome" => "login_timeout");
    c!(
        "breakwater_server_connect_failures_total",
        s.server_connect_failures
    );
    c!("breakwater_pool_timeouts_total", s.wait_timeouts, "kind" => "query_wait_timeout");
    c!("breakwater_pool_timeouts_total", s.connect_timeouts, "kind" => "server_connect_timeout");
    c!("breakwater_pool_timeouts_total", s.login_timeouts, "kind" => "server_login_timeout");

    let p = s.percentiles(earlier);
    let times = [
        (
            "breakwater_client_wait_seconds",
            p.wait_p50,
            p.wait_p99,
            s.wait_time_us,
            s.wait_hist.count(),
        ),
        (
            "breakwater_transaction_seconds",
            p.xact_p50,
            p.xact_p99,
            s.xact_time_us,
            s.xact_hist.count(),
        ),
        (
            "breakwater_query_seconds",
            p.query_p50,
            p.query_p99,
            s.query_time_us,
            s.query_hist.count(),
        ),
        (
            "breakwater_server_connect_seconds",
            p.connect_p50,
            p.connect_p99,
            s.connect_time_us,
            s.connect_hist.count(),
        ),
    ];
    for (name, p50, p99, sum, count) in times {
        for (q, v) in [("0.5", p50), ("0.99", p99)] {
            let mut l = labels.to_vec();
            l.push(("quantile", q.to_string()));
            gauge!(name, &l).set(secs(v));
        }
        gauge!(format!("{name}_sum"), &labels).set(secs(sum));
        counter!(format!("{name}_count"), &labels).absolute(count);
    }
}

/// Sets one upstream host's storm series.
pub fn publish_host(h: &HostSnapshot) {
    let host = ("host", h.host.clone());
    counter!(
        "breakwater_host_connect_attempts_total",
        std::slice::from_ref(&host)
    )
    .absolute(h.attempts);
    counter!(
        "breakwater_host_connect_successes_total",
        std::slice::from_ref(&host)
    )
    .absolute(h.successes);
    for (phase, failures, timeouts) in [
        ("dns", h.failures_dns, h.timeouts_dns),
        ("connect", h.failures_connect, h.timeouts_connect),
        ("login", h.failures_login, h.timeouts_login),
    ] {
        let l = [host.clone(), ("phase", phase.to_string())];
        counter!("breakwater_host_connect_failures_total", &l).absolute(failures);
        counter!("breakwater_host_connect_timeouts_total", &l).absolute(timeouts);
    }
    counter!(
        "breakwater_host_fast_failures_total",
        std::slice::from_ref(&host)
    )
    .absolute(h.fast_failures);
    counter!(
        "breakwater_host_breaker_opens_total",
        std::slice::from_ref(&host)
    )
    .absolute(h.breaker_opens);
    for state in ["closed", "open", "half-open"] {
        let l = [host.clone(), ("state", state.to_string())];
        gauge!("breakwater_host_breaker", &l).set(f64::from(u8::from(h.breaker == state)));
    }
    for mode in ["blackhole", "refuse", "slow"] {
        let l = [host.clone(), ("mode", mode.to_string())];
        gauge!("breakwater_host_drill", &l).set(f64::from(u8::from(h.drill == mode)));
    }
    counter!("breakwater_host_drills_total", std::slice::from_ref(&host)).absolute(h.drills);
}

/// Sets the process-wide series.
pub fn publish_global(g: &GlobalSnapshot, clients_current: u64) {
    counter!("breakwater_clients_accepted_total").absolute(g.clients_total);
    counter!("breakwater_login_failures_total").absolute(g.login_failures);
    counter!("breakwater_protocol_errors_total").absolute(g.protocol_errors);
    counter!("breakwater_refused_max_client_conn_total").absolute(g.refused_max_client_conn);
    counter!("breakwater_cancel_requests_total").absolute(g.cancel_requests);
    counter!("breakwater_clients_left_waiting_total").absolute(g.clients_left_waiting);
    counter!("breakwater_admin_logins_total").absolute(g.admin_logins);
    gauge!("breakwater_client_connections").set(clients_current as f64);
    for (kind, n) in [
        ("query_wait_timeout", g.timeouts_query_wait),
        ("client_login_timeout", g.timeouts_client_login),
        ("client_idle_timeout", g.timeouts_client_idle),
        ("idle_transaction_timeout", g.timeouts_idle_transaction),
        ("query_timeout", g.timeouts_query),
        (
            "server_unresponsive_timeout",
            g.timeouts_server_unresponsive,
        ),
    ] {
        counter!("breakwater_timeouts_total", "kind" => kind).absolute(n);
    }
    for (class, n) in &g.client_errors {
        counter!("breakwater_client_errors_total", "class" => *class).absolute(*n);
    }
}

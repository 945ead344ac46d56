//! Publishing snapshots to the `metrics` registry (and so to Prometheus). Called from a periodic
//! task in the binary with absolute values, so the data path never touches the registry.
//!
//! Some series are rendered as text at scrape time instead ([`render_histograms`],
//! [`render_clients_by_application`], [`render_process`]): the latency histograms come from
//! the pools' own bucket counts (the registry's histograms take one sample at a time), and
//! series whose label values come and go must not linger in the registry once gone.

use std::fmt::Write;

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};

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
    /// Connections beyond `pool_size` the reserve lets the pool have now.
    pub reserve_in_use: u64,
    pub paused: bool,
    /// How long the longest-waiting client has waited, in microseconds.
    pub maxwait_us: u64,
}

fn secs(us: u64) -> f64 {
    us as f64 / 1_000_000.0
}

/// Sets every registry series of one pool (its latency histograms are rendered at scrape time).
pub fn publish_pool(s: &PoolSnapshot, servers: &ServerGauges) {
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
    // Every client is in exactly one of the three (the session's `enter` moves it).
    g!("breakwater_clients", s.cl_active.max(0), "state" => "active");
    g!("breakwater_clients", s.cl_waiting.max(0), "state" => "waiting");
    g!("breakwater_clients", s.cl_idle.max(0), "state" => "idle");
    g!("breakwater_servers", servers.active, "state" => "active");
    g!("breakwater_servers", servers.idle, "state" => "idle");
    g!("breakwater_servers", s.sv_login.max(0), "state" => "login");
    g!("breakwater_pool_size", servers.max_size);
    g!("breakwater_pool_reserve_in_use", servers.reserve_in_use);
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
    c!("breakwater_pool_reserve_used_total", s.reserve_used);
    g!("breakwater_listen_clients", s.listen_clients.max(0));
    g!("breakwater_listen_channels", s.listen_channels.max(0));
    c!("breakwater_notifications_total", s.notifications_sent, "outcome" => "queued");
    c!("breakwater_notifications_total", s.notifications_dropped, "outcome" => "dropped");
    c!(
        "breakwater_listener_reconnects_total",
        s.listener_reconnects
    );
    c!("breakwater_pool_timeouts_total", s.wait_timeouts, "kind" => "query_wait_timeout");
    c!("breakwater_pool_timeouts_total", s.connect_timeouts, "kind" => "server_connect_timeout");
    c!("breakwater_pool_timeouts_total", s.login_timeouts, "kind" => "server_login_timeout");
    // Every reason, zeros included, so a rate over any reason is defined from the start.
    for (reason, n) in crate::CloseReason::ALL.into_iter().zip(s.server_closes) {
        let mut l = labels.to_vec();
        l.push(("reason", reason.as_str().to_string()));
        counter!("breakwater_server_closes_total", &l).absolute(n);
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
    counter!(
        "breakwater_host_auth_refused_total",
        std::slice::from_ref(&host)
    )
    .absolute(h.auth_refused);
    counter!(
        "breakwater_host_rds_iam_tokens_total",
        std::slice::from_ref(&host)
    )
    .absolute(h.rds_iam_tokens);
    counter!(
        "breakwater_host_rds_iam_failures_total",
        std::slice::from_ref(&host)
    )
    .absolute(h.rds_iam_failures);
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
    for (limit, n) in [
        (
            "max_user_client_connections",
            g.refused_max_user_client_connections,
        ),
        (
            "max_db_client_connections",
            g.refused_max_db_client_connections,
        ),
    ] {
        counter!("breakwater_refused_client_limit_total", "limit" => limit).absolute(n);
    }
    for (limit, n) in [
        ("max_client_conn_per_addr", g.refused_client_conn_per_addr),
        ("client_login_rate_per_addr", g.refused_client_login_rate),
    ] {
        counter!("breakwater_refused_per_addr_total", "limit" => limit).absolute(n);
    }
    counter!("breakwater_cancel_requests_total").absolute(g.cancel_requests);
    counter!("breakwater_auth_query_lookups_total").absolute(g.auth_query_lookups);
    counter!("breakwater_auth_query_cache_hits_total").absolute(g.auth_query_cache_hits);
    counter!("breakwater_auth_query_failures_total").absolute(g.auth_query_failures);
    counter!("breakwater_clients_left_waiting_total").absolute(g.clients_left_waiting);
    counter!("breakwater_clients_lost_total").absolute(g.clients_lost);
    counter!("breakwater_admin_logins_total").absolute(g.admin_logins);
    gauge!("breakwater_client_connections").set(clients_current as f64);
    gauge!("breakwater_clients_parked").set(g.clients_parked as f64);
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

/// HELP text for every series in the registry; call once after installing the recorder.
pub fn describe() {
    use Unit::{Bytes, Count, Seconds};
    for (name, unit, help) in [
        ("breakwater_clients", Count, "Clients logged in to the pool, by state: active (holding or using a server), waiting (queued for one), idle."),
        ("breakwater_servers", Count, "Server connections of the pool, by state: active (checked out), idle (in the pool), login (being opened)."),
        ("breakwater_pool_size", Count, "Most server connections the pool may open (pool_size)."),
        ("breakwater_pool_reserve_in_use", Count, "Server connections beyond pool_size the reserve (reserve_pool_size) lets the pool have now."),
        ("breakwater_pool_paused", Count, "1 while the pool is paused (PAUSE), else 0."),
        ("breakwater_client_maxwait_seconds", Seconds, "How long the longest-waiting client of the pool has waited for a server."),
        ("breakwater_client_connections", Count, "Client connections open now, logged in or not."),
        ("breakwater_clients_parked", Count, "Idle clients parked without a task of their own (after a second or two of silence)."),
        ("breakwater_host_breaker", Count, "1 for the circuit breaker state the upstream host is in (closed, open, half-open)."),
        ("breakwater_host_drill", Count, "1 for the failure drill mode in force on the upstream host (DRILL), else 0."),
    ] {
        describe_gauge!(name, unit, help);
    }
    for (name, unit, help) in [
        (
            "breakwater_transactions_total",
            Count,
            "Transactions served (a server held from checkout to release).",
        ),
        ("breakwater_queries_total", Count, "Queries served."),
        (
            "breakwater_received_bytes_total",
            Bytes,
            "Bytes received from clients.",
        ),
        (
            "breakwater_sent_bytes_total",
            Bytes,
            "Bytes sent to clients.",
        ),
        (
            "breakwater_server_assignments_total",
            Count,
            "Times a client was given a server connection (checkouts).",
        ),
        (
            "breakwater_client_logins_total",
            Count,
            "Clients that logged in to the pool.",
        ),
        (
            "breakwater_server_resets_total",
            Count,
            "Server connections reset because a client left session state behind.",
        ),
        (
            "breakwater_client_parses_total",
            Count,
            "Parse messages clients sent for named prepared statements.",
        ),
        (
            "breakwater_server_parses_total",
            Count,
            "Parse messages sent to servers (a client's, or one prepared again before a Bind).",
        ),
        (
            "breakwater_binds_total",
            Count,
            "Bind messages of named prepared statements.",
        ),
        (
            "breakwater_server_connects_total",
            Count,
            "Server connection attempts by outcome: ok, refused, connect_timeout, login_timeout.",
        ),
        (
            "breakwater_server_connect_failures_total",
            Count,
            "Server connection attempts that failed, in any phase.",
        ),
        (
            "breakwater_server_closes_total",
            Count,
            "Server connections closed, by reason (as SHOW SERVER_CLOSES).",
        ),
        (
            "breakwater_pool_timeouts_total",
            Count,
            "Timeouts of the pool by setting.",
        ),
        (
            "breakwater_pool_reserve_used_total",
            Count,
            "Times a client that waited reserve_pool_timeout made the pool one connection larger.",
        ),
        (
            "breakwater_listen_clients",
            Count,
            "Clients listening to a channel through the pool's listener connection (transaction and statement mode).",
        ),
        (
            "breakwater_listen_channels",
            Count,
            "Channels the pool's listener connection listens to for its clients.",
        ),
        (
            "breakwater_notifications_total",
            Count,
            "Notifications fanned out to listening clients: queued for a client, or dropped (the oldest of a full inbox).",
        ),
        (
            "breakwater_listener_reconnects_total",
            Count,
            "Times the pool's listener connection was lost (it reconnects and listens again).",
        ),
        (
            "breakwater_host_connect_attempts_total",
            Count,
            "Connection attempts the upstream host's storm controls admitted.",
        ),
        (
            "breakwater_host_connect_successes_total",
            Count,
            "Connection attempts to the upstream host that logged in.",
        ),
        (
            "breakwater_host_connect_failures_total",
            Count,
            "Failed connection attempts to the upstream host, by phase (dns, connect, login).",
        ),
        (
            "breakwater_host_connect_timeouts_total",
            Count,
            "Connection attempts to the upstream host that timed out, by phase.",
        ),
        (
            "breakwater_host_fast_failures_total",
            Count,
            "Checkouts failed at once because the upstream host was known to be down.",
        ),
        (
            "breakwater_host_breaker_opens_total",
            Count,
            "Times the upstream host's circuit breaker opened.",
        ),
        (
            "breakwater_host_auth_refused_total",
            Count,
            "Server logins abandoned because the server asked for a method server_require_auth refuses.",
        ),
        (
            "breakwater_host_rds_iam_tokens_total",
            Count,
            "RDS IAM tokens signed for logins to the upstream host (server_auth = \"rds_iam\").",
        ),
        (
            "breakwater_host_rds_iam_failures_total",
            Count,
            "Logins to the upstream host that could not get an RDS IAM token (no AWS credentials).",
        ),
        (
            "breakwater_host_drills_total",
            Count,
            "Failure drills started on the upstream host.",
        ),
        (
            "breakwater_clients_accepted_total",
            Count,
            "Client connections accepted.",
        ),
        (
            "breakwater_login_failures_total",
            Count,
            "Client logins refused (bad password, unknown user or database, ...).",
        ),
        (
            "breakwater_protocol_errors_total",
            Count,
            "Client connections closed for a protocol violation.",
        ),
        (
            "breakwater_refused_max_client_conn_total",
            Count,
            "Client connections refused by max_client_conn.",
        ),
        (
            "breakwater_refused_client_limit_total",
            Count,
            "Client logins refused by max_user_client_connections or max_db_client_connections (label limit).",
        ),
        (
            "breakwater_refused_per_addr_total",
            Count,
            "Client logins refused by a per-source-address limit, by limit.",
        ),
        (
            "breakwater_cancel_requests_total",
            Count,
            "Cancel requests received.",
        ),
        (
            "breakwater_clients_left_waiting_total",
            Count,
            "Clients that closed their connection while queued for a server.",
        ),
        (
            "breakwater_clients_lost_total",
            Count,
            "Client connections that broke (reset, or keepalive gave up) while holding a server.",
        ),
        (
            "breakwater_admin_logins_total",
            Count,
            "Logins to the admin console.",
        ),
        (
            "breakwater_auth_query_lookups_total",
            Count,
            "auth_query lookups run on the database (cache misses).",
        ),
        (
            "breakwater_auth_query_cache_hits_total",
            Count,
            "Logins whose auth_query secret came from the cache or a lookup already running.",
        ),
        (
            "breakwater_auth_query_failures_total",
            Count,
            "Logins refused because the auth_query lookup failed (database, query or timeout).",
        ),
        (
            "breakwater_timeouts_total",
            Count,
            "Timeouts process-wide, by the setting that expired.",
        ),
        (
            "breakwater_client_errors_total",
            Count,
            "ErrorResponses Breakwater itself sent to clients, by SQLSTATE class.",
        ),
    ] {
        describe_counter!(name, unit, help);
    }
}

/// Histogram bucket edges in microseconds: powers of two from 64 µs to about 33.5 s, which are
/// boundaries of the pools' own buckets, so every count is exact. The same edges in every
/// process, so `sum by (le)` across a fleet is meaningful.
const EDGES_US: [u64; 20] = {
    let mut e = [0u64; 20];
    let mut i = 0;
    while i < e.len() {
        e[i] = 64 << i;
        i += 1;
    }
    e
};

/// The latency histograms of every pool, in the Prometheus text format.
pub fn render_histograms(out: &mut String, pools: &[PoolSnapshot]) {
    type Pick = fn(&PoolSnapshot) -> (&crate::HistogramSnapshot, u64);
    let families: [(&str, &str, Pick); 4] = [
        (
            "breakwater_client_wait_seconds",
            "Time clients waited for a server connection, one sample per checkout.",
            |s| (&s.wait_hist, s.wait_time_us),
        ),
        (
            "breakwater_transaction_seconds",
            "Time a server was held per transaction, from checkout to release.",
            |s| (&s.xact_hist, s.xact_time_us),
        ),
        (
            "breakwater_query_seconds",
            "Time per query, from the request sent to its reply complete.",
            |s| (&s.query_hist, s.query_time_us),
        ),
        (
            "breakwater_server_connect_seconds",
            "Time to open and log in a server connection, one sample per success.",
            |s| (&s.connect_hist, s.connect_time_us),
        ),
    ];
    for (name, help, pick) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for s in pools {
            let (hist, sum_us) = pick(s);
            let labels = format!(
                "database=\"{}\",user=\"{}\"",
                escape(&s.database),
                escape(&s.user)
            );
            for (edge, n) in EDGES_US.iter().zip(hist.counts_below(&EDGES_US)) {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{}\"}} {n}", secs(*edge));
            }
            let count = hist.count();
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", secs(sum_us));
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
    }
}

/// Clients by `application_name`, at most `top` names (the most clients first) plus `other`
/// for the rest, so a fleet's series stay bounded whatever its apps call themselves.
pub fn render_clients_by_application(out: &mut String, names: &[&str], top: usize) {
    let mut counts: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for n in names {
        *counts.entry(n).or_default() += 1;
    }
    let mut by_count: Vec<(&str, u64)> = counts.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let other: u64 = by_count.iter().skip(top).map(|(_, n)| n).sum();
    let name = "breakwater_clients_by_application";
    let _ = writeln!(
        out,
        "# HELP {name} Logged-in clients by application_name: the {top} most common names, the rest as \"other\".\n# TYPE {name} gauge"
    );
    for (app, n) in by_count.iter().take(top) {
        let _ = writeln!(out, "{name}{{application_name=\"{}\"}} {n}", escape(app));
    }
    if other > 0 {
        let _ = writeln!(out, "{name}{{application_name=\"other\"}} {other}");
    }
}

/// `breakwater_fleet_slots{database,kind}` and `breakwater_fleet_connected{database}`.
pub fn render_fleets(out: &mut String, fleets: &[crate::FleetSnapshot]) {
    if fleets.is_empty() {
        return;
    }
    let name = "breakwater_fleet_slots";
    let _ = writeln!(
        out,
        "# HELP {name} Fleet budget slots of a database: held (locked by this process), wanted, allowed (server connections it may open), fleet_total (held by every process, from pg_locks), budget.\n# TYPE {name} gauge"
    );
    for f in fleets {
        let db = escape(&f.database);
        let kinds = [
            ("held", Some(f.held)),
            ("wanted", Some(f.wanted)),
            ("allowed", Some(f.allowed)),
            ("fleet_total", f.fleet_total),
            ("budget", Some(f.budget)),
        ];
        for (kind, v) in kinds {
            if let Some(v) = v {
                let _ = writeln!(out, "{name}{{database=\"{db}\",kind=\"{kind}\"}} {v}");
            }
        }
    }
    let name = "breakwater_fleet_connected";
    let _ = writeln!(
        out,
        "# HELP {name} 1 while the fleet's control connection is up.\n# TYPE {name} gauge"
    );
    for f in fleets {
        let _ = writeln!(
            out,
            "{name}{{database=\"{}\"}} {}",
            escape(&f.database),
            u8::from(f.connected)
        );
    }
}

/// What the process itself uses; `None` where the platform did not say.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessStats {
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// The conventional `process_*` series and `breakwater_build_info`.
pub fn render_process(out: &mut String, p: &ProcessStats, version: &str) {
    let _ = writeln!(
        out,
        "# HELP breakwater_build_info The running Breakwater's version; always 1.\n# TYPE breakwater_build_info gauge\nbreakwater_build_info{{version=\"{}\"}} 1",
        escape(version)
    );
    let series: [(&str, &str, &str, Option<f64>); 4] = [
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            p.resident_bytes.map(|v| v as f64),
        ),
        (
            "process_open_fds",
            "gauge",
            "Open file descriptors (client and server sockets among them).",
            p.open_fds.map(|v| v as f64),
        ),
        (
            "process_max_fds",
            "gauge",
            "The limit on open file descriptors.",
            p.max_fds.map(|v| v as f64),
        ),
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent, in seconds.",
            p.cpu_seconds,
        ),
    ];
    for (name, kind, help, v) in series {
        if let Some(v) = v {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Counter, PoolStats};

    #[test]
    fn histograms_are_cumulative_with_exact_sum_and_count() {
        let s = PoolStats::new("app", "u\"1");
        for us in [10, 100, 100, 5_000, 90_000_000] {
            s.query_time_us.add(us);
        }
        let mut out = String::new();
        render_histograms(&mut out, &[s.snapshot()]);
        let line = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} missing in\n{out}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        let l = r#"database="app",user="u\"1""#;
        assert_eq!(
            line(&format!(
                "breakwater_query_seconds_bucket{{{l},le=\"0.000064\"}}"
            )),
            "1"
        );
        assert_eq!(
            line(&format!(
                "breakwater_query_seconds_bucket{{{l},le=\"0.000128\"}}"
            )),
            "3"
        );
        assert_eq!(
            line(&format!(
                "breakwater_query_seconds_bucket{{{l},le=\"0.008192\"}}"
            )),
            "4"
        );
        assert_eq!(
            line(&format!(
                "breakwater_query_seconds_bucket{{{l},le=\"33.554432\"}}"
            )),
            "4"
        );
        assert_eq!(
            line(&format!(
                "breakwater_query_seconds_bucket{{{l},le=\"+Inf\"}}"
            )),
            "5"
        );
        assert_eq!(line(&format!("breakwater_query_seconds_count{{{l}}}")), "5");
        assert_eq!(
            line(&format!("breakwater_query_seconds_sum{{{l}}}")),
            "90.00521"
        );
        assert!(out.contains("# TYPE breakwater_client_wait_seconds histogram"));
        assert!(out.contains("# HELP breakwater_server_connect_seconds "));
    }

    #[test]
    fn clients_by_application_keep_the_top_names_and_fold_the_rest() {
        let names = ["web", "web", "web", "worker", "worker", "cron", "psql", ""];
        let mut out = String::new();
        render_clients_by_application(&mut out, &names, 2);
        let series: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            series,
            [
                r#"breakwater_clients_by_application{application_name="web"} 3"#,
                r#"breakwater_clients_by_application{application_name="worker"} 2"#,
                r#"breakwater_clients_by_application{application_name="other"} 3"#,
            ]
        );
    }

    #[test]
    fn process_series_are_left_out_where_unknown() {
        let mut out = String::new();
        let p = ProcessStats {
            resident_bytes: Some(4096),
            ..Default::default()
        };
        render_process(&mut out, &p, "1.2.3");
        assert!(out.contains("breakwater_build_info{version=\"1.2.3\"} 1"));
        assert!(out.contains("\nprocess_resident_memory_bytes 4096\n"));
        assert!(!out.contains("process_open_fds"));
    }
}

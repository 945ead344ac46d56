//! Result sets for the SHOW commands: PgBouncer's column names, order and types first,
//! Breakwater's extra columns after.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stats::{Averages, PoolSnapshot};

use crate::command::Show;
use crate::{ConnView, View};

pub const TEXT: u32 = 25;
pub const INT4: u32 = 23;
pub const INT8: u32 = 20;
pub const NUMERIC: u32 = 1700;
pub const TIMESTAMP: u32 = 1114;

/// Columns and rows in text form; `None` is NULL.
#[derive(Debug, Default)]
pub struct ResultSet {
    pub columns: Vec<(&'static str, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    fn new(columns: &[(&'static str, u32)]) -> ResultSet {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<Option<String>>) {
        self.rows.push(cells);
    }

    pub fn column_names(&self) -> Vec<&'static str> {
        self.columns.iter().map(|(n, _)| *n).collect()
    }
}

fn s(v: impl Into<String>) -> Option<String> {
    Some(v.into())
}

fn n(v: impl std::fmt::Display) -> Option<String> {
    Some(v.to_string())
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, as PgBouncer prints connect_time.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn result(show: Show, view: &View) -> ResultSet {
    match show {
        Show::Help => ResultSet::default(),
        Show::Version => {
            let mut r = ResultSet::new(&[("version", TEXT)]);
            r.row(vec![s(view.version.clone())]);
            r
        }
        Show::Pools => pools(view),
        Show::Stats => stats(view),
        Show::StatsTotals => stats_totals(view),
        Show::StatsAverages => stats_averages(view),
        Show::Totals => totals(view),
        Show::Databases => databases(view),
        Show::Clients => conns(&view.clients, "C"),
        Show::Servers => conns(&view.servers, "S"),
        Show::Users => users(view),
        Show::Config => {
            let mut r = ResultSet::new(&[
                ("key", TEXT),
                ("value", TEXT),
                ("default", TEXT),
                ("changeable", TEXT),
            ]);
            for c in &view.config {
                r.row(vec![
                    s(c.key.clone()),
                    s(c.value.clone()),
                    s(c.default.clone()),
                    s(if c.changeable { "yes" } else { "no" }),
                ]);
            }
            r
        }
        Show::Lists => lists(view),
        Show::State => {
            let mut r = ResultSet::new(&[("key", TEXT), ("value", TEXT)]);
            let yes_no = |b: bool| s(if b { "yes" } else { "no" });
            r.row(vec![s("active"), yes_no(!view.paused)]);
            r.row(vec![s("paused"), yes_no(view.paused)]);
            r.row(vec![s("suspended"), yes_no(false)]);
            r
        }
        Show::DnsHosts => {
            // PgBouncer's columns, then Breakwater's.
            let mut r = ResultSet::new(&[
                ("hostname", TEXT),
                ("ttl", INT8),
                ("addrs", TEXT),
                ("last_error", TEXT),
            ]);
            for d in &view.dns_hosts {
                r.row(vec![
                    s(d.hostname.clone()),
                    n(d.ttl_secs),
                    s(d.addrs.clone()),
                    d.last_error.clone(),
                ]);
            }
            r
        }
        Show::DnsZones => ResultSet::new(&[("zonename", TEXT), ("serial", INT8), ("count", INT4)]),
        Show::Latency => latency(view),
        Show::Hosts => hosts(view),
    }
}

fn pools(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("database", TEXT),
        ("user", TEXT),
        ("cl_active", INT4),
        ("cl_waiting", INT4),
        ("cl_active_cancel_req", INT4),
        ("cl_waiting_cancel_req", INT4),
        ("sv_active", INT4),
        ("sv_active_cancel", INT4),
        ("sv_being_canceled", INT4),
        ("sv_idle", INT4),
        ("sv_used", INT4),
        ("sv_tested", INT4),
        ("sv_login", INT4),
        ("maxwait", INT4),
        ("maxwait_us", INT4),
        ("pool_mode", TEXT),
        ("load_balance_hosts", TEXT),
        // Breakwater's own:
        ("cl_linked", INT4),
        ("cl_idle", INT4),
        ("pool_size", INT4),
        ("min_pool_size", INT4),
        ("paused", INT4),
    ]);
    for p in &view.pools {
        let st = &p.stats;
        // The data path counts a waiting client as idle too; PgBouncer's cl_active is every
        // logged-in client that is not waiting (linked to a server or not).
        let waiting = st.cl_waiting.max(0);
        let idle = (st.cl_idle - waiting).max(0);
        let linked = st.cl_active.max(0);
        r.row(vec![
            s(st.database.clone()),
            s(st.user.clone()),
            n(linked + idle),
            n(waiting),
            n(0),
            n(0),
            n(p.sv_active),
            n(0),
            n(0),
            n(p.sv_idle),
            n(0),
            n(0),
            n(p.sv_login),
            n(p.maxwait_us / 1_000_000),
            n(p.maxwait_us % 1_000_000),
            s(p.pool_mode.clone()),
            None,
            n(linked),
            n(idle),
            n(p.pool_size),
            n(p.min_pool_size),
            n(u8::from(p.paused)),
        ]);
    }
    r
}

/// Per-database sums: (totals now, counters at the older and newer tick when every pool has
/// both), in first-seen order of databases sorted by name.
struct DbStats {
    now: PoolSnapshot,
    older: PoolSnapshot,
    newer: PoolSnapshot,
}

fn by_database(view: &View) -> BTreeMap<String, DbStats> {
    let mut m: BTreeMap<String, DbStats> = BTreeMap::new();
    for p in &view.pools {
        let e = m
            .entry(p.stats.database.clone())
            .or_insert_with(|| DbStats {
                now: PoolSnapshot::default(),
                older: PoolSnapshot::default(),
                newer: PoolSnapshot::default(),
            });
        e.now.accumulate(&p.stats);
        if let (Some(o), Some(nw)) = (&p.older, &p.newer) {
            e.older.accumulate(o);
            e.newer.accumulate(nw);
        }
    }
    m
}

fn averages(d: &DbStats, secs: f64) -> Averages {
    d.newer.averages(&d.older, secs)
}

fn totals_cells(t: &PoolSnapshot) -> Vec<Option<String>> {
    vec![
        n(t.wait_count),
        n(t.xact_count),
        n(t.query_count),
        n(t.bytes_received),
        n(t.bytes_sent),
        n(t.xact_time_us),
        n(t.query_time_us),
        n(t.wait_time_us),
        n(t.client_parse_count),
        n(t.server_parse_count),
        n(t.bind_count),
        n(t.client_logins),
    ]
}

fn average_cells(a: &Averages) -> Vec<Option<String>> {
    vec![
        n(a.server_assignment_count),
        n(a.xact_count),
        n(a.query_count),
        n(a.recv),
        n(a.sent),
        n(a.xact_time),
        n(a.query_time),
        n(a.wait_time),
        n(a.client_parse_count),
        n(a.server_parse_count),
        n(a.bind_count),
        n(a.client_connect_count),
    ]
}

fn stats(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("database", TEXT),
        ("total_server_assignment_count", NUMERIC),
        ("total_xact_count", NUMERIC),
        ("total_query_count", NUMERIC),
        ("total_received", NUMERIC),
        ("total_sent", NUMERIC),
        ("total_xact_time", NUMERIC),
        ("total_query_time", NUMERIC),
        ("total_wait_time", NUMERIC),
        ("total_client_parse_count", NUMERIC),
        ("total_server_parse_count", NUMERIC),
        ("total_bind_count", NUMERIC),
        ("total_client_connect_count", NUMERIC),
        ("avg_server_assignment_count", NUMERIC),
        ("avg_xact_count", NUMERIC),
        ("avg_query_count", NUMERIC),
        ("avg_recv", NUMERIC),
        ("avg_sent", NUMERIC),
        ("avg_xact_time", NUMERIC),
        ("avg_query_time", NUMERIC),
        ("avg_wait_time", NUMERIC),
        ("avg_client_parse_count", NUMERIC),
        ("avg_server_parse_count", NUMERIC),
        ("avg_bind_count", NUMERIC),
        ("avg_client_connect_count", NUMERIC),
    ]);
    for (db, d) in by_database(view) {
        let mut row = vec![s(db)];
        row.extend(totals_cells(&d.now));
        row.extend(average_cells(&averages(&d, view.period_secs)));
        r.row(row);
    }
    r
}

fn stats_totals(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("database", TEXT),
        ("server_assignment_count", NUMERIC),
        ("xact_count", NUMERIC),
        ("query_count", NUMERIC),
        ("bytes_received", NUMERIC),
        ("bytes_sent", NUMERIC),
        ("xact_time", NUMERIC),
        ("query_time", NUMERIC),
        ("wait_time", NUMERIC),
        ("client_parse_count", NUMERIC),
        ("server_parse_count", NUMERIC),
        ("bind_count", NUMERIC),
        ("client_connect_count", NUMERIC),
    ]);
    for (db, d) in by_database(view) {
        let mut row = vec![s(db)];
        row.extend(totals_cells(&d.now));
        r.row(row);
    }
    r
}

fn stats_averages(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("database", TEXT),
        ("server_assignment_count", NUMERIC),
        ("xact_count", NUMERIC),
        ("query_count", NUMERIC),
        ("bytes_received", NUMERIC),
        ("bytes_sent", NUMERIC),
        ("xact_time", NUMERIC),
        ("query_time", NUMERIC),
        ("wait_time", NUMERIC),
        ("avg_client_parse_count", NUMERIC),
        ("avg_server_parse_count", NUMERIC),
        ("avg_bind_count", NUMERIC),
        ("client_connect_count", NUMERIC),
    ]);
    for (db, d) in by_database(view) {
        let mut row = vec![s(db)];
        row.extend(average_cells(&averages(&d, view.period_secs)));
        r.row(row);
    }
    r
}

fn totals(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[("name", TEXT), ("value", NUMERIC)]);
    let mut all = DbStats {
        now: PoolSnapshot::default(),
        older: PoolSnapshot::default(),
        newer: PoolSnapshot::default(),
    };
    for d in by_database(view).values() {
        all.now.accumulate(&d.now);
        all.older.accumulate(&d.older);
        all.newer.accumulate(&d.newer);
    }
    const NAMES: [&str; 12] = [
        "server_assignment_count",
        "xact_count",
        "query_count",
        "client_bytes",
        "server_bytes",
        "xact_time",
        "query_time",
        "wait_time",
        "ps_client_parse_count",
        "ps_server_parse_count",
        "ps_bind_count",
        "client_connect_count",
    ];
    for (name, v) in NAMES.iter().zip(totals_cells(&all.now)) {
        r.row(vec![s(format!("total_{name}")), v]);
    }
    for (name, v) in NAMES
        .iter()
        .zip(average_cells(&averages(&all, view.period_secs)))
    {
        r.row(vec![s(format!("avg_{name}")), v]);
    }
    r
}

fn databases(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("name", TEXT),
        ("host", TEXT),
        ("port", INT4),
        ("database", TEXT),
        ("force_user", TEXT),
        ("pool_size", INT4),
        ("min_pool_size", INT4),
        ("reserve_pool_size", INT4),
        ("server_lifetime", INT4),
        ("pool_mode", TEXT),
        ("load_balance_hosts", TEXT),
        ("max_connections", INT4),
        ("current_connections", INT4),
        ("max_client_connections", INT4),
        ("current_client_connections", INT4),
        ("paused", INT4),
        ("disabled", INT4),
    ]);
    for d in &view.databases {
        r.row(vec![
            s(d.name.clone()),
            s(d.host.clone()),
            n(d.port),
            s(d.dbname.clone()),
            d.force_user.clone(),
            n(d.pool_size),
            n(d.min_pool_size),
            n(0),
            n(d.server_lifetime_secs),
            s(d.pool_mode.clone()),
            None,
            n(0),
            n(d.current_connections),
            n(d.max_client_connections),
            n(d.current_client_connections),
            n(u8::from(d.paused)),
            n(u8::from(d.disabled)),
        ]);
    }
    r
}

fn conns(list: &[ConnView], kind: &str) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("type", TEXT),
        ("user", TEXT),
        ("database", TEXT),
        ("replication", TEXT),
        ("state", TEXT),
        ("addr", TEXT),
        ("port", INT4),
        ("local_addr", TEXT),
        ("local_port", INT4),
        ("connect_time", TIMESTAMP),
        ("request_time", TIMESTAMP),
        ("wait", INT4),
        ("wait_us", INT4),
        ("close_needed", INT4),
        ("ptr", TEXT),
        ("link", TEXT),
        ("remote_pid", INT4),
        ("tls", TEXT),
        ("application_name", TEXT),
        ("prepared_statements", INT4),
        ("id", INT8),
    ]);
    for c in list {
        r.row(vec![
            s(kind),
            s(c.user.clone()),
            s(c.database.clone()),
            s("none"),
            s(c.state.clone()),
            s(c.addr.clone()),
            n(c.port),
            s(c.local_addr.clone()),
            n(c.local_port),
            s(timestamp(c.connect_time)),
            s(timestamp(c.request_time.unwrap_or(c.connect_time))),
            n(0),
            n(0),
            n(u8::from(c.close_needed)),
            s(format!("{:x}", c.id)),
            s(""),
            n(c.remote_pid),
            s(""),
            s(c.application_name.clone()),
            n(0),
            n(c.id),
        ]);
    }
    r
}

fn users(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("name", TEXT),
        ("pool_size", TEXT),
        ("reserve_pool_size", TEXT),
        ("pool_mode", TEXT),
        ("max_user_connections", INT4),
        ("current_connections", INT4),
        ("max_user_client_connections", INT4),
        ("current_client_connections", INT4),
    ]);
    for u in &view.users {
        r.row(vec![
            s(u.name.clone()),
            s(""),
            s(""),
            None,
            n(0),
            n(u.current_connections),
            n(0),
            n(u.current_client_connections),
        ]);
    }
    r
}

fn lists(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[("list", TEXT), ("items", INT4)]);
    let rows: [(&str, u64); 14] = [
        ("databases", view.databases.len() as u64),
        ("users", view.users.len() as u64),
        ("peers", 0),
        ("pools", view.pools.len() as u64),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", view.clients.len() as u64),
        ("login_clients", view.login_clients),
        ("free_servers", 0),
        ("used_servers", view.servers.len() as u64),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ];
    for (name, items) in rows {
        r.row(vec![s(name), n(items)]);
    }
    r
}

fn latency(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("database", TEXT),
        ("user", TEXT),
        ("wait_p50_us", INT8),
        ("wait_p99_us", INT8),
        ("xact_p50_us", INT8),
        ("xact_p99_us", INT8),
        ("query_p50_us", INT8),
        ("query_p99_us", INT8),
        ("connect_p50_us", INT8),
        ("connect_p99_us", INT8),
        ("connects_ok", INT8),
        ("connects_refused", INT8),
        ("connect_timeouts", INT8),
        ("login_timeouts", INT8),
        ("wait_timeouts", INT8),
        ("xact_count", INT8),
        ("query_count", INT8),
        ("wait_count", INT8),
        ("wait_time", INT8),
    ]);
    for p in &view.pools {
        let st = &p.stats;
        // Over the last one to two stats periods: recent, yet never a nearly empty window.
        let q = st.percentiles(p.older.as_ref());
        r.row(vec![
            s(st.database.clone()),
            s(st.user.clone()),
            n(q.wait_p50),
            n(q.wait_p99),
            n(q.xact_p50),
            n(q.xact_p99),
            n(q.query_p50),
            n(q.query_p99),
            n(q.connect_p50),
            n(q.connect_p99),
            n(st.server_connects),
            n(st.connect_refused),
            n(st.connect_timeouts),
            n(st.login_timeouts),
            n(st.wait_timeouts),
            n(st.xact_count),
            n(st.query_count),
            n(st.wait_count),
            n(st.wait_time_us),
        ]);
    }
    r
}

fn hosts(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[
        ("host", TEXT),
        ("breaker", TEXT),
        ("attempts", INT8),
        ("successes", INT8),
        ("failures_dns", INT8),
        ("failures_connect", INT8),
        ("failures_login", INT8),
        ("timeouts_dns", INT8),
        ("timeouts_connect", INT8),
        ("timeouts_login", INT8),
        ("fast_failures", INT8),
        ("breaker_opens", INT8),
        ("drill", TEXT),
        ("drill_secs_left", INT8),
        ("drills", INT8),
    ]);
    for h in &view.hosts {
        r.row(vec![
            s(h.host.clone()),
            s(h.breaker),
            n(h.attempts),
            n(h.successes),
            n(h.failures_dns),
            n(h.failures_connect),
            n(h.failures_login),
            n(h.timeouts_dns),
            n(h.timeouts_connect),
            n(h.timeouts_login),
            n(h.fast_failures),
            n(h.breaker_opens),
            s(h.drill),
            n(h.drill_secs_left),
            n(h.drills),
        ]);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PoolView;

    #[test]
    fn timestamps_print_in_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(timestamp(t), "2023-11-14 22:13:20");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01 00:00:00");
    }

    #[test]
    fn pools_and_stats_lead_with_pgbouncers_columns() {
        let mut view = View::default();
        let mut a = PoolSnapshot {
            database: "app".into(),
            user: "u1".into(),
            xact_count: 5,
            cl_idle: 3,
            cl_waiting: 1,
            cl_active: 2,
            ..Default::default()
        };
        view.pools.push(PoolView {
            stats: a.clone(),
            pool_mode: "transaction".into(),
            ..Default::default()
        });
        a.user = "u2".into();
        a.xact_count = 7;
        view.pools.push(PoolView {
            stats: a,
            ..Default::default()
        });
        let p = result(Show::Pools, &view);
        assert_eq!(
            &p.column_names()[..17],
            &[
                "database",
                "user",
                "cl_active",
                "cl_waiting",
                "cl_active_cancel_req",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
                "maxwait_us",
                "pool_mode",
                "load_balance_hosts"
            ]
        );
        // 2 linked + (3 idle - 1 waiting) = 4 active in PgBouncer's sense.
        assert_eq!(p.rows[0][2].as_deref(), Some("4"));
        assert_eq!(p.rows[0][3].as_deref(), Some("1"));
        let st = result(Show::Stats, &view);
        assert_eq!(st.rows.len(), 1, "one row per database");
        assert_eq!(st.rows[0][2].as_deref(), Some("12"));
        assert_eq!(st.columns[1], ("total_server_assignment_count", NUMERIC));
    }
}

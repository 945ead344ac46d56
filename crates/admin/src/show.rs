//! Result sets for the SHOW commands: PgBouncer's column names, order and types first,
//! Breakwater's extra columns after.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stats::{Averages, FleetSnapshot, HostSnapshot, Percentiles, PoolSnapshot};

use crate::command::Show;
use crate::{ConfigItem, ConnView, DatabaseView, DnsHostView, PoolView, UserView, View};

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

    /// A result set whose columns each say how a row fills their cell, so that a column's name,
    /// type and value stand on one line and cannot drift apart.
    fn table<R>(columns: &[Column<R>], rows: impl IntoIterator<Item = R>) -> ResultSet {
        ResultSet {
            columns: columns.iter().map(|&(name, oid, _)| (name, oid)).collect(),
            rows: rows
                .into_iter()
                .map(|row| columns.iter().map(|(_, _, cell)| cell(&row)).collect())
                .collect(),
        }
    }

    pub fn column_names(&self) -> Vec<&'static str> {
        self.columns.iter().map(|(n, _)| *n).collect()
    }
}

/// A column of a table: its name and type OID, and how one row fills its cell.
type Column<R> = (&'static str, u32, fn(&R) -> Option<String>);

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
            r.row(vec![s(&view.version)]);
            r
        }
        Show::Pools => pools(view),
        Show::Stats => per_database(view, &[&STATS_TOTAL, &STATS_AVG], |d, secs| {
            [totals_cells(&d.now), average_cells(&d.averages(secs))].concat()
        }),
        Show::StatsTotals => per_database(view, &[&STATS_TOTALS], |d, _| totals_cells(&d.now)),
        Show::StatsAverages => per_database(view, &[&STATS_AVERAGES], |d, secs| {
            average_cells(&d.averages(secs))
        }),
        Show::Totals => totals(view),
        Show::Databases => databases(view),
        Show::Clients => conns(&view.clients, "C"),
        Show::Servers => conns(&view.servers, "S"),
        Show::Users => users(view),
        Show::Config => {
            let columns: &[Column<&ConfigItem>] = &[
                ("key", TEXT, |c| s(&c.key)),
                ("value", TEXT, |c| s(&c.value)),
                ("default", TEXT, |c| s(&c.default)),
                ("changeable", TEXT, |c| yes_no(c.changeable)),
            ];
            ResultSet::table(columns, &view.config)
        }
        Show::Lists => lists(view),
        Show::State => {
            let mut r = ResultSet::new(&[("key", TEXT), ("value", TEXT)]);
            r.row(vec![s("active"), yes_no(!view.paused)]);
            r.row(vec![s("paused"), yes_no(view.paused)]);
            r.row(vec![s("suspended"), yes_no(false)]);
            r
        }
        Show::DnsHosts => {
            // PgBouncer's columns, then Breakwater's.
            let columns: &[Column<&DnsHostView>] = &[
                ("hostname", TEXT, |d| s(&d.hostname)),
                ("ttl", INT8, |d| n(d.ttl_secs)),
                ("addrs", TEXT, |d| s(&d.addrs)),
                ("last_error", TEXT, |d| d.last_error.clone()),
            ];
            ResultSet::table(columns, &view.dns_hosts)
        }
        Show::DnsZones => ResultSet::new(&[("zonename", TEXT), ("serial", INT8), ("count", INT4)]),
        Show::Latency => latency(view),
        Show::Hosts => hosts(view),
        Show::ServerCloses => server_closes(view),
        Show::Fleet => fleet(view),
        Show::Listeners => listeners(view),
    }
}

fn yes_no(b: bool) -> Option<String> {
    s(if b { "yes" } else { "no" })
}

fn pools(view: &View) -> ResultSet {
    // PgBouncer's cl_active is every logged-in client that is not waiting (linked to a
    // server or not); the data path counts each client in one of three states.
    fn waiting(p: &PoolView) -> i64 {
        p.stats.cl_waiting.max(0)
    }
    fn idle(p: &PoolView) -> i64 {
        p.stats.cl_idle.max(0)
    }
    fn linked(p: &PoolView) -> i64 {
        p.stats.cl_active.max(0)
    }
    let columns: &[Column<&PoolView>] = &[
        ("database", TEXT, |p| s(&p.stats.database)),
        ("user", TEXT, |p| s(&p.stats.user)),
        ("cl_active", INT4, |p| n(linked(p) + idle(p))),
        ("cl_waiting", INT4, |p| n(waiting(p))),
        ("cl_active_cancel_req", INT4, |_| n(0)),
        ("cl_waiting_cancel_req", INT4, |_| n(0)),
        ("sv_active", INT4, |p| n(p.sv_active)),
        ("sv_active_cancel", INT4, |_| n(0)),
        ("sv_being_canceled", INT4, |_| n(0)),
        ("sv_idle", INT4, |p| n(p.sv_idle)),
        ("sv_used", INT4, |_| n(0)),
        ("sv_tested", INT4, |_| n(0)),
        ("sv_login", INT4, |p| n(p.sv_login)),
        ("maxwait", INT4, |p| n(p.maxwait_us / 1_000_000)),
        ("maxwait_us", INT4, |p| n(p.maxwait_us % 1_000_000)),
        ("pool_mode", TEXT, |p| s(&p.pool_mode)),
        ("load_balance_hosts", TEXT, |_| None),
        // Breakwater's own:
        ("cl_linked", INT4, |p| n(linked(p))),
        ("cl_idle", INT4, |p| n(idle(p))),
        ("pool_size", INT4, |p| n(p.pool_size)),
        ("min_pool_size", INT4, |p| n(p.min_pool_size)),
        ("paused", INT4, |p| n(u8::from(p.paused))),
        ("reserve_pool_size", INT4, |p| n(p.reserve_pool_size)),
        ("reserve_in_use", INT4, |p| n(p.reserve_in_use)),
    ];
    ResultSet::table(columns, &view.pools)
}

/// Per-database sums: totals now, and counters at the older and newer tick when every pool has
/// both.
#[derive(Default)]
struct DbStats {
    now: PoolSnapshot,
    older: PoolSnapshot,
    newer: PoolSnapshot,
}

impl DbStats {
    fn accumulate(&mut self, now: &PoolSnapshot, ticks: Option<(&PoolSnapshot, &PoolSnapshot)>) {
        self.now.accumulate(now);
        if let Some((older, newer)) = ticks {
            self.older.accumulate(older);
            self.newer.accumulate(newer);
        }
    }

    fn averages(&self, secs: f64) -> Averages {
        self.newer.averages(&self.older, secs)
    }
}

/// [`DbStats`] per database, sorted by name.
fn by_database(view: &View) -> BTreeMap<String, DbStats> {
    let mut m: BTreeMap<String, DbStats> = BTreeMap::new();
    for p in &view.pools {
        let ticks = p.older.as_ref().zip(p.newer.as_ref());
        m.entry(p.stats.database.clone())
            .or_default()
            .accumulate(&p.stats, ticks);
    }
    m
}

// The twelve counters of SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS, in PgBouncer's
// order. PgBouncer names them differently in each command (`total_received`, `avg_recv`,
// `bytes_received`, `client_bytes`), so each keeps its own list of names; the values, in the
// same order, come from `totals_cells` and `average_cells`.

/// SHOW STATS, first half.
const STATS_TOTAL: [&str; 12] = [
    "total_server_assignment_count",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_xact_time",
    "total_query_time",
    "total_wait_time",
    "total_client_parse_count",
    "total_server_parse_count",
    "total_bind_count",
    "total_client_connect_count",
];

/// SHOW STATS, second half.
const STATS_AVG: [&str; 12] = [
    "avg_server_assignment_count",
    "avg_xact_count",
    "avg_query_count",
    "avg_recv",
    "avg_sent",
    "avg_xact_time",
    "avg_query_time",
    "avg_wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
    "avg_client_connect_count",
];

const STATS_TOTALS: [&str; 12] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "client_parse_count",
    "server_parse_count",
    "bind_count",
    "client_connect_count",
];

/// As [`STATS_TOTALS`] but for the prepared-statement counters, as PgBouncer names them.
const STATS_AVERAGES: [&str; 12] = [
    "server_assignment_count",
    "xact_count",
    "query_count",
    "bytes_received",
    "bytes_sent",
    "xact_time",
    "query_time",
    "wait_time",
    "avg_client_parse_count",
    "avg_server_parse_count",
    "avg_bind_count",
    "client_connect_count",
];

/// SHOW TOTALS, after `total_` or `avg_`.
const TOTALS: [&str; 12] = [
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

/// One row per database: its name, then NUMERIC counters named by `names` (lists laid end to
/// end) and filled by `cells` from the database's sums and the stats period in seconds.
fn per_database(
    view: &View,
    names: &[&[&'static str]],
    cells: fn(&DbStats, f64) -> Vec<Option<String>>,
) -> ResultSet {
    let mut r = ResultSet::new(&[("database", TEXT)]);
    r.columns
        .extend(names.iter().copied().flatten().map(|&name| (name, NUMERIC)));
    for (db, d) in by_database(view) {
        let mut row = vec![s(db)];
        row.extend(cells(&d, view.period_secs));
        r.row(row);
    }
    r
}

fn totals(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[("name", TEXT), ("value", NUMERIC)]);
    let mut all = DbStats::default();
    for d in by_database(view).values() {
        all.accumulate(&d.now, Some((&d.older, &d.newer)));
    }
    for (name, v) in TOTALS.iter().zip(totals_cells(&all.now)) {
        r.row(vec![s(format!("total_{name}")), v]);
    }
    for (name, v) in TOTALS
        .iter()
        .zip(average_cells(&all.averages(view.period_secs)))
    {
        r.row(vec![s(format!("avg_{name}")), v]);
    }
    r
}

fn databases(view: &View) -> ResultSet {
    let columns: &[Column<&DatabaseView>] = &[
        ("name", TEXT, |d| s(&d.name)),
        ("host", TEXT, |d| s(&d.host)),
        ("port", INT4, |d| n(d.port)),
        ("database", TEXT, |d| s(&d.dbname)),
        ("force_user", TEXT, |d| d.force_user.clone()),
        ("pool_size", INT4, |d| n(d.pool_size)),
        ("min_pool_size", INT4, |d| n(d.min_pool_size)),
        ("reserve_pool_size", INT4, |d| n(d.reserve_pool_size)),
        ("server_lifetime", INT4, |d| n(d.server_lifetime_secs)),
        ("pool_mode", TEXT, |d| s(&d.pool_mode)),
        ("load_balance_hosts", TEXT, |_| None),
        ("max_connections", INT4, |d| n(d.max_connections)),
        ("current_connections", INT4, |d| n(d.current_connections)),
        ("max_client_connections", INT4, |d| {
            n(d.max_client_connections)
        }),
        ("current_client_connections", INT4, |d| {
            n(d.current_client_connections)
        }),
        ("paused", INT4, |d| n(u8::from(d.paused))),
        ("disabled", INT4, |d| n(u8::from(d.disabled))),
    ];
    ResultSet::table(columns, &view.databases)
}

/// SHOW CLIENTS (`kind` "C") and SHOW SERVERS ("S"): the same columns, each row paired with its
/// kind.
fn conns(list: &[ConnView], kind: &'static str) -> ResultSet {
    let columns: &[Column<(&str, &ConnView)>] = &[
        ("type", TEXT, |(kind, _)| s(*kind)),
        ("user", TEXT, |(_, c)| s(&c.user)),
        ("database", TEXT, |(_, c)| s(&c.database)),
        ("replication", TEXT, |_| s("none")),
        ("state", TEXT, |(_, c)| s(&c.state)),
        ("addr", TEXT, |(_, c)| s(&c.addr)),
        ("port", INT4, |(_, c)| n(c.port)),
        ("local_addr", TEXT, |(_, c)| s(&c.local_addr)),
        ("local_port", INT4, |(_, c)| n(c.local_port)),
        ("connect_time", TIMESTAMP, |(_, c)| {
            s(timestamp(c.connect_time))
        }),
        ("request_time", TIMESTAMP, |(_, c)| {
            s(timestamp(c.request_time.unwrap_or(c.connect_time)))
        }),
        ("wait", INT4, |_| n(0)),
        ("wait_us", INT4, |_| n(0)),
        ("close_needed", INT4, |(_, c)| n(u8::from(c.close_needed))),
        ("ptr", TEXT, |(_, c)| s(format!("{:x}", c.id))),
        ("link", TEXT, |_| s("")),
        ("remote_pid", INT4, |(_, c)| n(c.remote_pid)),
        ("tls", TEXT, |_| s("")),
        ("application_name", TEXT, |(_, c)| s(&c.application_name)),
        ("prepared_statements", INT4, |_| n(0)),
        ("id", INT8, |(_, c)| n(c.id)),
    ];
    ResultSet::table(columns, list.iter().map(|c| (kind, c)))
}

fn users(view: &View) -> ResultSet {
    let columns: &[Column<&UserView>] = &[
        ("name", TEXT, |u| s(&u.name)),
        ("pool_size", TEXT, |u| {
            s(u.pool_size.map(|n| n.to_string()).unwrap_or_default())
        }),
        ("reserve_pool_size", TEXT, |_| s("")),
        ("pool_mode", TEXT, |u| u.pool_mode.clone()),
        ("max_user_connections", INT4, |u| n(u.max_user_connections)),
        ("current_connections", INT4, |u| n(u.current_connections)),
        ("max_user_client_connections", INT4, |u| {
            n(u.max_user_client_connections)
        }),
        ("current_client_connections", INT4, |u| {
            n(u.current_client_connections)
        }),
    ];
    ResultSet::table(columns, &view.users)
}

fn lists(view: &View) -> ResultSet {
    let mut r = ResultSet::new(&[("list", TEXT), ("items", INT4)]);
    let rows: [(&str, u64); 15] = [
        ("databases", view.databases.len() as u64),
        ("users", view.users.len() as u64),
        ("peers", 0),
        ("pools", view.pools.len() as u64),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", view.used_clients),
        ("login_clients", view.login_clients),
        ("free_servers", 0),
        ("used_servers", view.servers.len() as u64),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
        // Breakwater's: sources the per-address limits remember (capped).
        ("client_addrs", view.client_addrs),
    ];
    for (name, items) in rows {
        r.row(vec![s(name), n(items)]);
    }
    r
}

fn latency(view: &View) -> ResultSet {
    let columns: &[Column<(&PoolView, Percentiles)>] = &[
        ("database", TEXT, |(p, _)| s(&p.stats.database)),
        ("user", TEXT, |(p, _)| s(&p.stats.user)),
        ("wait_p50_us", INT8, |(_, q)| n(q.wait_p50)),
        ("wait_p99_us", INT8, |(_, q)| n(q.wait_p99)),
        ("xact_p50_us", INT8, |(_, q)| n(q.xact_p50)),
        ("xact_p99_us", INT8, |(_, q)| n(q.xact_p99)),
        ("query_p50_us", INT8, |(_, q)| n(q.query_p50)),
        ("query_p99_us", INT8, |(_, q)| n(q.query_p99)),
        ("connect_p50_us", INT8, |(_, q)| n(q.connect_p50)),
        ("connect_p99_us", INT8, |(_, q)| n(q.connect_p99)),
        ("connects_ok", INT8, |(p, _)| n(p.stats.server_connects)),
        ("connects_refused", INT8, |(p, _)| {
            n(p.stats.connect_refused)
        }),
        ("connect_timeouts", INT8, |(p, _)| {
            n(p.stats.connect_timeouts)
        }),
        ("login_timeouts", INT8, |(p, _)| n(p.stats.login_timeouts)),
        ("wait_timeouts", INT8, |(p, _)| n(p.stats.wait_timeouts)),
        ("xact_count", INT8, |(p, _)| n(p.stats.xact_count)),
        ("query_count", INT8, |(p, _)| n(p.stats.query_count)),
        ("wait_count", INT8, |(p, _)| n(p.stats.wait_count)),
        ("wait_time", INT8, |(p, _)| n(p.stats.wait_time_us)),
    ];
    // Over the last one to two stats periods: recent, yet never a nearly empty window.
    let rows = view
        .pools
        .iter()
        .map(|p| (p, p.stats.percentiles(p.older.as_ref())));
    ResultSet::table(columns, rows)
}

/// One row per pool and reason that closed at least one server connection: why servers went
/// away (an operator's first question when server_connects climbs).
fn server_closes(view: &View) -> ResultSet {
    let columns: &[Column<(&PoolView, stats::CloseReason, u64)>] = &[
        ("database", TEXT, |(p, _, _)| s(&p.stats.database)),
        ("user", TEXT, |(p, _, _)| s(&p.stats.user)),
        ("reason", TEXT, |(_, r, _)| s(r.as_str())),
        ("closes", INT8, |(_, _, count)| n(count)),
    ];
    let rows = view
        .pools
        .iter()
        .flat_map(|p| p.stats.closes().map(move |(r, n)| (p, r, n)));
    ResultSet::table(columns, rows)
}

/// One row per pool whose clients LISTEN in transaction or statement mode (or did): how many
/// listen, to how many channels, and what the fan-out did.
fn listeners(view: &View) -> ResultSet {
    let columns: &[Column<&PoolView>] = &[
        ("database", TEXT, |p| s(&p.stats.database)),
        ("user", TEXT, |p| s(&p.stats.user)),
        ("clients", INT8, |p| n(p.stats.listen_clients.max(0) as u64)),
        ("channels", INT8, |p| {
            n(p.stats.listen_channels.max(0) as u64)
        }),
        ("notifications", INT8, |p| n(p.stats.notifications_sent)),
        ("dropped", INT8, |p| n(p.stats.notifications_dropped)),
        ("reconnects", INT8, |p| n(p.stats.listener_reconnects)),
    ];
    let rows = view.pools.iter().filter(|p| {
        let st = &p.stats;
        st.listen_clients > 0 || st.listen_channels > 0 || st.notifications_sent > 0
    });
    ResultSet::table(columns, rows)
}

fn fleet(view: &View) -> ResultSet {
    let columns: &[Column<&FleetSnapshot>] = &[
        ("database", TEXT, |f| s(&f.database)),
        ("budget", INT4, |f| n(f.budget as u64)),
        ("min_share", INT4, |f| n(f.min_share as u64)),
        ("held", INT4, |f| n(f.held as u64)),
        ("wanted", INT4, |f| n(f.wanted as u64)),
        ("allowed", INT4, |f| n(f.allowed as u64)),
        ("fleet_total", INT4, |f| {
            f.fleet_total.map(|t| t.to_string())
        }),
        ("connected", TEXT, |f| yes_no(f.connected)),
        ("lock_key", INT4, |f| s(f.key.to_string())),
    ];
    ResultSet::table(columns, &view.fleets)
}

fn hosts(view: &View) -> ResultSet {
    let columns: &[Column<&HostSnapshot>] = &[
        ("host", TEXT, |h| s(&h.host)),
        ("breaker", TEXT, |h| s(h.breaker)),
        ("attempts", INT8, |h| n(h.attempts)),
        ("successes", INT8, |h| n(h.successes)),
        ("failures_dns", INT8, |h| n(h.failures_dns)),
        ("failures_connect", INT8, |h| n(h.failures_connect)),
        ("failures_login", INT8, |h| n(h.failures_login)),
        ("timeouts_dns", INT8, |h| n(h.timeouts_dns)),
        ("timeouts_connect", INT8, |h| n(h.timeouts_connect)),
        ("timeouts_login", INT8, |h| n(h.timeouts_login)),
        ("fast_failures", INT8, |h| n(h.fast_failures)),
        ("breaker_opens", INT8, |h| n(h.breaker_opens)),
        ("drill", TEXT, |h| s(h.drill)),
        ("drill_secs_left", INT8, |h| n(h.drill_secs_left)),
        ("drills", INT8, |h| n(h.drills)),
    ];
    ResultSet::table(columns, &view.hosts)
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
            cl_idle: 2,
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
        // 2 linked + 2 idle = 4 active in PgBouncer's sense.
        assert_eq!(p.rows[0][2].as_deref(), Some("4"));
        assert_eq!(p.rows[0][3].as_deref(), Some("1"));
        let st = result(Show::Stats, &view);
        assert_eq!(st.rows.len(), 1, "one row per database");
        assert_eq!(st.rows[0][2].as_deref(), Some("12"));
        assert_eq!(st.columns[1], ("total_server_assignment_count", NUMERIC));
    }
}

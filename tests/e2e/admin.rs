//! The operators' console: PgBouncer-compatible SHOW commands, PAUSE/RESUME, KILL, RELOAD, the
//! Prometheus endpoint and the `breakwater stats` tail, driven by psql, tokio-postgres and the
//! binary itself against a real PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::common::*;

async fn admin(env: &Env) -> Client {
    connect(&env.pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .expect("admin console login")
}

/// Column names and rows (as name → text) of one SHOW.
async fn show(c: &Client, what: &str) -> (Vec<String>, Vec<HashMap<String, String>>) {
    let msgs = c
        .simple_query(what)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut cols = Vec::new();
    let mut rows = Vec::new();
    for m in msgs {
        match m {
            SimpleQueryMessage::RowDescription(d) => {
                cols = d.iter().map(|c| c.name().to_owned()).collect();
            }
            SimpleQueryMessage::Row(r) => {
                let mut row = HashMap::new();
                for (i, col) in r.columns().iter().enumerate() {
                    row.insert(col.name().to_owned(), r.get(i).unwrap_or("").to_owned());
                }
                rows.push(row);
            }
            _ => {}
        }
    }
    (cols, rows)
}

/// The row of `what` whose `key` column is `value`.
async fn row_where(
    c: &Client,
    what: &str,
    key: &str,
    value: &str,
) -> Option<HashMap<String, String>> {
    show(c, what)
        .await
        .1
        .into_iter()
        .find(|r| r.get(key).map(String::as_str) == Some(value))
}

async fn stat(c: &Client, what: &str, col: &str) -> u64 {
    row_where(c, what, "database", "app")
        .await
        .and_then(|r| r.get(col).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// The server's message for a failed call.
fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn psql_runs_show_pools_and_gets_pgbouncers_columns() {
    let env = start("", "");
    env.client().await.simple_query("SELECT 1").await.unwrap();
    let out = psql(
        env.pooler.port(),
        "admin",
        "admin_pw",
        "pgbouncer",
        &["-A", "-F", "|", "-c", "SHOW POOLS;"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = stdout.lines().next().unwrap_or_default();
    assert!(
        header.starts_with(
            "database|user|cl_active|cl_waiting|cl_active_cancel_req|cl_waiting_cancel_req|sv_active|\
             sv_active_cancel|sv_being_canceled|sv_idle|sv_used|sv_tested|sv_login|maxwait|maxwait_us|\
             pool_mode|load_balance_hosts"
        ),
        "{header}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with("app|app|")),
        "{stdout}"
    );
    // The other name of the console works the same way.
    let out = psql(
        env.pooler.port(),
        "admin",
        "admin_pw",
        "breakwater",
        &["-A", "-t", "-c", "SHOW VERSION"],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("Breakwater "),
        "{out:?}"
    );
}

/// SHOW CLIENTS and SHOW SERVERS: one list in PgBouncer, one here.
const CONNECTION_COLUMNS: &[&str] = &[
    "type",
    "user",
    "database",
    "replication",
    "state",
    "addr",
    "port",
    "local_addr",
    "local_port",
    "connect_time",
    "request_time",
    "wait",
    "wait_us",
    "close_needed",
    "ptr",
    "link",
    "remote_pid",
    "tls",
    "application_name",
    "prepared_statements",
    "id",
];

#[tokio::test]
async fn every_show_command_answers_with_pgbouncers_columns_first() {
    let env = start("", "");
    env.client().await.simple_query("SELECT 1").await.unwrap();
    let c = admin(&env).await;
    let expect: &[(&str, &[&str])] = &[
        ("SHOW VERSION", &["version"]),
        (
            "SHOW STATS",
            &[
                "database",
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
            ],
        ),
        (
            "SHOW STATS_TOTALS",
            &[
                "database",
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
            ],
        ),
        (
            "SHOW STATS_AVERAGES",
            &[
                "database",
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
            ],
        ),
        ("SHOW TOTALS", &["name", "value"]),
        ("SHOW LISTS", &["list", "items"]),
        ("SHOW CONFIG", &["key", "value", "default", "changeable"]),
        (
            "SHOW DATABASES",
            &[
                "name",
                "host",
                "port",
                "database",
                "force_user",
                "pool_size",
                "min_pool_size",
                "reserve_pool_size",
                "server_lifetime",
                "pool_mode",
                "load_balance_hosts",
                "max_connections",
                "current_connections",
                "max_client_connections",
                "current_client_connections",
                "paused",
                "disabled",
            ],
        ),
        (
            "SHOW USERS",
            &[
                "name",
                "pool_size",
                "reserve_pool_size",
                "pool_mode",
                "max_user_connections",
                "current_connections",
                "max_user_client_connections",
                "current_client_connections",
            ],
        ),
        ("SHOW CLIENTS", CONNECTION_COLUMNS),
        ("SHOW SERVERS", CONNECTION_COLUMNS),
        ("SHOW STATE", &["key", "value"]),
        ("SHOW DNS_HOSTS", &["hostname", "ttl", "addrs"]),
        (
            "SHOW LATENCY",
            &["database", "user", "wait_p50_us", "wait_p99_us"],
        ),
        ("SHOW HOSTS", &["host", "breaker", "attempts", "successes"]),
        (
            "SHOW SERVER_CLOSES",
            &["database", "user", "reason", "closes"],
        ),
    ];
    for (q, cols) in expect {
        let (got, _) = show(&c, q).await;
        assert!(
            got.len() >= cols.len() && got[..cols.len()] == strs(cols)[..],
            "{q}: {got:?}"
        );
    }
    // pgbouncer_exporter parses these SHOW CONFIG values as numbers.
    let max = row_where(&c, "SHOW CONFIG", "key", "max_client_conn")
        .await
        .unwrap();
    assert!(max["value"].parse::<f64>().is_ok(), "{max:?}");
    // The client is listed, with an id SHOW CLIENTS and the logs share; so is its server.
    assert!(!show(&c, "SHOW SERVERS").await.1.is_empty());
    let err = c.simple_query("SHOW NONSENSE").await.unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("unknown SHOW command 'NONSENSE'"),
        "{err}"
    );
    let err = c.simple_query("FROBNICATE").await.unwrap_err();
    assert!(
        err.as_db_error().unwrap().message().contains("SHOW HELP"),
        "{err}"
    );
}

#[tokio::test]
async fn show_stats_counts_exactly_the_traffic_a_test_sends() {
    let env = start("", "");
    let app = env.client().await;
    let c = admin(&env).await;
    app.simple_query("SELECT 1").await.unwrap();
    let xacts = stat(&c, "SHOW STATS_TOTALS", "xact_count").await;
    let queries = stat(&c, "SHOW STATS_TOTALS", "query_count").await;
    for _ in 0..5 {
        app.simple_query("SELECT 1").await.unwrap();
    }
    app.simple_query("BEGIN").await.unwrap();
    app.simple_query("SELECT 2").await.unwrap();
    app.simple_query("COMMIT").await.unwrap();
    // Five autocommit statements and one three-statement transaction.
    testkit::wait_until("stats to count the traffic", WAIT, || async {
        stat(&c, "SHOW STATS_TOTALS", "xact_count").await == xacts + 6
            && stat(&c, "SHOW STATS_TOTALS", "query_count").await == queries + 8
    })
    .await
    .unwrap();
    assert!(stat(&c, "SHOW STATS", "total_received").await > 0);
    assert!(stat(&c, "SHOW STATS", "total_sent").await > 0);
    assert_eq!(
        stat(&c, "SHOW STATS", "total_xact_count").await,
        stat(&c, "SHOW STATS_TOTALS", "xact_count").await
    );
    let lat = row_where(&c, "SHOW LATENCY", "database", "app")
        .await
        .unwrap();
    assert!(lat["query_p99_us"].parse::<u64>().unwrap() > 0, "{lat:?}");
    assert!(lat["connect_p50_us"].parse::<u64>().unwrap() > 0, "{lat:?}");
}

#[tokio::test]
async fn a_stats_user_may_show_but_not_pause() {
    let pg = testkit::PgCluster::start().unwrap();
    let pooler = start_pooler(
        &pg,
        "stats_users = [\"watcher\"]",
        "",
        &format!("{USERLIST}\"watcher\" \"watcher_pw\"\n"),
    );
    let c = connect(&pooler.conn_string("watcher", "watcher_pw", "pgbouncer"))
        .await
        .unwrap();
    show(&c, "SHOW POOLS").await;
    let err = c.simple_query("PAUSE").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{err}");
    assert!(err
        .as_db_error()
        .unwrap()
        .message()
        .contains("admin access needed"));
    // An application user is refused the console outright.
    let e = sqlstate(connect(&pooler.conn_string("app", "app_pw", "pgbouncer")).await);
    assert_eq!(e, "28000");
}

#[tokio::test]
async fn pause_makes_new_transactions_wait_and_resume_releases_them() {
    let env = start("", "");
    let app = env.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    let c = admin(&env).await;
    c.simple_query("PAUSE app").await.unwrap();
    let (_, st) = show(&c, "SHOW DATABASES").await;
    assert_eq!(
        st.iter().find(|r| r["name"] == "app").unwrap()["paused"],
        "1"
    );

    let waiting = tokio::spawn(async move { app.simple_query("SELECT 42").await.map(|_| ()) });
    testkit::wait_until("the query to wait at the pause", WAIT, || async {
        row_where(&c, "SHOW POOLS", "database", "app")
            .await
            .is_some_and(|r| r["cl_waiting"] == "1")
    })
    .await
    .unwrap();
    testkit::wait_until("maxwait to count the wait", WAIT, || async {
        row_where(&c, "SHOW POOLS", "database", "app")
            .await
            .is_some_and(|r| {
                r["maxwait"].parse::<u64>().unwrap() * 1_000_000
                    + r["maxwait_us"].parse::<u64>().unwrap()
                    > 0
            })
    })
    .await
    .unwrap();
    assert!(
        !waiting.is_finished(),
        "a paused database ran a transaction"
    );
    c.simple_query("RESUME app").await.unwrap();
    tokio::time::timeout(WAIT, waiting)
        .await
        .expect("RESUME released the query")
        .unwrap()
        .unwrap();
    let err = c.simple_query("RESUME app").await.unwrap_err();
    assert!(msg(&err).contains("not paused"), "{err}");
}

/// (SHOW DATABASES app, SHOW USERS app, SHOW USERS admin, SHOW LISTS used_clients, SHOW
/// CLIENTS rows) as the console reports them.
async fn client_counts(c: &Client) -> (usize, usize, usize, usize, usize) {
    let n = |row: Option<HashMap<String, String>>, col: &str| -> usize {
        row.and_then(|r| r.get(col).and_then(|v| v.parse().ok()))
            .unwrap_or(usize::MAX)
    };
    (
        n(
            row_where(c, "SHOW DATABASES", "name", "app").await,
            "current_client_connections",
        ),
        n(
            row_where(c, "SHOW USERS", "name", "app").await,
            "current_client_connections",
        ),
        n(
            row_where(c, "SHOW USERS", "name", "admin").await,
            "current_client_connections",
        ),
        n(
            row_where(c, "SHOW LISTS", "list", "used_clients").await,
            "items",
        ),
        show(c, "SHOW CLIENTS").await.1.len(),
    )
}

/// SHOW DATABASES, USERS and LISTS count clients without listing them (only SHOW CLIENTS
/// lists): the counts must still agree with the list, and follow a client that leaves.
#[tokio::test]
async fn databases_users_and_lists_count_the_clients_that_show_clients_lists() {
    let env = start("", "");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(env.client().await);
    }
    let c = admin(&env).await;
    assert_eq!(client_counts(&c).await, (3, 3, 0, 3, 3));
    drop(clients.pop());
    testkit::wait_until("the counts to drop to 2", WAIT, || async {
        client_counts(&c).await == (2, 2, 0, 2, 2)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn kill_client_disconnects_that_client_only() {
    let env = start("", "");
    let victim = env.client().await;
    let bystander = env.client().await;
    victim.simple_query("SELECT 1").await.unwrap();
    let c = admin(&env).await;
    let (_, clients) = show(&c, "SHOW CLIENTS").await;
    assert_eq!(clients.len(), 2, "{clients:?}");
    // The victim connected first, so it has the smaller id.
    let victim_id = clients
        .iter()
        .map(|r| r["id"].parse::<u64>().unwrap())
        .min()
        .unwrap();
    c.simple_query(&format!("KILL_CLIENT {victim_id}"))
        .await
        .unwrap();
    testkit::wait_until("the victim to be gone", WAIT, || async {
        victim.simple_query("SELECT 1").await.is_err()
    })
    .await
    .unwrap();
    bystander.simple_query("SELECT 1").await.unwrap();
    let err = c.simple_query("KILL_CLIENT 999999").await.unwrap_err();
    assert!(msg(&err).contains("client not found"), "{err}");
}

#[tokio::test]
async fn kill_disconnects_a_databases_clients_and_pauses_it_until_resume() {
    let env = start("", "");
    let app = env.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    let c = admin(&env).await;
    c.simple_query("KILL app").await.unwrap();
    testkit::wait_until("the client to be gone", WAIT, || async {
        app.simple_query("SELECT 1").await.is_err()
    })
    .await
    .unwrap();
    testkit::wait_until("its servers to close", WAIT, || async {
        show(&c, "SHOW SERVERS").await.1.is_empty()
    })
    .await
    .unwrap();
    c.simple_query("RESUME app").await.unwrap();
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn reconnect_replaces_server_connections_as_they_are_released() {
    let env = start("", "pool_size = 1\n");
    let app = env.client().await;
    let pid = |rows: Vec<SimpleQueryMessage>| {
        rows.into_iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap()
    };
    let before = pid(app.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let c = admin(&env).await;
    c.simple_query("RECONNECT app").await.unwrap();
    c.simple_query("WAIT_CLOSE app").await.unwrap();
    let after = pid(app.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_ne!(before, after, "RECONNECT kept the old server connection");
}

/// `closes` of `reason` for the app pool in SHOW SERVER_CLOSES (0 when it has no row).
async fn closes(c: &Client, reason: &str) -> u64 {
    show(c, "SHOW SERVER_CLOSES")
        .await
        .1
        .into_iter()
        .find(|r| r["database"] == "app" && r["reason"] == reason)
        .and_then(|r| r["closes"].parse().ok())
        .unwrap_or(0)
}

/// A checkout given up while its idle server runs `server_check_query` (the client left)
/// cannot trust that server idle: it is closed as a failed check, and counted and logged like
/// every close.
#[tokio::test]
async fn a_check_cut_short_by_its_client_leaving_is_a_counted_close() {
    use tokio::io::AsyncWriteExt;
    let env = start(
        "auth_type = \"trust\"\nserver_check_delay = \"1ms\"\nserver_check_query = \"SELECT pg_sleep(3)\"\n",
        "pool_size = 1\n",
    );
    let c = admin(&env).await;
    let direct = env.direct().await;
    // Logging in opens the pool's server; the client's query then finds it idle past
    // server_check_delay, and the check runs.
    let mut a = raw_login(env.pooler.port()).await;
    // Idle past server_check_delay: the time passing is the condition under test.
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.write_all(&query_message("SELECT 1")).await.unwrap();
    wait_for_active_query(&direct, "SELECT pg_sleep(3)").await;
    drop(a);
    testkit::wait_until("the cut check's close to be counted", WAIT, || async {
        closes(&c, "check_failed").await == 1
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", env.pooler.log()));
}

#[tokio::test]
async fn show_server_closes_counts_each_closed_server_under_its_reason() {
    let env = start("idle_transaction_timeout = \"300ms\"\n", "");
    let c = admin(&env).await;
    assert!(
        show(&c, "SHOW SERVER_CLOSES").await.1.is_empty(),
        "nothing closed yet"
    );

    // RECONNECT closes the idle server connection at once, as opened before the new epoch.
    let app = env.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    c.simple_query("RECONNECT app").await.unwrap();
    // The client has its ReadyForQuery a moment before its server is back in the pool: the
    // server is closed then, at once if idle, else as it comes back; counted either way.
    testkit::wait_until(
        "the stale server's close counted",
        Duration::from_secs(10),
        || async { closes(&c, "stale_epoch").await == 1 },
    )
    .await
    .unwrap();

    // A client idle in a transaction past idle_transaction_timeout loses its server with it.
    app.simple_query("BEGIN").await.unwrap();
    testkit::wait_until(
        "the idle transaction's server to be closed",
        WAIT,
        || async { closes(&c, "idle_transaction_timeout").await == 1 },
    )
    .await
    .unwrap();
    assert_eq!(
        closes(&c, "stale_epoch").await,
        1,
        "no other close was counted"
    );
}

#[tokio::test]
async fn disable_refuses_new_logins_and_enable_lifts_it() {
    let env = start("", "");
    let c = admin(&env).await;
    c.simple_query("DISABLE app").await.unwrap();
    assert_eq!(sqlstate(connect(&env.conn_string()).await), "57P03");
    c.simple_query("ENABLE app").await.unwrap();
    env.client().await.simple_query("SELECT 1").await.unwrap();
    let err = c.simple_query("DISABLE nosuchdb").await.unwrap_err();
    assert!(msg(&err).contains("no such database"), "{err}");
}

fn write_config(env: &Env, db_extra: &str, pooler_extra: &str) {
    let config = format!(
        "[pooler]\nlisten_port = {}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\n{pooler_extra}\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n{db_extra}\n",
        env.pooler.port(),
        env.pg.port()
    );
    std::fs::write(env.pooler.dir().join("pooler.toml"), config).unwrap();
}

/// Seconds left on the keepalive timer of the pooler's end of the connection from client port
/// `client_port`, from /proc/net/tcp (`tr` 02 is the keepalive timer; `tm->when` is in
/// 1/100 s). `None` when that socket has no keepalive timer running (or is not listed).
fn pooler_keepalive_left(pooler_port: u16, client_port: u16) -> Option<f64> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || port_of(f[1]) != Some(pooler_port) || port_of(f[2]) != Some(client_port) {
            return None;
        }
        let (tr, when) = f[5].split_once(':')?;
        (tr == "02").then(|| u64::from_str_radix(when, 16).ok().map(|t| t as f64 / 100.0))?
    })
}

/// Waits for the pooler's end of a connection to show a keepalive timer; its seconds left.
async fn keepalive_of(pooler_port: u16, client_port: u16, what: &str) -> f64 {
    testkit::wait_until(what, WAIT, || async {
        pooler_keepalive_left(pooler_port, client_port).is_some()
    })
    .await
    .unwrap();
    pooler_keepalive_left(pooler_port, client_port).unwrap_or(f64::NAN)
}

/// Client sockets get client_tcp_keepalive's options from their listening socket (Linux
/// copies them at accept), so a reload must re-tune the listener: a client that connects
/// after RELOAD has the new client_tcp_keepidle, whether its socket was made before the
/// listener changed (then it is set on its own) or after.
#[tokio::test]
async fn a_reloaded_client_tcp_keepidle_applies_to_clients_that_connect_after_it() {
    // The raw clients send nothing: without tcp_defer_accept they are accepted at once.
    let env = start(
        "client_tcp_keepidle = \"40s\"\ntcp_defer_accept = false\n",
        "",
    );
    let port = env.pooler.port();
    let connect_raw = || {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let local = s.local_addr().unwrap().port();
        (s, local)
    };
    let (_a, a) = connect_raw();
    let left = keepalive_of(port, a, "the first client's keepalive timer").await;
    assert!((30.0..=40.0).contains(&left), "{left} s left of 40");

    write_config(
        &env,
        "",
        "client_tcp_keepidle = \"7s\"\ntcp_defer_accept = false\n",
    );
    let c = admin(&env).await;
    c.simple_query("RELOAD").await.unwrap();
    // Connected before its accept re-tunes the listener: tuned on its own.
    let (_b, b) = connect_raw();
    testkit::wait_until("the next client's keepalive of 7 s", WAIT, || async {
        pooler_keepalive_left(port, b).is_some_and(|s| s <= 7.0)
    })
    .await
    .unwrap();
    // Connected after: the listener's new options, inherited. Three, because each shard's
    // accept loop notices the reload at its own first accept after it: at least two of these
    // are accepted by a loop that has, and take the listener's options as they are.
    let later: Vec<_> = (0..3).map(|_| connect_raw()).collect();
    for (_, c) in &later {
        let left = keepalive_of(port, *c, "a later client's keepalive timer").await;
        assert!(left <= 7.0, "{left} s left: the listener kept the old 40 s");
    }
}

async fn pool_size(c: &Client) -> String {
    row_where(c, "SHOW DATABASES", "name", "app").await.unwrap()["pool_size"].clone()
}

#[tokio::test]
async fn reload_changes_a_pool_size_under_load_without_a_failed_transaction() {
    let env = start("", "pool_size = 2\n");
    let c = admin(&env).await;
    assert_eq!(pool_size(&c).await, "2");
    // Load: four clients in a loop of short transactions through the reload.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let client = env.client().await;
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .simple_query("BEGIN; SELECT pg_sleep(0.005); COMMIT")
                    .await?;
                n += 1;
            }
            Ok::<u64, tokio_postgres::Error>(n)
        }));
    }
    write_config(&env, "pool_size = 5\n", "");
    let msgs = c.simple_query("RELOAD").await.unwrap();
    assert!(matches!(
        msgs.last(),
        Some(SimpleQueryMessage::CommandComplete(_))
    ));
    assert_eq!(pool_size(&c).await, "5");
    testkit::wait_until("the live pool to grow", WAIT, || async {
        row_where(&c, "SHOW POOLS", "database", "app")
            .await
            .is_some_and(|r| r["pool_size"] == "5")
    })
    .await
    .unwrap();

    // A bad config is rejected with a clear error and the running one stays.
    std::fs::write(
        env.pooler.dir().join("pooler.toml"),
        "[pooler]\nlisten_prot = 1\n",
    )
    .unwrap();
    let err = c.simple_query("RELOAD").await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("F0000"));
    assert!(msg(&err).contains("listen_prot"), "{err}");
    assert_eq!(pool_size(&c).await, "5");

    // SIGHUP reloads too.
    write_config(&env, "pool_size = 3\n", "");
    env.pooler.signal(libc::SIGHUP);
    testkit::wait_until("SIGHUP to reload", WAIT, || async {
        pool_size(&c).await == "3"
    })
    .await
    .unwrap();

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        let n = l
            .await
            .unwrap()
            .expect("no transaction failed across reloads");
        assert!(n > 0);
    }
}

#[tokio::test]
async fn set_changes_a_setting_live_and_refuses_restart_only_ones() {
    let env = start("", "");
    let c = admin(&env).await;
    c.simple_query("SET default_pool_size = 7").await.unwrap();
    let row = row_where(&c, "SHOW CONFIG", "key", "default_pool_size")
        .await
        .unwrap();
    assert_eq!(
        (
            row["value"].as_str(),
            row["default"].as_str(),
            row["changeable"].as_str()
        ),
        ("7", "20", "yes")
    );
    assert_eq!(pool_size(&c).await, "7");
    let err = c.simple_query("SET listen_port = 1").await.unwrap_err();
    assert!(msg(&err).contains("restart"), "{err}");
}

/// The value of the series whose line starts with `prefix`.
#[tokio::test]
async fn metrics_serve_breakwater_series_that_match_the_console() {
    let mport = testkit::free_port();
    let env = start(&format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""), "");
    let app = env.client().await;
    for _ in 0..3 {
        app.simple_query("SELECT 1").await.unwrap();
    }
    let web = connect(&format!("{} application_name=web", env.conn_string()))
        .await
        .unwrap();
    web.simple_query("SELECT 1").await.unwrap();
    // A refused login counts as an error of class 28.
    assert_eq!(
        sqlstate(connect(&env.pooler.conn_string("app", "wrong", "app")).await),
        "28P01"
    );
    let c = admin(&env).await;
    testkit::wait_until("metrics to match SHOW STATS_TOTALS", WAIT, || async {
        let xacts = stat(&c, "SHOW STATS_TOTALS", "xact_count").await as f64;
        let body = tokio::task::spawn_blocking(move || http_get(mport, "/metrics"))
            .await
            .unwrap();
        series(
            &body,
            "breakwater_transactions_total{database=\"app\",user=\"app\"}",
        ) == Some(xacts)
            && xacts >= 4.0
    })
    .await
    .unwrap();
    let body = tokio::task::spawn_blocking(move || http_get(mport, "/metrics"))
        .await
        .unwrap();
    let (head, text) = body.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200"),
        "{head}"
    );
    // Prometheus text format: comments, or `name{labels} value`; every family has HELP.
    let mut helped = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').unwrap();
            assert!(helped.contains(family), "no HELP before {line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            continue;
        }
        assert!(!line.starts_with('#'), "{line}");
        let (name, value) = line.rsplit_once(' ').unwrap();
        assert!(
            name.starts_with("breakwater_") || name.starts_with("process_"),
            "{line}"
        );
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let family = name.split('{').next().unwrap();
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| family.strip_suffix(s).filter(|b| helped.contains(*b)))
            .unwrap_or(family);
        assert!(helped.contains(base), "no HELP for {line}");
    }
    for name in [
        "breakwater_clients{database=\"app\",user=\"app\",state=\"idle\"}",
        "breakwater_servers{database=\"app\",user=\"app\",state=\"idle\"}",
        "breakwater_servers{database=\"app\",user=\"app\",state=\"login\"} 0",
        "breakwater_queries_total{database=\"app\",user=\"app\"}",
        "breakwater_server_connects_total{database=\"app\",user=\"app\",outcome=\"ok\"}",
        "breakwater_server_closes_total{database=\"app\",user=\"app\",reason=\"server_lifetime\"} 0",
        "breakwater_login_failures_total",
        "breakwater_client_errors_total{class=\"28\"} 1",
        "breakwater_timeouts_total{kind=\"query_timeout\"}",
        "breakwater_host_breaker{host=\"127.0.0.1:",
        "breakwater_clients_by_application{application_name=\"web\"} 1",
        "breakwater_build_info{version=\"",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(series(text, name).is_some(), "{name} missing from:\n{text}");
    }
    // Latency is a real histogram: cumulative buckets ending in +Inf = _count, which counts
    // every transaction the console counted.
    let xacts = stat(&c, "SHOW STATS_TOTALS", "xact_count").await as f64;
    let l = "database=\"app\",user=\"app\"";
    let count = series(
        text,
        &format!("breakwater_transaction_seconds_count{{{l}}}"),
    )
    .unwrap();
    let inf = series(
        text,
        &format!("breakwater_transaction_seconds_bucket{{{l},le=\"+Inf\"}}"),
    );
    assert_eq!((Some(count), count), (inf, xacts));
    let buckets: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with("breakwater_transaction_seconds_bucket{database=\"app\""))
        .map(|line| line.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        buckets.len() > 10 && buckets.windows(2).all(|w| w[0] <= w[1]),
        "{buckets:?}"
    );
}

#[tokio::test]
async fn breakwater_stats_prints_a_line_per_pool() {
    let env = start("", "");
    env.client().await.simple_query("SELECT 1").await.unwrap();
    let port = env.pooler.port().to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args([
                "stats",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "admin",
                "-i",
                "100ms",
                "-n",
                "2",
            ])
            .env("PGPASSWORD", "admin_pw")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<_> = stdout.lines().collect();
    assert!(
        lines[0].contains("tps") && lines[0].contains("wait_p99"),
        "{stdout}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("app/app")).count(),
        2,
        "{stdout}"
    );
}

#[tokio::test]
async fn the_stats_line_is_logged_every_stats_period() {
    let env = start("stats_period = \"200ms\"", "");
    env.client().await.simple_query("SELECT 1").await.unwrap();
    testkit::wait_until_blocking("a stats line", WAIT, || {
        env.pooler.log().contains("stats: ") && env.pooler.log().contains(" xacts/s")
    })
    .unwrap();
}

#[tokio::test]
async fn shutdown_wait_for_clients_exits_once_the_last_client_leaves() {
    let mut env = start("", "");
    let app = env.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    let c = admin(&env).await;
    c.simple_query("SHUTDOWN WAIT_FOR_CLIENTS").await.unwrap();
    // No new clients, but the connected one keeps working.
    testkit::wait_until("the listener to close", WAIT, || async {
        connect(&env.conn_string()).await.is_err()
    })
    .await
    .unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    assert!(
        env.pooler.exit_status().unwrap().is_none(),
        "exited with a client connected"
    );
    drop(app);
    // Poll asynchronously: the client's connection task must run to send its Terminate.
    let deadline = std::time::Instant::now() + WAIT;
    let status = loop {
        if let Some(s) = env.pooler.exit_status().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "breakwater did not exit after the last client left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn show_clients_says_which_clients_hold_a_server() {
    let env = start("", "pool_size = 1\n");
    let app = env.client().await;
    let c = admin(&env).await;
    let state = || async {
        let (_, rows) = show(&c, "SHOW CLIENTS").await;
        rows.into_iter()
            .map(|r| r["state"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(state().await, ["idle"]);
    app.simple_query("BEGIN").await.unwrap();
    assert_eq!(state().await, ["active"]);
    // With the only server in that transaction, a second client's query waits, and says so.
    let conn = env.conn_string();
    let second = tokio::spawn(async move {
        let c = connect(&conn).await.unwrap();
        c.simple_query("SELECT 1").await.map(|_| ())
    });
    testkit::wait_until("the second client to be waiting", WAIT, || async {
        state().await == ["active", "waiting"]
    })
    .await
    .unwrap();
    app.simple_query("COMMIT").await.unwrap();
    second.await.unwrap().unwrap();
    testkit::wait_until("the server to be released", WAIT, || async {
        state().await == ["idle"]
    })
    .await
    .unwrap();
    let (_, servers) = show(&c, "SHOW SERVERS").await;
    assert_eq!(servers.len(), 1);
    assert_eq!(servers[0]["state"], "idle");
    assert!(servers[0]["remote_pid"].parse::<i32>().unwrap() > 0);
    // log_connections / log_disconnections (default on) name the client's id, as SHOW CLIENTS does.
    let id = show(&c, "SHOW CLIENTS").await.1[0]["id"].clone();
    drop(app);
    testkit::wait_until("the disconnection to be logged", WAIT, || async {
        let log = env.pooler.log();
        log.contains(&format!("client{{id={id} ")) && log.contains("client closed")
    })
    .await
    .unwrap();
    let log = env.pooler.log();
    assert!(log.contains(" login"), "{log}");
    // The log goes to a file here, not a terminal: no colour escape codes in it.
    assert!(!log.contains('\x1b'), "escape codes in a log file:\n{log}");
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line_with_the_client_span() {
    let env = start("log_format = \"json\"", "");
    env.client().await.simple_query("SELECT 1").await.unwrap();
    testkit::wait_until("the login to be logged", WAIT, || async {
        env.pooler.log().contains("\"login\"")
    })
    .await
    .unwrap();
    let log = env.pooler.log();
    let login = log.lines().find(|l| l.contains("\"login\"")).unwrap();
    assert!(login.starts_with('{') && login.ends_with('}'), "{login}");
    assert!(
        login.contains("\"span\":{") && login.contains("\"user\":\"app\""),
        "{login}"
    );
}

#[tokio::test]
async fn a_query_with_two_commands_is_refused_whole_and_the_daemon_keeps_running() {
    let env = start("", "");
    let c = admin(&env).await;
    for q in [
        "SHOW POOLS; SHUTDOWN",
        "PAUSE app;SHUTDOWN;",
        "SHOW VERSION;;",
    ] {
        let r = c.simple_query(q).await;
        assert_eq!(sqlstate(r), "42601", "{q}");
    }
    // Nothing ran: the console still answers, the pool is not paused, and new clients get in.
    c.simple_query("SHOW VERSION;").await.unwrap();
    let pools = row_where(&c, "SHOW DATABASES", "name", "app")
        .await
        .unwrap();
    assert_eq!(pools["paused"], "0", "{pools:?}");
    env.client().await.simple_query("SELECT 1").await.unwrap();
    // psql -c sends its whole argument as one Query, as a script interpolating a name would.
    let out = psql(
        env.pooler.port(),
        "admin",
        "admin_pw",
        "pgbouncer",
        &["-c", "SHOW POOLS; SHUTDOWN"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "psql must see the query refused");
    assert!(stderr.contains("one command per query"), "{stderr}");
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_semicolon_inside_quotes_is_part_of_the_value() {
    let env = start("pool_mode = \"session\"", "pool_size = 1\n");
    let c = admin(&env).await;
    c.simple_query("SET server_reset_query = 'DISCARD ALL; SELECT 1'")
        .await
        .unwrap();
    let row = row_where(&c, "SHOW CONFIG", "key", "server_reset_query")
        .await
        .unwrap();
    assert_eq!(row["value"], "DISCARD ALL; SELECT 1");
    // The whole two-statement reset runs between sessions on the one server connection.
    let a = env.client().await;
    a.batch_execute("SET statement_timeout = '12345ms'")
        .await
        .unwrap();
    drop(a);
    let b = env.client().await;
    let st: String = b
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(st, "0", "the reset query's DISCARD ALL ran");
}

#[tokio::test]
async fn reload_with_a_fixed_server_password_serves_the_next_client_at_once() {
    let env = start("", "password = \"rotated_away\"\n");
    let c = admin(&env).await;
    // Each failed login adds to the host's back-off, as a rotated password would.
    for _ in 0..4 {
        let err = env
            .pooler
            .connect("app", "app_pw", "app")
            .await
            .expect_err("the server refuses the old password");
        assert_eq!(err.code().map(|c| c.code()), Some("28P01"), "{err}");
    }
    write_config(&env, "password = \"app_pw\"\n", "");
    c.simple_query("RELOAD").await.unwrap();
    let started = std::time::Instant::now();
    let app = env.client().await;
    app.simple_query("SELECT 1").await.unwrap();
    let took = started.elapsed();
    eprintln!("measured: first client served {took:?} after RELOAD fixed the password");
    // No back-off is left from the failures: the first attempt after RELOAD is made at once.
    assert!(took < Duration::from_secs(2), "{took:?}");
}

//! Issue 17, what a PgBouncer shop brings along: PgBouncer keys that ask for nothing Breakwater
//! does not already do load with a warning, and RESET gives a client back what it started
//! with.

use crate::common::{self, connect, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbouncer_keys_that_ask_for_nothing_load_with_a_warning_and_clients_keep_their_parameters()
{
    let env = common::start(
        "auth_type = \"md5\"\nignore_startup_parameters = \"extra_float_digits,search_path\"\n\
         track_extra_parameters = \"IntervalStyle\"\nserver_round_robin = 0\n\
         disable_pqexec = 0\napplication_name_add_host = 0\nlogfile = \"\"\n",
        "",
    );
    testkit::wait_until_blocking("the warnings to be logged", WAIT, || {
        let log = env.pooler.log();
        [
            "pooler.ignore_startup_parameters (a PgBouncer setting) is ignored",
            "pooler.track_extra_parameters (a PgBouncer setting) is ignored",
            "pooler.server_round_robin (a PgBouncer setting) is ignored",
            "pooler.logfile (a PgBouncer setting) is ignored",
        ]
        .iter()
        .all(|w| log.contains(w))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", env.pooler.log()));

    // What ignore_startup_parameters exists for in PgBouncer: drivers that send these.
    let conn = format!(
        "{} options='-c extra_float_digits=3 -c search_path=pg_catalog'",
        env.conn_string()
    );
    let client = connect(&conn).await.expect("connect with startup options");
    for (name, want) in [("extra_float_digits", "3"), ("search_path", "pg_catalog")] {
        let got: String = client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, want, "{name}");
    }
}

/// The values `SHOW` gives for `names` on `client`, after each simple-protocol statement of
/// `script` (SHOWs run the simple protocol, the statements alternate between protocols so
/// that RESET through Parse/Bind/Execute is covered too).
async fn shows_after(
    client: &tokio_postgres::Client,
    script: &[&str],
    names: &[&str],
) -> Vec<String> {
    let mut out = Vec::new();
    for (i, statement) in script.iter().enumerate() {
        match i % 2 {
            0 => client.batch_execute(statement).await,
            _ => client.execute(*statement, &[]).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
        for name in names {
            let rows = client.simple_query(&format!("SHOW {name}")).await.unwrap();
            let value = rows
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap_or_default();
            out.push(format!("{statement} → {name} = {value}"));
        }
    }
    out
}

const STARTUP_OPTIONS: &str =
    "options='-c DateStyle=German -c statement_timeout=5s -c TimeZone=Asia/Tokyo'";

/// What a client sees of its startup parameters through SET, RESET one, RESET ALL, SET … TO
/// DEFAULT and DISCARD ALL, inside and outside a transaction. (A SET of a parameter the server
/// does not report lasts only to the end of its transaction in transaction mode, so those are
/// inside one.)
const RESET_SCRIPT: &[&str] = &[
    "SET DateStyle = 'ISO, YMD'",
    "RESET DateStyle",
    "BEGIN",
    "SET statement_timeout = '1min'",
    "RESET statement_timeout",
    "COMMIT",
    "SET TimeZone = 'UTC'",
    "SET TimeZone TO DEFAULT",
    "SET DateStyle = 'SQL'",
    "BEGIN",
    "SET statement_timeout = '2min'",
    "RESET ALL",
    "COMMIT",
    "BEGIN",
    "SET DateStyle = 'Postgres'",
    "RESET DateStyle",
    "COMMIT",
    "SET DateStyle = 'SQL'",
    "DISCARD ALL",
];

async fn reset_transcript(conn: &str) -> Vec<String> {
    let client = connect(&format!("{conn} {STARTUP_OPTIONS}"))
        .await
        .expect("connect with startup options");
    shows_after(
        &client,
        RESET_SCRIPT,
        &["DateStyle", "statement_timeout", "TimeZone"],
    )
    .await
}

async fn reset_restores_startup_values(pool_mode: &str) {
    let env = common::start(
        &format!("auth_type = \"md5\"\npool_mode = \"{pool_mode}\"\ndefault_pool_size = 1\n"),
        "",
    );
    let direct = reset_transcript(&env.pg.conn_string("app", "app_pw", "app")).await;
    assert!(
        direct.contains(&"RESET ALL → DateStyle = German, DMY".to_owned()),
        "PostgreSQL itself: {direct:#?}"
    );
    let pooled = reset_transcript(&env.conn_string()).await;
    assert_eq!(pooled, direct, "through Breakwater ({pool_mode} mode)");

    // psql, each -c its own simple query.
    let out = common::psql_command(
        env.pooler.port(),
        "app",
        "app_pw",
        "app",
        &[
            "-At",
            "-c",
            "SET DateStyle = 'SQL'",
            "-c",
            "RESET DateStyle",
            "-c",
            "SHOW DateStyle",
        ],
    )
    .env("PGOPTIONS", "-c DateStyle=Postgres,DMY")
    .output()
    .expect("run psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        ["SET", "RESET", "Postgres, DMY"],
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The one server goes to the next client with the server's defaults, not the last one's.
    let names = ["DateStyle", "statement_timeout", "TimeZone"];
    let plain = env.client().await;
    let got = shows_after(&plain, &["SELECT 1"], &names).await;
    let direct = connect(&env.pg.conn_string("app", "app_pw", "app"))
        .await
        .unwrap();
    assert_eq!(got, shows_after(&direct, &["SELECT 1"], &names).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_the_startup_values_in_transaction_mode_as_postgresql_does() {
    reset_restores_startup_values("transaction").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_gives_back_the_startup_values_in_session_mode_as_postgresql_does() {
    reset_restores_startup_values("session").await;
}

/// A pooler in front of `pg` with `body` after the common `[pooler]` lines (listen port,
/// auth_file, admin) — the rest of `[pooler]`, then any sections.
fn pooler_with(pg: &testkit::PgCluster, body: &str) -> testkit::Pooler {
    let port = testkit::free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\nauth_type = \"md5\"\n{}\n",
        body.replace("PGPORT", &pg.port().to_string())
    );
    testkit::Pooler::start(
        common::BIN,
        port,
        &config,
        &[("userlist.txt", common::USERLIST)],
    )
    .expect("start breakwater")
}

/// Server backends of role `app`, seen from PostgreSQL.
async fn app_backends(pg: &testkit::PgCluster) -> i64 {
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    common::app_backends(&direct).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_section_sets_its_pools_mode_and_size_and_caps_its_servers_across_databases() {
    let pg = testkit::PgCluster::start().expect("start postgres");
    let pooler = pooler_with(
        &pg,
        "query_wait_timeout = \"1s\"\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = PGPORT\n\
         [databases.app2]\nhost = \"127.0.0.1\"\nport = PGPORT\ndbname = \"app\"\n\
         [users.app]\npool_mode = \"session\"\npool_size = 3\nmax_user_connections = 2\n",
    );
    let on = |db: &str| pooler.conn_string("app", "app_pw", db);
    // Session mode (the user's, over the pooler's transaction): each client keeps its server.
    let first = connect(&on("app")).await.expect("first client");
    let second = connect(&on("app2"))
        .await
        .expect("second client, other database");
    first.batch_execute("SET work_mem = '7MB'").await.unwrap();
    let kept: String = first.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(kept, "7MB", "a session-mode server stays with its client");
    let admin = connect(&pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .unwrap();
    let pools = admin.simple_query("SHOW POOLS").await.unwrap();
    let row = pools
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some("app") => {
                Some((
                    r.get("pool_mode").unwrap_or("").to_owned(),
                    r.get("pool_size").unwrap_or("").to_owned(),
                ))
            }
            _ => None,
        })
        .expect("a SHOW POOLS row for app");
    assert_eq!(row, ("session".to_owned(), "3".to_owned()));
    let users = admin.simple_query("SHOW USERS").await.unwrap();
    let row = users
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("name") == Some("app") => Some(
                ["pool_size", "pool_mode", "max_user_connections"]
                    .map(|c| r.get(c).unwrap_or("").to_owned()),
            ),
            _ => None,
        })
        .expect("a SHOW USERS row for app");
    assert_eq!(row, ["3", "session", "2"]);

    // Two servers of user app are open, one in each database's pool: a third client waits for
    // one (max_user_connections = 2) although its pool has room (pool_size = 3).
    // (A session-mode login answered from the cached welcome takes its server at its first
    // query.)
    let third = connect(&on("app")).await.expect("third client logs in");
    let err = third
        .simple_query("SELECT 1")
        .await
        .expect_err("over max_user_connections");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("08001"),
        "{err}"
    );
    let message = err.as_db_error().map(|e| e.message()).unwrap_or_default();
    assert!(message.contains("query_wait_timeout"), "{message}");
    assert_eq!(app_backends(&pg).await, 2);
    // When a client leaves, its server (idle in the app pool) serves the next client of app.
    drop(first);
    testkit::wait_until("a client of app to get the freed server", WAIT, || async {
        match connect(&on("app")).await {
            Ok(c) => c.simple_query("SELECT 1").await.is_ok(),
            Err(_) => false,
        }
    })
    .await
    .unwrap();
    assert_eq!(app_backends(&pg).await, 2);
    drop(second);
}

/// Value of the Prometheus series `name` (with its labels) in an exposition `body`.
fn series(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_a_thousand_logins_of_one_user_gets_exactly_its_cap_and_costs_no_server_work() {
    common::raise_fd_limit();
    const CLIENTS: usize = 1000;
    const CAP: usize = 100;
    let pg = testkit::PgCluster::start().expect("start postgres");
    let mport = testkit::free_port();
    let pooler = pooler_with(
        &pg,
        &format!(
            "max_client_conn = 5000\ndefault_pool_size = 2\n\
             [metrics]\nlisten = \"127.0.0.1:{mport}\"\n\
             [databases.app]\nhost = \"127.0.0.1\"\nport = PGPORT\n\
             [users.app]\nmax_user_client_connections = {CAP}\n"
        ),
    );
    let conn = pooler.conn_string("app", "app_pw", "app");
    // Bounded: at most 64 logins in flight, as a busy application's pool would open them.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let (conn, gate) = (conn.clone(), gate.clone());
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            connect(&conn).await
        });
    }
    let (mut admitted, mut refused) = (Vec::new(), 0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(client) => admitted.push(client),
            Err(e) => {
                let db = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
                assert_eq!(db.code().code(), "53300", "{e}");
                assert_eq!(
                    db.message(),
                    format!(
                        "no more connections allowed for user \"app\" (max_user_client_connections = {CAP})"
                    )
                );
                refused += 1;
            }
        }
    }
    assert_eq!((admitted.len(), refused), (CAP, CLIENTS - CAP));
    // Every admitted client works; the database saw the pool, not the storm.
    for c in &admitted {
        c.simple_query("SELECT 1").await.unwrap();
    }
    assert!(app_backends(&pg).await <= 2);
    let log = pooler.log();
    assert_eq!(
        log.matches("login refused: no more connections allowed for user")
            .count(),
        CLIENTS - CAP
    );
    // The exporter publishes on its own tick.
    testkit::wait_until("the refusals to be counted in /metrics", WAIT, || async {
        let body = tokio::task::spawn_blocking(move || common::http_get(mport, "/metrics"))
            .await
            .unwrap();
        series(
            &body,
            "breakwater_refused_client_limit_total{limit=\"max_user_client_connections\"}",
        ) == Some((CLIENTS - CAP) as f64)
    })
    .await
    .unwrap();
    // Places come free as clients leave.
    drop(admitted);
    testkit::wait_until("a new login after the others left", WAIT, || async {
        connect(&conn).await.is_ok()
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_db_client_connections_refuses_the_client_over_it_with_53300_naming_it() {
    let env = common::start(
        "auth_type = \"md5\"\nmax_db_client_connections = 1\n",
        "max_db_client_connections = 2\n",
    );
    let a = env.client().await;
    let _b = env.client().await;
    let err = connect(&env.conn_string())
        .await
        .expect_err("a third client");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(
        (db.code().code(), db.message()),
        (
            "53300",
            "no more connections allowed to database \"app\" (max_db_client_connections = 2)"
        )
    );
    drop(a);
    testkit::wait_until("the freed place to be taken", WAIT, || async {
        connect(&env.conn_string()).await.is_ok()
    })
    .await
    .unwrap();
}

/// `reserve_in_use` of the app pool in SHOW POOLS.
async fn reserve_in_use(admin: &tokio_postgres::Client) -> i64 {
    let rows = admin.simple_query("SHOW POOLS").await.unwrap();
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some("app") => {
                r.get("reserve_in_use").and_then(|v| v.parse().ok())
            }
            _ => None,
        })
        .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_500_clients_gets_the_reserve_only_after_reserve_pool_timeout_and_never_more() {
    common::raise_fd_limit();
    const POOL: i64 = 4;
    const RESERVE: i64 = 3;
    let pg = testkit::PgCluster::start().expect("start postgres");
    let pooler = pooler_with(
        &pg,
        &format!(
            "max_client_conn = 1000\ndefault_pool_size = {POOL}\nreserve_pool_size = {RESERVE}\n\
             reserve_pool_timeout = \"1s\"\n\
             [databases.app]\nhost = \"127.0.0.1\"\nport = PGPORT\n"
        ),
    );
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    let admin = connect(&pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .unwrap();
    let conn = pooler.conn_string("app", "app_pw", "app");
    // Everyone logged in first, so that the burst is of transactions, not of logins.
    let mut clients = Vec::new();
    for _ in 0..500 {
        clients.push(connect(&conn).await.expect("login"));
    }
    let started = std::time::Instant::now();
    let burst: Vec<_> = clients
        .into_iter()
        .map(|c| {
            tokio::spawn(async move {
                c.batch_execute("SELECT pg_sleep(0.05)").await.unwrap();
            })
        })
        .collect();
    // Sample the database and the console until the burst is over.
    let (mut most, mut first_over_pool, mut most_reserve) = (0, None, 0);
    while burst.iter().any(|t| !t.is_finished()) {
        let n = common::app_backends(&direct).await;
        if n > POOL && first_over_pool.is_none() {
            first_over_pool = Some(started.elapsed());
        }
        most = most.max(n);
        most_reserve = most_reserve.max(reserve_in_use(&admin).await);
    }
    for t in burst {
        t.await.unwrap();
    }
    let took = started.elapsed();
    eprintln!(
        "measured: 500 transactions of 50 ms on pool {POOL} + reserve {RESERVE}: {took:?}, \
         most server connections {most}, first over the pool at {first_over_pool:?}, \
         most reserve in use {most_reserve}"
    );
    assert!(most <= POOL + RESERVE, "{most} server connections");
    let first = first_over_pool.expect("the reserve was used");
    assert!(
        first >= std::time::Duration::from_secs(1),
        "the reserve was used after {first:?}, before reserve_pool_timeout"
    );
    assert!(
        first < std::time::Duration::from_secs(5),
        "the reserve came only after {first:?}"
    );
    assert!((1..=RESERVE).contains(&most_reserve), "{most_reserve}");
    // Idle, nobody waiting: back to pool_size.
    testkit::wait_until("the reserve to be given back", WAIT, || async {
        reserve_in_use(&admin).await == 0 && common::app_backends(&direct).await <= POOL
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_database_is_served_by_the_star_entry_and_its_pool_closes_after_autodb_idle_timeout() {
    let pg = testkit::PgCluster::start().expect("start postgres");
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    for db in ["tenant_a", "tenant_b"] {
        direct
            .batch_execute(&format!("CREATE DATABASE {db} OWNER app"))
            .await
            .unwrap();
    }
    let pooler = pooler_with(
        &pg,
        "autodb_idle_timeout = \"1s\"\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = PGPORT\n\
         [databases.\"*\"]\nhost = \"127.0.0.1\"\nport = PGPORT\npool_size = 3\n",
    );
    let admin = connect(&pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .unwrap();
    let pools = || async {
        let rows = admin.simple_query("SHOW POOLS").await.unwrap();
        let mut names: Vec<(String, String)> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                    r.get("database").unwrap_or("").to_owned(),
                    r.get("pool_size").unwrap_or("").to_owned(),
                )),
                _ => None,
            })
            .collect();
        names.sort();
        names
    };
    let mut clients = Vec::new();
    for db in ["tenant_a", "tenant_b"] {
        let c = connect(&pooler.conn_string("app", "app_pw", db))
            .await
            .unwrap_or_else(|e| panic!("{db}: {e}"));
        let got: String = c
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(got, db);
        clients.push(c);
    }
    // A listed database is not the "*" entry's.
    let app = connect(&pooler.conn_string("app", "app_pw", "app"))
        .await
        .unwrap();
    app.simple_query("SELECT 1").await.unwrap();
    let listed = |name: &str| (name.to_owned(), "3".to_owned());
    assert_eq!(
        pools().await,
        [
            ("app".to_owned(), "20".to_owned()),
            listed("tenant_a"),
            listed("tenant_b")
        ]
    );
    // SHOW DATABASES lists the automatic databases while they have pools, as PgBouncer does,
    // each with the name it serves and the "*" entry's settings.
    let databases = || async {
        let rows = admin.simple_query("SHOW DATABASES").await.unwrap();
        let mut names: Vec<(String, String, String)> = rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                    r.get("name").unwrap_or("").to_owned(),
                    r.get("database").unwrap_or("").to_owned(),
                    r.get("pool_size").unwrap_or("").to_owned(),
                )),
                _ => None,
            })
            .collect();
        names.sort();
        names
    };
    let row = |name: &str, db: &str, size: &str| (name.to_owned(), db.to_owned(), size.to_owned());
    assert_eq!(
        databases().await,
        [
            row("*", "*", "3"),
            row("app", "app", "20"),
            row("tenant_a", "tenant_a", "3"),
            row("tenant_b", "tenant_b", "3"),
        ]
    );
    // A database that does not exist: PostgreSQL's own answer.
    let err = connect(&pooler.conn_string("app", "app_pw", "no_such_db"))
        .await
        .expect_err("no such database");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("3D000"),
        "{err}"
    );
    // Without clients the automatic pools go; the listed one stays.
    drop(clients);
    testkit::wait_until("the automatic pools to close", WAIT, || async {
        pools().await == [("app".to_owned(), "20".to_owned())]
    })
    .await
    .unwrap();
    assert_eq!(
        databases().await,
        [row("*", "*", "3"), row("app", "app", "20")],
        "an automatic database is listed only while it has pools"
    );
    // And come back on the next login.
    let again = connect(&pooler.conn_string("app", "app_pw", "tenant_a"))
        .await
        .unwrap();
    again.simple_query("SELECT 1").await.unwrap();
    drop(app);
}

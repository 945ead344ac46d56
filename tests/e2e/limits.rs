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

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

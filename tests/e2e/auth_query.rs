//! auth_query / auth_user / auth_dbname: users that are not in the auth_file log in with the
//! secret the database holds, looked up on a small pool of the pooler's own.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use testkit::{free_port, PgCluster, Pooler};

/// The auth_file: the lookup roles (plaintext, so the pooler can log in as them) and the
/// admin; none of the users that log in through auth_query.
const USERLIST: &str =
    "\"lookup\" \"lookup_pw\"\n\"lookup_fn\" \"lookup_fn_pw\"\n\"admin\" \"admin_pw\"\n";

/// A cluster with `lookup` (superuser: the default query reads pg_shadow), `alice` (SCRAM)
/// and PgBouncer's documented SECURITY DEFINER lookup function, executable by the
/// unprivileged `lookup_fn` only.
fn cluster() -> PgCluster {
    let pg = PgCluster::start().expect("start postgres");
    pg.psql(
        "app",
        "CREATE ROLE lookup LOGIN SUPERUSER PASSWORD 'lookup_pw';\n\
         CREATE ROLE lookup_fn LOGIN PASSWORD 'lookup_fn_pw';\n\
         CREATE ROLE alice LOGIN PASSWORD 'alice_pw';\n\
         CREATE SCHEMA pgbouncer;\n\
         CREATE FUNCTION pgbouncer.user_lookup(in i_username text, out uname text, out phash text)\n\
         RETURNS record AS $$\n\
         BEGIN\n\
             SELECT usename, passwd FROM pg_catalog.pg_shadow\n\
             WHERE usename = i_username INTO uname, phash;\n\
             RETURN;\n\
         END;\n\
         $$ LANGUAGE plpgsql SECURITY DEFINER;\n\
         REVOKE ALL ON FUNCTION pgbouncer.user_lookup(text) FROM public;\n\
         GRANT USAGE ON SCHEMA pgbouncer TO lookup_fn;\n\
         GRANT EXECUTE ON FUNCTION pgbouncer.user_lookup(text) TO lookup_fn;\n",
    )
    .expect("create the lookup roles and function");
    pg
}

fn pooler(pg: &PgCluster, pooler_extra: &str, db_extra: &str) -> Pooler {
    let port = free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\n{pooler_extra}\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n{db_extra}\n",
        pg.port()
    );
    Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)]).expect("start breakwater")
}

async fn current_user(p: &Pooler, user: &str, password: &str) -> String {
    let c = p
        .connect(user, password, "app")
        .await
        .unwrap_or_else(|e| panic!("{user} logs in through auth_query: {e}"));
    c.query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// Backends of `user` (the lookup pool's connections).
async fn backends_of(direct: &tokio_postgres::Client, user: &str) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_scram_role_not_in_the_auth_file_logs_in_through_auth_query_and_strangers_get_28p01() {
    let pg = cluster();
    let p = pooler(
        &pg,
        "auth_type = \"scram-sha-256\"\nauth_user = \"lookup\"",
        "",
    );
    // The client's SCRAM proof is checked against the verifier from pg_shadow, and its keys
    // log in to the server as alice: the pooler never saw alice's password.
    assert_eq!(current_user(&p, "alice", "alice_pw").await, "alice");
    assert_eq!(sqlstate(p.connect("alice", "wrong", "app").await), "28P01");
    // No such role: the same answer as a wrong password.
    assert_eq!(sqlstate(p.connect("nobody", "x", "app").await), "28P01");
    // A role without a password (NULL passwd) cannot log in either.
    pg.psql("app", "CREATE ROLE nopass LOGIN;").unwrap();
    assert_eq!(sqlstate(p.connect("nopass", "", "app").await), "28P01");
    // Users of the auth_file are not looked up: lookup's own entry still works.
    assert_eq!(current_user(&p, "lookup", "lookup_pw").await, "lookup");
}

#[tokio::test]
async fn md5_roles_log_in_with_the_md5_hash_and_scram_roles_with_scram_under_auth_type_md5() {
    let pg = cluster();
    let p = pooler(&pg, "auth_type = \"md5\"\nauth_user = \"lookup\"", "");
    // md5user's password is stored as md5 and pg_hba asks it for md5: the hash answers the
    // client's md5 exchange and the server's.
    assert_eq!(current_user(&p, "md5user", "md5_pw").await, "md5user");
    assert_eq!(sqlstate(p.connect("md5user", "nope", "app").await), "28P01");
    // A SCRAM verifier gets a SCRAM exchange, as with the auth_file.
    assert_eq!(current_user(&p, "alice", "alice_pw").await, "alice");
    assert_eq!(sqlstate(p.connect("ghost", "x", "app").await), "28P01");
}

#[tokio::test]
async fn the_security_definer_function_pattern_works_per_database_without_a_superuser() {
    let pg = cluster();
    // Set on the database, not the pooler: an unprivileged auth_user calling the function.
    let p = pooler(
        &pg,
        "auth_type = \"scram-sha-256\"",
        "auth_user = \"lookup_fn\"\nauth_query = \"SELECT uname, phash FROM pgbouncer.user_lookup($1)\"",
    );
    assert_eq!(current_user(&p, "alice", "alice_pw").await, "alice");
    // The function returns one row of NULLs for an unknown name.
    assert_eq!(sqlstate(p.connect("nobody", "x", "app").await), "28P01");
    // A name that would break a spliced query is only ever a bound parameter.
    assert_eq!(
        sqlstate(p.connect("x' OR '1'='1", "x", "app").await),
        "28P01"
    );
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    assert!(backends_of(&direct, "lookup_fn").await <= 2);
}

#[tokio::test]
async fn lookup_connections_close_after_server_idle_timeout() {
    let pg = cluster();
    let p = pooler(
        &pg,
        "auth_type = \"scram-sha-256\"\nauth_user = \"lookup\"\nserver_idle_timeout = \"2s\"",
        "",
    );
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(current_user(&p, "alice", "alice_pw").await, "alice");
    // Kept for the next lookup, then closed by the maintenance tick like any idle server.
    let kept = backends_of(&direct, "lookup").await;
    let early = started.elapsed();
    testkit::wait_until("the idle lookup connection to close", WAIT, || async {
        backends_of(&direct, "lookup").await == 0
    })
    .await
    .unwrap();
    if early < Duration::from_millis(1500) {
        assert_eq!(kept, 1, "the lookup connection stays open while young");
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before server_idle_timeout's share",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_changed_password_is_picked_up_after_the_cache_ttl_and_the_old_one_is_refused() {
    let pg = cluster();
    let p = pooler(
        &pg,
        "auth_type = \"scram-sha-256\"\nauth_user = \"lookup\"\nauth_cache_ttl = \"1s\"",
        "",
    );
    assert_eq!(current_user(&p, "alice", "alice_pw").await, "alice");
    pg.psql("app", "ALTER ROLE alice PASSWORD 'alice_new';")
        .unwrap();
    // The cached verifier serves until the TTL is over; then the new password works.
    testkit::wait_until("the new password to work", WAIT, || async {
        p.connect("alice", "alice_new", "app").await.is_ok()
    })
    .await
    .unwrap();
    assert_eq!(
        sqlstate(p.connect("alice", "alice_pw", "app").await),
        "28P01"
    );
    // New server connections log in with the new keys: close the pooled ones first.
    let admin = p.connect("admin", "admin_pw", "breakwater").await.unwrap();
    admin.simple_query("RECONNECT app").await.unwrap();
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    testkit::wait_until("alice's old server connections to close", WAIT, || async {
        backends_of(&direct, "alice").await == 0
    })
    .await
    .unwrap();
    assert_eq!(current_user(&p, "alice", "alice_new").await, "alice");
}

#[tokio::test]
async fn a_wrong_password_against_an_answer_older_than_five_seconds_looks_again_before_the_ttl() {
    let pg = cluster();
    let p = pooler(
        &pg,
        "auth_type = \"scram-sha-256\"\nauth_user = \"lookup\"\nauth_cache_ttl = \"10m\"",
        "",
    );
    assert_eq!(current_user(&p, "alice", "alice_pw").await, "alice");
    pg.psql("app", "ALTER ROLE alice PASSWORD 'alice_new';")
        .unwrap();
    // The first tries fail against the cached verifier; one made once it is 5 s old drops it,
    // and the try after that finds the new one, long before the 10 minutes are over.
    let started = std::time::Instant::now();
    testkit::wait_until(
        "the new password to work",
        Duration::from_secs(30),
        || async { p.connect("alice", "alice_new", "app").await.is_ok() },
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[tokio::test]
async fn an_md5_login_with_a_just_changed_password_looks_again_and_gets_in_on_that_try() {
    let pg = cluster();
    let p = pooler(
        &pg,
        "auth_type = \"md5\"\nauth_user = \"lookup\"\nauth_cache_ttl = \"10m\"",
        "",
    );
    assert_eq!(current_user(&p, "md5user", "md5_pw").await, "md5user");
    // The cached hash is at least this old from here on.
    let cached_by = std::time::Instant::now();
    pg.psql(
        "app",
        "SET password_encryption = 'md5';\nALTER ROLE md5user PASSWORD 'md5_new';",
    )
    .unwrap();
    // Tries against a hash younger than 5 s fail (no lookup per wrong guess); the first try
    // once it is older checks the same md5 answer against a fresh lookup and gets in.
    let late_failures = std::sync::atomic::AtomicUsize::new(0);
    testkit::wait_until(
        "the new password to work",
        Duration::from_secs(30),
        || async {
            let tried_at = std::time::Instant::now();
            let ok = p.connect("md5user", "md5_new", "app").await.is_ok();
            if !ok && tried_at.duration_since(cached_by) >= Duration::from_secs(5) {
                late_failures.fetch_add(1, Ordering::Relaxed);
            }
            ok
        },
    )
    .await
    .unwrap();
    assert_eq!(late_failures.load(Ordering::Relaxed), 0);
    assert_eq!(current_user(&p, "md5user", "md5_new").await, "md5user");
    assert_eq!(
        sqlstate(p.connect("md5user", "md5_pw", "app").await),
        "28P01"
    );
}

#[tokio::test]
async fn a_lookup_slower_than_auth_query_timeout_fails_the_login_at_the_timeout() {
    let pg = cluster();
    let p = pooler(
        &pg,
        "auth_type = \"scram-sha-256\"\nauth_user = \"lookup\"\nauth_query_timeout = \"500ms\"\n\
         auth_query = \"SELECT usename, passwd FROM pg_shadow WHERE usename=$1 AND (SELECT true FROM pg_sleep(10))\"",
        "",
    );
    let started = std::time::Instant::now();
    assert_eq!(
        sqlstate(p.connect("alice", "alice_pw", "app").await),
        "08006"
    );
    let took = started.elapsed();
    assert!(
        // The query answers after 10 s: a refusal well before that is the timeout's.
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "refused after {took:?}"
    );
    assert!(
        p.log().contains("auth_query_timeout (500ms) expired"),
        "{}",
        p.log()
    );
}

#[tokio::test]
async fn a_failed_lookup_is_08006_and_the_next_login_tries_again() {
    let pg = cluster();
    // auth_user's password in the auth_file is not the database's: every lookup fails.
    pg.psql("app", "ALTER ROLE lookup PASSWORD 'changed';")
        .unwrap();
    let p = pooler(
        &pg,
        "auth_type = \"scram-sha-256\"\nauth_user = \"lookup\"",
        "",
    );
    assert_eq!(
        sqlstate(p.connect("alice", "alice_pw", "app").await),
        "08006"
    );
    assert!(p.log().contains("auth_query lookup failed"), "{}", p.log());
    // Not cached: once the password matches again, the next login looks again and works.
    pg.psql("app", "ALTER ROLE lookup PASSWORD 'lookup_pw';")
        .unwrap();
    testkit::wait_until("a lookup to work again", WAIT, || async {
        p.connect("alice", "alice_pw", "app").await.is_ok()
    })
    .await
    .unwrap();
}

/// 1,000 logins of 50 made-up names, 100 at a time: each name is looked up about once (the
/// negative cache and single-flight), and the database never sees more lookup connections
/// than auth_pool_size. md5 keeps the clients' side of 1,000 logins cheap; the lookups are the
/// same under SCRAM.
#[tokio::test]
async fn a_storm_of_unknown_users_costs_a_lookup_per_name_on_at_most_auth_pool_size_connections() {
    raise_fd_limit();
    let pg = cluster();
    let mport = free_port();
    let p = Arc::new(pooler(
        &pg,
        &format!(
            "auth_type = \"md5\"\nauth_user = \"lookup\"\nauth_pool_size = 2\n\
             auth_negative_cache_ttl = \"60s\"\n[metrics]\nlisten = \"127.0.0.1:{mport}\""
        ),
        "",
    ));
    let direct = Arc::new(pg.connect("postgres", "postgres", "app").await.unwrap());
    // Samples the lookup role's backends while the storm runs.
    let peak = Arc::new(AtomicI64::new(0));
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (direct, peak, sampling) = (direct.clone(), peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                let n = backends_of(&direct, "lookup").await;
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    const NAMES: usize = 50;
    const LOGINS: usize = 1000;
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let started = std::time::Instant::now();
    let logins = (0..LOGINS).map(|i| {
        let (p, gate) = (p.clone(), gate.clone());
        tokio::spawn(async move {
            let _turn = gate.acquire_owned().await.unwrap();
            sqlstate(p.connect(&format!("ghost{}", i % NAMES), "x", "app").await)
        })
    });
    let codes = futures_util::future::join_all(logins).await;
    let took = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let refused = codes
        .iter()
        .filter(|c| c.as_ref().is_ok_and(|c| c == "28P01"))
        .count();
    assert_eq!(refused, LOGINS, "every made-up name gets 28P01");
    // The exporter publishes on a tick: wait for it to count every login.
    let counts = || async move {
        let body = tokio::task::spawn_blocking(move || http_get(mport, "/metrics"))
            .await
            .unwrap();
        let lookups = series(&body, "breakwater_auth_query_lookups_total").unwrap_or(-1.0);
        let hits = series(&body, "breakwater_auth_query_cache_hits_total").unwrap_or(-1.0);
        (lookups, hits)
    };
    testkit::wait_until("the metrics to count every login", WAIT, || async {
        let (lookups, hits) = counts().await;
        lookups + hits == LOGINS as f64
    })
    .await
    .unwrap();
    let (lookups, hits) = counts().await;
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "lookup storm: {LOGINS} logins of {NAMES} names in {took:?}: {lookups} lookups, \
         {hits} cache hits, peak {peak} lookup backends"
    );
    assert!(
        (NAMES as f64..=2.0 * NAMES as f64).contains(&lookups),
        "{lookups} lookups for {NAMES} names"
    );
    assert!((1..=2).contains(&peak), "peak {peak} lookup backends");
}

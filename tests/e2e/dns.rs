//! The DNS cache, against the test kit's DNS responder: re-resolution after a failed connect,
//! the last good answer when the resolver times out, negative caching of NXDOMAIN.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use testkit::{free_port, DnsAnswer, DnsServer, PgCluster, Pooler};

use crate::common::*;

const NAME: &str = "db.breakwater.test";

/// Breakwater resolving `NAME` through `dns`, with fast back-off and no breaker, so clients keep
/// waiting (within query_wait_timeout) while the name points nowhere useful.
fn pooler_via_dns(pg: &PgCluster, dns: &DnsServer, pooler_extra: &str) -> Pooler {
    let port = free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\n\
         dns_nameservers = [\"{}\"]\ndns_timeout = \"300ms\"\n\
         server_login_retry = \"20ms\"\nserver_login_retry_max = \"200ms\"\n\
         server_breaker_threshold = 0\n{pooler_extra}\n\
         [databases.app]\nhost = \"{NAME}\"\nport = {}\n",
        dns.addr(),
        pg.port()
    );
    Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)]).expect("start breakwater")
}

/// Runs `SELECT n` with the simple protocol (no prepared statement whose Close would need a
/// server later) and returns what came back.
async fn one(c: &tokio_postgres::Client, n: i32) -> i32 {
    let msgs = c
        .simple_query(&format!("SELECT {n}"))
        .await
        .expect("query through breakwater");
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(-1)
}

/// Closes the pool's server connections, so the next query needs a new one (and DNS).
fn kill_server_connections(pg: &PgCluster) {
    pg.psql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'app'",
    )
    .expect("terminate app backends");
}

#[tokio::test]
async fn a_failed_connect_to_a_cached_address_re_resolves_before_the_ttl_expires() {
    let pg = PgCluster::start().expect("start postgres");
    let dns = DnsServer::start().expect("start dns");
    // Nothing listens on 127.0.0.3: connects are refused. The TTL keeps it cached for a minute.
    dns.set(NAME, DnsAnswer::A(vec![Ipv4Addr::new(127, 0, 0, 3)], 300));
    let pooler = pooler_via_dns(
        &pg,
        &dns,
        "dns_max_ttl = \"60s\"\nquery_wait_timeout = \"20s\"",
    );
    let conn = pooler.conn_string("app", "app_pw", "app");
    let client = tokio::spawn(async move {
        let c = connect(&conn).await.map_err(|e| format!("{e:?}"))?;
        c.query_one("SELECT 1", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
            .map_err(|e| e.to_string())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    if client.is_finished() {
        panic!(
            "the client must wait while the server is unreachable: {:?}",
            client.await
        );
    }
    dns.set(NAME, DnsAnswer::A(vec![Ipv4Addr::LOCALHOST], 300));
    let moved = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("the client hung")
        .expect("task");
    assert_eq!(r, Ok(1));
    assert!(
        moved.elapsed() < Duration::from_secs(3),
        "served {:?} after the record changed; the cached answer had a minute left",
        moved.elapsed()
    );
}

#[tokio::test]
async fn a_timing_out_resolver_gets_the_last_good_answer_and_nxdomain_is_cached_briefly() {
    let pg = PgCluster::start().expect("start postgres");
    let dns = DnsServer::start().expect("start dns");
    dns.set(NAME, DnsAnswer::A(vec![Ipv4Addr::LOCALHOST], 1));
    let pooler = pooler_via_dns(
        &pg,
        &dns,
        "dns_min_ttl = \"500ms\"\ndns_max_ttl = \"1s\"\ndns_nxdomain_ttl = \"1s\"\n\
         query_wait_timeout = \"2s\"",
    );
    let c = pooler
        .connect("app", "app_pw", "app")
        .await
        .expect("connect");
    assert_eq!(one(&c, 1).await, 1);

    // The console shows the cached name.
    let admin = pooler
        .connect("admin", "admin_pw", "pgbouncer")
        .await
        .expect("admin console");
    let rows: Vec<_> = admin
        .simple_query("SHOW DNS_HOSTS")
        .await
        .expect("SHOW DNS_HOSTS")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                r.get(0).unwrap_or_default().to_owned(),
                r.get(2).unwrap_or_default().to_owned(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec![(NAME.to_owned(), "127.0.0.1".to_owned())]);

    // The resolver stops answering; once the answer expired, a new server connection must
    // still be made, with the last good answer.
    dns.set(NAME, DnsAnswer::Silent);
    kill_server_connections(&pg);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let asked = dns.queries();
    let started = Instant::now();
    assert_eq!(one(&c, 2).await, 2);
    assert!(
        dns.queries() > asked,
        "the expired answer was not looked up again"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        pooler.log().contains("serving the last good answer"),
        "{}",
        pooler.log()
    );

    // NXDOMAIN is an answer, not a failure: connections fail and the client's wait ends at
    // query_wait_timeout, while the answer is remembered for dns_nxdomain_ttl rather than asked
    // again at every connection attempt.
    dns.set(NAME, DnsAnswer::NxDomain);
    kill_server_connections(&pg);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let asked = dns.queries();
    let started = Instant::now();
    let err = c.simple_query("SELECT 3").await.unwrap_err();
    let waited = started.elapsed();
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(msg.contains(NAME) && msg.contains("not found"), "{err:?}");
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    let during = dns.queries() - asked;
    assert!(
        (1..=8).contains(&during),
        "{during} DNS queries in {waited:?} of NXDOMAIN"
    );

    // Fixed again: served once the negative entry expires.
    dns.set(NAME, DnsAnswer::A(vec![Ipv4Addr::LOCALHOST], 1));
    let c2 = pooler
        .connect("app", "app_pw", "app")
        .await
        .expect("connect after NXDOMAIN");
    assert_eq!(one(&c2, 4).await, 4);
}

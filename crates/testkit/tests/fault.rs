//! The fault proxy between tokio-postgres and a real PostgreSQL: each fault does what it says, it
//! acts promptly, and the counters count.

#![allow(clippy::disallowed_methods)] // a test: its own runtime, never a shard

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use testkit::{wait_until, wait_until_blocking, ByteFault, ConnectFault, FaultProxy, PgCluster};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

fn proxy_to(pg: &PgCluster) -> FaultProxy {
    FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, pg.port()))).unwrap()
}

/// `app`'s connection settings, through the proxy.
fn via(proxy: &FaultProxy) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.port())
        .user("app")
        .password("app_pw")
        .dbname("app");
    config
}

async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

async fn one(client: &tokio_postgres::Client) -> Result<i32, tokio_postgres::Error> {
    Ok(client.query_one("SELECT 1", &[]).await?.get(0))
}

#[tokio::test]
async fn with_no_fault_queries_pass_through_and_connections_are_counted() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    let client = connect(&via(&proxy)).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
    assert_eq!(
        (proxy.attempts(), proxy.open(), proxy.logging_in()),
        (1, 1, 0)
    );
    drop(client);
    wait_until("the connection to close", WAIT, || async {
        proxy.open() == 0
    })
    .await
    .unwrap();
    assert_eq!(proxy.attempts(), 1);
}

#[tokio::test]
async fn connect_latency_delays_the_login_by_at_least_that_much() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    proxy.set_connect(ConnectFault::Latency(Duration::from_millis(300)));
    let start = Instant::now();
    let client = connect(&via(&proxy)).await.unwrap();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Only connects pay it: queries on the connection do not.
    let start = Instant::now();
    assert_eq!(one(&client).await.unwrap(), 1);
    assert!(
        start.elapsed() < Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_blackholed_connect_hangs_until_the_client_gives_up_and_stays_open() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    proxy.set_connect(ConnectFault::Blackhole);
    let mut config = via(&proxy);
    config.connect_timeout(Duration::from_secs(1));
    // tokio-postgres's connect_timeout bounds only the TCP connect, which the kernel completes
    // before the proxy goes silent; the login wait needs a timeout of its own.
    let start = Instant::now();
    let result = timeout(Duration::from_secs(1), connect(&config)).await;
    let took = start.elapsed();
    assert!(
        result.is_err(),
        "the connect finished: {:?}",
        result.map(|r| r.is_ok())
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(
        (proxy.attempts(), proxy.open(), proxy.logging_in()),
        (1, 1, 1)
    );
    // Still held open after the client left, until reset; then new connections get through.
    proxy.reset_all();
    wait_until("the blackholed socket to close", WAIT, || async {
        proxy.open() == 0
    })
    .await
    .unwrap();
    assert_eq!(proxy.logging_in(), 0);
    proxy.set_connect(ConnectFault::None);
    let client = connect(&via(&proxy)).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
    assert_eq!(proxy.attempts(), 2);
}

#[tokio::test]
async fn a_refused_connect_fails_at_once() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    proxy.set_connect(ConnectFault::Refuse);
    let start = Instant::now();
    let err = timeout(WAIT, connect(&via(&proxy)))
        .await
        .unwrap()
        .unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(500), "{took:?}: {err}");
    assert_eq!(proxy.attempts(), 1);
    wait_until("the refused socket to close", WAIT, || async {
        proxy.open() == 0
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_frozen_connection_holds_a_query_until_unfrozen() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    let client = connect(&via(&proxy)).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);

    proxy.set_bytes(ByteFault::Freeze);
    let query = one(&client);
    tokio::pin!(query);
    assert!(
        timeout(Duration::from_millis(300), &mut query)
            .await
            .is_err(),
        "not frozen"
    );
    proxy.set_bytes(ByteFault::None);
    let start = Instant::now();
    assert_eq!(timeout(WAIT, query).await.unwrap().unwrap(), 1);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!((proxy.attempts(), proxy.open()), (1, 1));
}

#[tokio::test]
async fn byte_latency_delays_each_direction() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    let client = connect(&via(&proxy)).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    proxy.set_bytes(ByteFault::Latency(Duration::from_millis(200)));
    let start = Instant::now();
    client.simple_query("SELECT 1").await.unwrap();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
}

#[tokio::test]
async fn reset_all_gives_existing_clients_an_error_and_spares_new_ones() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    let client = connect(&via(&proxy)).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
    proxy.reset_all();
    wait_until("the reset connection to close", WAIT, || async {
        proxy.open() == 0
    })
    .await
    .unwrap();
    timeout(WAIT, one(&client)).await.unwrap().unwrap_err();
    let client = connect(&via(&proxy)).await.unwrap();
    assert_eq!(one(&client).await.unwrap(), 1);
    assert_eq!((proxy.attempts(), proxy.open()), (2, 1));
}

#[tokio::test]
async fn logging_in_counts_logins_until_their_first_ready_for_query() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    let established = connect(&via(&proxy)).await.unwrap();
    assert_eq!((proxy.logging_in(), proxy.peak_logging_in()), (0, 1));
    proxy.reset_peak();
    assert_eq!(proxy.peak_logging_in(), 0);

    // Frozen bytes hold three logins mid-way.
    proxy.set_bytes(ByteFault::Freeze);
    let config = via(&proxy);
    let logins: Vec<_> = (0..3)
        .map(|_| tokio::spawn(connect_owned(config.clone())))
        .collect();
    wait_until("three logins in progress", WAIT, || async {
        proxy.logging_in() == 3
    })
    .await
    .unwrap();
    proxy.set_bytes(ByteFault::None);
    let mut clients = Vec::new();
    for login in logins {
        clients.push(timeout(WAIT, login).await.unwrap().unwrap().unwrap());
    }
    // The proxy sees each 'Z' before it passes it on, so the count is down once the logins end.
    assert_eq!((proxy.logging_in(), proxy.peak_logging_in()), (0, 3));
    // Queries on logged-in connections do not count.
    for client in clients.iter().chain([&established]) {
        assert_eq!(one(client).await.unwrap(), 1);
    }
    assert_eq!(
        (proxy.logging_in(), proxy.peak_logging_in(), proxy.open()),
        (0, 3, 4)
    );
}

async fn connect_owned(
    config: tokio_postgres::Config,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect(&config).await
}

/// A raw TCP client of a proxy in front of an echo server, for what tokio-postgres cannot show:
/// whether the peer sent a FIN, an RST, or nothing.
fn echo_upstream() -> (FaultProxy, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let _ = std::io::copy(&mut reader, &mut stream);
            });
        }
    });
    (FaultProxy::start(addr).unwrap(), echo)
}

fn raw_client(proxy: &FaultProxy) -> TcpStream {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    stream.write_all(b"ping").unwrap();
    let mut buf = [0; 4];
    stream.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    stream
}

#[test]
fn reset_all_sends_an_rst_not_a_fin() {
    let (proxy, _echo) = echo_upstream();
    let mut stream = raw_client(&proxy);
    stream.set_read_timeout(Some(WAIT)).unwrap();
    proxy.reset_all();
    let err = stream.read(&mut [0; 1]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn drop_all_silently_stops_existing_connections_without_closing_them() {
    let (proxy, _echo) = echo_upstream();
    let mut old = raw_client(&proxy);
    proxy.drop_all_silently();
    old.write_all(b"ping").unwrap();
    // Neither an echo, nor a FIN (Ok(0)), nor an RST: the read times out.
    let err = old.read(&mut [0; 4]).unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{err}"
    );
    let _new = raw_client(&proxy);
    assert_eq!((proxy.attempts(), proxy.open()), (2, 2));
}

#[test]
fn a_bandwidth_cap_paces_the_bytes() {
    let (proxy, _echo) = echo_upstream();
    let mut stream = raw_client(&proxy);
    stream.set_read_timeout(Some(WAIT)).unwrap();
    proxy.set_bytes(ByteFault::BandwidthCap(100_000));
    let start = Instant::now();
    let sent = vec![7u8; 50_000];
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        let sent = sent.clone();
        std::thread::spawn(move || stream.write_all(&sent).unwrap())
    };
    let mut echoed = vec![0; sent.len()];
    stream.read_exact(&mut echoed).unwrap();
    let took = start.elapsed();
    writer.join().unwrap();
    assert_eq!(echoed, sent);
    // 50 kB at 100 kB/s is 0.5 s each way; the two directions overlap.
    assert!(took >= Duration::from_millis(450), "{took:?}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
}

#[test]
fn dropping_the_proxy_closes_every_socket() {
    let (proxy, _echo) = echo_upstream();
    let mut forwarded = raw_client(&proxy);
    proxy.set_connect(ConnectFault::Blackhole);
    let mut blackholed = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
    // Accepted, not just queued: a queued connection is reset when the listener closes.
    wait_until_blocking("the blackholed connect to be accepted", WAIT, || {
        proxy.attempts() == 2
    })
    .unwrap();
    proxy.drop_all_silently();
    drop(proxy);
    for stream in [&mut forwarded, &mut blackholed] {
        stream.set_read_timeout(Some(WAIT)).unwrap();
        assert_eq!(stream.read(&mut [0; 1]).unwrap(), 0);
    }
}

#[test]
fn an_upstream_that_refuses_resets_the_client() {
    // A port of ours that nothing listens on.
    let closed = SocketAddr::from((Ipv4Addr::LOCALHOST, testkit::free_port()));
    let proxy = FaultProxy::start(closed).unwrap();
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let err = stream.read(&mut [0; 1]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset, "{err}");
    assert_eq!(proxy.attempts(), 1);
}

#[tokio::test]
async fn a_login_ends_when_the_server_closes_though_the_client_lingers() {
    let pg = PgCluster::start().unwrap();
    let proxy = proxy_to(&pg);
    // A CancelRequest for no backend: the server reads it and closes, sending nothing.
    let mut cancel = 16u32.to_be_bytes().to_vec();
    cancel.extend_from_slice(&80_877_102u32.to_be_bytes());
    cancel.extend_from_slice(&[0; 8]);
    let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, proxy.port())).unwrap();
    client.write_all(&cancel).unwrap();
    wait_until("a login to start and end", WAIT, || async {
        proxy.peak_logging_in() == 1 && proxy.logging_in() == 0
    })
    .await
    .unwrap();
    // The client still holds its socket, so the proxy still holds its side.
    assert_eq!((proxy.open(), proxy.peak_logging_in()), (1, 1));
    drop(client);
    wait_until("the connection to close", WAIT, || async {
        proxy.open() == 0
    })
    .await
    .unwrap();
}

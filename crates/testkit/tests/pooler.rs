//! `Pooler` against a stand-in binary: start, files, log, signals, exit, and cleanup.

use std::time::Duration;

use testkit::{accepts_connections, free_port, wait_until_blocking, Pooler};

const FAKE: &str = env!("CARGO_BIN_EXE_testkit-fake-pooler");

fn process_alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[test]
fn start_writes_the_files_and_returns_once_listening() {
    let port = free_port();
    let pooler = Pooler::start(
        FAKE,
        port,
        &format!("listen_port = {port}\n"),
        &[
            ("userlist.txt", "\"app\" \"app_pw\"\n"),
            ("certs/ca.pem", "x"),
        ],
    )
    .unwrap();
    assert_eq!(pooler.port(), port);
    // Readiness is seen in /proc, without a probe connection (which the pooler would count); look
    // before connecting here ourselves.
    assert!(
        !pooler.log().contains("accepted a connection"),
        "{}",
        pooler.log()
    );
    assert!(accepts_connections(port));
    assert_eq!(
        std::fs::read_to_string(pooler.dir().join("userlist.txt")).unwrap(),
        "\"app\" \"app_pw\"\n"
    );
    assert!(pooler.dir().join("certs/ca.pem").is_file());
    assert!(pooler.dir().join("pooler.toml").is_file());
    let expected_rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let log = pooler.log();
    assert!(
        log.contains(&format!("RUST_LOG={expected_rust_log}\n")),
        "{log}"
    );
}

#[test]
fn a_pooler_that_exits_at_startup_is_an_error_with_its_log() {
    let err = match Pooler::start(FAKE, free_port(), "# no port\n", &[]) {
        Ok(_) => panic!("started without a port"),
        Err(e) => e,
    };
    let message = format!("{err:#}");
    assert!(message.contains("fatal: no listen_port"), "{message}");
}

#[test]
fn file_names_must_stay_inside_the_pooler_dir() {
    let port = free_port();
    let config = format!("listen_port = {port}\n");
    for name in ["/etc/evil", "../evil"] {
        assert!(
            Pooler::start(FAKE, port, &config, &[(name, "")]).is_err(),
            "{name}"
        );
    }
}

#[test]
fn a_signal_reaches_the_pooler_and_wait_exit_reports_it() {
    use std::os::unix::process::ExitStatusExt;

    let port = free_port();
    let mut pooler = Pooler::start(FAKE, port, &format!("listen_port = {port}\n"), &[]).unwrap();
    assert!(pooler.wait_exit(Duration::from_millis(100)).is_err());
    assert_eq!(pooler.exit_status().unwrap(), None);
    pooler.signal(libc::SIGTERM);
    let status = pooler.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    assert!(!accepts_connections(port));
}

#[test]
fn dropping_a_pooler_kills_it() {
    let port = free_port();
    let pooler = Pooler::start(FAKE, port, &format!("listen_port = {port}\n"), &[]).unwrap();
    let (pid, dir) = (pooler.pid(), pooler.dir().to_owned());
    drop(pooler);
    assert!(!process_alive(pid));
    assert!(!dir.exists());
    wait_until_blocking("the port to close", Duration::from_secs(5), || {
        !accepts_connections(port)
    })
    .unwrap();
}

#[tokio::test]
async fn connect_returns_the_driver_error_when_nothing_speaks_postgres() {
    let port = free_port();
    let pooler = Pooler::start(FAKE, port, &format!("listen_port = {port}\n"), &[]).unwrap();
    assert!(pooler
        .conn_string("app", "app_pw", "app")
        .contains(&format!("port={port}")));
    let err = pooler.connect("app", "app_pw", "app").await.unwrap_err();
    assert!(err.as_db_error().is_none(), "{err}");
}

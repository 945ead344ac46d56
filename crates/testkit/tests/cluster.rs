//! The throwaway cluster: it starts, every role logs in with its own authentication method, it is
//! configurable, and it goes away however the test ends.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::{accepts_connections, wait_until_blocking, PgCluster, PgOptions};

fn process_alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

#[tokio::test]
async fn every_role_logs_in_over_tcp_with_its_own_auth_method() {
    let pg = PgCluster::start().unwrap();
    for (user, password, db) in [
        ("app", "app_pw", "app"),
        ("md5user", "md5_pw", "app"),
        ("plainuser", "plain_pw", "app"),
        ("trustuser", "", "app"),
        ("postgres", "postgres", "postgres"),
    ] {
        let client = pg
            .connect(user, password, db)
            .await
            .unwrap_or_else(|e| panic!("{user}: {e:#}"));
        let row = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
    }
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT rolname || ' ' || left(rolpassword, 3) FROM pg_authid \
             WHERE rolname IN ('app', 'md5user') ORDER BY 1"
        )
        .unwrap(),
        "app SCR\nmd5user md5"
    );
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let pg = PgCluster::start().unwrap();
    for (user, db) in [("app", "app"), ("md5user", "app"), ("plainuser", "app")] {
        let err = pg.connect(user, "wrong", db).await.unwrap_err();
        let db_error = err
            .chain()
            .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
            .and_then(|e| e.as_db_error())
            .unwrap_or_else(|| panic!("{user}: not a server error: {err:#}"));
        assert_eq!(db_error.code().code(), "28P01", "{user}: {db_error}");
    }
}

#[tokio::test]
async fn app_creates_tables_in_its_database() {
    let pg = PgCluster::start().unwrap();
    let client = pg.connect("app", "app_pw", "app").await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1), (2)")
        .await
        .unwrap();
    assert_eq!(pg.psql("app", "SELECT sum(id) FROM t").unwrap(), "3");
}

#[test]
fn psql_errors_carry_the_servers_message() {
    let pg = PgCluster::start().unwrap();
    let err = pg.psql("app", "SELECT no_such_column").unwrap_err();
    assert!(
        format!("{err:#}").contains("column \"no_such_column\" does not exist"),
        "{err:#}"
    );
}

#[test]
fn options_reach_postgresql_conf() {
    let pg = PgCluster::start_with(PgOptions {
        max_connections: 20,
        extra_conf: vec!["work_mem = '7MB'".to_owned()],
    })
    .unwrap();
    assert_eq!(pg.psql("postgres", "SHOW max_connections").unwrap(), "20");
    assert_eq!(pg.psql("postgres", "SHOW work_mem").unwrap(), "7MB");
    assert_eq!(
        pg.psql("postgres", "SHOW unix_socket_directories").unwrap(),
        pg.socket_dir().to_str().unwrap()
    );
    assert!(pg
        .socket_dir()
        .join(format!(".s.PGSQL.{}", pg.port()))
        .exists());
}

#[test]
fn clusters_started_concurrently_get_distinct_ports() {
    let handles: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(|| PgCluster::start().unwrap()))
        .collect();
    let clusters: Vec<PgCluster> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_ne!(clusters[0].port(), clusters[1].port());
    assert_ne!(clusters[0].data_dir(), clusters[1].data_dir());
    for pg in &clusters {
        assert!(accepts_connections(pg.port()));
        assert_eq!(pg.psql("app", "SELECT 1").unwrap(), "1");
    }
}

#[test]
fn restart_keeps_the_port_and_the_data() {
    let mut pg = PgCluster::start().unwrap();
    let port = pg.port();
    pg.psql(
        "app",
        "CREATE TABLE kept (v text); INSERT INTO kept VALUES ('yes')",
    )
    .unwrap();
    let first_pid = pg.pid().unwrap();

    pg.stop();
    assert_eq!(pg.pid(), None);
    assert!(!accepts_connections(port));

    pg.restart();
    assert_eq!(pg.port(), port);
    assert_ne!(pg.pid(), Some(first_pid));
    assert_eq!(pg.psql("app", "SELECT v FROM kept").unwrap(), "yes");
}

#[test]
fn dropping_a_cluster_stops_postgres_and_removes_its_dir() {
    let pg = PgCluster::start().unwrap();
    let (port, pid, dir) = (pg.port(), pg.pid().unwrap(), pg.socket_dir().to_owned());
    assert!(accepts_connections(port));
    drop(pg);
    wait_until_blocking("postgres to stop", Duration::from_secs(10), || {
        !accepts_connections(port) && !process_alive(pid)
    })
    .unwrap();
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn a_panicking_test_still_stops_its_cluster() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let pg = PgCluster::start().unwrap();
        tx.send((pg.port(), pg.pid().unwrap())).unwrap();
        panic!("the test failed");
    })
    .join();
    assert!(result.is_err());
    let (port, pid) = rx.recv().unwrap();
    // The unwinding drop asked for an immediate stop; the postmaster exits shortly after.
    wait_until_blocking(
        "postgres to stop after the panic",
        Duration::from_secs(10),
        || !accepts_connections(port) && !process_alive(pid),
    )
    .unwrap();
}

/// Marks the helper's report line; libtest prints `test <name> ... ` on the same line first.
const HELPER_MARK: &str = "testkit-helper-cluster:";

/// Run by `a_killed_test_process_leaves_no_postgres_behind` in a child process, which it kills.
#[test]
#[ignore = "helper: only does something when run by another test"]
fn helper_start_a_cluster_and_hang() {
    if std::env::var_os("TESTKIT_HELPER").is_none() {
        return;
    }
    let pg = PgCluster::start().unwrap();
    println!(
        "{HELPER_MARK} {} {} {}",
        pg.port(),
        pg.pid().unwrap(),
        pg.socket_dir().display()
    );
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[test]
fn a_killed_test_process_leaves_no_postgres_behind() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_start_a_cluster_and_hang",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TESTKIT_HELPER", "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    // Read on a thread so a helper that never reports fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let report = stdout.lines().map_while(Result::ok).find_map(|line| {
            let (_, fields) = line.split_once(HELPER_MARK)?;
            Some(fields.trim().to_owned())
        });
        let _ = tx.send(report);
    });
    let report = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(report)) => report,
        outcome => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the helper reported no cluster: {outcome:?}");
        }
    };
    let mut fields = report.split(' ');
    let port: u16 = fields.next().unwrap().parse().unwrap();
    let pid: u32 = fields.next().unwrap().parse().unwrap();
    let dir = PathBuf::from(fields.next().unwrap());
    assert!(accepts_connections(port));

    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();

    wait_until_blocking(
        "the watchdog to stop postgres",
        Duration::from_secs(20),
        || !process_alive(pid) && !dir.exists(),
    )
    .unwrap();
    assert!(!accepts_connections(port));
}

//! Running Breakwater where it is deployed: probes on the metrics listener, and shutdown as
//! a pod or a rolling restart needs it.

use std::time::Duration;

use crate::common::*;

/// A pooler with the HTTP listener on a port of its own and one warm server, as a sidecar runs.
fn start_sidecar(pooler_extra: &str) -> (Env, u16) {
    let mport = testkit::free_port();
    let env = start(
        &format!("{pooler_extra}\n[metrics]\nlisten = \"127.0.0.1:{mport}\""),
        "user = \"app\"\nmin_pool_size = 1\n",
    );
    (env, mport)
}

#[tokio::test]
async fn readiness_turns_503_while_the_database_is_down_and_200_when_it_returns() {
    let (mut env, mport) = start_sidecar("");
    let ready = || async move { http_status(mport, "/readyz").await };
    testkit::wait_until("ready", WAIT, || async { ready().await.0 == 200 })
        .await
        .unwrap();
    assert_eq!(http_status(mport, "/healthz").await.0, 200);
    // Only the three paths: a probe pointed at a wrong path must not pass.
    for path in ["/", "/health", "/ready", "/metricsx"] {
        assert_eq!(http_status(mport, path).await.0, 404, "{path}");
    }

    env.pg.stop();
    testkit::wait_until("not ready with the database down", WAIT, || async {
        ready().await.0 == 503
    })
    .await
    .unwrap();
    let (_, why) = ready().await;
    assert!(why.contains("app/app"), "{why}");
    // Alive all the same: restarting the pooler would not bring the database back.
    assert_eq!(http_status(mport, "/healthz").await.0, 200);

    env.pg.try_restart().unwrap();
    // Maintenance reconnects with back-off (at most server_retry_max apart, 5 s by default).
    testkit::wait_until("ready again", Duration::from_secs(20), || async {
        ready().await.0 == 200
    })
    .await
    .unwrap();
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

/// Sends `sig` and waits until `/readyz` says the pooler is shutting down: the signal was
/// handled, so a second one is seen as a second one.
async fn signal_and_see_shutdown(env: &Env, mport: u16, sig: i32) {
    env.pooler.signal(sig);
    testkit::wait_until("/readyz to say shutting down", WAIT, || async {
        http_status(mport, "/readyz").await == (503, "shutting down\n".into())
    })
    .await
    .unwrap();
}

/// Waits for the pooler to exit without blocking the runtime, whose tasks carry the test's
/// clients' goodbyes.
async fn exited(pooler: &mut testkit::Pooler) -> std::process::ExitStatus {
    let mut status = None;
    testkit::wait_until("breakwater to exit", WAIT, || {
        status = pooler.exit_status().unwrap();
        std::future::ready(status.is_some())
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", pooler.log()));
    status.unwrap()
}

#[tokio::test]
async fn after_sigterm_connected_apps_keep_working_until_they_disconnect() {
    let (mut env, mport) = start_sidecar("shutdown_timeout = \"60s\"");
    let app = env.client().await;
    let idle = env.client().await;
    app.batch_execute("CREATE TABLE drained (n int); BEGIN; INSERT INTO drained VALUES (1)")
        .await
        .unwrap();
    signal_and_see_shutdown(&env, mport, libc::SIGTERM).await;
    testkit::wait_until("new logins are refused", WAIT, || async {
        env.pooler.connect("app", "app_pw", "app").await.is_err()
    })
    .await
    .unwrap();
    // The transaction in flight commits, and the app goes on with more, as an app draining
    // its own requests does; the idle client was not told to leave either.
    app.batch_execute("INSERT INTO drained VALUES (2); COMMIT")
        .await
        .unwrap();
    for n in 3..=5i32 {
        app.execute("INSERT INTO drained VALUES ($1)", &[&n])
            .await
            .unwrap();
    }
    idle.simple_query("SELECT 1").await.unwrap();
    assert!(
        env.pooler.exit_status().unwrap().is_none(),
        "exited with clients connected"
    );
    drop(idle);
    drop(app);
    let status = exited(&mut env.pooler).await;
    assert!(status.success(), "exit status {status:?}");
    let direct = env.direct().await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM drained", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
}

#[tokio::test]
async fn a_second_sigterm_stops_at_once_even_mid_transaction() {
    let (mut env, mport) = start_sidecar("shutdown_timeout = \"60s\"");
    let app = env.client().await;
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    signal_and_see_shutdown(&env, mport, libc::SIGTERM).await;
    env.pooler.signal(libc::SIGTERM);
    let status = env.pooler.wait_exit(Duration::from_secs(5)).unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(app.simple_query("SELECT 2").await.is_err());
}

/// The repository's top directory.
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kills a process group when dropped: whatever a failing test leaves behind.
struct Group(i32);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

#[test]
fn killing_the_quickstart_script_stops_breakwater_and_postgres_with_it() {
    use std::os::unix::process::CommandExt;
    let (pg_port, bw_port) = (testkit::free_port(), testkit::free_port());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    let mut script = std::process::Command::new("bash")
        .arg(repo().join("scripts/quickstart.sh"))
        .env("BW_BIN", BIN)
        .env("PG_PORT", pg_port.to_string())
        .env("BW_PORT", bw_port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap();
    let _group = Group(script.id() as i32);
    // initdb and a first start take a while on a loaded machine.
    testkit::wait_until_blocking("the quickstart to listen", Duration::from_secs(90), || {
        if let Some(status) = script.try_wait().unwrap() {
            panic!("the quickstart exited ({status}) before listening");
        }
        testkit::accepts_connections(bw_port)
    })
    .unwrap();
    let printed = std::fs::read_to_string(&out).unwrap();
    assert!(printed.contains("password admin_pw"), "{printed}");
    let ps = psql_command(bw_port, "app", "app_pw", "app", &["-c", "SELECT 42"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ps.stdout).contains("42"), "{ps:?}");

    // SAFETY: kill has no memory-safety preconditions; the script is not reaped yet.
    unsafe { libc::kill(script.id() as i32, libc::SIGTERM) };
    testkit::wait_until_blocking("the script to exit", WAIT, || {
        script.try_wait().unwrap().is_some()
    })
    .unwrap();
    assert!(
        !testkit::accepts_connections(bw_port),
        "breakwater still listens after the script was killed"
    );
    assert!(
        !testkit::accepts_connections(pg_port),
        "postgres still runs"
    );
}

/// Runs `podman` with `args`; its stdout, or the failure with stderr.
fn podman(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("podman")
        .args(args)
        .output()
        .map_err(|e| format!("podman: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "podman {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Removes the test's container and image however the test ends.
struct Container {
    name: String,
    image: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = podman(&["logs", &self.name]) {
                eprintln!("container log:\n{logs}");
            }
        }
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
        let _ = podman(&["rmi", "-f", &self.image]);
    }
}

#[tokio::test]
async fn the_container_image_serves_clients_in_front_of_postgres() {
    if podman(&["--version"]).is_err() {
        // scripts/test.sh installs podman, so CI always runs this.
        assert!(
            std::env::var_os("CI").is_none(),
            "podman is missing (scripts/test.sh installs it: apt-get install podman runc)"
        );
        eprintln!("skipped: podman is not installed");
        return;
    }
    let id = format!("{}-{}", std::process::id(), testkit::free_port());
    let image = format!("localhost/breakwater:e2e-{id}");
    let name = format!("breakwater-e2e-{id}");
    let build = tokio::task::spawn_blocking({
        let image = image.clone();
        move || {
            std::process::Command::new(repo().join("examples/container/build.sh"))
                .arg(&image)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        build.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let container = Container {
        name: name.clone(),
        image: image.clone(),
    };

    let pg = testkit::PgCluster::start().unwrap();
    let (port, mport) = (testkit::free_port(), testkit::free_port());
    // The image's user is nobody: the mounted config must be readable by anyone.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(repo().join("examples/container/pooler.toml"))
        .unwrap()
        .replace("listen_addr = \"0.0.0.0\"", "listen_addr = \"127.0.0.1\"")
        .replace("listen_port = 6432", &format!("listen_port = {port}"))
        .replace("0.0.0.0:9127", &format!("127.0.0.1:{mport}"))
        .replace("port = 5432", &format!("port = {}", pg.port()));
    std::fs::write(dir.path().join("pooler.toml"), config).unwrap();
    std::fs::write(dir.path().join("userlist.txt"), USERLIST).unwrap();
    for (path, mode) in [
        (dir.path().to_owned(), 0o755),
        (dir.path().join("pooler.toml"), 0o644),
        (dir.path().join("userlist.txt"), 0o644),
    ] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let volume = format!("{}:/etc/breakwater:ro", dir.path().display());
    podman(&[
        "--runtime",
        "runc",
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "-v",
        &volume,
        &image,
    ])
    .unwrap();
    testkit::wait_until(
        "the container to be ready",
        Duration::from_secs(30),
        || async {
            tokio::task::spawn_blocking(move || testkit::accepts_connections(mport))
                .await
                .unwrap()
                && http_status(mport, "/readyz").await.0 == 200
        },
    )
    .await
    .unwrap();
    let conn = format!("host=127.0.0.1 port={port} user=app password=app_pw dbname=app");
    let client = connect(&conn).await.unwrap();
    let row = client
        .query_one("SELECT current_user::text, 6 * 7", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("app".into(), 42)
    );
    drop(client);
    // `podman stop` sends SIGTERM; with its client gone the pooler exits cleanly at once. Off
    // the runtime, whose connection task still has to say goodbye for the dropped client.
    let stop_name = name.clone();
    tokio::task::spawn_blocking(move || podman(&["stop", "-t", "20", &stop_name]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        podman(&["inspect", "--format", "{{.State.ExitCode}}", &name]).unwrap(),
        "0"
    );
    drop(container);
}

/// A breakwater run as systemd runs a `Type=notify` unit: NOTIFY_SOCKET names a datagram socket
/// the test reads.
#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let pg = testkit::PgCluster::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    let port = testkit::free_port();
    std::fs::write(dir.path().join("userlist.txt"), USERLIST).unwrap();
    let config = dir.path().join("pooler.toml");
    std::fs::write(
        &config,
        format!(
            "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\n\
             [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n",
            pg.port()
        ),
    )
    .unwrap();
    let mut child = Kill(
        std::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 512];
    let mut next = || match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => format!("no notification within {WAIT:?}: {e}"),
    };
    assert_eq!(next(), "READY=1\n");
    assert!(
        testkit::accepts_connections(port),
        "READY=1 before listening"
    );
    let signal = |sig| {
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
        unsafe { libc::kill(child.0.id() as i32, sig) }
    };
    signal(libc::SIGHUP);
    let reloading = next();
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(next(), "READY=1\n");
    signal(libc::SIGTERM);
    assert_eq!(next(), "STOPPING=1\n");
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Kills the child when dropped, unless it already exited.
struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test]
async fn sigterm_keeps_accepting_for_shutdown_accept_delay_while_not_ready() {
    let (mut env, mport) =
        start_sidecar("shutdown_accept_delay = \"3s\"\nshutdown_timeout = \"30s\"");
    let app = env.client().await;
    let signalled = std::time::Instant::now();
    signal_and_see_shutdown(&env, mport, libc::SIGTERM).await;
    // Not ready, yet still letting apps in: a Service that still routes here loses nothing.
    let late = env.client().await;
    late.simple_query("SELECT 1").await.unwrap();
    testkit::wait_until("new logins are refused", WAIT, || async {
        env.pooler.connect("app", "app_pw", "app").await.is_err()
    })
    .await
    .unwrap();
    let refused_after = signalled.elapsed();
    assert!(
        refused_after >= Duration::from_secs(3),
        "refused after {refused_after:?}, before shutdown_accept_delay"
    );
    // Both clients still work until they leave.
    app.simple_query("SELECT 2").await.unwrap();
    late.simple_query("SELECT 3").await.unwrap();
    drop((app, late));
    assert!(exited(&mut env.pooler).await.success());
}

#[tokio::test]
async fn with_so_reuseport_a_new_process_takes_over_the_port_while_the_old_one_drains() {
    let (mut old, mport) = start_sidecar("so_reuseport = true\nshutdown_timeout = \"30s\"");
    let port = old.pooler.port();
    let app = old.client().await;
    app.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // The new version binds the same port. Pooler::start sees the port listening already,
    // so look for the new process's own line in its log.
    let config = std::fs::read_to_string(old.pooler.dir().join("pooler.toml"))
        .unwrap()
        .replace(
            &format!("127.0.0.1:{mport}"),
            &format!("127.0.0.1:{}", testkit::free_port()),
        );
    let mut new = testkit::Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)])
        .expect("start the new breakwater");
    testkit::wait_until("the new process to listen", WAIT, || {
        std::future::ready(new.log().contains("breakwater listening"))
    })
    .await
    .unwrap();
    assert!(new.exit_status().unwrap().is_none(), "{}", new.log());
    signal_and_see_shutdown(&old, mport, libc::SIGTERM).await;
    // The old process closed its listener: every new login is the new process's.
    testkit::wait_until("a login after the old listener closed", WAIT, || async {
        old.pooler.connect("app", "app_pw", "app").await.is_ok()
    })
    .await
    .unwrap();
    let logins = |log: &str| log.matches(": login ").count();
    let (old_before, new_before) = (logins(&old.pooler.log()), logins(&new.log()));
    for _ in 0..5 {
        let c = old.pooler.connect("app", "app_pw", "app").await.unwrap();
        c.simple_query("SELECT 1").await.unwrap();
    }
    assert_eq!(
        logins(&old.pooler.log()),
        old_before,
        "the old process took a login"
    );
    assert_eq!(logins(&new.log()), new_before + 5);
    // Its own client finishes its transaction there, and then it goes.
    app.batch_execute("SELECT 2; COMMIT").await.unwrap();
    drop(app);
    assert!(exited(&mut old.pooler).await.success());
}

//! Configuration as a user meets it: the shipped example and every config under examples/ pass
//! `--check`, `--check` catches what would fail at start (a busy port), PgBouncer habits get
//! the fix spelled out, and `--upstream` runs a pooler with no file at all.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use testkit::{free_port, pg_bin, PgCluster, Pooler};

use crate::common::{psql, BIN};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `breakwater --check` with `args`, an environment without BREAKWATER_*/DATABASE_URL from the
/// test runner, and `env`.
fn check(args: &[&str], env: &[(&str, &str)], dir: &Path) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--check").args(args).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("BREAKWATER_") || k == "DATABASE_URL" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied())
        .output()
        .expect("run breakwater --check")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// pgbench as `app` against database `app` through `pooler`; panics with the pooler's log if it
/// fails, else returns its output.
fn pgbench_as_app(pooler: &Pooler, password: &str, args: &[&str]) -> String {
    let out = Command::new(pg_bin("pgbench").expect("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &pooler.port().to_string(),
            "-U",
            "app",
        ])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", password)
        .output()
        .expect("run pgbench");
    let all = text(&out);
    assert!(
        out.status.success(),
        "pgbench {args:?}: {all}\n{}",
        pooler.log()
    );
    all
}

/// Config files under examples/, at any depth.
fn example_configs(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            example_configs(&path, found);
        } else if path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
}

#[test]
fn the_shipped_example_and_every_example_config_pass_check() {
    // pooler.toml.example names userlist.txt next to it, as a real install would have.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        repo_root().join("pooler.toml.example"),
        dir.path().join("pooler.toml"),
    )
    .unwrap();
    std::fs::write(dir.path().join("userlist.txt"), "\"app\" \"app_pw\"\n").unwrap();
    let port = free_port().to_string();
    let set_port = format!("listen_port={port}");
    let out = check(&["-c", "pooler.toml", "--set", &set_port], &[], dir.path());
    assert!(out.status.success(), "pooler.toml.example: {}", text(&out));

    let mut configs = Vec::new();
    example_configs(&repo_root().join("examples"), &mut configs);
    for config in configs {
        // The example's own port may be taken on this machine; the bind is tested below.
        let port = format!("listen_port={}", free_port());
        let out = check(
            &["-c", config.to_str().unwrap(), "--set", &port],
            &[],
            dir.path(),
        );
        assert!(out.status.success(), "{}: {}", config.display(), text(&out));
    }
}

#[test]
fn check_reports_a_busy_port_and_every_problem_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    std::fs::write(
        dir.path().join("pooler.toml"),
        format!("[pooler]\nlisten_port = {port}\nauth_type = \"trust\"\n"),
    )
    .unwrap();
    let out = check(&["-c", "pooler.toml"], &[], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        text(&out)
    );

    std::fs::write(
        dir.path().join("pooler.toml"),
        "[pooler]\nauth_type = \"trust\"\nadmin_user = [\"admin\"]\nquery_wait_timeout = 120\n\
         tcp_keepalive = 1\nignore_startup_parameters = \"extra_float_digits\"\nlogfile = \"/var/log/pgbouncer.log\"\n",
    )
    .unwrap();
    let out = check(&["-c", "pooler.toml"], &[], dir.path());
    let all = text(&out);
    assert_eq!(out.status.code(), Some(2), "{all}");
    for want in [
        "4 problems",
        "line 3: pooler.admin_user: unknown key; did you mean `admin_users`?",
        "line 4: pooler.query_wait_timeout: a duration needs a unit: write \"120s\"",
        "line 5: pooler.tcp_keepalive: write true instead of 1",
        "line 7: pooler.logfile: a PgBouncer setting Breakwater has no equivalent of",
    ] {
        assert!(all.contains(want), "{want}\n{all}");
    }
    // A key Breakwater needs no equivalent of is a warning, not an error.
    assert!(!all.contains("pooler.ignore_startup_parameters:"), "{all}");

    std::fs::write(
        dir.path().join("pgbouncer.ini"),
        "[databases]\napp = host=127.0.0.1 port=5432 dbname=app\n\n[pgbouncer]\nlisten_addr = *\nlisten_port = 6432\n",
    )
    .unwrap();
    let out = check(&["-c", "pgbouncer.ini"], &[], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("run `breakwater import-pgbouncer"),
        "{}",
        text(&out)
    );
}

#[test]
fn check_shows_where_each_value_came_from() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pooler.toml"),
        "[pooler]\nauth_type = \"trust\"\ndefault_pool_size = 7\nquery_wait_timeout = \"30s\"\n",
    )
    .unwrap();
    let port = free_port().to_string();
    let out = check(
        &["-c", "pooler.toml", "--set", "query_wait_timeout=45s"],
        &[
            ("BREAKWATER_LISTEN_PORT", port.as_str()),
            ("BREAKWATER_DEFAULT_POOL_SIZE", "9"),
        ],
        dir.path(),
    );
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    // defaults < file < environment < flags
    for want in [
        format!("listen_port = {port}"),
        "(BREAKWATER_LISTEN_PORT)".into(),
        "default_pool_size = 9".into(),
        "(BREAKWATER_DEFAULT_POOL_SIZE)".into(),
        "query_wait_timeout = 45s".into(),
        "(--set)".into(),
        "auth_type = trust".into(),
        "(pooler.toml line 2)".into(),
    ] {
        assert!(all.contains(&want), "{want}\n{all}");
    }
}

#[test]
fn check_into_a_pipe_nobody_reads_ends_quietly_with_its_verdict() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pooler.toml"),
        "[pooler]\nauth_type = \"trust\"\ndefault_pool_size = 7\n",
    )
    .unwrap();
    let port = free_port().to_string();
    // As `breakwater --check | head -0`: the reader is gone before the first line.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut cmd = Command::new(BIN);
    cmd.args(["--check", "-c", "pooler.toml"])
        .current_dir(dir.path())
        .env("BREAKWATER_LISTEN_PORT", &port)
        .env_remove("DATABASE_URL")
        .stdout(writer);
    let out = cmd.output().expect("run breakwater --check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "the config is fine: {stderr}");
}

#[test]
fn listen_addr_star_and_comma_lists_listen_on_each_address() {
    let pg = PgCluster::start().expect("start postgres");
    for listen_addr in ["*", "127.0.0.1, localhost"] {
        let port = free_port();
        let config = format!(
            "[pooler]\nlisten_addr = \"{listen_addr}\"\nlisten_port = {port}\nauth_file = \"userlist.txt\"\n\
             [databases.app]\nport = {}\n",
            pg.port()
        );
        let pooler = Pooler::start(
            BIN,
            port,
            &config,
            &[("userlist.txt", crate::common::USERLIST)],
        )
        .expect("start breakwater");
        let out = psql(port, "app", "app_pw", "app", &["-tAc", "SELECT 40 + 2"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "{}",
            pooler.log()
        );
    }
}

/// `--upstream` alone: no file, clients log in with the URL's user and password, pgbench and
/// psql work through it.
#[test]
fn upstream_url_serves_psql_and_pgbench_without_a_config_file() {
    let pg = PgCluster::start().expect("start postgres");
    pg.psql("postgres", "ALTER ROLE app PASSWORD 'app pw@1'")
        .expect("set a password with URL-special characters");
    let port = free_port();
    let url = format!("postgres://app:app%20pw%401@127.0.0.1:{}/app", pg.port());
    let listen_port = port.to_string();
    let pooler = Pooler::start_with(
        BIN,
        port,
        &["--upstream", &url],
        &[
            ("BREAKWATER_LISTEN_PORT", &listen_port),
            ("BREAKWATER_ADMIN_USERS", "app"),
            ("BREAKWATER_DEFAULT_POOL_SIZE", "3"),
        ],
        &[],
    )
    .expect("start breakwater with --upstream");

    let out = psql(
        port,
        "app",
        "app pw@1",
        "app",
        &["-tAc", "SELECT current_user"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "app",
        "{}",
        pooler.log()
    );
    let wrong = psql(port, "app", "nope", "app", &["-tAc", "SELECT 1"]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let pgbench = |args: &[&str]| pgbench_as_app(&pooler, "app pw@1", args);
    pgbench(&["-i", "-s", "1", "-q"]);
    let all = pgbench(&["-c", "4", "-j", "2", "-t", "50", "-S"]);
    assert!(
        all.contains("number of transactions actually processed: 200/200"),
        "{all}"
    );

    // RELOAD with no file applies the same URL and environment again.
    let console = |sql: &str| {
        let out = psql(
            port,
            "app",
            "app pw@1",
            "breakwater",
            &["-tA", "-F", "|", "-c", sql],
        );
        assert!(out.status.success(), "{sql}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    console("RELOAD");
    let config = console("SHOW CONFIG");
    assert!(
        config
            .lines()
            .any(|l| l.starts_with("default_pool_size|3|")),
        "{config}"
    );
    let databases = console("SHOW DATABASES");
    assert!(
        databases.lines().any(|l| l.starts_with("app|127.0.0.1|")),
        "{databases}"
    );
}

/// A production-style pgbouncer.ini (36 keys, connection-string databases, a `*` fallback,
/// `[users]`, `%include`, integer seconds, `listen_addr = *`, lists) imports; the report names
/// what was mapped and what has no equivalent; the result passes `--check` and serves pgbench.
#[test]
fn a_real_pgbouncer_ini_imports_and_the_result_serves_pgbench() {
    let pg = PgCluster::start().expect("start postgres");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let ini = format!(
        ";; PgBouncer config of a web tier\n\
         [databases]\n\
         app = host=127.0.0.1 port={pg} dbname=app pool_size=10 reserve_pool=5\n\
         app_ro = host=127.0.0.1 port={pg} dbname=app user=app password='app_pw' pool_mode=session connect_query='SET search_path = public' timezone=UTC datestyle=ISO\n\
         * = host=127.0.0.1 port={pg} auth_user=pgbouncer\n\
         \n[users]\napp = pool_mode=transaction\n\
         \n[pgbouncer]\n\
         logfile = /var/log/pgbouncer/pgbouncer.log\n\
         pidfile = /var/run/pgbouncer/pgbouncer.pid\n\
         listen_addr = *\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = scram-sha-256\n\
         auth_file = userlist.txt\n\
         auth_user = pgbouncer\n\
         auth_query = SELECT usename, passwd FROM pg_shadow WHERE usename=$1\n\
         admin_users = admin, ops\n\
         stats_users = stats\n\
         pool_mode = transaction\n\
         default_pool_size = 20\n\
         min_pool_size = 1\n\
         reserve_pool_size = 5\n\
         reserve_pool_timeout = 3\n\
         max_client_conn = 1000\n\
         max_db_connections = 50\n\
         max_user_connections = 50\n\
         server_reset_query = DISCARD ALL\n\
         server_check_delay = 30\n\
         server_check_query = select 1\n\
         server_lifetime = 3600\n\
         server_idle_timeout = 600\n\
         server_connect_timeout = 15\n\
         server_login_retry = 1\n\
         client_login_timeout = 60\n\
         query_timeout = 0\n\
         query_wait_timeout = 120\n\
         client_idle_timeout = 0\n\
         idle_transaction_timeout = 300\n\
         ignore_startup_parameters = extra_float_digits,search_path\n\
         tcp_keepalive = 1\n\
         tcp_keepidle = 0\n\
         tcp_keepcnt = 0\n\
         log_connections = 1\n\
         log_disconnections = 0\n\
         log_pooler_errors = 1\n\
         stats_period = 60\n\
         max_prepared_statements = 100\n\
         so_reuseport = 1\n\
         pkt_buf = 4096\n\
         %include extra.ini\n",
        pg = pg.port()
    );
    std::fs::write(dir.path().join("pgbouncer.ini"), ini).unwrap();
    std::fs::write(
        dir.path().join("extra.ini"),
        "verbose = 0\ndns_max_ttl = 15\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("userlist.txt"), crate::common::USERLIST).unwrap();

    let out = Command::new(BIN)
        .args(["import-pgbouncer", "pgbouncer.ini", "-o", "pooler.toml"])
        .current_dir(dir.path())
        .output()
        .expect("run import-pgbouncer");
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    for want in [
        "listen_addr = * → listen_addr = \"*\"",
        "query_wait_timeout = 120 → query_wait_timeout = \"2m\"",
        "admin_users = admin, ops → admin_users = [\"admin\", \"ops\"]",
        "tcp_keepalive = 1 → tcp_keepalive = true",
        "server_login_retry = 1 → server_login_retry = \"1s\": the base of an exponential back-off",
        "app → [databases.app]",
        "reserve_pool_size=5",
        "connect_query=\"SET search_path = public\"",
        "timezone=\"UTC\"",
        "datestyle=ISO: not imported: no per-database datestyle",
        "* → [databases.*] host=\"127.0.0.1\"",
        "auth_query = SELECT",
        "app → [users.app] pool_mode=\"transaction\"",
        "max_user_connections = 50 → max_user_connections = 50",
        "logfile = /var/log/pgbouncer/pgbouncer.log: Breakwater logs to stdout",
        "ignore_startup_parameters = extra_float_digits,search_path: Breakwater forwards every startup parameter",
        "extra.ini:1  verbose = 0: 0 is the default log level",
        "extra.ini:2  dns_max_ttl = 15 → dns_max_ttl = \"15s\"",
        "followed %include",
        "the result passes the config checks",
    ] {
        assert!(report.contains(want), "{want}\n{report}");
    }
    let toml = std::fs::read_to_string(dir.path().join("pooler.toml")).unwrap();
    assert!(toml.contains("max_db_connections = 50"), "{toml}");
    assert!(
        toml.contains("[users.app]\npool_mode = \"transaction\""),
        "{toml}"
    );

    let out = check(&["-c", "pooler.toml"], &[], dir.path());
    assert!(out.status.success(), "{}\n{toml}", text(&out));
    // Not over an existing file without --force.
    let again = Command::new(BIN)
        .args(["import-pgbouncer", "pgbouncer.ini"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));

    let config = dir.path().join("pooler.toml");
    let pooler = Pooler::start_with(BIN, port, &["--config", config.to_str().unwrap()], &[], &[])
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let pgbench = |args: &[&str]| pgbench_as_app(&pooler, "app_pw", args);
    pgbench(&["-i", "-s", "1", "-q"]);
    let all = pgbench(&["-c", "8", "-j", "2", "-t", "50"]);
    assert!(
        all.contains("number of transactions actually processed: 400/400"),
        "{all}"
    );
}

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
        &[("BREAKWATER_LISTEN_PORT", &listen_port)],
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

    let pgbench = |args: &[&str]| {
        let out = Command::new(pg_bin("pgbench").expect("pgbench"))
            .args(["-h", "127.0.0.1", "-p", &listen_port, "-U", "app"])
            .args(args)
            .arg("app")
            .env("PGPASSWORD", "app pw@1")
            .output()
            .expect("run pgbench");
        let all = text(&out);
        assert!(
            out.status.success(),
            "pgbench {args:?}: {all}\n{}",
            pooler.log()
        );
        all
    };
    pgbench(&["-i", "-s", "1", "-q"]);
    let all = pgbench(&["-c", "4", "-j", "2", "-t", "50", "-S"]);
    assert!(
        all.contains("number of transactions actually processed: 200/200"),
        "{all}"
    );
}

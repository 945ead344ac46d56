//! Throwaway PostgreSQL clusters: initdb into a temp dir, a loopback port of our own, fixed roles
//! for every authentication method the pooler must speak, and a stop that happens however the test
//! ends. A cluster never touches the system's clusters, sockets or data directories.

use std::ffi::OsStr;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::conn;
use crate::port::free_port;
use crate::process::{command_as, log_tail, run, server_user, OsUser, Watchdog};

/// Superuser, with password `postgres`; trusted over the unix socket.
pub const SUPERUSER: &str = "postgres";

/// Roles created in every cluster, as `(user, password)`. `app` owns database `app`;
/// `md5user`'s password is stored as md5 and pg_hba asks it for md5, `plainuser` is asked for a
/// cleartext password, `trustuser` is trusted, everyone else is asked for SCRAM-SHA-256.
pub const ROLES: [(&str, &str); 5] = [
    (SUPERUSER, "postgres"),
    ("app", "app_pw"),
    ("md5user", "md5_pw"),
    ("plainuser", "plain_pw"),
    ("trustuser", ""),
];

const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Finds a PostgreSQL program: in `$PG_BIN_DIR` if set, else in the newest
/// `/usr/lib/postgresql/<version>/bin/` that has it, else on `PATH`.
pub fn pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN_DIR") {
        let path = Path::new(&dir).join(name);
        if path.is_file() {
            return Ok(path);
        }
        bail!("PG_BIN_DIR is {} but it has no `{name}`", path.display());
    }
    for dir in packaged_bin_dirs() {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
        }
    }
    bail!(
        "PostgreSQL program `{name}` not found in $PG_BIN_DIR, /usr/lib/postgresql/*/bin or PATH: \
         install postgresql (apt-get install postgresql), or point PG_BIN_DIR at its bin directory"
    )
}

/// `/usr/lib/postgresql/*/bin`, newest version first (Debian's layout for side-by-side versions).
fn packaged_bin_dirs() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") else {
        return Vec::new();
    };
    let mut versions: Vec<(Vec<u32>, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort_by(|a, b| b.0.cmp(&a.0));
    versions.into_iter().map(|(_, dir)| dir).collect()
}

/// Settings for [`PgCluster::start_with`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `max_connections` of the server.
    pub max_connections: u32,
    /// Lines appended to postgresql.conf after the test kit's own, so they win.
    pub extra_conf: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 100,
            extra_conf: Vec::new(),
        }
    }
}

/// A throwaway PostgreSQL cluster listening on 127.0.0.1 and on a unix socket in its own temp
/// dir. Dropping it stops the server (immediate mode) and removes the directory; if the test
/// process is killed first, a watchdog process does both.
pub struct PgCluster {
    port: u16,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log_file: PathBuf,
    run_as: Option<OsUser>,
    /// The running postmaster's pid; `None` while stopped.
    postmaster_pid: Option<u32>,
    watchdog: Option<Watchdog>,
    // Last: removed only after the server has stopped writing into it.
    dir: tempfile::TempDir,
}

impl PgCluster {
    /// Starts a cluster with default [`PgOptions`].
    pub fn start() -> anyhow::Result<PgCluster> {
        PgCluster::start_with(PgOptions::default())
    }

    /// Creates, configures and starts a cluster, then creates the roles of [`ROLES`] and
    /// database `app`. Blocks (it runs `initdb`, `pg_ctl` and `psql`), which is fine in a test,
    /// async or not.
    pub fn start_with(opts: PgOptions) -> anyhow::Result<PgCluster> {
        let run_as = server_user()?;
        let pg_ctl = pg_bin("pg_ctl")?;
        let bin_dir = pg_ctl
            .parent()
            .map(Path::to_path_buf)
            .context("pg_ctl path has no parent directory")?;

        let dir = cluster_dir(run_as.as_ref(), "creating the cluster's temp dir")?;
        let socket_path_len = dir.path().as_os_str().len() + "/.s.PGSQL.65535".len();
        if socket_path_len > 100 {
            bail!(
                "temp dir {} is too long for a unix socket path; set TMPDIR to something short",
                dir.path().display()
            );
        }
        initdb(
            &bin_dir,
            dir.path(),
            &dir.path().join("data"),
            run_as.as_ref(),
        )?;
        let cluster = PgCluster::launch(dir, bin_dir, run_as, &opts)?;
        cluster.create_roles()?;
        Ok(cluster)
    }

    /// Starts a streaming standby of `primary` on a port of its own: `pg_basebackup -R` over the
    /// primary's unix socket into a temp dir, then the test kit's settings (port, socket dir,
    /// `opts.extra_conf`) on top. Roles and databases are the primary's.
    pub fn start_standby_of(primary: &PgCluster, opts: PgOptions) -> anyhow::Result<PgCluster> {
        let run_as = primary.run_as.clone();
        let bin_dir = primary.bin_dir.clone();
        let dir = cluster_dir(run_as.as_ref(), "creating the standby's temp dir")?;
        run(
            command_as(bin_dir.join("pg_basebackup"), run_as.as_ref())
                .arg("-D")
                .arg(dir.path().join("data"))
                .arg("-h")
                .arg(primary.socket_dir())
                .args(["-p", &primary.port.to_string(), "-U", SUPERUSER])
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"])
                .current_dir(dir.path()),
            "pg_basebackup",
        )?;
        PgCluster::launch(dir, bin_dir, run_as, &opts)
    }

    /// Configures the cluster whose data directory initdb or pg_basebackup has filled in
    /// `dir/data`, arms the watchdog (before the server exists, so that nothing outlives a
    /// killed test) and starts the server on a free port.
    fn launch(
        dir: tempfile::TempDir,
        bin_dir: PathBuf,
        run_as: Option<OsUser>,
        opts: &PgOptions,
    ) -> anyhow::Result<PgCluster> {
        let data_dir = dir.path().join("data");
        let port = free_port();
        write_config(&data_dir, dir.path(), port, opts)?;
        let watchdog = Watchdog::spawn(
            r#""$1" stop -D "$2" -m immediate -w >/dev/null 2>&1; rm -rf "$3""#,
            &[
                bin_dir.join("pg_ctl").as_os_str(),
                data_dir.as_os_str(),
                dir.path().as_os_str(),
            ],
            run_as.as_ref(),
        )?;
        let mut cluster = PgCluster {
            port,
            bin_dir,
            data_dir,
            log_file: dir.path().join("postgres.log"),
            run_as,
            postmaster_pid: None,
            watchdog: Some(watchdog),
            dir,
        };
        cluster.start_server()?;
        Ok(cluster)
    }

    /// Promotes a standby to primary and waits until it accepts writes (`pg_ctl promote -w`).
    pub fn promote(&self) -> anyhow::Result<()> {
        run(
            self.pg_ctl()
                .args(["promote", "-w", "-s", "-t", PG_CTL_TIMEOUT_SECS]),
            "pg_ctl promote",
        )
        .map(|_| ())
    }

    /// The TCP port, on [`PgCluster::host`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Always `127.0.0.1`: the cluster listens on nothing else.
    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    /// Where the unix socket `.s.PGSQL.<port>` lives.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory with the binaries this cluster runs (initdb, pg_ctl, postgres, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The postmaster's pid, `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster_pid
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_file)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// A key=value connection string for tokio-postgres, over TCP.
    pub fn conn_string(&self, user: &str, password: &str, db: &str) -> String {
        conn::conn_string(self.host(), self.port, user, password, db)
    }

    /// Connects over TCP and spawns the connection task on the current tokio runtime.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> anyhow::Result<tokio_postgres::Client> {
        conn::connect(&self.conn_string(user, password, db))
            .await
            .with_context(|| format!("connecting to postgres on port {} as {user}", self.port))
    }

    /// Runs `sql` (any number of statements, `\` commands too) with psql as the superuser over
    /// the unix socket, stopping at the first error. Returns what psql printed in unaligned,
    /// tuples-only mode (`-At`), without the final newline: `psql("app", "select 1")` is `"1"`.
    pub fn psql(&self, db: &str, sql: &str) -> anyhow::Result<String> {
        let psql = self.program("psql")?;
        let mut child = command_as(&psql, None)
            .arg("-X")
            .arg("-q")
            .arg("-At")
            .args(["-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", psql.display()))?;
        // Fed from a thread: psql may fill its stdout pipe before it has read all of a long script.
        let feeder = child.stdin.take().map(|mut stdin| {
            let sql = sql.to_owned();
            std::thread::spawn(move || stdin.write_all(sql.as_bytes()))
        });
        let output = child.wait_with_output().context("waiting for psql")?;
        if let Some(feeder) = feeder {
            // A write error means psql stopped reading, which its exit status explains.
            let _ = feeder.join();
        }
        if !output.status.success() {
            bail!(
                "psql on database {db} failed ({}): {}\nSQL: {sql}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim_end(),
            );
        }
        let stdout = String::from_utf8(output.stdout).context("psql printed non-UTF-8")?;
        Ok(stdout.trim_end_matches('\n').to_owned())
    }

    /// Stops the server (fast mode: sessions are terminated, nothing is left half-done). Does
    /// nothing if it is stopped already.
    pub fn stop(&mut self) {
        if let Err(e) = self.stop_server("fast") {
            eprintln!("testkit: stopping postgres on port {}: {e:#}", self.port);
        }
    }

    /// Stops the server if it runs, and starts it again on the same port.
    ///
    /// # Panics
    /// If the server does not come back; the message carries the server log. Use
    /// [`PgCluster::try_restart`] to handle that instead.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("{e:#}");
        }
    }

    /// [`PgCluster::restart`], returning the failure instead of panicking.
    pub fn try_restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.start_server()
    }

    /// `pg_ctl restart -m immediate`: the server stops as in a crash (backends killed, no
    /// checkpoint), then starts again and replays WAL, as after a database host's failure.
    /// Returns once it accepts connections again.
    pub fn try_restart_immediate(&mut self) -> anyhow::Result<()> {
        self.stop_server("immediate")?;
        self.start_server()
    }

    fn program(&self, name: &str) -> anyhow::Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            pg_bin(name)
        }
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = command_as(self.bin_dir.join("pg_ctl"), self.run_as.as_ref());
        cmd.arg("-D")
            .arg(&self.data_dir)
            .current_dir(self.dir.path());
        cmd
    }

    fn start_server(&mut self) -> anyhow::Result<()> {
        if self.postmaster_pid.is_some() {
            return Ok(());
        }
        // With -l the postmaster's output goes to the log file, not to our pipes, so waiting for
        // pg_ctl's output does not wait for the server.
        let started = run(
            self.pg_ctl()
                .args(["start", "-w", "-s", "-t", PG_CTL_TIMEOUT_SECS, "-l"])
                .arg(&self.log_file),
            "pg_ctl start",
        );
        if let Err(e) = started {
            bail!("{e:#}\npostgres log:\n{}", log_tail(&self.log_file, 50));
        }
        let pid_file = self.data_dir.join("postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .with_context(|| format!("reading {}", pid_file.display()))?
            .lines()
            .next()
            .and_then(|line| line.trim().parse::<u32>().ok())
            .with_context(|| format!("no pid on the first line of {}", pid_file.display()))?;
        self.postmaster_pid = Some(pid);
        Ok(())
    }

    fn stop_server(&mut self, mode: &str) -> anyhow::Result<()> {
        let Some(pid) = self.postmaster_pid.take() else {
            return Ok(());
        };
        let stopped = run(
            self.pg_ctl()
                .args(["stop", "-w", "-s", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode]),
            "pg_ctl stop",
        );
        if stopped.is_err() && process_alive(pid) && self.data_dir.join("postmaster.pid").exists() {
            // SAFETY: kill has no memory-safety preconditions. The pid is the postmaster's: its
            // pid file is still there, so it has not exited and the pid cannot have been reused.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        stopped.map(|_| ())
    }

    fn create_roles(&self) -> anyhow::Result<()> {
        let mut sql = String::new();
        for (user, password) in ROLES {
            let create = match user {
                SUPERUSER => continue,
                "trustuser" => format!("CREATE ROLE {user} LOGIN;\n"),
                "md5user" => format!(
                    "SET password_encryption = 'md5';\n\
                     CREATE ROLE {user} LOGIN PASSWORD '{password}';\n\
                     RESET password_encryption;\n"
                ),
                _ => format!("CREATE ROLE {user} LOGIN PASSWORD '{password}';\n"),
            };
            sql.push_str(&create);
        }
        // PostgreSQL 15 took CREATE on schema public away from PUBLIC; tests create tables as
        // whichever role they log in as.
        sql.push_str(
            "CREATE DATABASE app OWNER app;\n\
             \\connect app\n\
             GRANT ALL ON SCHEMA public TO PUBLIC;\n",
        );
        self.psql("postgres", &sql)
            .context("creating the test kit's roles and database")?;
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- postgres log (port {}), last 30 lines ----\n{}\n---- end of postgres log ----",
                self.port,
                log_tail(&self.log_file, 30)
            );
        }
        let _ = self.stop_server("immediate");
        // The directory goes with `self.dir` right after this.
        self.watchdog.take();
    }
}

fn process_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// A temp dir for a cluster, given to the server's OS user when we run as root.
fn cluster_dir(run_as: Option<&OsUser>, what: &'static str) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("bw-pg-")
        .tempdir()
        .context(what)?;
    if let Some(user) = run_as {
        user.chown(dir.path())?;
    }
    Ok(dir)
}

fn initdb(
    bin_dir: &Path,
    dir: &Path,
    data_dir: &Path,
    run_as: Option<&OsUser>,
) -> anyhow::Result<()> {
    let pwfile = dir.join("pwfile");
    std::fs::write(&pwfile, "postgres\n").context("writing initdb's password file")?;
    if let Some(user) = run_as {
        user.chown(&pwfile)?;
    }
    let result = run(
        command_as(bin_dir.join("initdb"), run_as)
            .arg("-D")
            .arg(data_dir)
            .args(["-U", SUPERUSER])
            .arg(OsStr::new("--pwfile"))
            .arg(&pwfile)
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                // Nothing here has to survive a power cut.
                "--no-sync",
            ])
            .current_dir(dir),
        "initdb",
    );
    let _ = std::fs::remove_file(&pwfile);
    result.map(|_| ())
}

fn write_config(data_dir: &Path, dir: &Path, port: u16, opts: &PgOptions) -> anyhow::Result<()> {
    let socket_dir = dir.to_str().context("temp dir path is not UTF-8")?;
    let mut conf = format!(
        "\n# breakwater-testkit\n\
         listen_addresses = '127.0.0.1'\n\
         port = {port}\n\
         unix_socket_directories = '{}'\n\
         max_connections = {}\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n\
         timezone = 'UTC'\n",
        socket_dir.replace('\'', "''"),
        opts.max_connections,
    );
    for line in &opts.extra_conf {
        conf.push_str(line);
        conf.push('\n');
    }
    let conf_path = data_dir.join("postgresql.conf");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&conf_path)
        .with_context(|| format!("opening {}", conf_path.display()))?;
    file.write_all(conf.as_bytes())
        .with_context(|| format!("writing {}", conf_path.display()))?;

    // First match wins, so the per-user lines come before the catch-all.
    let hba = "\
local   all          all                     trust
local   replication  all                     trust
host    all          md5user    127.0.0.1/32 md5
host    all          plainuser  127.0.0.1/32 password
host    all          trustuser  127.0.0.1/32 trust
host    all          all        127.0.0.1/32 scram-sha-256
host    replication  all        127.0.0.1/32 scram-sha-256
";
    // Truncating keeps the file's owner (the postgres user when we run as root).
    let hba_path = data_dir.join("pg_hba.conf");
    std::fs::write(&hba_path, hba).with_context(|| format!("writing {}", hba_path.display()))?;
    Ok(())
}

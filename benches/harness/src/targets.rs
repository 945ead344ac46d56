//! The things pgbench is pointed at: PostgreSQL itself, PgBouncer, Breakwater, and any other
//! pooler given on the command line, each started with equivalent settings (transaction mode,
//! pool size 16, SCRAM or md5 client auth against the server's own verifier or hash, quiet logs)
//! and stopped when its handle drops.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procfs::{self, OsUser};

pub const DB: &str = "app";
pub const USER: &str = "app";
pub const PASSWORD: &str = "app_pw";
/// The test kit's role whose password PostgreSQL stores as md5 and asks for with md5 (pg_hba):
/// md5 scenarios log in as it everywhere, direct included.
pub const MD5_USER: &str = "md5user";
pub const MD5_PASSWORD: &str = "md5_pw";
pub const POOL_SIZE: u32 = 16;
pub const MAX_CLIENT_CONN: u32 = 60_000;
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How clients authenticate to a pooler. The pgbench runs use SCRAM, the `storm-md5` scenario
/// md5; the idle-client memory test uses trust so that opening 10k clients costs the harness no
/// PBKDF2 (and the pooler nothing but the login itself). Whatever the clients use, the poolers
/// log in to PostgreSQL as `app` with its password (SCRAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Scram,
    Md5,
    Trust,
}

impl ClientAuth {
    /// The user and password pgbench logs in with.
    pub fn login(self) -> (&'static str, &'static str) {
        match self {
            ClientAuth::Md5 => (MD5_USER, MD5_PASSWORD),
            ClientAuth::Scram | ClientAuth::Trust => (USER, PASSWORD),
        }
    }

    /// `auth_type` as both poolers spell it.
    fn auth_type(self) -> &'static str {
        match self {
            ClientAuth::Scram => "scram-sha-256",
            ClientAuth::Md5 => "md5",
            ClientAuth::Trust => "trust",
        }
    }
}

/// A running target. `pid` is the pooler's (None for direct Postgres, whose CPU we do not
/// charge to anyone).
pub struct Target {
    pub name: String,
    pub port: u16,
    pub pid: Option<u32>,
    _handle: Option<Handle>,
}

/// Held only to be dropped: dropping it stops the pooler.
#[allow(dead_code)]
enum Handle {
    Breakwater(testkit::Pooler),
    Process(ChildProcess),
}

impl Target {
    pub fn direct(cluster: &testkit::PgCluster) -> Target {
        Target {
            name: "direct".to_owned(),
            port: cluster.port(),
            pid: None,
            _handle: None,
        }
    }

    pub fn is_pooler(&self) -> bool {
        self.pid.is_some()
    }
}

/// The auth_file line for `app`, with the verifier PostgreSQL itself stores: both poolers then
/// check clients exactly as the server would, without running PBKDF2 per login.
pub fn userlist(cluster: &testkit::PgCluster) -> anyhow::Result<String> {
    let verifier = cluster.psql(
        "postgres",
        &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'"),
    )?;
    if !verifier.starts_with("SCRAM-SHA-256$") {
        bail!("role {USER} has no SCRAM verifier: {verifier:?}");
    }
    Ok(format!("\"{USER}\" \"{verifier}\"\n"))
}

/// The auth_file line for the md5 role, with the hash PostgreSQL itself stores
/// (`md5` + md5(password + user)). Both poolers map it onto the `app` pool.
pub fn md5_userlist(cluster: &testkit::PgCluster) -> anyhow::Result<String> {
    let hash = cluster.psql(
        "postgres",
        &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{MD5_USER}'"),
    )?;
    if !(hash.starts_with("md5") && hash.len() == 35) {
        bail!("role {MD5_USER} has no md5 password: {hash:?}");
    }
    Ok(format!("\"{MD5_USER}\" \"{hash}\"\n"))
}

/// Lets the md5 role run pgbench's select-only script on the data `app` owns (it reads
/// pgbench_branches for the scale, then pgbench_accounts).
pub fn grant_md5_user(cluster: &testkit::PgCluster) -> anyhow::Result<()> {
    cluster.psql(
        DB,
        &format!(
            "GRANT SELECT ON pgbench_accounts, pgbench_branches, pgbench_tellers, \
             pgbench_history TO {MD5_USER}"
        ),
    )?;
    Ok(())
}

pub fn start_breakwater(
    bin: &Path,
    cluster: &testkit::PgCluster,
    userlist: &str,
    auth: ClientAuth,
    name: &str,
    extra: &[String],
) -> anyhow::Result<Target> {
    let port = testkit::free_port();
    let extra: String = extra.iter().map(|kv| format!("{kv}\n")).collect();
    let auth_type = auth.auth_type();
    let config = format!(
        "[pooler]\n\
         listen_addr = \"127.0.0.1\"\n\
         listen_port = {port}\n\
         pool_mode = \"transaction\"\n\
         max_client_conn = {MAX_CLIENT_CONN}\n\
         default_pool_size = {POOL_SIZE}\n\
         auth_type = \"{auth_type}\"\n\
         auth_file = \"userlist.txt\"\n\
         admin_users = [\"{USER}\"]\n\
         {extra}\
         \n\
         [databases.{DB}]\n\
         host = \"127.0.0.1\"\n\
         port = {pg_port}\n\
         dbname = \"{DB}\"\n\
         user = \"{USER}\"\n\
         password = \"{PASSWORD}\"\n",
        pg_port = cluster.port(),
    );
    let pooler = testkit::Pooler::start(bin, port, &config, &[("userlist.txt", userlist)])
        .context("starting breakwater")?;
    Ok(Target {
        name: name.to_owned(),
        port,
        pid: Some(pooler.pid()),
        _handle: Some(Handle::Breakwater(pooler)),
    })
}

pub fn start_pgbouncer(
    bin: &Path,
    cluster: &testkit::PgCluster,
    userlist: &str,
    auth: ClientAuth,
    name: &str,
) -> anyhow::Result<Target> {
    let port = testkit::free_port();
    // PgBouncer refuses to run as root.
    let run_as = if procfs::is_root() {
        Some(procfs::lookup_user("postgres").context("PgBouncer must not run as root")?)
    } else {
        None
    };
    let dir = tempfile::Builder::new().prefix("bw-pgbouncer-").tempdir()?;
    let auth_type = auth.auth_type();
    let d = dir.path().display();
    let ini = format!(
        "[databases]\n\
         {DB} = host=127.0.0.1 port={pg_port} dbname={DB} user={USER} password={PASSWORD}\n\
         \n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = {auth_type}\n\
         auth_file = {d}/userlist.txt\n\
         admin_users = {USER}\n\
         pool_mode = transaction\n\
         default_pool_size = {POOL_SIZE}\n\
         max_client_conn = {MAX_CLIENT_CONN}\n\
         logfile = {d}/pgbouncer.log\n\
         log_connections = 0\n\
         log_disconnections = 0\n\
         log_stats = 0\n\
         verbose = 0\n",
        pg_port = cluster.port(),
    );
    std::fs::write(dir.path().join("pgbouncer.ini"), ini)?;
    std::fs::write(dir.path().join("userlist.txt"), userlist)?;
    let mut cmd = Command::new(bin);
    cmd.arg(dir.path().join("pgbouncer.ini"));
    if let Some(user) = &run_as {
        for path in ["", "pgbouncer.ini", "userlist.txt"] {
            procfs::chown(&dir.path().join(path), user)?;
        }
        cmd.uid(user.uid).gid(user.gid);
    }
    let child = ChildProcess::spawn(cmd, dir, "pgbouncer.out", run_as.as_ref())?;
    let pid = child.pid();
    let handle = Handle::Process(child);
    wait_listening(port, &handle, name)?;
    Ok(Target {
        name: name.to_owned(),
        port,
        pid: Some(pid),
        _handle: Some(handle),
    })
}

/// `--other NAME=CMD`: runs `CMD` under `sh -c "exec CMD"` (so its pid is the pooler's) in a temp
/// dir, after replacing `{port}` (where it must listen), `{pg_port}`, `{dir}` (the temp dir) and
/// `{userlist}` (a PgBouncer-format auth_file with app's SCRAM verifier). It must accept user
/// `app`, password `app_pw`, database `app`.
pub fn start_other(
    name: &str,
    command: &str,
    cluster: &testkit::PgCluster,
    userlist: &str,
) -> anyhow::Result<Target> {
    let port = testkit::free_port();
    let dir = tempfile::Builder::new().prefix("bw-other-").tempdir()?;
    let userlist_path = dir.path().join("userlist.txt");
    std::fs::write(&userlist_path, userlist)?;
    let command = command
        .replace("{port}", &port.to_string())
        .replace("{pg_port}", &cluster.port().to_string())
        .replace("{dir}", &dir.path().display().to_string())
        .replace("{userlist}", &userlist_path.display().to_string());
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("exec {command}"))
        .current_dir(dir.path());
    let child = ChildProcess::spawn(cmd, dir, "output.log", None)?;
    let pid = child.pid();
    let handle = Handle::Process(child);
    wait_listening(port, &handle, name)?;
    Ok(Target {
        name: name.to_owned(),
        port,
        pid: Some(pid),
        _handle: Some(handle),
    })
}

fn wait_listening(port: u16, handle: &Handle, name: &str) -> anyhow::Result<()> {
    let Handle::Process(child) = handle else {
        return Ok(());
    };
    let deadline = Instant::now() + START_TIMEOUT;
    while !testkit::accepts_connections(port) {
        if !child.alive() || Instant::now() >= deadline {
            bail!(
                "{name} did not listen on port {port} within {START_TIMEOUT:?}; its output:\n{}",
                child.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A child process with its own temp dir, killed when dropped, and killed by the kernel if the
/// harness dies first (PR_SET_PDEATHSIG), so an interrupted run leaves no pooler behind.
struct ChildProcess {
    child: Child,
    log: PathBuf,
    // Last: removed after the child is gone.
    _dir: tempfile::TempDir,
}

impl ChildProcess {
    fn spawn(
        mut cmd: Command,
        dir: tempfile::TempDir,
        log_name: &str,
        owner: Option<&OsUser>,
    ) -> anyhow::Result<ChildProcess> {
        let log = dir.path().join(log_name);
        let out = std::fs::File::create(&log)?;
        if let Some(user) = owner {
            procfs::chown(&log, user)?;
        }
        let err = out.try_clone()?;
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        Ok(ChildProcess {
            child,
            log,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&self) -> bool {
        // SAFETY: signal 0 only checks existence; the child is not reaped before Drop.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, 0) };
        rc == 0 && !is_zombie(self.child.id())
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PgBouncer's binary: on PATH or in /usr/sbin (Debian's place, often not on a user's PATH).
/// When missing and `install` is set, installs Debian's package with apt-get.
pub fn find_pgbouncer(install: bool) -> anyhow::Result<Option<PathBuf>> {
    let find = || {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain([PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join("pgbouncer"))
            .find(|p| p.is_file())
    };
    if let Some(found) = find() {
        return Ok(Some(found));
    }
    if !install {
        return Ok(None);
    }
    eprintln!("== pgbouncer not found: installing Debian's package (apt-get install pgbouncer)");
    let sudo = !procfs::is_root();
    for args in [
        &["apt-get", "update", "-qq"][..],
        &["apt-get", "install", "-y", "-qq", "pgbouncer"][..],
    ] {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.args(args);
            c
        } else {
            let mut c = Command::new(args[0]);
            c.args(&args[1..]);
            c
        };
        let status = cmd
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .with_context(|| format!("running {args:?}"))?;
        if !status.success() {
            bail!("{args:?} failed ({status}); install pgbouncer by hand or leave it out with --targets direct,breakwater");
        }
    }
    // Debian's package enables a system service; we never use it (our own config, own port).
    find()
        .map(Some)
        .context("apt-get installed pgbouncer but its binary is nowhere to be found")
}

/// The first line a program prints for `--version`, or a note saying why there is none.
pub fn version_of(program: &Path) -> String {
    match Command::new(program).arg("--version").output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("?")
            .trim()
            .to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}

//! Child processes of the test kit: who runs PostgreSQL (the `postgres` OS user when we are root,
//! since postgres refuses to run as root), and the watchdog that cleans up after a test process
//! that died before its `Drop`s could run. Nothing here knows about PostgreSQL configuration.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

use anyhow::{bail, Context};

/// An OS account that server processes run as.
#[derive(Debug, Clone)]
pub(crate) struct OsUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

impl OsUser {
    fn lookup(name: &str) -> anyhow::Result<OsUser> {
        let c_name = CString::new(name).context("user name contains a NUL byte")?;
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        // SAFETY: `passwd` is plain old data; getpwnam_r fills it with pointers into `buf`, which
        // outlives every read below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc))
                .with_context(|| format!("looking up OS user `{name}`"));
        }
        if found.is_null() {
            bail!("OS user `{name}` does not exist");
        }
        let home = if pwd.pw_dir.is_null() {
            PathBuf::from("/")
        } else {
            // SAFETY: non-null pw_dir points at a NUL-terminated string inside `buf`.
            let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
            PathBuf::from(OsStr::from_bytes(dir.to_bytes()))
        };
        Ok(OsUser {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home,
        })
    }

    /// Gives `path` to this user, so that a server running as them may write there.
    pub(crate) fn chown(&self, path: &Path) -> anyhow::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("chown {} to {}", path.display(), self.name))
    }
}

/// The user PostgreSQL server programs must run as: `None` means "as we are", `Some` is the
/// `postgres` account when this process runs as root.
pub(crate) fn server_user() -> anyhow::Result<Option<OsUser>> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    OsUser::lookup("postgres").map(Some).context(
        "running as root, and PostgreSQL refuses to run as root: the test kit runs it as the \
         OS user `postgres` (install postgresql, which creates it, or run tests as a normal user)",
    )
}

/// A command for `program` that runs as `user` (or as us), with no `PG*` variables from our
/// environment leaking into it: the test kit always says host, port, user and data dir explicitly.
pub(crate) fn command_as(program: impl AsRef<OsStr>, user: Option<&OsUser>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"PG") {
            cmd.env_remove(key);
        }
    }
    if let Some(user) = user {
        cmd.uid(user.uid)
            .gid(user.gid)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    cmd
}

/// Runs `cmd` to completion; an error if it cannot start or exits unsuccessfully, carrying what it
/// printed.
pub(crate) fn run(cmd: &mut Command, what: &str) -> anyhow::Result<Output> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what} ({:?})", cmd.get_program()))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
    Ok(output)
}

/// A shell that runs a cleanup script once this test process is gone.
///
/// It blocks reading a pipe whose only writer is this process; the kernel closes that end when we
/// die, however we die (a SIGKILL from a test runner's timeout included), and the read returns.
/// Dropping the watchdog kills it, because the normal `Drop` path has cleaned up already. It runs
/// in its own process group, so a runner that kills the test's group does not take it along.
pub(crate) struct Watchdog {
    shell: Child,
    // Never written: its only job is to be closed by the kernel when this process exits.
    _tripwire: ChildStdin,
}

impl Watchdog {
    /// `script` runs under `/bin/sh -c` with `args` as `$1`, `$2`, ...
    pub(crate) fn spawn(
        script: &str,
        args: &[&OsStr],
        user: Option<&OsUser>,
    ) -> anyhow::Result<Watchdog> {
        let mut shell = command_as("/bin/sh", user)
            .arg("-c")
            .arg(format!("read _ignored; {script}"))
            .arg("breakwater-testkit-watchdog")
            .args(args)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the cleanup watchdog (/bin/sh)")?;
        let tripwire = match shell.stdin.take() {
            Some(stdin) => stdin,
            None => {
                let _ = shell.kill();
                let _ = shell.wait();
                bail!("the watchdog shell has no stdin pipe");
            }
        };
        Ok(Watchdog {
            shell,
            _tripwire: tripwire,
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.shell.kill();
        let _ = self.shell.wait();
    }
}

/// The last `n` lines of a log file, or a note saying why there are none.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

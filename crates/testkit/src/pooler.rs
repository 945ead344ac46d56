//! A running Breakwater process for end-to-end tests: its own temp dir with the config and any
//! files it names, a log file that failing tests print, and a kill however the test ends. The
//! test kit parses none of the config; the test says which port it put there.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::conn;
use crate::port::{accepts_connections, is_listening};
use crate::process::{log_tail, Watchdog};

const POLL_INTERVAL: Duration = Duration::from_millis(20);
const START_TIMEOUT: Duration = Duration::from_secs(15);
const LOG_TAIL_LINES: usize = 100;

/// A Breakwater child process. Dropping it kills the process (SIGKILL) and removes its dir; if
/// the test is panicking, the end of the pooler's log goes to stderr first.
pub struct Pooler {
    port: u16,
    child: Child,
    /// Set once the child has been reaped: its pid may belong to someone else from then on.
    exit_status: Option<ExitStatus>,
    log_file: PathBuf,
    watchdog: Option<Watchdog>,
    dir: tempfile::TempDir,
}

impl Pooler {
    /// Writes `files` (relative path, content) and `pooler.toml` into a fresh temp dir, runs
    /// `bin --config <dir>/pooler.toml` there with stdout and stderr going to
    /// `<dir>/breakwater.log`, and waits until it listens on 127.0.0.1:`port`, which
    /// `config_toml` must configure. `RUST_LOG` is passed through, `info` if unset.
    pub fn start(
        bin: impl AsRef<Path>,
        port: u16,
        config_toml: &str,
        files: &[(&str, &str)],
    ) -> anyhow::Result<Pooler> {
        let mut all = files.to_vec();
        all.push(("pooler.toml", config_toml));
        Self::start_with(bin, port, &["--config", "pooler.toml"], &[], &all)
    }

    /// As [`Pooler::start`], but with the command line `args` and the extra environment `env`
    /// instead of a config file: for configurations from flags and `BREAKWATER_*` variables.
    /// `files` are written first; the pooler runs in their directory.
    pub fn start_with(
        bin: impl AsRef<Path>,
        port: u16,
        args: &[&str],
        env: &[(&str, &str)],
        files: &[(&str, &str)],
    ) -> anyhow::Result<Pooler> {
        let bin = bin.as_ref();
        let dir = tempfile::Builder::new()
            .prefix("bw-pooler-")
            .tempdir()
            .context("creating the pooler's temp dir")?;
        for (name, content) in files {
            let relative = Path::new(name);
            ensure!(
                relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                "pooler file name {name:?} must be a relative path inside the pooler's dir"
            );
            let path = dir.path().join(relative);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            std::fs::write(&path, content)
                .with_context(|| format!("writing {}", path.display()))?;
        }

        let log_file = dir.path().join("breakwater.log");
        let stdout =
            File::create(&log_file).with_context(|| format!("creating {}", log_file.display()))?;
        let stderr = stdout
            .try_clone()
            .context("duplicating the log file handle")?;
        let rust_log = std::env::var_os("RUST_LOG").unwrap_or_else(|| OsString::from("info"));
        let child = Command::new(bin)
            .args(args)
            .current_dir(dir.path())
            .env("RUST_LOG", rust_log)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;

        let mut pooler = Pooler {
            port,
            child,
            exit_status: None,
            log_file,
            watchdog: None,
            dir,
        };
        let pid = pooler.pid().to_string();
        pooler.watchdog = Some(Watchdog::spawn(
            r#"kill -9 "$1""#,
            &[OsStr::new(&pid)],
            None,
        )?);
        pooler.wait_listening()?;
        Ok(pooler)
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status()? {
                bail!(
                    "breakwater exited ({status}) before listening on port {}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            // Look in /proc rather than connect where we can: a probe connection would be counted
            // and logged by the pooler, and tests look at both.
            let listening =
                is_listening(self.port).unwrap_or_else(|| accepts_connections(self.port));
            if listening {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "breakwater did not listen on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// The port given to [`Pooler::start`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pooler's working directory, holding `pooler.toml`, the files given to
    /// [`Pooler::start`] and `breakwater.log`. Rewrite files here before a reload.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything the pooler has printed so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_file)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends signal `sig` (`libc::SIGHUP`, `libc::SIGTERM`, ...) to the pooler.
    ///
    /// # Panics
    /// If the pooler has already exited and been reaped by [`Pooler::wait_exit`] or
    /// [`Pooler::exit_status`]: its pid may now belong to another process.
    pub fn signal(&self, sig: i32) {
        if let Some(status) = self.exit_status {
            panic!("cannot signal breakwater: it already exited ({status})");
        }
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet (checked
        // above), so the pid is still the pooler's, at worst a zombie.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        if rc != 0 {
            panic!(
                "kill({}, {sig}) failed: {}",
                self.child.id(),
                std::io::Error::last_os_error()
            );
        }
    }

    /// The exit status if the pooler has exited, without waiting.
    pub fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exit_status.is_none() {
            self.exit_status = self
                .child
                .try_wait()
                .context("checking whether breakwater exited")?;
        }
        Ok(self.exit_status)
    }

    /// Waits up to `timeout` for the pooler to exit (after a signal, say).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "breakwater did not exit within {timeout:?}; log tail:\n{}",
                    log_tail(&self.log_file, LOG_TAIL_LINES)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// A key=value connection string for tokio-postgres, to the pooler.
    pub fn conn_string(&self, user: &str, password: &str, db: &str) -> String {
        conn::conn_string("127.0.0.1", self.port, user, password, db)
    }

    /// Connects through the pooler and spawns the connection task on the current tokio runtime.
    /// The error is tokio-postgres's own, so tests can look at the SQLSTATE the pooler sent.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        conn::connect(&self.conn_string(user, password, db)).await
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        // An error here means we cannot tell: kill anyway.
        if !matches!(self.exit_status(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.watchdog.take();
        if !std::thread::panicking() {
            // A task that panicked took a client or a server with it, and the test may not
            // have looked there: no test passes with a panic in the log.
            let log = std::fs::read_to_string(&self.log_file).unwrap_or_default();
            if let Some(at) = log.find("panicked at") {
                let from = log[..at].rfind('\n').map_or(0, |i| i + 1);
                let line = log[from..].lines().next().unwrap_or_default();
                panic!(
                    "breakwater (port {}) panicked: {line}\n---- last {LOG_TAIL_LINES} lines ----\n{}",
                    self.port,
                    log_tail(&self.log_file, LOG_TAIL_LINES)
                );
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- breakwater log (port {}), last {LOG_TAIL_LINES} lines ----\n{}\n\
                 ---- end of breakwater log ----",
                self.port,
                log_tail(&self.log_file, LOG_TAIL_LINES)
            );
        }
    }
}

//! pgbench scenarios: what each one runs, running one against a target with a hard time bound,
//! and reading its result, together with the pooler CPU it cost.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::procfs;
use crate::targets::{ClientAuth, Target, DB, PASSWORD, USER};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Script {
    /// `-S`: one primary-key SELECT per transaction.
    SelectOnly,
    /// The default TPC-B-like script: three UPDATEs, a SELECT and an INSERT in a transaction.
    TpcB,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub script: Script,
    /// `-M`: simple, extended or prepared.
    pub mode: &'static str,
    pub clients: u32,
    /// `-C`: a new connection (and login) per transaction.
    pub connect_per_txn: bool,
    /// How pgbench logs in: SCRAM as `app`, or md5 as `md5user` (to the poolers and to
    /// PostgreSQL alike). Poolers are started with this client auth.
    pub auth: ClientAuth,
}

impl Scenario {
    pub fn select(mode: &'static str, clients: u32) -> Scenario {
        Scenario {
            name: format!("select-{mode}-c{clients}"),
            script: Script::SelectOnly,
            mode,
            clients,
            connect_per_txn: false,
            auth: ClientAuth::Scram,
        }
    }

    pub fn tpcb(clients: u32) -> Scenario {
        Scenario {
            name: format!("tpcb-simple-c{clients}"),
            script: Script::TpcB,
            mode: "simple",
            clients,
            connect_per_txn: false,
            auth: ClientAuth::Scram,
        }
    }

    pub fn storm(clients: u32) -> Scenario {
        Scenario {
            name: format!("storm-simple-c{clients}"),
            script: Script::SelectOnly,
            mode: "simple",
            clients,
            connect_per_txn: true,
            auth: ClientAuth::Scram,
        }
    }

    /// The storm with md5 logins: no PBKDF2 in libpq, so the pooler's own login path weighs
    /// more in the result.
    pub fn storm_md5(clients: u32) -> Scenario {
        Scenario {
            name: format!("storm-md5-c{clients}"),
            auth: ClientAuth::Md5,
            ..Scenario::storm(clients)
        }
    }

    /// The pgbench options, for the report.
    pub fn flags(&self) -> String {
        let mut f = String::new();
        if self.script == Script::SelectOnly {
            f.push_str("-S ");
        }
        if self.connect_per_txn {
            f.push_str("-C ");
        }
        f.push_str(&format!("-M {} -c {}", self.mode, self.clients));
        if self.auth != ClientAuth::Scram {
            f.push_str(&format!(" -U {}", self.auth.login().0));
        }
        f
    }
}

/// The full list, in the order runs happen.
pub fn all_scenarios(with_1000: bool) -> Vec<Scenario> {
    let mut clients = vec![1, 16, 64, 256];
    if with_1000 {
        clients.push(1000);
    }
    let mut list = Vec::new();
    for mode in ["simple", "extended", "prepared"] {
        for &c in &clients {
            list.push(Scenario::select(mode, c));
        }
    }
    list.push(Scenario::tpcb(64));
    list.push(Scenario::storm(64));
    list.push(Scenario::storm_md5(64));
    list
}

/// One pgbench run against one target.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub scenario: String,
    pub target: String,
    pub rep: u32,
    pub tps: Option<f64>,
    pub latency_ms: Option<f64>,
    pub transactions: u64,
    /// Pooler CPU (utime + stime) per transaction, µs; None for direct or when nothing ran.
    pub cpu_us_per_txn: Option<f64>,
    /// Why the run counts as failed: pgbench exited non-zero or reported failed transactions.
    pub error: Option<String>,
    /// Why this is a second attempt, when the first ran no transaction at all.
    pub retried: Option<String>,
}

impl RunResult {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.tps.is_some()
    }
}

/// Runs pgbench for `duration` against `target`, killed if it is not done a minute later. Its
/// stdout and stderr are kept in `logs` as `SCENARIO.TARGET.REP.out` / `.err`.
///
/// pgbench's `-T` clock starts before its clients connect, and each connect runs PBKDF2 for
/// SCRAM in libpq: on a busy 2-core machine connecting 64 clients can eat the whole run. Such a
/// run (no transaction at all, no error) is made once more, and says so.
pub fn run(
    pgbench: &Path,
    scenario: &Scenario,
    target: &Target,
    duration: Duration,
    rep: u32,
    logs: &Path,
) -> anyhow::Result<RunResult> {
    let first = run_once(pgbench, scenario, target, duration, rep, logs, "")?;
    if first.transactions > 0
        || first
            .error
            .as_deref()
            .is_some_and(|e| !e.starts_with(NO_TXN))
    {
        return Ok(first);
    }
    let mut second = run_once(pgbench, scenario, target, duration, rep, logs, ".retry")?;
    second.retried = first.error;
    Ok(second)
}

const NO_TXN: &str = "no transactions";

fn run_once(
    pgbench: &Path,
    scenario: &Scenario,
    target: &Target,
    duration: Duration,
    rep: u32,
    logs: &Path,
    suffix: &str,
) -> anyhow::Result<RunResult> {
    let secs = run_secs(duration, scenario.clients);
    let threads = scenario.clients.clamp(1, 2);
    let mut cmd = base_command(pgbench, target.port, scenario.auth.login());
    cmd.arg("-n") // no VACUUM before the run: it is not part of what we measure
        .args(["-T", &secs.to_string()])
        .args(["-c", &scenario.clients.to_string()])
        .args(["-j", &threads.to_string()])
        .args(["-M", scenario.mode]);
    if scenario.script == Script::SelectOnly {
        cmd.arg("-S");
    }
    if scenario.connect_per_txn {
        cmd.arg("-C");
    }
    cmd.arg(DB);

    // Output goes to files: 256 aborted clients print more than a pipe holds.
    let stem = format!("{}.{}.{rep}{suffix}", scenario.name, target.name);
    let out_path = logs.join(format!("{stem}.out"));
    let err_path = logs.join(format!("{stem}.err"));
    cmd.stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .stdin(Stdio::null());

    let cpu_before = target.pid.map(procfs::cpu_us).transpose()?;
    let mut child = cmd.spawn().context("starting pgbench")?;
    // Connecting 256 clients with SCRAM (PBKDF2 in libpq) takes a while on 2 cores.
    let deadline = Instant::now() + deadline_len(secs);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let cpu_after = target.pid.map(procfs::cpu_us).transpose()?;

    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let parsed = parse_output(&stdout);
    let transactions = parsed.transactions.unwrap_or(0);

    let error = match status {
        None => Some(format!("timed out after {:?}", deadline_len(secs))),
        Some(s) if !s.success() => Some(first_error(&stderr, &format!("pgbench exited {s}"))),
        Some(_) if parsed.failed > 0 => Some(format!(
            "{} failed transactions: {}",
            parsed.failed,
            first_error(&stderr, "")
        )),
        Some(_) if transactions == 0 => Some(format!(
            "{NO_TXN}: connecting {} clients took {} of the {secs} s run",
            scenario.clients,
            parsed
                .connect_ms
                .map_or_else(|| "all".to_owned(), |ms| format!("{ms:.0} ms"))
        )),
        Some(_) if parsed.tps.is_none() => Some(first_error(&stderr, "no tps in pgbench output")),
        Some(_) => None,
    };
    let cpu_us_per_txn = match (cpu_before, cpu_after) {
        (Some(before), Some(after)) if transactions > 0 => {
            Some((after - before) / transactions as f64)
        }
        _ => None,
    };
    Ok(RunResult {
        scenario: scenario.name.clone(),
        target: target.name.clone(),
        rep,
        tps: parsed.tps,
        latency_ms: parsed.latency_ms,
        transactions,
        cpu_us_per_txn,
        error,
        retried: None,
    })
}

/// pgbench's `-T`: the run's length plus time to connect its clients. Its clock starts before
/// they connect, and libpq's PBKDF2 for SCRAM takes some 8 ms of this machine's CPU a client:
/// with a flat 5 s, 1000 clients often connected for the whole run and it measured nothing.
/// The TPS pgbench reports leaves the connecting time out.
fn run_secs(duration: Duration, clients: u32) -> u64 {
    duration.as_secs().max(1) + u64::from(clients) * 8 / 1000
}

fn deadline_len(secs: u64) -> Duration {
    Duration::from_secs(secs + 60)
}

/// pgbench with connection settings for `port` and a `(user, password)` login, and no PG*
/// variables from our environment.
pub fn base_command(pgbench: &Path, port: u16, (user, password): (&str, &str)) -> Command {
    let mut cmd = Command::new(pgbench);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", user]);
    cmd
}

/// `pgbench -i -s SCALE` straight against PostgreSQL, once per harness run.
pub fn initialize(pgbench: &Path, port: u16, scale: u32) -> anyhow::Result<()> {
    let out = base_command(pgbench, port, (USER, PASSWORD))
        .args(["-i", "-q", "-s", &scale.to_string(), DB])
        .stdin(Stdio::null())
        .output()
        .context("starting pgbench -i")?;
    if !out.status.success() {
        bail!(
            "pgbench -i failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq)]
struct Parsed {
    tps: Option<f64>,
    latency_ms: Option<f64>,
    transactions: Option<u64>,
    failed: u64,
    /// "initial connection time" (absent with -C, which reports an average per connection).
    connect_ms: Option<f64>,
}

fn parse_output(stdout: &str) -> Parsed {
    let mut p = Parsed::default();
    for line in stdout.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("tps = ") {
            p.tps = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("initial connection time = ") {
            p.connect_ms = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("latency average = ") {
            p.latency_ms = first_number(rest);
        } else if let Some(rest) = line.strip_prefix("number of transactions actually processed: ")
        {
            // "N" or "N/M" when a transaction count was given.
            p.transactions = rest.split('/').next().and_then(|n| n.trim().parse().ok());
        } else if let Some(rest) = line.strip_prefix("number of failed transactions: ") {
            p.failed = rest
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    p
}

fn first_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.split_whitespace().next().and_then(|n| n.parse().ok())
}

/// The first line of pgbench's stderr that says what went wrong, shortened for a table cell.
fn first_error(stderr: &str, fallback: &str) -> String {
    let line = stderr
        .lines()
        .find(|l| l.contains("error") || l.contains("ERROR") || l.contains("FATAL"))
        .or_else(|| stderr.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or(fallback)
        .trim();
    let line = line.strip_prefix("pgbench: error: ").unwrap_or(line);
    let mut short: String = line.chars().take(160).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    const PG15_OUTPUT: &str = "\
pgbench (15.14 (Debian 15.14-0+deb12u1))
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 64
number of threads: 2
maximum number of tries: 1
duration: 5 s
number of transactions actually processed: 123456
number of failed transactions: 0 (0.000%)
latency average = 2.593 ms
initial connection time = 81.335 ms
tps = 24681.234567 (without initial connection time)
";

    #[test]
    fn pg15_output_is_parsed() {
        let p = parse_output(PG15_OUTPUT);
        assert_eq!(
            p,
            Parsed {
                tps: Some(24681.234567),
                latency_ms: Some(2.593),
                transactions: Some(123456),
                failed: 0,
                connect_ms: Some(81.335),
            }
        );
    }

    #[test]
    fn the_first_error_line_is_kept_short() {
        let stderr = "pgbench: error: client 3 script 0 aborted in command 1 query 0: \
                      ERROR:  prepared statement \"P0_1\" does not exist\nmore\n";
        assert_eq!(
            first_error(stderr, "x"),
            "client 3 script 0 aborted in command 1 query 0: ERROR:  prepared statement \"P0_1\" does not exist"
        );
    }

    #[test]
    fn the_md5_storm_logs_in_as_the_md5_role_and_says_so() {
        let s = Scenario::storm_md5(64);
        assert_eq!(s.auth.login(), ("md5user", "md5_pw"));
        assert_eq!(s.flags(), "-S -C -M simple -c 64 -U md5user");
        assert_eq!(Scenario::storm(64).flags(), "-S -C -M simple -c 64");
    }

    #[test]
    fn the_full_list_has_each_mode_at_each_client_count() {
        let names: Vec<String> = all_scenarios(false).into_iter().map(|s| s.name).collect();
        assert_eq!(names.len(), 15);
        assert!(names.contains(&"select-prepared-c256".to_owned()));
        assert!(names.contains(&"storm-simple-c64".to_owned()));
        assert!(names.contains(&"storm-md5-c64".to_owned()));
    }
}

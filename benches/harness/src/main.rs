//! Breakwater's benchmark harness: starts a throwaway PostgreSQL, PgBouncer and Breakwater with
//! equivalent settings, runs pgbench scenarios against each in turn (direct, pgbouncer,
//! breakwater, direct, … so drift hits every target alike), measures the pooler's own CPU per
//! transaction and its memory per idle client, and prints medians and ratios as markdown (and
//! CSV under bench-results/).
//!
//! It measures; it never tunes. Everything it starts is stopped when it ends, however it ends.

mod idle;
mod pgbench;
mod procfs;
mod report;
mod targets;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

use pgbench::Scenario;
use targets::{ClientAuth, Target};

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-bench",
    about = "Benchmarks Breakwater against PgBouncer and direct PostgreSQL (pgbench TPS, pooler CPU per transaction, memory per idle client)"
)]
struct Cli {
    /// One repetition of 3 s per scenario (about 3 minutes in all).
    #[arg(long)]
    quick: bool,
    /// CI check that the harness works: one scenario, one 2 s run per target, 200 idle clients.
    /// PgBouncer is used when installed and skipped (not installed) when not. Exits non-zero if
    /// any run fails.
    #[arg(long)]
    smoke: bool,
    /// Length of each pgbench run (default 5s; --quick 3s; --smoke 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Repetitions of each (scenario, target) pair, interleaved (default 3; --quick/--smoke 1).
    #[arg(long)]
    reps: Option<u32>,
    /// Run only scenarios whose name contains this text (repeatable), e.g. `select-simple`,
    /// `c64`, `storm`; `memory` selects the idle-client memory test. Names: select-MODE-cN
    /// (MODE simple|extended|prepared, N 1|16|64|256), tpcb-simple-c64, storm-simple-c64
    /// (SCRAM logins), storm-md5-c64 (md5 logins).
    #[arg(long)]
    only: Vec<String>,
    /// Targets to run, comma-separated, from direct, pgbouncer, breakwater (default: all).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Another pooler to compare, as NAME=COMMAND (repeatable). COMMAND runs as
    /// `sh -c "exec COMMAND"` in a temp dir, with {port} (where it must listen), {pg_port},
    /// {dir} (the temp dir) and {userlist} (a PgBouncer-format auth_file) replaced; it must
    /// become the pooler process (one command, or a script ending in `exec pooler ...`) and
    /// accept user app / password app_pw on database app. Not part of the memory test.
    #[arg(long, value_name = "NAME=COMMAND")]
    other: Vec<String>,
    /// The breakwater binary to measure (default: build target/release/breakwater first).
    #[arg(long)]
    breakwater: Option<PathBuf>,
    /// The pgbouncer binary (default: found on PATH or /usr/sbin, installed with apt-get if missing).
    #[arg(long)]
    pgbouncer: Option<PathBuf>,
    /// Idle-client counts for the memory test, comma-separated, ascending (default 1000,10000;
    /// --smoke 200; 0 skips the test).
    #[arg(long, value_delimiter = ',')]
    idle_clients: Option<Vec<usize>>,
    /// Also run select-only at 1000 clients (raises PostgreSQL's max_connections to 1100).
    #[arg(long)]
    with_1000: bool,
    /// pgbench scale factor for the data set (initialized once, directly on PostgreSQL).
    #[arg(long, default_value_t = 1)]
    scale: u32,
    /// Where the CSV files and the markdown report go (default: bench-results/ in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Never run apt-get; without pgbouncer, leave it out.
    #[arg(long)]
    no_install: bool,
    /// An extra `[pooler]` setting for Breakwater, as KEY=VALUE in TOML (repeatable), e.g.
    /// `--set workers=1`; recorded in the report's notes.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    settings: Vec<String>,
}

/// The targets the harness knows how to start; `--other` adds more.
const BUILTIN_TARGETS: [&str; 3] = ["direct", "pgbouncer", "breakwater"];

/// What one invocation runs, after defaults and filters.
struct Plan {
    duration: Duration,
    reps: u32,
    scenarios: Vec<Scenario>,
    idle_counts: Vec<usize>,
    targets: Vec<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn plan(cli: &Cli) -> anyhow::Result<Plan> {
    let duration = cli.duration.unwrap_or(if cli.smoke {
        Duration::from_secs(2)
    } else if cli.quick {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(5)
    });
    let reps = cli
        .reps
        .unwrap_or(if cli.smoke || cli.quick { 1 } else { 3 });
    let all = pgbench::all_scenarios(cli.with_1000);
    let (scenarios, memory_selected) = if !cli.only.is_empty() {
        let chosen: Vec<Scenario> = all
            .into_iter()
            .filter(|s| cli.only.iter().any(|o| s.name.contains(o.as_str())))
            .collect();
        let memory = cli.only.iter().any(|o| o == "memory");
        if chosen.is_empty() && !memory {
            bail!(
                "--only {:?} matches no scenario (see --help for the names)",
                cli.only
            );
        }
        (chosen, memory)
    } else if cli.smoke {
        (vec![Scenario::select("simple", 16)], true)
    } else {
        (all, true)
    };
    let idle_counts = match (&cli.idle_clients, memory_selected) {
        (_, false) => Vec::new(),
        (Some(counts), true) => {
            let mut c: Vec<usize> = counts.iter().copied().filter(|&n| n > 0).collect();
            c.sort_unstable();
            c.dedup();
            c
        }
        (None, true) if cli.smoke => vec![200],
        (None, true) => vec![1_000, 10_000],
    };
    let mut targets = cli
        .targets
        .clone()
        .unwrap_or_else(|| BUILTIN_TARGETS.map(str::to_owned).to_vec());
    for t in &targets {
        if !BUILTIN_TARGETS.contains(&t.as_str()) {
            bail!("unknown target {t:?}: use direct, pgbouncer, breakwater (and --other for more)");
        }
    }
    for other in &cli.other {
        let (name, _) = other
            .split_once('=')
            .with_context(|| format!("--other {other:?} is not NAME=COMMAND"))?;
        targets.push(name.to_owned());
    }
    Ok(Plan {
        duration,
        reps,
        scenarios,
        idle_counts,
        targets,
    })
}

fn main() {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("smoke run failed: see the failures above");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("breakwater-bench: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Runs everything; `Ok(false)` when this is a smoke run and something in it failed.
fn run(cli: &Cli) -> anyhow::Result<bool> {
    // Breakwater logs at info by default; a benchmark wants only what an operator must see.
    // (Set before any thread exists.)
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let mut plan = plan(cli)?;
    let mut notes = Vec::new();
    if !cli.settings.is_empty() {
        notes.push(format!(
            "Breakwater ran with extra settings: {}.",
            cli.settings.join(", ")
        ));
    }
    let root = workspace_root();

    let max_idle = plan.idle_counts.iter().copied().max().unwrap_or(0) as u64;
    let fd_limit = procfs::raise_nofile((max_idle + 10_000).max(20_000));

    let breakwater_bin = match &cli.breakwater {
        Some(path) => path.clone(),
        None => build_breakwater(&root)?,
    };
    let breakwater_bin = breakwater_bin
        .canonicalize()
        .with_context(|| format!("breakwater binary {}", breakwater_bin.display()))?;
    if breakwater_bin
        .components()
        .any(|c| c.as_os_str() == "debug")
    {
        notes.push(format!(
            "{} is a debug build: its numbers say nothing about Breakwater's speed.",
            breakwater_bin.display()
        ));
    }

    let mut pgbouncer_bin = None;
    if plan.targets.iter().any(|t| t == "pgbouncer") {
        pgbouncer_bin = match &cli.pgbouncer {
            Some(p) => Some(p.clone()),
            None => targets::find_pgbouncer(!cli.smoke && !cli.no_install)?,
        };
        if pgbouncer_bin.is_none() {
            if !cli.smoke && !cli.no_install {
                bail!("pgbouncer not found");
            }
            notes.push("PgBouncer is not installed: left out of this run.".to_owned());
            plan.targets.retain(|t| t != "pgbouncer");
        }
    }
    let pgbench_bin = testkit::pg_bin("pgbench")?;

    eprintln!("== starting PostgreSQL");
    let max_connections = if cli.with_1000 { 1100 } else { 300 };
    let cluster = testkit::PgCluster::start_with(testkit::PgOptions {
        max_connections,
        extra_conf: Vec::new(),
    })?;
    eprintln!(
        "== pgbench -i -s {} (once, directly on PostgreSQL)",
        cli.scale
    );
    pgbench::initialize(&pgbench_bin, cluster.port(), cli.scale)?;
    cluster.psql("app", "VACUUM ANALYZE")?;
    let userlist = targets::userlist(&cluster)?;

    let mut versions = vec![(
        "breakwater".to_owned(),
        breakwater_version(&breakwater_bin, &root, cli.breakwater.is_none()),
    )];
    if let Some(bin) = &pgbouncer_bin {
        versions.push(("pgbouncer".to_owned(), targets::version_of(bin)));
    }
    versions.push((
        "postgres".to_owned(),
        targets::version_of(&cluster.bin_dir().join("postgres")),
    ));
    versions.push(("pgbench".to_owned(), targets::version_of(&pgbench_bin)));
    let machine = procfs::Machine::read();
    let date = shell_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);

    // Every pgbench run's output is kept, so a failure can be read in full afterwards.
    let out_dir = cli
        .out
        .clone()
        .unwrap_or_else(|| root.join("bench-results"));
    let stamp = shell_line("date", &["-u", "+%Y%m%d-%H%M%S"]);
    let logs = out_dir.join(format!("{stamp}-pgbench"));
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;

    // `auth_type` is a setting of a whole pooler, so each client auth gets its own set of
    // targets: SCRAM scenarios first, then md5 ones, one set running at a time. `--other`
    // commands configure their own auth, so they take part in SCRAM scenarios only.
    let targets_for = |auth: ClientAuth| -> Vec<String> {
        plan.targets
            .iter()
            .filter(|t| auth == ClientAuth::Scram || BUILTIN_TARGETS.contains(&t.as_str()))
            .cloned()
            .collect()
    };
    let start_targets = |auth: ClientAuth, userlist: &str| -> anyhow::Result<Vec<Target>> {
        let mut running = Vec::new();
        for name in targets_for(auth) {
            eprintln!("== starting {name} (clients log in with {auth:?})");
            let target = match name.as_str() {
                "direct" => Target::direct(&cluster),
                "pgbouncer" => targets::start_pgbouncer(
                    pgbouncer_bin.as_deref().context("no pgbouncer binary")?,
                    &cluster,
                    userlist,
                    auth,
                    &name,
                )?,
                "breakwater" => targets::start_breakwater(
                    &breakwater_bin,
                    &cluster,
                    userlist,
                    auth,
                    &name,
                    &cli.settings,
                )?,
                other => {
                    let command = cli
                        .other
                        .iter()
                        .find_map(|o| o.strip_prefix(&format!("{other}=")))
                        .context("--other command")?;
                    targets::start_other(other, command, &cluster, userlist)?
                }
            };
            running.push(target);
        }
        Ok(running)
    };

    let total: usize = plan
        .scenarios
        .iter()
        .map(|s| plan.reps as usize * targets_for(s.auth).len())
        .sum();
    let mut runs = Vec::new();
    for auth in [ClientAuth::Scram, ClientAuth::Md5] {
        let scenarios: Vec<&Scenario> = plan.scenarios.iter().filter(|s| s.auth == auth).collect();
        if scenarios.is_empty() {
            continue;
        }
        let userlist = match auth {
            ClientAuth::Md5 => {
                targets::grant_md5_user(&cluster)?;
                notes.push(format!(
                    "md5 scenarios: pgbench logs in as {} with md5 everywhere — to the poolers \
                     (auth_type md5, an auth_file with the md5 hash PostgreSQL stores for it) and \
                     to PostgreSQL directly (its pg_hba asks this role for md5); the poolers \
                     still log in to PostgreSQL as {} with its password (SCRAM).",
                    targets::MD5_USER,
                    targets::USER
                ));
                if !cli.other.is_empty() {
                    notes.push("--other poolers are not part of the md5 scenarios.".to_owned());
                }
                targets::md5_userlist(&cluster)?
            }
            _ => userlist.clone(),
        };
        // Start every target of this set up front, so each run finds its pooler warm.
        let running = start_targets(auth, &userlist)?;
        // Open each pooler's server connections before anything is measured.
        let warmup = Scenario {
            auth,
            ..Scenario::select("simple", 16)
        };
        for t in running.iter().filter(|t| t.is_pooler()) {
            let r = pgbench::run(&pgbench_bin, &warmup, t, Duration::from_secs(1), 0, &logs)?;
            if let Some(e) = r.error {
                eprintln!("   warm-up on {} failed: {e}", t.name);
            }
        }
        for scenario in scenarios {
            for rep in 1..=plan.reps {
                for target in &running {
                    let r =
                        pgbench::run(&pgbench_bin, scenario, target, plan.duration, rep, &logs)?;
                    eprintln!(
                        "[{:>3}/{total}] {:<22} {:<10} rep {rep}: {}",
                        runs.len() + 1,
                        scenario.name,
                        target.name,
                        describe(&r)
                    );
                    runs.push(r);
                }
            }
        }
    }

    let mut memory = Vec::new();
    if !plan.idle_counts.is_empty() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        for name in plan
            .targets
            .iter()
            .filter(|t| *t == "pgbouncer" || *t == "breakwater")
        {
            eprintln!(
                "== idle clients on a fresh {name} (trust auth): {:?}",
                plan.idle_counts
            );
            let target = if name == "pgbouncer" {
                targets::start_pgbouncer(
                    pgbouncer_bin.as_deref().context("no pgbouncer binary")?,
                    &cluster,
                    &userlist,
                    ClientAuth::Trust,
                    name,
                )?
            } else {
                targets::start_breakwater(
                    &breakwater_bin,
                    &cluster,
                    &userlist,
                    ClientAuth::Trust,
                    name,
                    &cli.settings,
                )?
            };
            let pid = target.pid.context("pooler without a pid")?;
            let points = runtime.block_on(idle::measure(
                name,
                target.port,
                pid,
                &plan.idle_counts,
                fd_limit,
            ));
            for p in &points {
                match &p.error {
                    Some(e) => eprintln!("   {} clients: {e}", p.clients),
                    None => eprintln!(
                        "   {} clients: RSS {:.1} MiB, {:.2} KiB per client, admin SHOW POOLS {}",
                        p.clients,
                        p.rss_kib as f64 / 1024.0,
                        p.kib_per_client,
                        p.admin_show_ms
                            .map_or_else(|| "no answer".to_owned(), |ms| format!("{ms:.1} ms")),
                    ),
                }
            }
            memory.extend(points);
        }
        if !cli.other.is_empty() {
            notes.push("--other poolers are not part of the idle-client memory test.".to_owned());
        }
    }

    for r in runs.iter().filter(|r| r.retried.is_some()) {
        notes.push(format!(
            "{} on {} (repetition {}) was run twice: the first attempt had {}.",
            r.scenario,
            r.target,
            r.rep,
            r.retried.as_deref().unwrap_or("")
        ));
    }
    let summaries = report::summarize(&plan.scenarios, &plan.targets, &runs);
    let header = report::Header {
        date,
        command: command_line(),
        versions,
        machine: format!(
            "{} cores ({}), {:.0} GiB RAM, Linux {}; load average {} at start, {} at the end \
             (other work on the machine shows up here). \
             **pgbench, PostgreSQL and the pooler share these {} cores**, so TPS is bounded by \
             the machine as a whole; pooler CPU µs per transaction (utime+stime of the pooler \
             process ÷ transactions) is the fairer comparison.",
            machine.cores,
            machine.cpu_model,
            machine.mem_gib,
            machine.kernel,
            machine.loadavg,
            procfs::Machine::read().loadavg,
            machine.cores
        ),
        settings: format!(
            "transaction mode, pool size {}, clients authenticate with SCRAM-SHA-256 against \
             the server's own verifier in the auth_file (md5 scenarios: see the note), poolers \
             log in to PostgreSQL with a password; pgbench scale {}, `-j 2`, `-n`, `-T {}` per \
             run (plus 1 s per 125 clients to connect them), {} repetition(s) interleaved \
             across targets, medians shown; PostgreSQL max_connections {} with fsync off.",
            targets::POOL_SIZE,
            cli.scale,
            plan.duration.as_secs().max(1),
            plan.reps,
            max_connections
        ),
    };
    let md = report::markdown(&header, &summaries, &memory, &notes);
    println!("{md}");

    let mut written = report::write_csv(&out_dir, &stamp, &runs, &summaries, &memory)?;
    let md_path = out_dir.join(format!("{stamp}.md"));
    std::fs::write(&md_path, &md)?;
    written.push(md_path);
    written.push(logs);
    for path in written {
        eprintln!("wrote {}", path.display());
    }

    // Holding idle clients, a pooler must still answer a new client and the admin console.
    let all_ok = runs.iter().all(|r| r.ok())
        && memory
            .iter()
            .all(|m| m.error.is_none() && m.login_select_ms.is_some() && m.admin_show_ms.is_some());
    Ok(!cli.smoke || all_ok)
}

fn describe(r: &pgbench::RunResult) -> String {
    let mut s = match r.tps {
        Some(tps) => format!("{tps:>9.0} tps"),
        None => "        — tps".to_owned(),
    };
    if let Some(lat) = r.latency_ms {
        s.push_str(&format!(", {lat:.3} ms"));
    }
    if let Some(cpu) = r.cpu_us_per_txn {
        s.push_str(&format!(", pooler {cpu:.1} µs/txn"));
    }
    if let Some(e) = &r.error {
        s.push_str(&format!(", FAILED: {e}"));
    }
    if let Some(why) = &r.retried {
        s.push_str(&format!(" (second attempt; the first had {why})"));
    }
    s
}

/// `cargo build --release -p breakwater`, so the one command measures the code in this tree.
fn build_breakwater(root: &Path) -> anyhow::Result<PathBuf> {
    eprintln!("== cargo build --release -p breakwater");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "breakwater"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p breakwater failed ({status})");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target_dir.join("release").join("breakwater"))
}

/// `breakwater --version` plus the commit, marked when the tree had uncommitted changes. A binary
/// given with --breakwater may have been built from anything: then the commit is only the tree's.
fn breakwater_version(bin: &Path, root: &Path, built_here: bool) -> String {
    let version = targets::version_of(bin);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--", "crates"])
        .current_dir(root)
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    let built = if built_here {
        "built from commit"
    } else {
        "given with --breakwater; the working tree is at commit"
    };
    match commit {
        Some(c) if dirty => format!("{version} ({built} {c} plus uncommitted changes in crates/)"),
        Some(c) => format!("{version} ({built} {c})"),
        None => version,
    }
}

fn shell_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn command_line() -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let profile = if cfg!(debug_assertions) {
        ""
    } else {
        " --release"
    };
    let mut cmd = format!("cargo run{profile} -p breakwater-bench --");
    for a in args {
        cmd.push(' ');
        cmd.push_str(&a);
    }
    cmd
}

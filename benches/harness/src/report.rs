//! Turning runs into what people read: medians per (scenario, target), ratios against direct
//! PostgreSQL and PgBouncer, a markdown report and CSV files.

use std::fmt::Write as _;
use std::path::Path;

use crate::idle::MemPoint;
use crate::pgbench::{RunResult, Scenario};

/// The medians of one scenario on one target.
#[derive(Clone, Debug)]
pub struct Summary {
    pub scenario: String,
    pub flags: String,
    pub target: String,
    pub runs: usize,
    pub ok_runs: usize,
    pub tps: Option<f64>,
    pub latency_ms: Option<f64>,
    pub cpu_us_per_txn: Option<f64>,
    /// The lowest and highest of this target's CPU per transaction over PgBouncer's in the same
    /// repetition. Repetitions interleave the targets, so each pair ran within seconds of each
    /// other: the spread shows how far the machine's noise moves the ratio.
    pub cpu_vs_pgbouncer_range: Option<(f64, f64)>,
    /// The first failure's message, when any run failed.
    pub error: Option<String>,
}

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

pub fn summarize(scenarios: &[Scenario], targets: &[String], runs: &[RunResult]) -> Vec<Summary> {
    let mut out = Vec::new();
    for s in scenarios {
        for t in targets {
            let mine: Vec<&RunResult> = runs
                .iter()
                .filter(|r| r.scenario == s.name && &r.target == t)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let ok: Vec<&&RunResult> = mine.iter().filter(|r| r.ok()).collect();
            let paired: Vec<f64> = ok
                .iter()
                .filter(|r| r.target != "pgbouncer")
                .filter_map(|r| {
                    let bouncer = runs.iter().find(|b| {
                        b.scenario == s.name && b.target == "pgbouncer" && b.rep == r.rep && b.ok()
                    })?;
                    ratio(r.cpu_us_per_txn, bouncer.cpu_us_per_txn)
                })
                .collect();
            let med =
                |f: fn(&RunResult) -> Option<f64>| median(ok.iter().filter_map(|r| f(r)).collect());
            out.push(Summary {
                scenario: s.name.clone(),
                flags: s.flags(),
                target: t.clone(),
                runs: mine.len(),
                ok_runs: ok.len(),
                tps: med(|r| r.tps),
                latency_ms: med(|r| r.latency_ms),
                cpu_us_per_txn: med(|r| r.cpu_us_per_txn),
                cpu_vs_pgbouncer_range: range(&paired),
                error: mine.iter().find_map(|r| r.error.clone()),
            });
        }
    }
    out
}

fn range(values: &[f64]) -> Option<(f64, f64)> {
    let lo = values.iter().copied().min_by(f64::total_cmp)?;
    let hi = values.iter().copied().max_by(f64::total_cmp)?;
    Some((lo, hi))
}

fn find<'a>(summaries: &'a [Summary], scenario: &str, target: &str) -> Option<&'a Summary> {
    summaries
        .iter()
        .find(|s| s.scenario == scenario && s.target == target && s.ok_runs > 0)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.digits$}"))
}

/// Everything the header says about where and how the numbers were made.
pub struct Header {
    pub date: String,
    pub command: String,
    pub versions: Vec<(String, String)>,
    pub machine: String,
    pub settings: String,
}

pub fn markdown(
    header: &Header,
    summaries: &[Summary],
    memory: &[MemPoint],
    notes: &[String],
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Breakwater vs PgBouncer vs direct PostgreSQL — {}\n",
        header.date
    );
    let _ = writeln!(md, "- Command: `{}`", header.command);
    let versions: Vec<String> = header
        .versions
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(md, "- Versions: {}", versions.join("; "));
    let _ = writeln!(md, "- Machine: {}", header.machine);
    let _ = writeln!(md, "- Settings: {}", header.settings);
    for note in notes {
        let _ = writeln!(md, "- Note: {note}");
    }
    md.push('\n');

    if !summaries.is_empty() {
        md.push_str(
            "| scenario | pgbench | target | TPS | latency ms | pooler CPU µs/txn | TPS vs direct | TPS vs PgBouncer | CPU vs PgBouncer (per-repetition range) |\n\
             |---|---|---|--:|--:|--:|--:|--:|--:|\n",
        );
        let mut failures = Vec::new();
        for s in summaries {
            let direct = find(summaries, &s.scenario, "direct");
            let bouncer = find(summaries, &s.scenario, "pgbouncer");
            let tps_cell = match (s.tps, s.ok_runs) {
                (Some(tps), n) if n == s.runs => format!("{tps:.0}"),
                (Some(tps), n) => format!("{tps:.0} ({}/{} failed)", s.runs - n, s.runs),
                (None, _) => format!("FAIL ({}/{})", s.runs - s.ok_runs, s.runs),
            };
            if let Some(e) = &s.error {
                failures.push(format!("{} on {}: {e}", s.scenario, s.target));
            }
            let vs = |other: Option<&Summary>, f: fn(&Summary) -> Option<f64>| {
                if other.is_some_and(|o| o.target == s.target) {
                    return "—".to_owned();
                }
                fmt_opt(ratio(f(s), other.and_then(f)), 2)
            };
            let _ = writeln!(
                md,
                "| {} | `{}` | {} | {} | {} | {} | {} | {} | {} |",
                s.scenario,
                s.flags,
                s.target,
                tps_cell,
                fmt_opt(s.latency_ms, 3),
                fmt_opt(s.cpu_us_per_txn, 1),
                vs(direct, |x| x.tps),
                vs(bouncer, |x| x.tps),
                cpu_vs(s, vs(bouncer, |x| x.cpu_us_per_txn)),
            );
        }
        md.push('\n');
        latency_table(&mut md, summaries);
        if !failures.is_empty() {
            md.push_str("Failures (first error of each):\n\n");
            for f in failures {
                let _ = writeln!(md, "- {f}");
            }
            md.push('\n');
        }
    }

    if !memory.is_empty() {
        md.push_str(
            "Idle clients (logged in with trust auth, then silent):\n\n\
             | pooler | idle clients | RSS MiB (baseline) | RSS MiB | KiB per client | pooler fds | new login + SELECT 1 ms | admin SHOW POOLS ms | open time s |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for m in memory {
            match &m.error {
                Some(e) => {
                    let _ = writeln!(
                        md,
                        "| {} | {} | — | — | {e} | — | — | — | — |",
                        m.target, m.clients
                    );
                }
                None => {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {:.1} | {:.1} | {:.2} | {} | {} | {} | {:.1} |",
                        m.target,
                        m.clients,
                        m.baseline_rss_kib as f64 / 1024.0,
                        m.rss_kib as f64 / 1024.0,
                        m.kib_per_client,
                        m.pooler_fds
                            .map_or_else(|| "—".to_owned(), |n| n.to_string()),
                        m.login_select_ms.map_or_else(
                            || "no answer in 15 s".to_owned(),
                            |ms| format!("{ms:.1}")
                        ),
                        m.admin_show_ms.map_or_else(
                            || "no answer in 15 s".to_owned(),
                            |ms| format!("{ms:.1}")
                        ),
                        m.open_secs,
                    );
                }
            }
        }
        md.push('\n');
    }
    md
}

/// The CPU ratio of medians, with the range of the paired per-repetition ratios when there
/// is more than one repetition.
fn cpu_vs(s: &Summary, ratio_of_medians: String) -> String {
    match s.cpu_vs_pgbouncer_range {
        Some((lo, hi)) if s.ok_runs > 1 => format!("{ratio_of_medians} ({lo:.2}–{hi:.2})"),
        _ => ratio_of_medians,
    }
}

/// Added latency at one client: each pooler's median latency minus direct's, per query mode.
fn latency_table(md: &mut String, summaries: &[Summary]) {
    let one_client: Vec<&Summary> = summaries
        .iter()
        .filter(|s| s.scenario.starts_with("select-") && s.scenario.ends_with("-c1"))
        .collect();
    let mut poolers: Vec<&str> = Vec::new();
    for s in &one_client {
        if s.target != "direct" && !poolers.contains(&s.target.as_str()) {
            poolers.push(&s.target);
        }
    }
    if one_client.is_empty() || poolers.is_empty() {
        return;
    }
    md.push_str("Added latency at 1 client (median latency minus direct's, µs per transaction):\n\n| query mode | direct ms |");
    for p in &poolers {
        let _ = write!(md, " {p} +µs |");
    }
    md.push_str("\n|---|--:|");
    for _ in &poolers {
        md.push_str("--:|");
    }
    md.push('\n');
    let mut scenarios: Vec<&str> = one_client.iter().map(|s| s.scenario.as_str()).collect();
    scenarios.dedup();
    for scenario in scenarios {
        let direct = find(summaries, scenario, "direct").and_then(|s| s.latency_ms);
        let mode = scenario
            .trim_start_matches("select-")
            .trim_end_matches("-c1");
        let _ = write!(md, "| {mode} | {} |", fmt_opt(direct, 3));
        for p in &poolers {
            let lat = find(summaries, scenario, p).and_then(|s| s.latency_ms);
            let added = match (lat, direct) {
                (Some(l), Some(d)) => Some((l - d) * 1000.0),
                _ => None,
            };
            let _ = write!(md, " {} |", fmt_opt(added, 0));
        }
        md.push('\n');
    }
    md.push('\n');
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_default()
}

/// Writes `<prefix>-runs.csv` (every run), `<prefix>-summary.csv` (medians and ratios) and
/// `<prefix>-memory.csv` into `dir`.
pub fn write_csv(
    dir: &Path,
    prefix: &str,
    runs: &[RunResult],
    summaries: &[Summary],
    memory: &[MemPoint],
) -> anyhow::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();

    let mut text = String::from(
        "scenario,target,rep,status,tps,latency_ms,transactions,pooler_cpu_us_per_txn,error,retried_because\n",
    );
    for r in runs {
        let _ = writeln!(
            text,
            "{},{},{},{},{},{},{},{},{},{}",
            r.scenario,
            r.target,
            r.rep,
            if r.ok() { "ok" } else { "failed" },
            csv_opt(r.tps),
            csv_opt(r.latency_ms),
            r.transactions,
            csv_opt(r.cpu_us_per_txn),
            csv_field(r.error.as_deref().unwrap_or("")),
            csv_field(r.retried.as_deref().unwrap_or("")),
        );
    }
    written.push(write(dir, &format!("{prefix}-runs.csv"), &text)?);

    let mut text = String::from(
        "scenario,pgbench_flags,target,runs,ok_runs,tps_median,latency_ms_median,pooler_cpu_us_per_txn_median,tps_vs_direct,tps_vs_pgbouncer,cpu_vs_pgbouncer,cpu_vs_pgbouncer_min,cpu_vs_pgbouncer_max\n",
    );
    for s in summaries {
        let direct = find(summaries, &s.scenario, "direct");
        let bouncer = find(summaries, &s.scenario, "pgbouncer");
        let _ = writeln!(
            text,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            s.scenario,
            csv_field(&s.flags),
            s.target,
            s.runs,
            s.ok_runs,
            csv_opt(s.tps),
            csv_opt(s.latency_ms),
            csv_opt(s.cpu_us_per_txn),
            csv_opt(ratio(s.tps, direct.and_then(|d| d.tps))),
            csv_opt(ratio(s.tps, bouncer.and_then(|b| b.tps))),
            csv_opt(ratio(
                s.cpu_us_per_txn,
                bouncer.and_then(|b| b.cpu_us_per_txn)
            )),
            csv_opt(s.cpu_vs_pgbouncer_range.map(|r| r.0)),
            csv_opt(s.cpu_vs_pgbouncer_range.map(|r| r.1)),
        );
    }
    written.push(write(dir, &format!("{prefix}-summary.csv"), &text)?);

    if !memory.is_empty() {
        let mut text = String::from(
            "target,clients,baseline_rss_kib,rss_kib,kib_per_client,pooler_fds,login_select_ms,admin_show_ms,open_secs,error\n",
        );
        for m in memory {
            let _ = writeln!(
                text,
                "{},{},{},{},{:.3},{},{},{},{:.2},{}",
                m.target,
                m.clients,
                m.baseline_rss_kib,
                m.rss_kib,
                m.kib_per_client,
                m.pooler_fds.map(|n| n.to_string()).unwrap_or_default(),
                csv_opt(m.login_select_ms),
                csv_opt(m.admin_show_ms),
                m.open_secs,
                csv_field(m.error.as_deref().unwrap_or("")),
            );
        }
        written.push(write(dir, &format!("{prefix}-memory.csv"), &text)?);
    }
    Ok(written)
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    fn run(target: &str, rep: u32, cpu: f64) -> RunResult {
        RunResult {
            scenario: "select-simple-c64".into(),
            target: target.into(),
            rep,
            tps: Some(1000.0),
            latency_ms: Some(1.0),
            transactions: 5000,
            cpu_us_per_txn: Some(cpu),
            error: None,
            retried: None,
        }
    }

    #[test]
    fn cpu_ratio_range_pairs_each_repetition_with_pgbouncer_s_own() {
        let runs = [
            run("pgbouncer", 1, 10.0),
            run("breakwater", 1, 12.0),
            run("pgbouncer", 2, 20.0),
            run("breakwater", 2, 18.0),
            run("pgbouncer", 3, 10.0),
            run("breakwater", 3, 15.0),
        ];
        let scenario = crate::pgbench::Scenario::select("simple", 64);
        let targets = ["pgbouncer".to_owned(), "breakwater".to_owned()];
        let summaries = summarize(&[scenario], &targets, &runs);
        let bw = summaries.iter().find(|s| s.target == "breakwater").unwrap();
        // Pairs 1.2, 0.9, 1.5; the ratio of medians (15 / 10) hides the spread.
        assert_eq!(bw.cpu_vs_pgbouncer_range, Some((0.9, 1.5)));
        assert_eq!(cpu_vs(bw, "1.50".into()), "1.50 (0.90–1.50)");
        let pgb = summaries.iter().find(|s| s.target == "pgbouncer").unwrap();
        assert_eq!(pgb.cpu_vs_pgbouncer_range, None);
    }

    #[test]
    fn csv_fields_with_commas_are_quoted() {
        assert_eq!(csv_field("a,b \"c\""), "\"a,b \"\"c\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}

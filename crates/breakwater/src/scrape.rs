//! What a `/metrics` scrape adds to the registry's rendering: the pools' latency histograms,
//! clients by application_name, the process's own use, and build info (see
//! `stats::export` for why these are rendered at scrape time).

use proxy::Proxy;
use stats::export::{self, ProcessStats};

/// Distinct application_name values shown; the rest count as "other". Ten keeps a fleet's
/// series bounded and still names the apps that matter on one sidecar.
const TOP_APPLICATIONS: usize = 10;

/// Appends the scrape-time series to `out`.
pub fn render(out: &mut String, proxy: &Proxy) {
    let pools: Vec<_> = proxy.pools().iter().map(|p| p.stats.snapshot()).collect();
    export::render_histograms(out, &pools);
    let clients = proxy.clients();
    let names: Vec<&str> = clients
        .iter()
        .map(|c| c.application_name.as_str())
        .collect();
    export::render_clients_by_application(out, &names, TOP_APPLICATIONS);
    export::render_fleets(out, &proxy.fleets());
    export::render_process(out, &process_stats(), env!("CARGO_PKG_VERSION"));
}

/// Read from /proc (Linux); what cannot be read is left out.
fn process_stats() -> ProcessStats {
    // SAFETY: sysconf and getrlimit only read.
    let (page, ticks, max_fds) = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        let max = (libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0).then_some(lim.rlim_cur);
        (
            libc::sysconf(libc::_SC_PAGESIZE),
            libc::sysconf(libc::_SC_CLK_TCK),
            max,
        )
    };
    let statm = std::fs::read_to_string("/proc/self/statm").ok();
    let resident_pages = statm
        .as_deref()
        .and_then(|s| s.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    ProcessStats {
        resident_bytes: resident_pages
            .zip(u64::try_from(page).ok())
            .map(|(n, p)| n * p),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        max_fds,
        cpu_seconds: stat
            .as_deref()
            .and_then(cpu_ticks)
            .zip((ticks > 0).then_some(ticks as f64))
            .map(|(t, hz)| t as f64 / hz),
    }
}

/// utime + stime from /proc/self/stat, whose second field (the command) may hold spaces and
/// parentheses: count fields after its last ')'.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_with_spaces_and_parens() {
        let stat =
            "4242 (break (water) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 17 5 0 0 20 0 4 0 123 0";
        assert_eq!(cpu_ticks(stat), Some(22));
        assert_eq!(cpu_ticks("garbage"), None);
    }

    #[test]
    fn this_process_reports_its_memory_and_descriptors() {
        let p = process_stats();
        assert!(p.resident_bytes.is_some_and(|b| b > 0), "{p:?}");
        assert!(p.open_fds.is_some_and(|n| n >= 3), "{p:?}");
        assert!(p.max_fds.is_some() && p.cpu_seconds.is_some(), "{p:?}");
    }
}

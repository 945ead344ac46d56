//! What the harness reads about processes and the machine from /proc: a process's CPU time and
//! resident memory, the fd limit, and the machine notes printed next to the numbers.

use std::path::Path;

use anyhow::{bail, Context};

/// utime + stime of process `pid` (all its threads), in microseconds.
pub fn cpu_us(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from the last ')'.
    let after_comm = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no ')' in /proc/PID/stat")?;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Field 3 (state) is fields[0], so utime (field 14) and stime (field 15) are [11] and [12].
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .context("short /proc/PID/stat")?
            .parse::<u64>()
            .context("non-numeric CPU time in /proc/PID/stat")
    };
    let total_ticks = ticks(11)? + ticks(12)?;
    Ok(total_ticks as f64 * 1e6 / clock_ticks_per_sec())
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// Resident set size of process `pid` (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status_field_kib(&status, "VmRSS:").context("no VmRSS in /proc/PID/status")
}

fn status_field_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// How many file descriptors process `pid` holds; None if /proc/PID/fd is unreadable.
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|entries| entries.count())
}

/// Raises RLIMIT_NOFILE (soft and, when we may, hard) to at least `wanted`, so that we and the
/// poolers we start (they inherit it) can hold that many sockets. Returns the soft limit now in
/// force, which may be lower than `wanted` when we are not allowed more.
pub fn raise_nofile(wanted: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur >= wanted {
            return lim.rlim_cur;
        }
        // Raising the hard limit needs root (CAP_SYS_RESOURCE) and stays under fs.nr_open.
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(lim.rlim_max);
        let target = wanted.min(nr_open);
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: target.max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return target;
        }
        lim.rlim_cur = lim.rlim_max.min(wanted);
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            return lim.rlim_cur;
        }
        let mut now: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut now);
        now.rlim_cur
    }
}

/// What the report says about the machine next to the numbers.
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub mem_gib: f64,
    pub kernel: String,
    pub loadavg: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_gib = status_field_kib(&meminfo, "MemTotal:").unwrap_or(0) as f64 / 1048576.0;
        let read_trim = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            mem_gib,
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            loadavg: read_trim("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// An OS account to run PgBouncer as (it refuses to run as root), from /etc/passwd.
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

pub fn lookup_user(name: &str) -> anyhow::Result<OsUser> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() >= 4 && fields[0] == name {
            return Ok(OsUser {
                name: name.to_owned(),
                uid: fields[2].parse().context("uid in /etc/passwd")?,
                gid: fields[3].parse().context("gid in /etc/passwd")?,
            });
        }
    }
    bail!("OS user `{name}` not found in /etc/passwd")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn chown(path: &Path, user: &OsUser) -> anyhow::Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .with_context(|| format!("chown {} to {}", path.display(), user.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_cpu_time_and_rss_are_readable() {
        let pid = std::process::id();
        assert!(cpu_us(pid).unwrap() >= 0.0);
        assert!(rss_kib(pid).unwrap() > 0);
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let text = "Name:\tx\nVmRSS:\t   12345 kB\nVmSwap:\t0 kB\n";
        assert_eq!(status_field_kib(text, "VmRSS:"), Some(12345));
        assert_eq!(status_field_kib(text, "VmHWM:"), None);
    }
}

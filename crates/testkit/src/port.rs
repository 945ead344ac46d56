//! Loopback ports that parallel test processes cannot collide on.
//!
//! A port is ours once we hold an exclusive `flock` on `$TMPDIR/breakwater-testkit-ports/<port>`
//! and 127.0.0.1:port could be bound. The lock is held until this process exits, so no other test
//! process (nor this one) hands the port out while a server of ours may still be using it; the
//! kernel drops it when we die, so nothing goes stale. Candidates are drawn from outside the
//! kernel's ephemeral range, where the outgoing connections of every test (and the pooler's
//! connections to PostgreSQL) take their local ports: a port from bind(0) can be taken by such a
//! connection between our check and the server's bind.

use std::collections::hash_map::RandomState;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

/// Locks on the ports this process handed out; held (open) until the process exits.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Lowest port we hand out: below this live too many well-known services.
const LOWEST: u16 = 10_000;
const ATTEMPTS: usize = 2_000;

/// A loopback TCP port no other test process will be given, free at the time of the call.
///
/// # Panics
/// If no port can be found after many attempts, or the lock directory cannot be created: a test
/// cannot go on without a port.
pub fn free_port() -> u16 {
    match try_free_port() {
        Ok(port) => port,
        Err(e) => panic!("free_port: {e:#}"),
    }
}

fn try_free_port() -> anyhow::Result<u16> {
    let dir = lock_dir()?;
    let ranges = candidate_ranges();
    for _ in 0..ATTEMPTS {
        let port = match pick(&ranges) {
            Some(port) => port,
            None => ephemeral_port()?,
        };
        let Some(lock) = try_lock(&dir, port)? else {
            continue;
        };
        if !bindable(port) {
            continue;
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
        return Ok(port);
    }
    bail!("no free loopback port after {ATTEMPTS} attempts")
}

fn lock_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join("breakwater-testkit-ports");
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating port lock directory {}", dir.display()))?;
        // Shared by every user who runs the tests (root in CI, a developer at their desk): make it
        // writable by all, sticky like /tmp. Best effort; a lock we cannot create reads as taken.
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
    }
    Ok(dir)
}

/// Takes the lock for `port`, or `None` if another holder (process or earlier call) has it.
fn try_lock(dir: &Path, port: u16) -> anyhow::Result<Option<File>> {
    let path = dir.join(port.to_string());
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o666)
        .open(&path)
    {
        Ok(file) => file,
        // Created by another user with a tighter umask: flock works on a read-only open too.
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => match File::open(&path) {
            Ok(file) => file,
            Err(_) => return Ok(None),
        },
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    // SAFETY: the descriptor belongs to `file`, which is open for the whole call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    Ok((rc == 0).then_some(file))
}

fn bindable(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

fn ephemeral_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener
        .local_addr()
        .context("local_addr of 127.0.0.1:0")?
        .port())
}

/// Port ranges outside the kernel's ephemeral range, as inclusive `(low, high)` pairs.
fn candidate_ranges() -> Vec<(u16, u16)> {
    let (eph_low, eph_high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        // Linux's default, and close to what other kernels use.
        .unwrap_or((32_768, 60_999));
    let mut ranges = Vec::new();
    if eph_low > LOWEST {
        ranges.push((LOWEST, eph_low - 1));
    }
    if eph_high < u16::MAX {
        ranges.push((eph_high.max(LOWEST - 1) + 1, u16::MAX));
    }
    // Too few ports outside the ephemeral range to spread parallel tests over: use bind(0).
    let size: u32 = ranges.iter().map(|&(lo, hi)| u32::from(hi - lo) + 1).sum();
    if size < 1_000 {
        ranges.clear();
    }
    ranges
}

fn pick(ranges: &[(u16, u16)]) -> Option<u16> {
    let size: u64 = ranges.iter().map(|&(lo, hi)| u64::from(hi - lo) + 1).sum();
    if size == 0 {
        return None;
    }
    let mut offset = random() % size;
    for &(lo, hi) in ranges {
        let len = u64::from(hi - lo) + 1;
        if offset < len {
            return u16::try_from(u64::from(lo) + offset).ok();
        }
        offset -= len;
    }
    None
}

/// A random number; each `RandomState` is freshly keyed, which is all the randomness we need.
fn random() -> u64 {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    hasher.write_u128(nanos);
    hasher.finish()
}

/// Whether something accepts TCP connections on 127.0.0.1:`port` (tries to connect, for up to
/// 200 ms).
pub fn accepts_connections(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether a socket is listening on `port`, found without connecting (a probe connection would
/// show up in the pooler's logs and client counters). `None` when `/proc/net/tcp` is unreadable.
pub(crate) fn is_listening(port: u16) -> Option<bool> {
    const LISTEN: &str = "0A";
    let mut readable = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        readable = true;
        let listening = text.lines().skip(1).any(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            let local_port = local
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|hex| u16::from_str_radix(hex, 16).ok());
            local_port == Some(port) && state == Some(LISTEN)
        });
        if listening {
            return Some(true);
        }
    }
    readable.then_some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_handed_out_are_distinct_and_outside_the_ephemeral_range() {
        let ranges = candidate_ranges();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let port = free_port();
            assert!(seen.insert(port), "port {port} handed out twice");
            if !ranges.is_empty() {
                assert!(ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&port)));
            }
        }
    }

    #[test]
    fn a_held_port_cannot_be_locked_again() {
        let port = free_port();
        let dir = lock_dir().unwrap();
        assert!(try_lock(&dir, port).unwrap().is_none());
    }

    #[test]
    fn a_listening_socket_is_seen_without_connecting() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(is_listening(port), Some(true));
        drop(listener);
        assert_eq!(is_listening(port), Some(false));
    }
}

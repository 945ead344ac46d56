//! Who is connected to the servers: one row per server connection for SHOW SERVERS, published
//! when a connection logs in and removed when it is dropped. Readers copy rows out under a
//! short lock on this map only; they never touch a pool or a connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

/// What SHOW SERVERS says about one server connection.
#[derive(Debug)]
pub struct ServerInfo {
    pub id: u64,
    pub database: String,
    pub user: String,
    /// `host:port` or the Unix socket path.
    pub addr: String,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub pid: i32,
    pub connect_time: SystemTime,
    /// Pool epoch at creation; a connection from an older epoch is closed when released
    /// (RECONNECT, KILL, RELOAD of a re-pointed database).
    pub epoch: u64,
    in_use: AtomicBool,
    /// Microseconds since the Unix epoch of the last checkout.
    request_time_us: AtomicU64,
}

impl ServerInfo {
    pub fn in_use(&self) -> bool {
        self.in_use.load(Relaxed)
    }

    pub fn request_time(&self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_micros(self.request_time_us.load(Relaxed))
    }

    pub(crate) fn set_in_use(&self, in_use: bool) {
        self.in_use.store(in_use, Relaxed);
        if in_use {
            self.request_time_us.store(coarse_unix_micros(), Relaxed);
        }
    }
}

/// Microseconds since the Unix epoch by the kernel's coarse clock, which moves once per tick
/// (a few milliseconds): enough for SHOW SERVERS' request_time, shown to the second, and read
/// at every checkout, where `SystemTime::now` and its conversion were about 100 instructions.
fn coarse_unix_micros() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid place for the result; the call only writes it.
        if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
            return (ts.tv_sec as u64)
                .saturating_mul(1_000_000)
                .saturating_add(ts.tv_nsec as u64 / 1_000);
        }
    }
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Default)]
pub struct ServerRegistry {
    servers: Mutex<HashMap<u64, Arc<ServerInfo>>>,
}

/// Removes its connection's row when dropped (with the connection).
#[derive(Debug)]
pub(crate) struct Registration {
    registry: Weak<ServerRegistry>,
    pub info: Arc<ServerInfo>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(r) = self.registry.upgrade() {
            if let Ok(mut m) = r.servers.lock() {
                m.remove(&self.info.id);
            }
        }
    }
}

pub(crate) struct NewServer {
    pub id: u64,
    pub database: String,
    pub user: String,
    pub addr: String,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub pid: i32,
    pub epoch: u64,
}

impl ServerRegistry {
    pub(crate) fn register(self: &Arc<Self>, s: NewServer) -> Registration {
        let info = Arc::new(ServerInfo {
            id: s.id,
            database: s.database,
            user: s.user,
            addr: s.addr,
            remote: s.remote,
            local: s.local,
            pid: s.pid,
            connect_time: SystemTime::now(),
            epoch: s.epoch,
            in_use: AtomicBool::new(false),
            request_time_us: AtomicU64::new(0),
        });
        if let Ok(mut m) = self.servers.lock() {
            m.insert(info.id, info.clone());
        }
        Registration {
            registry: Arc::downgrade(self),
            info,
        }
    }

    /// Every server connection, ordered by id.
    pub fn list(&self) -> Vec<Arc<ServerInfo>> {
        let mut v: Vec<_> = match self.servers.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        v.sort_by_key(|s| s.id);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coarse clock is the wall clock to within its tick: a request_time in SHOW SERVERS
    /// must not be off by more than the display's resolution.
    #[test]
    fn the_coarse_clock_agrees_with_the_wall_clock() {
        let wall = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64);
        let before = wall(SystemTime::now()).unwrap_or(0);
        let coarse = coarse_unix_micros();
        let after = wall(SystemTime::now()).unwrap_or(0);
        // One tick is at most 10 ms (HZ = 100); allow a whole second of slack for a loaded
        // machine between the three reads.
        assert!(coarse + 1_000_000 >= before, "{coarse} vs {before}");
        assert!(coarse <= after + 1_000_000, "{coarse} vs {after}");
        assert!(coarse > 1_700_000_000_000_000, "a plausible date: {coarse}");
    }
}

//! Who is connected: one row per logged-in client for SHOW CLIENTS, published at login and
//! removed when the session ends. A row also holds a second handle on the client's socket so an
//! operator can disconnect it (KILL, KILL_CLIENT): shutting the socket down makes the session
//! see end-of-stream and clean up exactly as for a client that left (roll back or close its
//! server), so no server connection is ever handed on dirty.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::cancel::{CancelSlot, ClientState};

/// What SHOW CLIENTS says about one client.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub application_name: String,
    /// The client socket's descriptor, not a duplicate: a duplicate per client doubled the
    /// descriptors Breakwater holds. It is only used under the registry's lock, and the row is
    /// removed (under that lock) before the session closes the socket, so it never names an
    /// unrelated socket.
    kill: Option<RawFd>,
    /// The client's cancel slot, which says whether it holds a server right now.
    slot: Arc<CancelSlot>,
}

impl ClientInfo {
    /// Holds a server (`active`), waits for one (`waiting`) or neither (`idle`).
    pub fn state(&self) -> ClientState {
        self.slot.state()
    }

    /// Disconnects the client: its session sees end-of-stream at its next read. Call only under
    /// the registry's lock (see `kill`).
    fn kill(&self) {
        if let Some(fd) = self.kill {
            // SAFETY: shutdown(2) on a descriptor that is open while the row exists.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
    }
}

/// Logged-in clients counted, for the console's SHOW DATABASES, USERS and LISTS.
#[derive(Debug, Default)]
pub struct ClientCounts {
    pub total: u64,
    pub by_database: HashMap<String, u64>,
    pub by_user: HashMap<String, u64>,
}

fn bump(counts: &mut HashMap<String, u64>, key: &str) {
    match counts.get_mut(key) {
        Some(n) => *n += 1,
        None => {
            counts.insert(key.to_owned(), 1);
        }
    }
}

#[derive(Default)]
pub struct ClientRegistry {
    clients: Mutex<HashMap<u64, Arc<ClientInfo>>>,
}

pub(crate) struct NewClient {
    pub id: u64,
    pub user: String,
    pub database: String,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub application_name: String,
    pub kill: Option<RawFd>,
    pub slot: Arc<CancelSlot>,
}

impl ClientRegistry {
    /// Lists a client. The session unlists it (see `Session`'s `Drop`) before its socket closes.
    pub(crate) fn register(&self, c: NewClient) {
        let info = Arc::new(ClientInfo {
            id: c.id,
            user: c.user,
            database: c.database,
            remote: c.remote,
            local: c.local,
            connect_time: SystemTime::now(),
            application_name: c.application_name,
            kill: c.kill,
            slot: c.slot,
        });
        if let Ok(mut m) = self.clients.lock() {
            m.insert(c.id, info);
        }
    }

    pub(crate) fn unlist(&self, id: u64) {
        // Even on a poisoned lock: a row left behind would keep a descriptor number that the
        // kernel may hand to another socket.
        let mut m = match self.clients.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.remove(&id);
    }

    /// Every logged-in client, ordered by id.
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = match self.clients.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        v.sort_by_key(|c| c.id);
        v
    }

    /// How many clients are logged in, in all and per database and per user. Counts under the
    /// lock without copying a row, so SHOW DATABASES/USERS/LISTS stay cheap with 50k clients.
    pub fn counts(&self) -> ClientCounts {
        let m = match self.clients.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let mut counts = ClientCounts {
            total: m.len() as u64,
            ..ClientCounts::default()
        };
        for c in m.values() {
            bump(&mut counts.by_database, &c.database);
            bump(&mut counts.by_user, &c.user);
        }
        counts
    }

    /// Wakes every client's session that waits on its client, to see that Breakwater is
    /// shutting down (see `CancelSlot::shutdown`).
    pub(crate) fn wake_for_shutdown(&self) {
        let m = match self.clients.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        for c in m.values() {
            c.slot.wake_for_shutdown();
        }
    }

    /// Disconnects client `id`; `false` when there is no such client.
    pub fn kill(&self, id: u64) -> bool {
        let m = match self.clients.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        match m.get(&id) {
            Some(c) => {
                c.kill();
                true
            }
            None => false,
        }
    }

    /// Disconnects every client of `database` (all with `None`); returns how many.
    pub fn kill_database(&self, database: Option<&str>) -> usize {
        let m = match self.clients.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let mut n = 0;
        for c in m.values() {
            if database.is_none_or(|d| d == c.database) {
                c.kill();
                n += 1;
            }
        }
        n
    }
}

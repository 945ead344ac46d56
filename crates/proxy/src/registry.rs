//! Who is connected: one row per logged-in client for SHOW CLIENTS, published at login and
//! removed when the session ends. A row also holds a second handle on the client's socket so an
//! operator can disconnect it (KILL, KILL_CLIENT): shutting the socket down makes the session
//! see end-of-stream and clean up exactly as for a client that left (roll back or close its
//! server), so no server connection is ever handed on dirty.
//!
//! The row is also the client's entry for cancels: its BackendKeyData and its cancel slot
//! (`cancel.rs`) live in it, found by key here. One allocation per client for all three, and
//! the user and database names shared by every client that uses them: an idle client's memory
//! is mostly these rows.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use crate::cancel::{CancelSlot, ClientState};

/// What SHOW CLIENTS says about one client, and where a cancel for it goes.
#[derive(Debug)]
pub struct ClientInfo {
    pub id: u64,
    pub user: Arc<str>,
    pub database: Arc<str>,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connect_time: SystemTime,
    pub application_name: String,
    /// The client socket's descriptor, not a duplicate: a duplicate per client doubled the
    /// descriptors Breakwater holds. It is only used under the registry's lock, and the row is
    /// removed (under that lock) before the session closes the socket, so it never names an
    /// unrelated socket.
    kill: Option<RawFd>,
    /// The BackendKeyData the client was given: a CancelRequest naming it reaches `slot`.
    pub(crate) pid: i32,
    pub(crate) key: i32,
    /// Which server the client holds right now, if any, and what it is doing.
    pub(crate) slot: CancelSlot,
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
    rows: Mutex<Rows>,
}

#[derive(Default)]
struct Rows {
    /// By BackendKeyData (pid, key), for cancels; the only index: everything else walks all
    /// rows anyway, and KILL_CLIENT of one id is rare enough to walk them too (a second map
    /// by id was some 28 bytes of every idle client).
    ///
    /// Hashed with foldhash, not SipHash: the keys are random numbers Breakwater draws, so no
    /// client can choose colliding ones, and SipHash was most of a login's insert and a
    /// session's removal (about 700 instructions per login in a connection storm).
    by_key: HashMap<(i32, i32), Arc<ClientInfo>, foldhash::fast::RandomState>,
    /// User and database names of listed clients, each kept once (a short `String` per
    /// client was a 32-byte allocation, twice), with how many listed clients use it: a name
    /// leaves with its last client. The count is a `Cell` so that a login finds the name and
    /// counts itself in one lookup. SipHash stays here: under trust auth a client names
    /// itself.
    names: HashMap<Arc<str>, Cell<usize>>,
}

impl Rows {
    fn intern(&mut self, name: &str) -> Arc<str> {
        if let Some((known, n)) = self.names.get_key_value(name) {
            n.set(n.get() + 1);
            return known.clone();
        }
        let name: Arc<str> = name.into();
        self.names.insert(name.clone(), Cell::new(1));
        name
    }

    fn release(&mut self, name: &str) {
        let Some(n) = self.names.get(name) else {
            return;
        };
        n.set(n.get().saturating_sub(1));
        if n.get() == 0 {
            self.names.remove(name);
        }
    }
}

pub(crate) struct NewClient<'a> {
    pub id: u64,
    pub user: &'a str,
    pub database: &'a str,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub application_name: String,
    pub kill: Option<RawFd>,
}

impl ClientRegistry {
    fn rows(&self) -> MutexGuard<'_, Rows> {
        // Even on a poisoned lock: a row left behind would keep a descriptor number that the
        // kernel may hand to another socket, and the maps are still maps.
        self.rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lists a client under a fresh random BackendKeyData. The session unlists it (see
    /// `Session`'s `Drop`) before its socket closes.
    pub(crate) fn register(&self, c: NewClient<'_>) -> Arc<ClientInfo> {
        let mut rows = self.rows();
        let (pid, key) = loop {
            let k = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
            if !rows.by_key.contains_key(&k) {
                break k;
            }
        };
        let info = Arc::new(ClientInfo {
            id: c.id,
            user: rows.intern(c.user),
            database: rows.intern(c.database),
            remote: c.remote,
            local: c.local,
            connect_time: SystemTime::now(),
            application_name: c.application_name,
            kill: c.kill,
            pid,
            key,
            slot: CancelSlot::default(),
        });
        rows.by_key.insert((pid, key), info.clone());
        info
    }

    pub(crate) fn unlist(&self, c: &ClientInfo) {
        let mut rows = self.rows();
        rows.by_key.remove(&(c.pid, c.key));
        rows.release(&c.user);
        rows.release(&c.database);
    }

    /// Forwards a cancel for the client with this key, if it holds a server. Returns whether a
    /// cancel was sent.
    pub(crate) async fn cancel(&self, pid: i32, key: i32, timeout: Duration) -> bool {
        let row = self.rows().by_key.get(&(pid, key)).cloned();
        match row {
            Some(row) => row.slot.forward(timeout).await,
            None => false,
        }
    }

    /// Every logged-in client, ordered by id.
    pub fn list(&self) -> Vec<Arc<ClientInfo>> {
        let mut v: Vec<_> = self.rows().by_key.values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// How many clients are logged in, in all and per database and per user. Counts under the
    /// lock without copying a row, so SHOW DATABASES/USERS/LISTS stay cheap with 50k clients.
    pub fn counts(&self) -> ClientCounts {
        let rows = self.rows();
        let m = &rows.by_key;
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
        let rows = self.rows();
        let m = &rows.by_key;
        for c in m.values() {
            c.slot.wake_for_shutdown();
        }
    }

    /// The park sweep (see `crate::park`): every idle client is marked, or asked to park.
    pub(crate) fn sweep(&self) {
        let rows = self.rows();
        for c in rows.by_key.values() {
            c.slot.sweep();
        }
    }

    /// Disconnects client `id`; `false` when there is no such client.
    pub fn kill(&self, id: u64) -> bool {
        let rows = self.rows();
        let m = &rows.by_key;
        match m.values().find(|c| c.id == id) {
            Some(c) => {
                c.kill();
                true
            }
            None => false,
        }
    }

    /// Disconnects every client of `database` (all with `None`); returns how many.
    pub fn kill_database(&self, database: Option<&str>) -> usize {
        let rows = self.rows();
        let m = &rows.by_key;
        let mut n = 0;
        for c in m.values() {
            if database.is_none_or(|d| d == &*c.database) {
                c.kill();
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use upstream::{CancelTarget, ServerAddr};

    fn new_client<'a>(id: u64, user: &'a str, database: &'a str) -> NewClient<'a> {
        NewClient {
            id,
            user,
            database,
            remote: None,
            local: None,
            application_name: String::new(),
            kill: None,
        }
    }

    #[test]
    fn clients_share_their_names_and_a_name_leaves_with_its_last_client() {
        let registry = ClientRegistry::default();
        let a = registry.register(new_client(1, "app", "shop"));
        let b = registry.register(new_client(2, "app", "blog"));
        assert!(Arc::ptr_eq(&a.user, &b.user), "one copy of a user's name");
        assert_ne!((a.pid, a.key), (b.pid, b.key));
        assert_eq!(registry.rows().names.len(), 3);

        registry.unlist(&a);
        assert_eq!(&*b.user, "app", "still used by the other client");
        assert_eq!(
            registry.rows().names.len(),
            2,
            "\"shop\" went with its client"
        );
        registry.unlist(&b);
        assert!(registry.rows().names.is_empty());
        assert!(registry.list().is_empty());
        assert_eq!(registry.counts().total, 0);
    }

    #[tokio::test]
    async fn a_cancel_reaches_the_listed_client_with_that_key_and_nobody_once_it_left() {
        let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let registry = Arc::new(ClientRegistry::default());
        let client = registry.register(new_client(1, "app", "app"));
        let target = CancelTarget {
            addr: ServerAddr::Tcp(server.local_addr().unwrap()),
            pid: 7,
            key: 8,
        };
        client.slot.hold(target);
        let timeout = Duration::from_secs(10);

        assert!(!registry.cancel(client.pid, client.key ^ 1, timeout).await);
        let (sender, pid, key) = (registry.clone(), client.pid, client.key);
        let cancel = tokio::spawn(async move { sender.cancel(pid, key, timeout).await });
        // The "server" takes the cancel and closes, as PostgreSQL does.
        drop(server.accept().await.unwrap());
        assert!(cancel.await.unwrap(), "the cancel was sent");

        registry.unlist(&client);
        assert!(!registry.cancel(client.pid, client.key, timeout).await);
    }
}

//! Named prepared statements in transaction mode.
//!
//! Drivers prepare a statement on one server connection and use it later, when the client may
//! be served by another. Breakwater keeps each client's statements (name → query and parameter
//! types) and gives the server a Breakwater-wide name derived from the statement's content, so
//! clients preparing the same text share one server-side statement. Before a Bind or Describe
//! that names a statement the serving connection lacks, the Parse is sent first and its
//! ParseComplete hidden from the client; a client's Close is answered by Breakwater and never
//! closes the shared statement.
//!
//! Replies are matched to requests by the transaction ledger (`crate::ledger`), so synthetic
//! replies (ParseComplete for a Parse the server already had, CloseComplete) are emitted
//! exactly where the server's would have been.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::Bytes;

/// A statement as a client prepared it.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// The name the server knows it by: `bw_` and a hash of the Parse body.
    pub global: Bytes,
    /// The Parse body after the statement name: query, parameter count and types.
    pub rest: Bytes,
    /// Its text may leave session state (`crate::scan::text_may_leave_state`), and names an
    /// advisory lock function: read at each Bind, since a statement prepared in one
    /// transaction runs in later ones, where its Parse is not seen again.
    pub may_leave_state: bool,
    pub mentions_advisory: bool,
}

impl Statement {
    pub fn new(rest: Bytes) -> Statement {
        // SipHash with fixed keys: the same text gets the same name in every process, so a
        // restarted Breakwater reuses nothing by accident (its caches start empty anyway).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rest.hash(&mut h);
        let global = Bytes::from(format!("bw_{:016x}_{}", h.finish(), rest.len()));
        let sql = rest.split(|b| *b == 0).next().unwrap_or_default();
        let may_leave_state = crate::scan::text_may_leave_state(sql);
        let mentions_advisory = may_leave_state && crate::scan::text_mentions_advisory(sql);
        Statement {
            global,
            rest,
            may_leave_state,
            mentions_advisory,
        }
    }
}

/// One client's prepared statements.
#[derive(Debug, Default)]
pub struct ClientStatements {
    /// Boxed when the first statement comes: every client keeps this for its whole life, and
    /// many never prepare a named statement (an empty map inline is 48 bytes, a box 8).
    #[allow(clippy::box_collection)]
    by_name: Option<Box<HashMap<Bytes, Arc<Statement>>>>,
}

impl ClientStatements {
    pub fn get(&self, name: &[u8]) -> Option<&Arc<Statement>> {
        self.by_name.as_ref()?.get(name)
    }

    /// Records a Parse; a later Parse of the same name replaces it (the server would refuse a
    /// duplicate name, but the client evidently wants the new text).
    pub fn insert(&mut self, name: Bytes, stmt: Arc<Statement>) {
        self.by_name
            .get_or_insert_with(Box::default)
            .insert(name, stmt);
    }

    pub fn remove(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        self.by_name.as_mut()?.remove(name)
    }

    /// Forgets `name` if it still refers to `global` (used when the server refused its Parse).
    pub fn forget_if(&mut self, name: &[u8], global: &[u8]) {
        if self.get(name).is_some_and(|s| s.global == global) {
            self.remove(name);
        }
    }

    pub fn clear(&mut self) {
        if let Some(m) = &mut self.by_name {
            m.clear();
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Statements a server of one pool has parsed without error, for clients with the same
/// parameters (their fingerprint: `search_path` and the like decide whether a text parses).
///
/// A client that prepares one of these outside a transaction (Parse, Sync) is answered by
/// Breakwater, and the statement is sent to a server before the client's first Bind or Describe
/// of it, as for any server that lacks it. That saves a checkout and a round trip per client
/// and statement; and it keeps a client that prepares synchronously between its transactions
/// from needing a server while others it multiplexes hold every server in open transactions
/// (pgbench `-M prepared` up to PostgreSQL 15 deadlocked so until `query_wait_timeout`).
/// The cost: when DDL has made a known statement invalid since, the client learns it at the
/// Bind instead of the Parse, and the statement is forgotten here.
#[derive(Debug, Default)]
pub struct KnownStatements {
    inner: std::sync::Mutex<Known>,
}

#[derive(Debug, Default)]
struct Known {
    set: HashSet<(u64, Bytes)>,
    /// Insertion order, for evicting the oldest when full.
    order: VecDeque<(u64, Bytes)>,
}

impl KnownStatements {
    pub fn contains(&self, fingerprint: u64, global: &Bytes) -> bool {
        // A poisoned lock only means a panic elsewhere held it: the set is still a valid cache.
        let known = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        known.set.contains(&(fingerprint, global.clone()))
    }

    /// Records a statement a server parsed, keeping at most `cap`.
    pub fn insert(&self, fingerprint: u64, global: &Bytes, cap: usize) {
        let mut known = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (fingerprint, global.clone());
        if cap == 0 || known.set.contains(&key) {
            return;
        }
        while known.order.len() >= cap {
            if let Some(old) = known.order.pop_front() {
                known.set.remove(&old);
            }
        }
        known.set.insert(key.clone());
        known.order.push_back(key);
    }

    /// Forgets a statement a server refused (rare: DDL since it was known).
    pub fn forget(&self, fingerprint: u64, global: &Bytes) {
        let mut known = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let key = (fingerprint, global.clone());
        if known.set.remove(&key) {
            known.order.retain(|k| *k != key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_text_gets_the_same_global_name_and_different_text_another() {
        let a = Statement::new(Bytes::from_static(b"select 1\0\0\0"));
        let b = Statement::new(Bytes::from_static(b"select 1\0\0\0"));
        let c = Statement::new(Bytes::from_static(b"select 2\0\0\0"));
        assert_eq!(a.global, b.global);
        assert_ne!(a.global, c.global);
        assert!(a.global.starts_with(b"bw_"));
    }

    #[test]
    fn known_statements_are_kept_per_fingerprint_bounded_and_forgotten() {
        let known = KnownStatements::default();
        let g = |i: u8| Bytes::from(vec![b'g', i]);
        known.insert(1, &g(0), 2);
        assert!(known.contains(1, &g(0)));
        assert!(!known.contains(2, &g(0)), "other parameters, other answer");
        known.insert(1, &g(1), 2);
        known.insert(1, &g(2), 2);
        assert!(!known.contains(1, &g(0)), "the oldest goes when full");
        assert!(known.contains(1, &g(1)) && known.contains(1, &g(2)));
        known.forget(1, &g(1));
        assert!(!known.contains(1, &g(1)));
        // Forgetting and learning again does not grow the order past the cap.
        for _ in 0..100 {
            known.insert(1, &g(1), 2);
            known.forget(1, &g(1));
        }
        let inner = known.inner.lock().unwrap();
        assert!(inner.order.len() <= 2 && inner.set.len() <= 2);
    }
}

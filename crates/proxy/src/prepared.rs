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
//! Replies are matched to requests with [`Expect`], one per request still awaiting its reply,
//! so synthetic replies (ParseComplete for a Parse the server already had, CloseComplete) are
//! emitted exactly where the server's would have been.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use proto::frame::write_message;

/// A statement as a client prepared it.
#[derive(Debug, PartialEq, Eq)]
pub struct Statement {
    /// The name the server knows it by: `bw_` and a hash of the Parse body.
    pub global: Bytes,
    /// The Parse body after the statement name: query, parameter count and types.
    pub rest: Bytes,
}

impl Statement {
    pub fn new(rest: Bytes) -> Statement {
        // SipHash with fixed keys: the same text gets the same name in every process, so a
        // restarted Breakwater reuses nothing by accident (its caches start empty anyway).
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rest.hash(&mut h);
        let global = Bytes::from(format!("bw_{:016x}_{}", h.finish(), rest.len()));
        Statement { global, rest }
    }

    /// Writes a Parse of this statement under its global name.
    pub fn write_parse(&self, out: &mut BytesMut) {
        write_message(out, b'P', |b| {
            b.extend_from_slice(&self.global);
            b.put_u8(0);
            b.extend_from_slice(&self.rest);
        });
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

/// The reply a request sent to the server (or answered by Breakwater) is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A Parse the server will answer with ParseComplete. `hide` when Breakwater injected it;
    /// `prepared` names the statement to forget if the server refuses it.
    Parse {
        hide: bool,
        prepared: Option<(Bytes, Bytes)>,
    },
    Bind,
    Describe,
    Execute,
    /// A Close the server will answer; hidden when Breakwater closed an evicted statement.
    Close {
        hide: bool,
    },
    Sync,
    /// A simple Query or a FunctionCall: everything up to ReadyForQuery belongs to it.
    Query,
    /// Answered by Breakwater: this message goes to the client when it reaches the front.
    Synthetic(u8),
    /// The client ended a COPY IN (CopyDone or CopyFail). No reply of its own; it marks where
    /// the server stops ignoring Syncs (see [`Expectations::on_copy_in`]).
    CopyEnd,
}

impl Expect {
    /// Does `tag` end the reply to this request?
    fn ends_with(&self, tag: u8) -> bool {
        match self {
            Expect::Parse { .. } => tag == b'1',
            Expect::Bind => tag == b'2',
            Expect::Describe => matches!(tag, b'T' | b'n'),
            Expect::Execute => matches!(tag, b'C' | b'I' | b's'),
            Expect::Close { .. } => tag == b'3',
            Expect::Sync | Expect::Query => tag == b'Z',
            Expect::Synthetic(_) | Expect::CopyEnd => false,
        }
    }
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    /// Breakwater's own request: the client never asked, so it must not see the reply.
    Hide,
}

/// Requests awaiting replies, oldest first.
#[derive(Debug, Default)]
pub struct Expectations {
    queue: VecDeque<Expect>,
}

impl Expectations {
    pub fn push(&mut self, e: Expect) {
        self.queue.push_back(e);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn clear(&mut self) {
        self.queue.clear();
    }

    /// Writes the synthetic replies now at the front (and drops spent COPY markers).
    pub fn emit_synthetic(&mut self, out: &mut BytesMut) {
        loop {
            match self.queue.front() {
                Some(Expect::Synthetic(tag)) => write_message(out, *tag, |_| {}),
                Some(Expect::CopyEnd) => {}
                _ => return,
            }
            self.queue.pop_front();
        }
    }

    /// The server entered COPY IN mode (CopyInResponse). It ignores Sync (and Flush) until the
    /// copy ends, so Syncs the client pipelined behind the COPY get no ReadyForQuery.
    /// Removes them and returns how many; `copy_still_open` is true when the client has not
    /// ended the copy yet, so Syncs it sends until then must not be counted either.
    pub fn on_copy_in(&mut self) -> (u32, bool) {
        let mut removed = 0;
        let mut i = 1;
        while i < self.queue.len() {
            match self.queue.get(i) {
                Some(Expect::CopyEnd) => return (removed, false),
                Some(Expect::Sync) => {
                    self.queue.remove(i);
                    removed += 1;
                }
                _ => i += 1,
            }
        }
        (removed, true)
    }

    /// Accounts for one server message with `tag`. On an ErrorResponse in an extended batch
    /// the server skips everything up to the next Sync: those requests get no reply (not even
    /// a synthetic one), and the Parses among them did not create anything, which `failed`
    /// receives so the caches can forget them. `parsed` gets the global name of a named
    /// statement whose ParseComplete this is.
    pub fn on_server_message(
        &mut self,
        tag: u8,
        mut failed: impl FnMut(&Expect),
        parsed: impl FnOnce(Bytes),
    ) -> Verdict {
        while self.queue.front() == Some(&Expect::CopyEnd) {
            self.queue.pop_front();
        }
        let Some(front) = self.queue.front() else {
            return Verdict::Forward;
        };
        if tag == b'E' && !matches!(front, Expect::Query | Expect::Sync) {
            while let Some(e) = self.queue.front() {
                if *e == Expect::Sync {
                    break;
                }
                failed(e);
                self.queue.pop_front();
            }
            // Even an error from Breakwater's own injected Parse goes to the client: it is why
            // the client's Bind fails.
            return Verdict::Forward;
        }
        if !front.ends_with(tag) {
            return Verdict::Forward;
        }
        let verdict = match front {
            Expect::Parse { hide: true, .. } | Expect::Close { hide: true } => Verdict::Hide,
            _ => Verdict::Forward,
        };
        if let Some(Expect::Parse {
            prepared: Some((_, global)),
            ..
        }) = self.queue.pop_front()
        {
            parsed(global);
        }
        verdict
    }
}

/// A Close of a statement, for evictions.
pub fn write_close_statement(out: &mut BytesMut, global: &[u8]) {
    write_message(out, b'C', |b| {
        b.put_u8(b'S');
        b.extend_from_slice(global);
        b.put_u8(0);
    });
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

    #[test]
    fn a_parse_complete_names_the_statement_the_server_parsed() {
        let mut q = Expectations::default();
        q.push(Expect::Parse {
            hide: true,
            prepared: Some((Bytes::new(), Bytes::from_static(b"bw_1"))),
        });
        q.push(Expect::Parse {
            hide: false,
            prepared: None,
        });
        let mut parsed = Vec::new();
        q.on_server_message(b'1', |_| {}, |g| parsed.push(g));
        assert_eq!(parsed, [Bytes::from_static(b"bw_1")]);
        q.on_server_message(b'1', |_| {}, |g| parsed.push(g));
        assert_eq!(parsed.len(), 1, "an unnamed statement is nobody's to know");
    }

    #[test]
    fn synthetic_replies_wait_for_earlier_requests() {
        let mut q = Expectations::default();
        let mut out = BytesMut::new();
        q.push(Expect::Bind);
        q.push(Expect::Synthetic(b'3'));
        q.push(Expect::Sync);
        q.emit_synthetic(&mut out);
        assert!(out.is_empty(), "CloseComplete must wait for BindComplete");
        assert_eq!(q.on_server_message(b'2', |_| {}, |_| {}), Verdict::Forward);
        q.emit_synthetic(&mut out);
        assert_eq!(&out[..], &[b'3', 0, 0, 0, 4]);
        assert_eq!(q.on_server_message(b'Z', |_| {}, |_| {}), Verdict::Forward);
        assert!(q.is_empty());
    }

    #[test]
    fn injected_parse_replies_are_hidden_and_rows_pass() {
        let mut q = Expectations::default();
        q.push(Expect::Parse {
            hide: true,
            prepared: None,
        });
        q.push(Expect::Bind);
        q.push(Expect::Execute);
        q.push(Expect::Sync);
        let tags = [b'1', b'2', b'D', b'D', b'C', b'Z'];
        let verdicts: Vec<_> = tags
            .iter()
            .map(|t| q.on_server_message(*t, |_| {}, |_| {}))
            .collect();
        assert_eq!(verdicts[0], Verdict::Hide);
        assert!(verdicts[1..].iter().all(|v| *v == Verdict::Forward));
        assert!(q.is_empty());
    }

    #[test]
    fn an_error_skips_to_sync_and_reports_the_parses_that_did_not_happen() {
        let mut q = Expectations::default();
        let g = (Bytes::from_static(b"s1"), Bytes::from_static(b"bw_x"));
        q.push(Expect::Parse {
            hide: false,
            prepared: Some(g.clone()),
        });
        q.push(Expect::Synthetic(b'1'));
        q.push(Expect::Bind);
        q.push(Expect::Sync);
        let mut failed = Vec::new();
        assert_eq!(
            q.on_server_message(b'E', |e| failed.push(e.clone()), |_| {}),
            Verdict::Forward
        );
        assert_eq!(failed.len(), 3);
        assert_eq!(
            failed[0],
            Expect::Parse {
                hide: false,
                prepared: Some(g)
            }
        );
        let mut out = BytesMut::new();
        q.emit_synthetic(&mut out);
        assert!(out.is_empty(), "no synthetic reply after an error");
        assert_eq!(q.on_server_message(b'Z', |_| {}, |_| {}), Verdict::Forward);
        assert!(q.is_empty());
    }

    #[test]
    fn syncs_sent_during_copy_in_are_not_awaited() {
        // tokio-postgres: Bind, Execute, Sync, CopyData…, CopyDone, Sync.
        let mut q = Expectations::default();
        for e in [
            Expect::Bind,
            Expect::Execute,
            Expect::Sync,
            Expect::CopyEnd,
            Expect::Sync,
        ] {
            q.push(e);
        }
        q.on_server_message(b'2', |_| {}, |_| {});
        assert_eq!(q.on_server_message(b'G', |_| {}, |_| {}), Verdict::Forward);
        assert_eq!(q.on_copy_in(), (1, false));
        q.on_server_message(b'C', |_| {}, |_| {});
        q.on_server_message(b'Z', |_| {}, |_| {});
        assert!(q.is_empty());
        // The copy still open when CopyInResponse arrives.
        let mut q = Expectations::default();
        q.push(Expect::Execute);
        q.push(Expect::Sync);
        assert_eq!(q.on_copy_in(), (1, true));
    }

    #[test]
    fn errors_inside_a_simple_query_do_not_end_it() {
        let mut q = Expectations::default();
        q.push(Expect::Query);
        assert_eq!(
            q.on_server_message(b'E', |_| panic!("nothing fails"), |_| {}),
            Verdict::Forward
        );
        assert!(!q.is_empty());
        q.on_server_message(b'Z', |_| {}, |_| {});
        assert!(q.is_empty());
    }
}

//! The transaction ledger: what a server connection owes its client, and whether it may go to
//! someone else.
//!
//! The session tells the ledger every message it forwards, each way; the ledger keeps the
//! requests still awaiting replies (pipelined Syncs, Parses Breakwater injected, requests it
//! answered itself), COPY IN, messages half forwarded, the transaction status and whether the
//! client left session state behind. One answer, [`TxLedger::handover`], decides what a release,
//! an abandon and a drain for nobody may do with the server.
//!
//! Pure bookkeeping: no I/O, no clock, no tokio, so every protocol shape is a table test.
//! It must never guess from SQL text what the server will answer; the replies decide.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use proto::backend::{self, TxStatus};
use proto::frame::{write_message, Forwarder};
use proto::frontend;

/// The reply a request sent to the server (or answered by Breakwater) is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expect {
    /// A Parse the server will answer with ParseComplete. `hide` when Breakwater injected it;
    /// `prepared` names the statement (client name, global name) to forget if it is refused.
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
    /// The client ended a COPY IN (CopyDone or CopyFail) before the server said it started.
    /// No reply of its own; it marks where the server stops ignoring Syncs.
    CopyEnd,
}

impl Expect {
    /// Does the server message `tag` end the reply to this request?
    fn ends_with(&self, tag: u8) -> bool {
        match self {
            Expect::Parse { .. } => tag == backend::PARSE_COMPLETE,
            Expect::Bind => tag == backend::BIND_COMPLETE,
            Expect::Describe => matches!(tag, backend::ROW_DESCRIPTION | backend::NO_DATA),
            Expect::Execute => matches!(
                tag,
                backend::COMMAND_COMPLETE
                    | backend::EMPTY_QUERY_RESPONSE
                    | backend::PORTAL_SUSPENDED
            ),
            Expect::Close { .. } => tag == backend::CLOSE_COMPLETE,
            Expect::Sync | Expect::Query => tag == backend::READY_FOR_QUERY,
            Expect::Synthetic(_) | Expect::CopyEnd => false,
        }
    }

    /// Answered by a ReadyForQuery.
    fn owes_ready(&self) -> bool {
        matches!(self, Expect::Sync | Expect::Query)
    }
}

/// A client message, as far as the ledger cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sent {
    Query,
    FunctionCall,
    /// `hide`: Breakwater sent it on its own account (before a Bind of a statement the server
    /// lacks); `prepared`: a named statement's (client name, global name).
    Parse {
        hide: bool,
        prepared: Option<(Bytes, Bytes)>,
    },
    Bind,
    Describe,
    Execute,
    /// `hide`: Breakwater closed an evicted statement.
    Close {
        hide: bool,
    },
    /// A request Breakwater answers itself with this message (ParseComplete for a statement
    /// the server has already, CloseComplete for a client's Close of a shared statement), in
    /// its place among the server's replies.
    Answered(u8),
    Sync,
    Flush,
    CopyData,
    /// CopyDone or CopyFail.
    CopyEnd,
}

impl Sent {
    /// A message that is forwarded as it is, known by its tag alone; `None` for Terminate and
    /// for anything a logged-in client may not send.
    pub fn from_tag(tag: u8) -> Option<Sent> {
        Some(match tag {
            frontend::QUERY => Sent::Query,
            frontend::FUNCTION_CALL => Sent::FunctionCall,
            frontend::PARSE => Sent::Parse {
                hide: false,
                prepared: None,
            },
            frontend::BIND => Sent::Bind,
            frontend::DESCRIBE => Sent::Describe,
            frontend::EXECUTE => Sent::Execute,
            frontend::CLOSE => Sent::Close { hide: false },
            frontend::SYNC => Sent::Sync,
            frontend::FLUSH => Sent::Flush,
            frontend::COPY_DATA => Sent::CopyData,
            frontend::COPY_DONE | frontend::COPY_FAIL => Sent::CopyEnd,
            _ => return None,
        })
    }
}

/// A server message, as far as the ledger cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Received {
    /// ReadyForQuery, with its status.
    Ready(TxStatus),
    /// Any other message, by its tag.
    Other(u8),
}

/// What to do with one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Forward,
    /// The reply to Breakwater's own request: the client never asked, so it must not see it.
    Hide,
}

/// May the server go to someone else, and if not, what stands in the way?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handover {
    /// Idle, owing nothing: it may serve anyone.
    Clean,
    /// Owing nothing, but inside a transaction block (or a failed one): a ROLLBACK ends it.
    NeedsRollback,
    /// Replies are still to come (or the server waits for the rest of an extended batch, which
    /// a Sync ends): they can be read for nobody.
    Owes,
    /// A client message is half forwarded: the server waits for bytes nobody will send. Only
    /// closing the connection ends that.
    HalfMessage,
    /// The server is in COPY IN: it waits for data nobody will send.
    CopyIn,
}

/// One transaction's bookkeeping on one server connection.
#[derive(Debug)]
pub(crate) struct TxLedger {
    /// Requests awaiting replies, oldest first.
    expect: VecDeque<Expect>,
    /// How many of `expect` a ReadyForQuery answers: kept by `push` and `pop`, nowhere else.
    ready_owed: u32,
    /// Extended-protocol messages were sent since the last Sync.
    batch_open: bool,
    /// The server is in COPY IN and the client has not ended it yet.
    copy_in: bool,
    /// An error ended an extended batch before the client's Sync: the server skips every
    /// message until that Sync, so they are owed nothing.
    skipping: bool,
    /// From the last ReadyForQuery.
    status: TxStatus,
    /// The client may have left session state on the server: reset it before anyone else.
    leaves_state: bool,
    /// Client → server and server → client streams.
    pub client: Forwarder,
    pub server: Forwarder,
}

impl Default for TxLedger {
    fn default() -> Self {
        TxLedger {
            expect: VecDeque::new(),
            ready_owed: 0,
            batch_open: false,
            copy_in: false,
            skipping: false,
            status: TxStatus::Idle,
            leaves_state: false,
            client: Forwarder::default(),
            server: Forwarder::default(),
        }
    }
}

/// Would [`TxLedger::on_server`] forward a message with `tag` and change nothing, with no
/// synthetic reply to write after it? `front` is the oldest request awaiting a reply.
#[inline]
fn passes_untouched(front: Option<&Expect>, tag: u8) -> bool {
    if matches!(
        tag,
        backend::READY_FOR_QUERY | backend::ERROR_RESPONSE | backend::COPY_IN_RESPONSE
    ) {
        return false;
    }
    match front {
        None => true,
        Some(Expect::Synthetic(_) | Expect::CopyEnd) => false,
        Some(e) => !e.ends_with(tag),
    }
}

impl TxLedger {
    /// Ready for a new transaction on a server that owes nothing, keeping the reply queue's
    /// allocation (a steady stream of transactions allocates nothing).
    ///
    /// Field by field rather than by assigning a fresh ledger, which dropped the queue twice
    /// (about 150 instructions of every transaction); the destructuring makes a new field a
    /// compile error here until it is reset too.
    pub fn clear(&mut self) {
        let TxLedger {
            expect,
            ready_owed,
            batch_open,
            copy_in,
            skipping,
            status,
            leaves_state,
            client,
            server,
        } = self;
        if !expect.is_empty() {
            expect.clear();
        }
        *ready_owed = 0;
        *batch_open = false;
        *copy_in = false;
        *skipping = false;
        *status = TxStatus::Idle;
        *leaves_state = false;
        *client = Forwarder::default();
        *server = Forwarder::default();
    }

    fn push(&mut self, e: Expect) {
        if e.owes_ready() {
            self.ready_owed += 1;
        }
        self.expect.push_back(e);
    }

    fn pop(&mut self) -> Option<Expect> {
        let e = self.expect.pop_front()?;
        if e.owes_ready() {
            self.ready_owed -= 1;
        }
        Some(e)
    }

    /// Records a message forwarded to the server (or answered by Breakwater in its place).
    /// Returns the request if the server will skip it (an error earlier in its batch), so the
    /// caller forgets what it assumed of it: a statement it thought it prepared, or one it
    /// thought it closed.
    #[must_use]
    pub fn on_client(&mut self, sent: Sent) -> Option<Expect> {
        if self.skipping {
            match sent {
                Sent::Sync => self.skipping = false,
                Sent::Parse { hide, prepared } => return Some(Expect::Parse { hide, prepared }),
                Sent::Close { hide } => return Some(Expect::Close { hide }),
                _ => return None,
            }
        }
        match sent {
            Sent::Query | Sent::FunctionCall => self.push(Expect::Query),
            // The server ignores Sync in COPY IN: it gets no ReadyForQuery.
            Sent::Sync if self.copy_in => {}
            Sent::Sync => {
                self.batch_open = false;
                self.push(Expect::Sync);
            }
            Sent::Parse { hide, prepared } => {
                self.batch_open = true;
                self.push(Expect::Parse { hide, prepared });
            }
            Sent::Bind => self.extended(Expect::Bind),
            Sent::Describe => self.extended(Expect::Describe),
            Sent::Execute => self.extended(Expect::Execute),
            Sent::Close { hide } => self.extended(Expect::Close { hide }),
            Sent::Answered(tag) => self.extended(Expect::Synthetic(tag)),
            Sent::Flush => self.batch_open = true,
            Sent::CopyData => {}
            Sent::CopyEnd if self.copy_in => self.copy_in = false,
            Sent::CopyEnd => self.push(Expect::CopyEnd),
        }
        None
    }

    fn extended(&mut self, e: Expect) {
        self.batch_open = true;
        self.push(e);
    }

    /// The client may have left session state (a temp table, an advisory lock, a SET).
    pub fn mark_session_state(&mut self) {
        self.leaves_state = true;
    }

    /// Accounts for one server message. On an ErrorResponse in an extended batch the server
    /// skips everything up to the next Sync: those requests get no reply (not even a
    /// synthetic one), and `failed` hears of each, so caches can forget the Parses among them.
    /// `parsed` gets the global name of a named statement whose ParseComplete this is.
    pub fn on_server(
        &mut self,
        msg: Received,
        mut failed: impl FnMut(&Expect),
        parsed: impl FnOnce(Bytes),
    ) -> Verdict {
        let tag = match msg {
            Received::Ready(status) => {
                self.status = status;
                // Whatever the client still sends of a COPY, the server has left it.
                self.copy_in = false;
                backend::READY_FOR_QUERY
            }
            Received::Other(tag) => tag,
        };
        while self.expect.front() == Some(&Expect::CopyEnd) {
            self.pop();
        }
        if tag == backend::COPY_IN_RESPONSE {
            self.copy_in_started();
            return Verdict::Forward;
        }
        let Some(front) = self.expect.front() else {
            return Verdict::Forward;
        };
        if tag == backend::ERROR_RESPONSE && !front.owes_ready() {
            while let Some(e) = self.expect.front() {
                if *e == Expect::Sync {
                    break;
                }
                failed(e);
                self.pop();
            }
            // No Sync sent yet: what the client sends until it is skipped too.
            self.skipping = self.expect.is_empty() && self.batch_open;
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
        }) = self.pop()
        {
            parsed(global);
        }
        verdict
    }

    /// Forwards, in one copy, the run of whole server messages at the front of `src` that
    /// `streams` accepts (the ones the caller would stream unread) and that
    /// [`TxLedger::on_server`] would forward without a change, with no synthetic reply due
    /// after them: a result's rows, mostly. Returns how many went.
    #[inline]
    pub fn pass_server_run(
        &mut self,
        src: &mut BytesMut,
        dst: &mut BytesMut,
        max: usize,
        streams: impl Fn(u8) -> bool,
    ) -> usize {
        let front = self.expect.front();
        self.server.pass_whole(src, dst, max, |tag| {
            streams(tag) && passes_untouched(front, tag)
        })
    }

    /// CopyInResponse: the server ignores Sync (and Flush) until the copy ends, so Syncs the
    /// client pipelined behind the COPY get no ReadyForQuery and are no longer awaited; and
    /// until the client ends the copy, Syncs it sends are not awaited either.
    fn copy_in_started(&mut self) {
        let mut i = 1;
        while let Some(e) = self.expect.get(i) {
            match e {
                Expect::CopyEnd => {
                    self.copy_in = false;
                    return;
                }
                Expect::Sync => {
                    self.expect.remove(i);
                    self.ready_owed -= 1;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    /// Writes the replies Breakwater answers itself that are now at the front, in order after
    /// the server's (and drops spent COPY markers). Nothing while a server message is half
    /// forwarded: its remaining bytes come first. Called after every message, so the common
    /// case (nothing to write) is a check inlined at the caller.
    #[inline]
    pub fn emit_synthetic(&mut self, out: &mut BytesMut) {
        if matches!(
            self.expect.front(),
            Some(Expect::Synthetic(_) | Expect::CopyEnd)
        ) && !self.server.mid_message()
        {
            self.emit_synthetic_now(out);
        }
    }

    #[cold]
    fn emit_synthetic_now(&mut self, out: &mut BytesMut) {
        loop {
            match self.expect.front() {
                Some(Expect::Synthetic(tag)) => write_message(out, *tag, |_| {}),
                Some(Expect::CopyEnd) => {}
                _ => return,
            }
            self.pop();
        }
    }

    /// The one question release, abandon and drain ask.
    pub fn handover(&self) -> Handover {
        if self.client.mid_message() {
            Handover::HalfMessage
        } else if self.copy_in {
            Handover::CopyIn
        } else if self.server.mid_message() || self.batch_open || !self.expect.is_empty() {
            Handover::Owes
        } else if self.status != TxStatus::Idle {
            Handover::NeedsRollback
        } else {
            Handover::Clean
        }
    }

    /// ReadyForQuery messages still to come.
    pub fn ready_owed(&self) -> u32 {
        self.ready_owed
    }

    pub fn batch_open(&self) -> bool {
        self.batch_open
    }

    pub fn status(&self) -> TxStatus {
        self.status
    }

    pub fn leaves_state(&self) -> bool {
        self.leaves_state
    }

    /// Panics if the ledger's own counts disagree: for the fuzz targets (`crate::fuzzing`).
    pub(crate) fn check_invariants(&self) {
        let owed = self.expect.iter().filter(|e| e.owes_ready()).count();
        assert_eq!(
            owed, self.ready_owed as usize,
            "ready_owed is out of step with the reply queue: {:?}",
            self.expect
        );
    }

    /// A ROLLBACK Breakwater ran on its own account ended the transaction.
    pub fn rolled_back(&mut self) {
        self.status = TxStatus::Idle;
    }
}

#[cfg(test)]
mod tests;

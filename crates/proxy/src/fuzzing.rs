//! Entry points for the fuzz targets in `fuzz/` (not an API: hidden from the docs, and nothing
//! else may use it). The transaction ledger is crate-private; [`ledger_conversation`] drives it
//! with a conversation read from arbitrary bytes and panics when it breaks an invariant, which
//! libFuzzer reports as a crash.
//!
//! Two kinds of conversation, chosen by the first byte:
//! - **legal**: client requests, and the replies a model PostgreSQL gives them (an error in an
//!   extended batch skips to the next Sync, as the server does), interleaved as the bytes say.
//!   The ledger must never call the server clean (or merely in need of a rollback) while a
//!   reply is still to come or a batch is unfinished, and once everything is answered after a
//!   final Sync it must be clean or need only a rollback;
//! - **hostile**: any client message and any server message in any order, half-forwarded
//!   messages included, as a broken client or server could produce. The ledger must not
//!   panic, its own counts must stay consistent, and "clean" must still mean nothing is owed.

use bytes::BytesMut;
use proto::backend::{self, TxStatus};

use crate::ledger::{Handover, Received, Sent, TxLedger};

/// A client request in a legal conversation (and in the ledger's property test).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Req {
    Query {
        fails: bool,
        opens: bool,
        closes: bool,
    },
    Parse {
        fails: bool,
    },
    InjectedParse,
    Bind,
    Describe,
    Execute {
        rows: u8,
    },
    AnsweredClose,
    Flush,
    Sync,
}

impl Req {
    /// The message the session tells the ledger it sent.
    pub(crate) fn sent(self) -> Sent {
        match self {
            Req::Query { .. } => Sent::Query,
            Req::Parse { .. } => Sent::Parse {
                hide: false,
                prepared: None,
            },
            Req::InjectedParse => Sent::Parse {
                hide: true,
                prepared: None,
            },
            Req::Bind => Sent::Bind,
            Req::Describe => Sent::Describe,
            Req::Execute { .. } => Sent::Execute,
            Req::AnsweredClose => Sent::Answered(backend::CLOSE_COMPLETE),
            Req::Flush => Sent::Flush,
            Req::Sync => Sent::Sync,
        }
    }
}

/// A model PostgreSQL: takes requests in order and queues what it answers.
#[derive(Debug, Default)]
pub(crate) struct ModelServer {
    /// An error in an extended batch: everything up to the next Sync is skipped.
    skipping: bool,
    in_tx: bool,
    /// Replies not yet read, oldest first.
    pub(crate) replies: std::collections::VecDeque<Received>,
    /// Replies produced so far, read or not.
    pub(crate) produced: usize,
    /// An extended-protocol message came after the last Sync: the server waits for the rest.
    pub(crate) batch_unfinished: bool,
}

impl ModelServer {
    pub(crate) fn receive(&mut self, r: Req) {
        let before = self.replies.len();
        match r {
            Req::Sync => self.batch_unfinished = false,
            Req::Query { .. } => {}
            _ => self.batch_unfinished = true,
        }
        if self.skipping && !matches!(r, Req::Sync) {
            return;
        }
        let ready = |in_tx: bool| {
            Received::Ready(if in_tx {
                TxStatus::InTransaction
            } else {
                TxStatus::Idle
            })
        };
        match r {
            Req::Query {
                fails,
                opens,
                closes,
            } => {
                if fails {
                    self.replies
                        .push_back(Received::Other(backend::ERROR_RESPONSE));
                } else {
                    self.in_tx = (self.in_tx || opens) && !closes;
                    self.replies
                        .push_back(Received::Other(backend::COMMAND_COMPLETE));
                }
                self.replies.push_back(ready(self.in_tx));
            }
            Req::Parse { fails: true } => {
                self.replies
                    .push_back(Received::Other(backend::ERROR_RESPONSE));
                self.skipping = true;
            }
            Req::Parse { fails: false } | Req::InjectedParse => self
                .replies
                .push_back(Received::Other(backend::PARSE_COMPLETE)),
            Req::Bind => self
                .replies
                .push_back(Received::Other(backend::BIND_COMPLETE)),
            Req::Describe => self.replies.push_back(Received::Other(backend::NO_DATA)),
            Req::Execute { rows } => {
                for _ in 0..rows {
                    self.replies.push_back(Received::Other(backend::DATA_ROW));
                }
                self.replies
                    .push_back(Received::Other(backend::COMMAND_COMPLETE));
            }
            Req::AnsweredClose | Req::Flush => {}
            Req::Sync => {
                self.skipping = false;
                self.replies.push_back(ready(self.in_tx));
            }
        }
        self.produced += self.replies.len() - before;
    }

    /// Does the ledger owe the client anything, by this model? Replies not read yet, or a batch
    /// the server waits to see finished.
    pub(crate) fn owes(&self) -> bool {
        !self.replies.is_empty() || self.batch_unfinished
    }
}

/// Longest conversation read from one input: longer ones find nothing new and run slower.
const MAX_STEPS: usize = 4096;

/// Drives a ledger with the conversation `data` describes; panics on a broken invariant.
pub fn ledger_conversation(data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode & 1 == 0 => legal(rest),
        Some((_, rest)) => hostile(rest),
        None => {}
    }
}

/// Each byte: a request (low nibble 0–8, its options in the high nibble) or, for 9–15, the
/// server's next reply if it has one. At the end, every reply is read.
fn legal(data: &[u8]) {
    let mut ledger = TxLedger::default();
    let mut server = ModelServer::default();
    let mut out = BytesMut::new();
    let mut last_was_sync = false;
    for &b in data.iter().take(MAX_STEPS) {
        let (op, bits) = (b & 0x0f, b >> 4);
        let req = match op {
            0 => Some(Req::Query {
                fails: bits & 1 != 0,
                opens: bits & 2 != 0,
                closes: bits & 4 != 0,
            }),
            1 => Some(Req::Parse {
                fails: bits & 1 != 0,
            }),
            2 => Some(Req::InjectedParse),
            3 => Some(Req::Bind),
            4 => Some(Req::Describe),
            5 => Some(Req::Execute { rows: bits % 3 }),
            6 => Some(Req::AnsweredClose),
            7 => Some(Req::Flush),
            8 => Some(Req::Sync),
            _ => None,
        };
        match req {
            Some(r) => {
                let _ = ledger.on_client(r.sent());
                server.receive(r);
                last_was_sync = matches!(r, Req::Sync);
            }
            None => {
                if let Some(reply) = server.replies.pop_front() {
                    ledger.on_server(reply, |_| {}, |_| {});
                }
            }
        }
        ledger.emit_synthetic(&mut out);
        out.clear();
        check_legal(&ledger, &server);
    }
    while let Some(reply) = server.replies.pop_front() {
        ledger.on_server(reply, |_| {}, |_| {});
        ledger.emit_synthetic(&mut out);
        out.clear();
        check_legal(&ledger, &server);
    }
    if last_was_sync {
        assert!(
            matches!(ledger.handover(), Handover::Clean | Handover::NeedsRollback),
            "everything answered after a final Sync, yet {:?}",
            ledger.handover()
        );
    }
}

fn check_legal(ledger: &TxLedger, server: &ModelServer) {
    ledger.check_invariants();
    if server.owes() {
        assert!(
            !matches!(ledger.handover(), Handover::Clean | Handover::NeedsRollback),
            "{:?} while the model server still owes replies or waits for a Sync ({server:?})",
            ledger.handover()
        );
    }
}

/// Server messages a hostile conversation picks from.
const SERVER_TAGS: [u8; 14] = [
    backend::PARSE_COMPLETE,
    backend::BIND_COMPLETE,
    backend::CLOSE_COMPLETE,
    backend::NO_DATA,
    backend::ROW_DESCRIPTION,
    backend::DATA_ROW,
    backend::COMMAND_COMPLETE,
    backend::EMPTY_QUERY_RESPONSE,
    backend::PORTAL_SUSPENDED,
    backend::ERROR_RESPONSE,
    backend::NOTICE_RESPONSE,
    backend::COPY_IN_RESPONSE,
    backend::COPY_OUT_RESPONSE,
    backend::PARAMETER_STATUS,
];

/// Client messages a hostile conversation picks from.
fn client_message(n: u8) -> Sent {
    match n % 15 {
        0 => Sent::Query,
        1 => Sent::FunctionCall,
        2 => Sent::Parse {
            hide: false,
            prepared: None,
        },
        3 => Sent::Parse {
            hide: true,
            prepared: Some((bytes::Bytes::new(), bytes::Bytes::from_static(b"bw_1"))),
        },
        4 => Sent::Bind,
        5 => Sent::Describe,
        6 => Sent::Execute,
        7 => Sent::Close { hide: false },
        8 => Sent::Close { hide: true },
        9 => Sent::Answered(backend::PARSE_COMPLETE),
        10 => Sent::Answered(backend::CLOSE_COMPLETE),
        11 => Sent::Sync,
        12 => Sent::Flush,
        13 => Sent::CopyData,
        _ => Sent::CopyEnd,
    }
}

/// Each byte: its top two bits pick the side (client message, server message, ReadyForQuery,
/// or a message half forwarded / finished), the rest which one.
fn hostile(data: &[u8]) {
    let mut ledger = TxLedger::default();
    let mut out = BytesMut::new();
    for &b in data.iter().take(MAX_STEPS) {
        let n = b & 0x3f;
        match b >> 6 {
            0 => {
                let _ = ledger.on_client(client_message(n));
            }
            1 => {
                if let Some(&tag) = SERVER_TAGS.get(usize::from(n) % SERVER_TAGS.len()) {
                    ledger.on_server(Received::Other(tag), |_| {}, |_| {});
                }
            }
            2 => {
                let status = match n % 3 {
                    0 => TxStatus::Idle,
                    1 => TxStatus::InTransaction,
                    _ => TxStatus::Failed,
                };
                ledger.on_server(Received::Ready(status), |_| {}, |_| {});
            }
            _ => match n % 4 {
                0 => ledger.client.skip(usize::from(n) + 1),
                1 => ledger.client.reset(),
                2 => ledger.server.skip(usize::from(n) + 1),
                _ => ledger.server.reset(),
            },
        }
        ledger.emit_synthetic(&mut out);
        out.clear();
        ledger.check_invariants();
        if ledger.handover() == Handover::Clean {
            assert!(
                ledger.ready_owed() == 0 && !ledger.batch_open(),
                "clean while owing {} ReadyForQuery (batch open: {})",
                ledger.ready_owed(),
                ledger.batch_open()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's seeds (fuzz/corpus/ledger), so the checks themselves run in CI.
    #[test]
    fn the_seed_conversations_keep_every_invariant() {
        let seeds: [&[u8]; 6] = [
            b"\x00\x00\x09\x09",
            b"\x00\x01\x03\x04\x25\x08\x09\x09\x09\x09\x09\x09\x09\x09",
            b"\x00\x11\x03\x05\x08\x09\x09\x09",
            b"\x00\x20\x09\x09\x00\x09\x09\x40\x08\x09",
            b"\x01\x00\x4b\x0d\x0e\x80",
            b"\x01\xc0\x04\xc1\x49\x80",
        ];
        for seed in seeds {
            ledger_conversation(seed);
        }
    }

    #[test]
    #[should_panic(expected = "while the model server still owes")]
    fn a_ledger_called_clean_while_a_reply_is_owed_is_caught() {
        // The model's own check, against a ledger that was never told of the Query.
        let mut server = ModelServer::default();
        server.receive(Req::Query {
            fails: false,
            opens: false,
            closes: false,
        });
        check_legal(&TxLedger::default(), &server);
    }
}

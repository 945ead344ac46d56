//! Every protocol shape the ledger must account for, as a table: what the client sent and the
//! server answered, in order, what the client sees, and what the ledger says of the server.
//!
//! The script: `>X` is a client message, `<X` a server message, by tag, with these extras:
//! `>Pn` a named Parse (statement `s1`), `>p` a Parse Breakwater injected, `>c` a Close
//! Breakwater injected, `>1`/`>3` a ParseComplete/CloseComplete Breakwater answers itself,
//! `>x` CopyDone, `>half`/`>rest` a client message half forwarded and then finished,
//! `<half`/`<rest` the same for a server message, `<X~` a server message whose header went ahead
//! of its body, `<Z:I`/`<Z:T`/`<Z:E` ReadyForQuery.

use super::*;
use proptest::prelude::*;

use crate::fuzzing::{ModelServer, Req};

/// What a script did: what the client saw (tags, in order), and the ledger after it.
struct Run {
    sees: String,
    failed: usize,
    parsed: Vec<Bytes>,
    ledger: TxLedger,
}

fn run(script: &str) -> Run {
    run_on(TxLedger::default(), script)
}

fn run_on(mut ledger: TxLedger, script: &str) -> Run {
    let mut out = BytesMut::new();
    let mut sees = String::new();
    let mut failed = 0;
    let mut parsed = Vec::new();
    for token in script.split_whitespace() {
        let (side, what) = token.split_at(1);
        if side == ">" {
            let sent = match what {
                "half" => {
                    ledger.client.skip(10);
                    continue;
                }
                "rest" => {
                    ledger.client.reset();
                    continue;
                }
                "Pn" => Sent::Parse {
                    hide: false,
                    prepared: Some((Bytes::from_static(b"s1"), Bytes::from_static(b"bw_1"))),
                },
                "p" => Sent::Parse {
                    hide: true,
                    prepared: Some((Bytes::new(), Bytes::from_static(b"bw_2"))),
                },
                "c" => Sent::Close { hide: true },
                "1" => Sent::Answered(backend::PARSE_COMPLETE),
                "3" => Sent::Answered(backend::CLOSE_COMPLETE),
                "x" => Sent::CopyEnd,
                t => Sent::from_tag(t.as_bytes()[0]).unwrap_or_else(|| panic!("no such {t}")),
            };
            if ledger.on_client(sent).is_some() {
                failed += 1;
            }
        } else {
            let msg = match what {
                "half" => {
                    ledger.server.skip(10);
                    continue;
                }
                "rest" => {
                    ledger.server.reset();
                    continue;
                }
                "Z:I" => Received::Ready(TxStatus::Idle),
                "Z:T" => Received::Ready(TxStatus::InTransaction),
                "Z:E" => Received::Ready(TxStatus::Failed),
                // `<T~`: a message whose header went ahead of its body.
                t if t.ends_with('~') => {
                    ledger.server.skip(10);
                    Received::Other(t.as_bytes()[0])
                }
                t => Received::Other(t.as_bytes()[0]),
            };
            let verdict = ledger.on_server(msg, |_| failed += 1, |g| parsed.push(g));
            if verdict == Verdict::Forward {
                let tag = match msg {
                    Received::Ready(_) => backend::READY_FOR_QUERY,
                    Received::Other(t) => t,
                };
                write_message(&mut out, tag, |_| {});
            }
        }
        // The session emits the synthetic replies after each message, either way.
        ledger.emit_synthetic(&mut out);
    }
    let mut rest = &out[..];
    while let Some((&tag, tail)) = rest.split_first() {
        sees.push(tag as char);
        rest = tail.get(4..).unwrap_or_default();
    }
    Run {
        sees,
        failed,
        parsed,
        ledger,
    }
}

use Handover::*;

/// (name, script, what the client sees, handover)
const SHAPES: &[(&str, &str, &str, Handover)] = &[
    // Simple protocol.
    ("simple query", ">Q <T <D <C <Z:I", "TDCZ", Clean),
    ("simple query still running", ">Q <T <D", "TD", Owes),
    ("simple query sent, nothing back yet", ">Q", "", Owes),
    (
        "BEGIN leaves a transaction open",
        ">Q <C <Z:T",
        "CZ",
        NeedsRollback,
    ),
    (
        "an error inside a transaction",
        ">Q <E <Z:E",
        "EZ",
        NeedsRollback,
    ),
    ("COMMIT ends it", ">Q <C <Z:T >Q <C <Z:I", "CZCZ", Clean),
    ("multi-statement query", ">Q <C <C <C <Z:I", "CCCZ", Clean),
    (
        "multi-statement query with an error",
        ">Q <C <E <Z:I",
        "CEZ",
        Clean,
    ),
    ("error before the last of several", ">Q <E", "E", Owes),
    ("empty query", ">Q <I <Z:I", "IZ", Clean),
    (
        "notices and parameter changes pass",
        ">Q <N <S <C <Z:I",
        "NSCZ",
        Clean,
    ),
    (
        "two pipelined queries, one answered",
        ">Q >Q <C <Z:I",
        "CZ",
        Owes,
    ),
    (
        "two pipelined queries, both answered",
        ">Q >Q <C <Z:I <C <Z:I",
        "CZCZ",
        Clean,
    ),
    ("function call", ">F <V <Z:I", "VZ", Clean),
    (
        "notification after the transaction",
        ">Q <C <Z:I <A",
        "CZA",
        Clean,
    ),
    // Extended protocol.
    (
        "extended batch",
        ">P >B >D >E >S <1 <2 <T <D <C <Z:I",
        "12TDCZ",
        Clean,
    ),
    ("extended batch without its Sync yet", ">P >B >E", "", Owes),
    (
        "extended replies in, no Sync",
        ">P >B >E >H <1 <2 <C",
        "12C",
        Owes,
    ),
    ("Flush without Sync", ">P >H <1", "1", Owes),
    ("Flush then Sync", ">P >H <1 >S <Z:I", "1Z", Clean),
    (
        "pipelined Syncs, one answered",
        ">P >B >E >S >B >E >S <1 <2 <C <Z:I",
        "12CZ",
        Owes,
    ),
    (
        "pipelined Syncs, all answered",
        ">P >B >E >S >B >E >S <1 <2 <C <Z:I <2 <C <Z:I",
        "12CZ2CZ",
        Clean,
    ),
    (
        "Describe of a statement that returns nothing",
        ">P >D >S <1 <t <n <Z:I",
        "1tnZ",
        Clean,
    ),
    (
        "Describe of a statement with rows",
        ">D >S <t <T <Z:I",
        "tTZ",
        Clean,
    ),
    (
        "PortalSuspended ends an Execute",
        ">B >E >S <2 <D <s <Z:I",
        "2DsZ",
        Clean,
    ),
    (
        "a portal resumed inside a transaction",
        ">B >E >S <2 <D <s <Z:T >E >S <D <C <Z:T",
        "2DsZDCZ",
        NeedsRollback,
    ),
    (
        "Execute of an empty query",
        ">P >B >E >S <1 <2 <I <Z:I",
        "12IZ",
        Clean,
    ),
    (
        "error mid-pipeline skips to the next Sync",
        ">P >B >E >S >B >E >S <1 <E <Z:I",
        "1EZ",
        Owes,
    ),
    (
        "error mid-pipeline, then the next batch",
        ">P >B >E >S >B >E >S <1 <E <Z:I <2 <C <Z:I",
        "1EZ2CZ",
        Clean,
    ),
    ("error before any Sync", ">P >B >E >H <E", "E", Owes),
    (
        "error before any Sync, then the Sync",
        ">P >B >E >H <E >S <Z:I",
        "EZ",
        Clean,
    ),
    (
        "what the client sends after an error, before its Sync, is skipped",
        ">P >H <E >B >E >Q >3 >S <Z:I",
        "EZ",
        Clean,
    ),
    (
        "after the Sync that ends the skipping, replies are owed again",
        ">P >H <E >S <Z:I >Q",
        "EZ",
        Owes,
    ),
    ("error at Sync (a failed COMMIT)", ">S <E <Z:I", "EZ", Clean),
    (
        "error in an open transaction",
        ">B >E >S <E <Z:E",
        "EZ",
        NeedsRollback,
    ),
    // Requests Breakwater makes or answers itself.
    (
        "a Parse Breakwater injected is hidden",
        ">p >B >E >S <1 <2 <C <Z:I",
        "2CZ",
        Clean,
    ),
    (
        "an eviction Close and an injected Parse are hidden",
        ">c >p >B >E >S <3 <1 <2 <C <Z:I",
        "2CZ",
        Clean,
    ),
    (
        "an error from an injected Parse reaches the client",
        ">p >B >S <E <Z:I",
        "EZ",
        Clean,
    ),
    ("a Parse answered locally", ">1 >S <Z:I", "1Z", Clean),
    (
        "a Parse answered locally waits for an earlier Bind",
        ">B >1 >S <2 <Z:I",
        "21Z",
        Clean,
    ),
    (
        "a Close answered locally waits for earlier replies",
        ">B >3 >S <2 <Z:I",
        "23Z",
        Clean,
    ),
    (
        "a Close answered locally with nothing before it",
        ">3",
        "3",
        Owes,
    ),
    (
        "a Close answered locally, then Sync",
        ">3 >S <Z:I",
        "3Z",
        Clean,
    ),
    ("a Close the server answers", ">C >S <3 <Z:I", "3Z", Clean),
    (
        "no synthetic reply after an error",
        ">Pn >1 >B >S <E <Z:I",
        "EZ",
        Clean,
    ),
    // COPY.
    (
        "COPY IN by a simple query",
        ">Q <G >d >d >x <C <Z:I",
        "GCZ",
        Clean,
    ),
    ("COPY IN under way", ">Q <G >d", "G", CopyIn),
    (
        "Sync during COPY IN is not awaited",
        ">Q <G >S >d >x <C <Z:I",
        "GCZ",
        Clean,
    ),
    (
        "ErrorResponse during COPY IN",
        ">Q <G >d <E <Z:I",
        "GEZ",
        Clean,
    ),
    (
        "ErrorResponse during COPY IN, the client ends it late",
        ">Q <G >d <E <Z:I >x",
        "GEZ",
        Clean,
    ),
    (
        "COPY IN in an extended batch",
        ">B >E >S <2 <G >d >x >S <C <Z:I",
        "2GCZ",
        Clean,
    ),
    (
        "COPY IN ended before CopyInResponse arrived",
        ">B >E >S >d >x >S <2 <G <C <Z:I",
        "2GCZ",
        Clean,
    ),
    (
        "COPY IN in an extended batch, error mid-copy",
        ">B >E >S <2 <G >d <E >x >S <Z:I",
        "2GEZ",
        Clean,
    ),
    ("COPY OUT", ">Q <H <d <d <c <C <Z:I", "HddcCZ", Clean),
    ("COPY OUT under way", ">Q <H <d", "Hd", Owes),
    // Messages half forwarded.
    ("a client message half sent", ">Q >half", "", HalfMessage),
    (
        "a client message half sent after the reply",
        ">Q <C <Z:I >half",
        "CZ",
        HalfMessage,
    ),
    (
        "a client message finished",
        ">half >rest >Q <C <Z:I",
        "CZ",
        Clean,
    ),
    (
        "a server message half received",
        ">Q <C <Z:I <half",
        "CZ",
        Owes,
    ),
    (
        "a half message wins over COPY IN",
        ">Q <G >half",
        "G",
        HalfMessage,
    ),
];

#[test]
fn every_protocol_shape_is_accounted_for() {
    assert!(SHAPES.len() >= 40);
    for (name, script, sees, handover) in SHAPES {
        let r = run(script);
        assert_eq!(r.sees, *sees, "{name}: what the client sees");
        assert_eq!(r.ledger.handover(), *handover, "{name}: handover");
    }
}

#[test]
fn ready_for_query_counts_follow_the_queue() {
    let r = run(">P >B >E >S >B >E >S");
    assert_eq!(r.ledger.ready_owed(), 2);
    let r = run_on(r.ledger, "<1 <2 <C <Z:I");
    assert_eq!(r.ledger.ready_owed(), 1);
    // COPY IN removes the Sync it ignores from the count too.
    let r = run(">B >E >S <2 <G");
    assert_eq!(r.ledger.ready_owed(), 0);
    assert_eq!(r.ledger.handover(), CopyIn);
}

#[test]
fn a_parse_complete_names_the_statement_the_server_parsed() {
    let r = run(">p >P >B >S <1 <1 <2 <Z:I");
    assert_eq!(r.parsed, [Bytes::from_static(b"bw_2")]);
    let r = run(">Pn >S <1 <Z:I");
    assert_eq!(r.parsed, [Bytes::from_static(b"bw_1")]);
}

#[test]
fn an_error_reports_every_request_it_skipped() {
    let r = run(">Pn >1 >B >S <E");
    assert_eq!(r.failed, 3, "Parse, the answered Parse and Bind");
    let r = run(">Q <E");
    assert_eq!(r.failed, 0, "an error inside a simple query skips nothing");
    let r = run(">P >H <E >p >B");
    assert_eq!(
        r.failed, 2,
        "the Parse, and the injected Parse sent after the error"
    );
    // An eviction's Close skipped, queued or sent after the error: the server keeps the
    // statement, and the caller must know.
    let r = run(">P >B >E >c >p >B >E >S <1 <2 <E");
    assert_eq!(r.failed, 5, "Execute, Close, Parse, Bind, Execute");
    let r = run(">P >H <E >c >p");
    assert_eq!(
        r.failed, 3,
        "the Parse, and the Close and Parse sent after the error"
    );
}

#[test]
fn batch_and_status_are_reported_for_statement_mode() {
    let r = run(">Q <C <Z:T");
    assert_eq!(r.ledger.status(), TxStatus::InTransaction);
    assert_eq!((r.ledger.ready_owed(), r.ledger.batch_open()), (0, false));
    let r = run(">P >B");
    assert!(r.ledger.batch_open());
}

#[test]
fn a_rollback_by_breakwater_makes_the_server_clean() {
    let mut r = run(">Q <E <Z:E");
    assert_eq!(r.ledger.handover(), NeedsRollback);
    r.ledger.rolled_back();
    assert_eq!(r.ledger.handover(), Clean);
}

#[test]
fn session_state_is_remembered_until_cleared() {
    let mut r = run(">Q <C <Z:I");
    assert!(!r.ledger.leaves_state());
    r.ledger.mark_session_state();
    assert!(r.ledger.leaves_state());
    assert_eq!(r.ledger.handover(), Clean, "state is the reset's business");
    r.ledger.clear();
    assert!(!r.ledger.leaves_state());
    assert_eq!(r.ledger.handover(), Clean);
}

#[test]
fn a_cleared_ledger_is_a_new_one_whatever_it_was_in_the_middle_of() {
    // Mid-batch, in a failed transaction, with session state and replies owed.
    for script in [">P >B >D >E", ">Q <E <Z:E >P", ">Q <C <Z:T >Q"] {
        let mut r = run(script);
        r.ledger.mark_session_state();
        r.ledger.clear();
        assert_eq!(
            format!("{:?}", r.ledger),
            format!("{:?}", TxLedger::default()),
            "{script}"
        );
    }
}

#[test]
fn only_messages_a_client_may_send_are_known() {
    for tag in *b"QFPBDECSHdcf" {
        assert!(Sent::from_tag(tag).is_some(), "{}", tag as char);
    }
    for tag in [frontend::TERMINATE, 0, b'!', b'T', b'p', b'Z'] {
        assert!(Sent::from_tag(tag).is_none(), "{tag}");
    }
}

// A model server, to check the ledger against random legal conversations.

fn req() -> impl Strategy<Value = Req> {
    prop_oneof![
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(fails, opens, closes)| {
            Req::Query {
                fails,
                opens,
                closes,
            }
        }),
        any::<bool>().prop_map(|fails| Req::Parse { fails }),
        Just(Req::InjectedParse),
        Just(Req::Bind),
        Just(Req::Describe),
        (0u8..3).prop_map(|rows| Req::Execute { rows }),
        Just(Req::AnsweredClose),
        Just(Req::Flush),
        Just(Req::Sync),
    ]
}

/// What the model PostgreSQL answers to `reqs`, in order.
fn server_replies(reqs: &[Req]) -> Vec<Received> {
    let mut server = ModelServer::default();
    for r in reqs {
        server.receive(*r);
    }
    server.replies.into_iter().collect()
}

proptest! {
    /// However requests and replies interleave, the ledger never calls a server clean while
    /// a reply is still to come or a batch is unfinished; and once everything is answered after
    /// a final Sync, it is clean or needs only a rollback.
    #[test]
    fn random_conversations_are_never_clean_while_a_reply_is_owed(
        reqs in proptest::collection::vec(req(), 1..24),
        schedule in proptest::collection::vec(any::<bool>(), 0..96),
        end_with_sync in any::<bool>(),
    ) {
        let mut reqs = reqs;
        if end_with_sync {
            reqs.push(Req::Sync);
        }
        let mut ledger = TxLedger::default();
        let mut out = BytesMut::new();
        let (mut sent_n, mut recv_n) = (0, 0);
        let mut steps = schedule.into_iter().chain(std::iter::repeat(true));
        loop {
            // The server can only answer what it has received.
            let replies = server_replies(&reqs[..sent_n]);
            let can_send = sent_n < reqs.len();
            let can_recv = recv_n < replies.len();
            if !can_send && !can_recv {
                break;
            }
            let send = can_send && (!can_recv || steps.next().unwrap_or(true));
            if send {
                let _ = ledger.on_client(reqs[sent_n].sent());
                sent_n += 1;
            } else {
                let msg = replies[recv_n];
                // A message the ledger says passes untouched: telling it changes nothing (so
                // the pump may forward a run of them without a word).
                let untouched = match msg {
                    Received::Other(tag) => passes_untouched(ledger.expect.front(), tag),
                    Received::Ready(_) => false,
                };
                let before = format!("{ledger:?}");
                let verdict = ledger.on_server(msg, |_| {}, |_| {});
                if untouched {
                    prop_assert_eq!(verdict, Verdict::Forward);
                    prop_assert_eq!(format!("{ledger:?}"), before);
                    let mut synthetic = BytesMut::new();
                    ledger.emit_synthetic(&mut synthetic);
                    prop_assert!(synthetic.is_empty());
                }
                recv_n += 1;
            }
            ledger.emit_synthetic(&mut out);
            let all_replies = server_replies(&reqs[..sent_n]).len();
            let owed = recv_n < all_replies;
            // An extended-protocol message after the last Sync: the server waits for the rest.
            let so_far = &reqs[..sent_n];
            let last_sync = so_far.iter().rposition(|r| matches!(r, Req::Sync));
            let last_extended = so_far
                .iter()
                .rposition(|r| !matches!(r, Req::Sync | Req::Query { .. }));
            let unfinished_batch = last_extended > last_sync;
            if owed || unfinished_batch {
                prop_assert_ne!(ledger.handover(), Handover::Clean);
                prop_assert_ne!(ledger.handover(), Handover::NeedsRollback);
            }
        }
        if end_with_sync {
            prop_assert!(matches!(ledger.handover(), Handover::Clean | Handover::NeedsRollback));
        }
    }
}

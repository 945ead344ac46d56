//! The transaction ledger (crates/proxy/src/ledger.rs), which decides when a server may go to
//! another client, driven with conversations read from the input: legal ones against a model
//! PostgreSQL (never "clean" while a reply is owed), and hostile ones (any message from either
//! side in any order: no panic, consistent counts). The checks live in `proxy::fuzzing`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    proxy::fuzzing::ledger_conversation(data);
});

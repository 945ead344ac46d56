//! The server side of SCRAM-SHA-256 as clients drive it: client-first, then client-final.
//! `\x00` separates the two messages; `@N` in the second stands for the nonce the server
//! chose, so the fuzzer can reach the proof check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::auth::{ScramServer, ScramVerifier};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let first = parts.next().unwrap_or_default();
    let fin = parts.next().unwrap_or_default();
    // One iteration: PBKDF2 cost is not what is being fuzzed.
    let verifier = ScramVerifier::from_password_with("pencil", b"fuzz-salt", 1);
    let mut server = ScramServer::new(verifier);
    let Ok(reply) = server.client_first(first) else {
        return;
    };
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let nonce = reply
        .split(',')
        .find_map(|a| a.strip_prefix("r="))
        .unwrap_or_default()
        .to_owned();
    let fin = String::from_utf8_lossy(fin).replace("@N", &nonce);
    if server.client_final(fin.as_bytes()).is_ok() {
        assert!(server.client_key().is_some());
    }
    // A third message is out of order, never a panic.
    let _ = server.client_final(fin.as_bytes());
});

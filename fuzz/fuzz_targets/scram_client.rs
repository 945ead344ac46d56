//! The client side of SCRAM-SHA-256 against a hostile server: server-first, then server-final.
//! `\x00` separates them; `@N` in the first stands for the client's nonce, so the fuzzer gets
//! past the nonce check. Keys, not a password, so a fuzzed iteration count costs no PBKDF2.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::auth::{ScramClient, ServerCredential};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(2, |b| *b == 0);
    let first = parts.next().unwrap_or_default();
    let fin = parts.next().unwrap_or_default();
    let mut client = ScramClient::new(&ServerCredential::ScramKeys {
        client_key: [7; 32],
        server_key: [9; 32],
    });
    let client_first = String::from_utf8_lossy(&client.client_first()).into_owned();
    let nonce = client_first.rsplit("r=").next().unwrap_or_default().to_owned();
    let first = String::from_utf8_lossy(first).replace("@N", &nonce);
    if client.server_first(first.as_bytes()).is_err() {
        return;
    }
    // Nobody without the server key can sign: a fuzzed server-final must be refused.
    assert!(client.server_final(fin).is_err());
});

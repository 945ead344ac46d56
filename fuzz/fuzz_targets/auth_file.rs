//! The auth_file (PgBouncer's userlist format), and the secrets in it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::auth::{ScramVerifier, Userlist};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Userlist::parse(text) {
        Ok(list) => {
            for name in list.names() {
                assert!(list.get(name).is_some());
            }
        }
        Err(e) => assert!(e.line() >= 1),
    }
    let _ = ScramVerifier::parse(text);
});

//! The first packets of a client connection (SSLRequest, GSSENCRequest, CancelRequest,
//! StartupMessage), as `take_startup` sees them arriving in any split.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::startup::{take_startup, StartupRequest, MAX_STARTUP_LEN};

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the bytes arrive: in reads of 1..=256 bytes.
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(split) + 1;
    let mut buf = BytesMut::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match take_startup(&mut buf) {
                Ok(Some(req)) => {
                    assert!(buf.len() < before, "a packet was taken without consuming it");
                    assert!(before - buf.len() <= MAX_STARTUP_LEN + 4);
                    if let StartupRequest::Startup(p) = req {
                        assert!(!p.user.is_empty() && !p.database.is_empty());
                        assert!(p.params.iter().all(|(k, _)| k != "user" && k != "database"));
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

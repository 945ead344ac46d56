//! Server → pooler messages: framing with the cap, and every parser the upstream login and the
//! session run on server messages.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::{backend, error, frame};

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(split) + 1;
    let mut buf = BytesMut::new();
    for chunk in data.chunks(step) {
        buf.extend_from_slice(chunk);
        loop {
            match frame::take_message(&mut buf, MAX) {
                Ok(Some(msg)) => {
                    assert!(msg.body.len() + 4 <= MAX);
                    let body = &msg.body[..];
                    match msg.tag {
                        backend::AUTHENTICATION => drop(backend::parse_auth(&msg.body)),
                        backend::PARAMETER_STATUS => drop(backend::parse_parameter_status(body)),
                        backend::BACKEND_KEY_DATA => drop(backend::parse_backend_key_data(body)),
                        backend::READY_FOR_QUERY => drop(backend::parse_ready_for_query(body)),
                        backend::DATA_ROW => drop(backend::parse_data_row(body)),
                        backend::COMMAND_COMPLETE => drop(backend::command_tag(body)),
                        _ => drop(error::parse_error_fields(body)),
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

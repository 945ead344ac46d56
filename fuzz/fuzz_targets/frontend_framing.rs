//! Client → server framing as the session's pump drives it: the Forwarder streams bodies it need
//! not see, keeps whole the messages the pooler inspects, and hands Bind prefixes to the caller;
//! the frontend parsers then read those messages. Every byte must end up forwarded, taken or
//! still pending, and no message over the cap may be accepted.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use proto::frame::{take_whole, Forwarded, Forwarder, Want, HEADER_LEN};
use proto::frontend;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(split) + 1;
    let mut src = BytesMut::new();
    let mut dst = BytesMut::new();
    let mut fwd = Forwarder::default();
    let mut taken = 0usize;
    let mut fed = 0usize;
    for chunk in data.chunks(step) {
        src.extend_from_slice(chunk);
        fed += chunk.len();
        loop {
            let r = fwd.next(&mut src, &mut dst, MAX, |h, _body| match h.tag {
                frontend::BIND => Want::Prefix(64),
                frontend::QUERY
                | frontend::PARSE
                | frontend::DESCRIBE
                | frontend::CLOSE
                | frontend::PASSWORD => Want::Whole,
                _ => Want::Stream,
            });
            match r {
                Ok(Forwarded::NeedMore) => break,
                Ok(Forwarded::Finished) => {}
                Ok(Forwarded::Streamed(h)) => assert!(h.body_len + 4 <= MAX),
                Ok(Forwarded::Whole(h)) => {
                    assert!(h.body_len + 4 <= MAX);
                    let msg = take_whole(&mut src, h);
                    taken += HEADER_LEN + msg.body.len();
                    let body = &msg.body[..];
                    match msg.tag {
                        frontend::QUERY => drop(frontend::parse_query(body)),
                        frontend::PARSE => drop(frontend::parse_parse(body)),
                        frontend::DESCRIBE | frontend::CLOSE => {
                            if let Ok(r) = frontend::statement_ref(msg.tag, body) {
                                assert!(r.end() <= body.len());
                            }
                        }
                        _ => {
                            drop(frontend::parse_password(body));
                            drop(frontend::parse_sasl_initial_response(&msg.body));
                        }
                    }
                }
                Ok(Forwarded::Prefix(h)) => {
                    let avail = (src.len() - HEADER_LEN).min(h.body_len);
                    let body = &src[HEADER_LEN..HEADER_LEN + avail];
                    let end = match frontend::statement_ref(h.tag, body) {
                        Ok(r) => {
                            assert!(r.end() <= body.len());
                            r.end()
                        }
                        Err(_) => 0,
                    };
                    // The caller forwards header and prefix itself, then streams the rest.
                    let n = proto::frame::move_bytes(&mut src, &mut dst, HEADER_LEN + end);
                    assert_eq!(n, HEADER_LEN + end);
                    fwd.skip(h.body_len - end);
                }
                Err(_) => return,
            }
        }
        assert_eq!(dst.len() + taken + src.len(), fed, "bytes lost or invented");
    }
});

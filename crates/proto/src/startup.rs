//! The untagged first packets a client may send: SSLRequest, GSSENCRequest, CancelRequest and the
//! StartupMessage, plus the writers for the ones Breakwater sends to servers.

use bytes::{BufMut, BytesMut};

use crate::frame::{put_cstr, FrameError, Reader};

const PROTOCOL_V3: u32 = 196_608;
/// The protocol's major version, in the high 16 bits of the startup packet's version word.
const MAJOR_V3: u32 = 3;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// Startup packets are small; PostgreSQL accepts up to 10000 bytes after the length word, and
/// so do we.
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Protocol options (`_pq_.name`) are named with this prefix; they ask for protocol extensions.
pub const PROTOCOL_OPTION_PREFIX: &str = "_pq_.";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        key: i32,
    },
    Startup(StartupParams),
    /// A protocol version we do not speak (v2, or a future major version). A 3.x startup with
    /// a higher minor version is a [`StartupRequest::Startup`], to be answered with
    /// NegotiateProtocolVersion.
    Unsupported {
        version: u32,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupParams {
    pub user: String,
    /// Defaults to the user name, as in PostgreSQL.
    pub database: String,
    /// Every other parameter, in the order the client sent them.
    pub params: Vec<(String, String)>,
    /// The minor version of protocol 3 the client asked for (0 for 3.0).
    pub minor_version: u16,
    /// `_pq_.*` protocol options, with their prefix, in the order sent.
    pub protocol_options: Vec<(String, String)>,
}

impl StartupParams {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Takes one startup packet off `buf` if it is complete.
pub fn take_startup(buf: &mut BytesMut) -> Result<Option<StartupRequest>, FrameError> {
    let Some(&[a, b, c, d]) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len < 8 {
        return Err(FrameError::BadLength { len });
    }
    if len - 4 > MAX_STARTUP_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_STARTUP_LEN + 4,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    // Parsed in place, then dropped from the buffer: `split_to` would allocate a shared
    // header for a packet that is thrown away at once.
    let parsed = parse_startup(buf.get(4..len).unwrap_or_default());
    bytes::Buf::advance(buf, len);
    parsed.map(Some)
}

fn parse_startup(body: &[u8]) -> Result<StartupRequest, FrameError> {
    let mut r = Reader::new(body, "startup");
    let code = r.i32()? as u32;
    match code {
        SSL_REQUEST => Ok(StartupRequest::Ssl),
        GSSENC_REQUEST => Ok(StartupRequest::GssEnc),
        CANCEL_REQUEST => {
            let pid = r.i32()?;
            let key = r.i32()?;
            Ok(StartupRequest::Cancel { pid, key })
        }
        version if version >> 16 == MAJOR_V3 => {
            let mut p = StartupParams {
                minor_version: (version & 0xffff) as u16,
                ..StartupParams::default()
            };
            loop {
                let name = r.cstr_utf8()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr_utf8()?.to_owned();
                match name {
                    "user" => p.user = value,
                    "database" => p.database = value,
                    _ if name.starts_with(PROTOCOL_OPTION_PREFIX) => {
                        p.protocol_options.push((name.to_owned(), value))
                    }
                    _ => p.params.push((name.to_owned(), value)),
                }
            }
            if p.user.is_empty() {
                return Err(FrameError::Malformed {
                    what: "startup (no user name)",
                });
            }
            if p.database.is_empty() {
                p.database = p.user.clone();
            }
            Ok(StartupRequest::Startup(p))
        }
        version => Ok(StartupRequest::Unsupported { version }),
    }
}

/// StartupMessage for a server login.
pub fn write_startup(buf: &mut BytesMut, params: &[(&str, &str)]) {
    let start = buf.len();
    buf.put_u32(0);
    buf.put_u32(PROTOCOL_V3);
    for (k, v) in params {
        put_cstr(buf, k.as_bytes());
        put_cstr(buf, v.as_bytes());
    }
    buf.put_u8(0);
    let len = (buf.len() - start) as u32;
    if let Some(field) = buf.get_mut(start..start + 4) {
        field.copy_from_slice(&len.to_be_bytes());
    }
}

/// CancelRequest, sent on a fresh connection to the server.
pub fn write_cancel(buf: &mut BytesMut, pid: i32, key: i32) {
    buf.put_u32(16);
    buf.put_u32(CANCEL_REQUEST);
    buf.put_i32(pid);
    buf.put_i32(key);
}

/// SSLRequest, sent to a server before the StartupMessage.
pub fn write_ssl_request(buf: &mut BytesMut) {
    buf.put_u32(8);
    buf.put_u32(SSL_REQUEST);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, rest: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(8 + rest.len() as u32);
        b.put_u32(code);
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn recognises_each_first_packet() {
        let cases = [
            (packet(SSL_REQUEST, b""), StartupRequest::Ssl),
            (packet(GSSENC_REQUEST, b""), StartupRequest::GssEnc),
            (
                packet(CANCEL_REQUEST, &[0, 0, 0, 7, 0, 0, 0, 9]),
                StartupRequest::Cancel { pid: 7, key: 9 },
            ),
            (
                packet(131_072, b"user\0a\0\0"),
                StartupRequest::Unsupported { version: 131_072 },
            ),
            (
                packet(PROTOCOL_V3, b"user\0bob\0application_name\0x\0\0"),
                StartupRequest::Startup(StartupParams {
                    user: "bob".into(),
                    database: "bob".into(),
                    params: vec![("application_name".into(), "x".into())],
                    ..StartupParams::default()
                }),
            ),
            (
                packet(
                    PROTOCOL_V3 + 2,
                    b"user\0bob\0_pq_.frob\0on\0database\0d\0\0",
                ),
                StartupRequest::Startup(StartupParams {
                    user: "bob".into(),
                    database: "d".into(),
                    minor_version: 2,
                    protocol_options: vec![("_pq_.frob".into(), "on".into())],
                    ..StartupParams::default()
                }),
            ),
            (
                packet(4 << 16, b"user\0a\0\0"),
                StartupRequest::Unsupported { version: 4 << 16 },
            ),
        ];
        for (mut bytes, want) in cases {
            assert_eq!(take_startup(&mut bytes).unwrap(), Some(want));
            assert!(bytes.is_empty());
        }
    }

    #[test]
    fn startup_round_trips_through_the_writer() {
        let mut b = BytesMut::new();
        write_startup(
            &mut b,
            &[("user", "u"), ("database", "d"), ("TimeZone", "UTC")],
        );
        let got = take_startup(&mut b).unwrap().unwrap();
        let StartupRequest::Startup(p) = got else {
            panic!("not a startup: {got:?}")
        };
        assert_eq!((p.user.as_str(), p.database.as_str()), ("u", "d"));
        assert_eq!(p.get("TimeZone"), Some("UTC"));
    }

    #[test]
    fn refuses_bad_startup_packets() {
        let mut missing_user = packet(PROTOCOL_V3, b"database\0d\0\0");
        assert!(take_startup(&mut missing_user).is_err());
        let mut unterminated = packet(PROTOCOL_V3, b"user\0bob");
        assert!(take_startup(&mut unterminated).is_err());
        let mut huge = BytesMut::from(&[0u8, 1, 0, 0, 0, 0, 0, 0][..]);
        assert!(matches!(
            take_startup(&mut huge),
            Err(FrameError::TooLarge { .. })
        ));
        let mut partial = BytesMut::from(&[0u8, 0, 0, 20, 0][..]);
        assert_eq!(take_startup(&mut partial).unwrap(), None);
    }

    #[test]
    fn a_startup_may_carry_10000_bytes_after_its_length_word_as_in_postgresql() {
        let sized = |body_len: usize| {
            // "user\0u\0" + "x\0" + value + "\0" + final "\0", after the 4-byte version.
            let fixed = 4 + 7 + 2 + 1 + 1;
            let mut rest = b"user\0u\0x\0".to_vec();
            rest.extend(std::iter::repeat_n(b'v', body_len - fixed));
            rest.extend_from_slice(b"\0\0");
            packet(PROTOCOL_V3, &rest)
        };
        let mut max = sized(MAX_STARTUP_LEN);
        assert_eq!(max.len(), MAX_STARTUP_LEN + 4);
        assert!(matches!(
            take_startup(&mut max),
            Ok(Some(StartupRequest::Startup(_)))
        ));
        let mut over = sized(MAX_STARTUP_LEN + 1);
        assert!(matches!(
            take_startup(&mut over),
            Err(FrameError::TooLarge { .. })
        ));
    }
}

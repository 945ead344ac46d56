//! The untagged first packets a client may send: SSLRequest, GSSENCRequest, CancelRequest and the
//! StartupMessage, plus the writers for the ones Breakwater sends to servers.

use std::ops::Range;

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

/// A StartupMessage's parameters, kept as the packet sent them: the names and values, each
/// ended by its NUL, in one allocation. A `String` apiece (and a list of pairs) was five
/// allocations per login, all freed again once the login was done.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupParams {
    /// `name\0value\0` pairs as sent, up to the empty name that ends them.
    text: Box<str>,
    /// Where the user name is in `text` (the last `user` sent, as PostgreSQL takes it).
    user: Range<usize>,
    /// Where the database name is; the user name's place when none (or an empty one) was sent,
    /// as in PostgreSQL.
    database: Range<usize>,
    /// The minor version of protocol 3 the client asked for (0 for 3.0).
    pub minor_version: u16,
    /// Whether any `_pq_.*` protocol option was sent (rarely): most logins ask, and need not
    /// walk the pairs to be told no.
    has_options: bool,
}

impl StartupParams {
    pub fn user(&self) -> &str {
        self.text.get(self.user.clone()).unwrap_or_default()
    }

    pub fn database(&self) -> &str {
        self.text.get(self.database.clone()).unwrap_or_default()
    }

    /// Every pair, in the order sent. Split with the `memchr` crate: `str::split` on a char
    /// cost several times as much, and a login walks the pairs more than once.
    fn pairs(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let mut rest: &str = &self.text;
        std::iter::from_fn(move || {
            let name = next_field(&mut rest).filter(|n| !n.is_empty())?;
            Some((name, next_field(&mut rest)?))
        })
    }

    /// Every parameter but `user`, `database` and the protocol options, in the order sent.
    pub fn params(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.pairs().filter(|(name, _)| {
            !matches!(*name, "user" | "database") && !name.starts_with(PROTOCOL_OPTION_PREFIX)
        })
    }

    /// `_pq_.*` protocol options, with their prefix, in the order sent.
    pub fn protocol_options(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        let pairs = self.has_options.then(|| self.pairs());
        pairs
            .into_iter()
            .flatten()
            .filter(|(name, _)| name.starts_with(PROTOCOL_OPTION_PREFIX))
    }

    /// The first value sent for parameter `name` (not `user` or `database`).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// The text up to the next NUL, and `rest` moved past that NUL.
fn next_field<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let end = memchr::memchr(0, rest.as_bytes())?;
    let field = rest.get(..end)?;
    *rest = rest.get(end + 1..)?;
    Some(field)
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
            parse_params(r.rest(), (version & 0xffff) as u16).map(StartupRequest::Startup)
        }
        version => Ok(StartupRequest::Unsupported { version }),
    }
}

/// The name-value pairs after the version word: measured in place, checked to be UTF-8 once,
/// then copied into one allocation.
fn parse_params(body: &[u8], minor_version: u16) -> Result<StartupParams, FrameError> {
    let malformed = || FrameError::Malformed { what: "startup" };
    // The next NUL-ended string from `at`: its place, and `at` moved past its NUL.
    let field = |at: &mut usize| {
        let rest = body.get(*at..).unwrap_or_default();
        let len = memchr::memchr(0, rest).ok_or_else(malformed)?;
        let place = *at..*at + len;
        *at += len + 1;
        Ok::<_, FrameError>(place)
    };
    let (mut at, mut user, mut database, mut has_options) = (0, 0..0, 0..0, false);
    loop {
        let name = field(&mut at)?;
        if name.is_empty() {
            break;
        }
        let value = field(&mut at)?;
        match body.get(name).unwrap_or_default() {
            b"user" => user = value,
            b"database" => database = value,
            n if n.starts_with(PROTOCOL_OPTION_PREFIX.as_bytes()) => has_options = true,
            _ => {}
        }
    }
    // Checked whole: NUL is ASCII and never part of a longer UTF-8 sequence, so the text is
    // UTF-8 exactly when every name and value is.
    let text = std::str::from_utf8(body.get(..at).unwrap_or_default()).map_err(|_| malformed())?;
    if user.is_empty() {
        return Err(FrameError::Malformed {
            what: "startup (no user name)",
        });
    }
    if database.is_empty() {
        database = user.clone();
    }
    Ok(StartupParams {
        text: text.into(),
        user,
        database,
        minor_version,
        has_options,
    })
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
                packet(4 << 16, b"user\0a\0\0"),
                StartupRequest::Unsupported { version: 4 << 16 },
            ),
        ];
        for (mut bytes, want) in cases {
            assert_eq!(take_startup(&mut bytes).unwrap(), Some(want));
            assert!(bytes.is_empty());
        }
    }

    fn startup(mut bytes: BytesMut) -> StartupParams {
        match take_startup(&mut bytes) {
            Ok(Some(StartupRequest::Startup(p))) => {
                assert!(bytes.is_empty());
                p
            }
            other => panic!("not a startup: {other:?}"),
        }
    }

    #[test]
    fn a_startup_packet_is_split_into_user_database_parameters_and_protocol_options() {
        let p = startup(packet(PROTOCOL_V3, b"user\0bob\0application_name\0x\0\0"));
        assert_eq!((p.user(), p.database(), p.minor_version), ("bob", "bob", 0));
        assert_eq!(p.params().collect::<Vec<_>>(), [("application_name", "x")]);
        assert_eq!(p.protocol_options().count(), 0);
        assert_eq!(p.get("application_name"), Some("x"));
        assert_eq!(p.get("user"), None, "user is not a parameter");

        let p = startup(packet(
            PROTOCOL_V3 + 2,
            b"user\0bob\0_pq_.frob\0on\0database\0d\0TimeZone\0UTC\0a\0\0\0",
        ));
        assert_eq!((p.user(), p.database(), p.minor_version), ("bob", "d", 2));
        assert_eq!(
            p.params().collect::<Vec<_>>(),
            [("TimeZone", "UTC"), ("a", "")],
            "in the order sent, an empty value kept"
        );
        assert_eq!(
            p.protocol_options().collect::<Vec<_>>(),
            [("_pq_.frob", "on")]
        );
    }

    #[test]
    fn the_last_user_counts_and_an_empty_database_means_the_users_name() {
        let p = startup(packet(
            PROTOCOL_V3,
            b"user\0a\0database\0\0user\0b\0x\0\xc3\xa9\0\0trailing",
        ));
        assert_eq!((p.user(), p.database()), ("b", "b"));
        assert_eq!(p.get("x"), Some("\u{e9}"));
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
        assert_eq!((p.user(), p.database()), ("u", "d"));
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
        let mut empty_user = packet(PROTOCOL_V3, b"user\0\0\0");
        assert!(matches!(
            take_startup(&mut empty_user),
            Err(FrameError::Malformed {
                what: "startup (no user name)"
            })
        ));
        let mut not_utf8 = packet(PROTOCOL_V3, b"user\0b\xff\0\0");
        assert!(matches!(
            take_startup(&mut not_utf8),
            Err(FrameError::Malformed { what: "startup" })
        ));
        let mut no_value = packet(PROTOCOL_V3, b"user\0bob\0x\0");
        assert!(take_startup(&mut no_value).is_err());
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

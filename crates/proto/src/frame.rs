//! Message framing: a one-byte tag and a four-byte big-endian length that counts itself.
//!
//! Callers keep partial input in a `BytesMut` they own; these functions only look at what is
//! there, so reading can be cancelled at any await point without losing bytes.

use bytes::{Buf, Bytes, BytesMut};

/// Tag byte plus length field.
pub const HEADER_LEN: usize = 5;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("message length {len} exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("invalid message length {len}")]
    BadLength { len: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
}

/// One complete message. `body` excludes the tag and the length field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

/// A message's header: its tag, and the length of the body that follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    /// Bytes after the header (the length field minus its own four bytes).
    pub body_len: usize,
}

impl Header {
    /// The header at the front of `buf`, once its five bytes are in. Lengths below 4 or above
    /// `max` are refused as soon as the header is visible, so a peer that announces a huge
    /// message is cut off before anything is buffered for it.
    #[inline]
    pub fn peek(buf: &[u8], max: usize) -> Result<Option<Header>, FrameError> {
        let Some(&[tag, a, b, c, d]) = buf.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len < 4 {
            return Err(FrameError::BadLength { len });
        }
        if len > max {
            return Err(FrameError::TooLarge { len, max });
        }
        Ok(Some(Header {
            tag,
            body_len: len - 4,
        }))
    }

    /// Tag, length field and body.
    #[inline]
    pub fn total(&self) -> usize {
        HEADER_LEN + self.body_len
    }
}

/// If a whole message starts at `buf[0]`, returns its total size (tag + length + body).
/// Refuses bad lengths as [`Header::peek`] does.
#[inline]
pub fn message_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    Ok(Header::peek(buf, max)?
        .map(|h| h.total())
        .filter(|total| buf.len() >= *total))
}

/// How a caller wants one message handled by a [`Forwarder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Forward the header now and the body as it arrives, unexamined.
    Stream,
    /// Leave the message in the source until all of it is in; the caller takes it.
    Whole,
    /// Leave it in the source until its header and the first `n` bytes of its body (or all of a
    /// shorter body) are in; the caller moves that part itself and streams the rest with
    /// [`Forwarder::skip`]. For large messages whose start the caller rewrites (a Bind naming a
    /// prepared statement). `Prefix(0)` hands the caller the header alone, moving nothing.
    Prefix(usize),
}

/// What a [`Forwarder`] did with the next message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// Nothing more until more bytes arrive.
    NeedMore,
    /// The last of a streamed message went to the destination: what comes after that
    /// message (a reply the caller owes in its place) may be written now.
    Finished,
    /// The header went to the destination; the body follows as it arrives.
    Streamed(Header),
    /// All of the message is at the front of the source (nothing moved).
    Whole(Header),
    /// The header and the wanted prefix are at the front of the source (nothing moved).
    Prefix(Header),
}

/// Moves messages from a source buffer to a destination, reading each header once: bodies the
/// caller does not need stream through before they are whole, so a message's size never decides
/// how much is buffered. Partial input stays in the source, so a read cancelled at any await
/// point loses nothing.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Forwarder {
    /// Bytes of the current message still to forward unexamined.
    skip: usize,
}

impl Forwarder {
    /// Part of a message has been forwarded and the rest has not: the peer on the other side is
    /// waiting for it.
    #[inline]
    pub fn mid_message(&self) -> bool {
        self.skip > 0
    }

    /// Forwards what is owed of a streaming message, then looks at the next header and acts as
    /// `want` says for it; `want` also sees as much of the body as has arrived.
    #[inline]
    pub fn next(
        &mut self,
        src: &mut BytesMut,
        dst: &mut BytesMut,
        max: usize,
        want: impl FnOnce(&Header, &[u8]) -> Want,
    ) -> Result<Forwarded, FrameError> {
        if self.skip > 0 {
            self.skip -= move_bytes(src, dst, self.skip);
            return Ok(if self.skip > 0 {
                Forwarded::NeedMore
            } else {
                Forwarded::Finished
            });
        }
        let Some(h) = Header::peek(src, max)? else {
            return Ok(Forwarded::NeedMore);
        };
        let body = src.get(HEADER_LEN..).unwrap_or_default();
        let body = body.get(..h.body_len).unwrap_or(body);
        Ok(match want(&h, body) {
            Want::Stream => {
                move_bytes(src, dst, HEADER_LEN);
                self.skip = h.body_len;
                Forwarded::Streamed(h)
            }
            Want::Whole if src.len() >= h.total() => Forwarded::Whole(h),
            Want::Prefix(n) if src.len() >= HEADER_LEN + n.min(h.body_len) => Forwarded::Prefix(h),
            Want::Whole | Want::Prefix(_) => Forwarded::NeedMore,
        })
    }

    /// Forwards, in one copy, the whole messages at the front of `src` whose tags `plain`
    /// accepts, stopping at the first other one (or an incomplete one, or a header `peek`
    /// refuses, which [`Forwarder::next`] then reports). Nothing while a message is half
    /// forwarded. Returns how many messages went: a result's rows cost one copy instead of
    /// a look and two copies each.
    #[inline]
    pub fn pass_whole(
        &mut self,
        src: &mut BytesMut,
        dst: &mut BytesMut,
        max: usize,
        plain: impl Fn(u8) -> bool,
    ) -> usize {
        if self.skip > 0 {
            return 0;
        }
        let (mut end, mut n) = (0, 0);
        while let Some(rest) = src.get(end..) {
            match Header::peek(rest, max) {
                Ok(Some(h)) if rest.len() >= h.total() && plain(h.tag) => {
                    end += h.total();
                    n += 1;
                }
                _ => break,
            }
        }
        if end > 0 {
            move_bytes(src, dst, end);
        }
        n
    }

    /// After the caller forwarded the start of a message itself, the next `n` bytes of the
    /// source belong to it and stream through.
    #[inline]
    pub fn skip(&mut self, n: usize) {
        self.skip = n;
    }

    /// Forgets a message in flight (the connection it belonged to is being dropped).
    pub fn reset(&mut self) {
        self.skip = 0;
    }
}

/// Moves up to `n` bytes from the front of `from` to the end of `to`; returns how many. A copy
/// and a pointer bump: `split_to` takes and drops a reference on the buffer's shared storage
/// (two atomic operations) for bytes that are copied at once.
#[inline]
pub fn move_bytes(from: &mut BytesMut, to: &mut BytesMut, n: usize) -> usize {
    let n = n.min(from.len());
    if let Some(head) = from.get(..n) {
        to.extend_from_slice(head);
    }
    from.advance(n);
    n
}

/// Splits the first complete message off `buf`, if there is one.
pub fn take_message(buf: &mut BytesMut, max: usize) -> Result<Option<Message>, FrameError> {
    match Header::peek(buf, max)? {
        Some(h) if buf.len() >= h.total() => Ok(Some(take_whole(buf, h))),
        _ => Ok(None),
    }
}

/// Splits off the message whose header is `h`; all of it must be in `buf` (see
/// [`Forwarded::Whole`]).
pub fn take_whole(buf: &mut BytesMut, h: Header) -> Message {
    let mut msg = buf.split_to(h.total().min(buf.len()));
    msg.advance(HEADER_LEN.min(msg.len()));
    Message {
        tag: h.tag,
        body: msg.freeze(),
    }
}

/// Bytes still needed before the first message in `buf` is complete (at least 1 when the header
/// itself is incomplete). Lets readers reserve exactly what is missing.
pub fn missing(buf: &[u8]) -> usize {
    match buf.get(..HEADER_LEN) {
        Some(&[_, a, b, c, d]) => {
            let total = u32::from_be_bytes([a, b, c, d]) as usize + 1;
            total.saturating_sub(buf.len())
        }
        _ => HEADER_LEN.saturating_sub(buf.len()),
    }
}

/// Appends a message with `tag`, reserving the length and filling it in after `body` wrote.
#[inline]
pub fn write_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = buf.len() - 4;
    body(buf);
    let len = (buf.len() - start) as u32;
    if let Some(field) = buf.get_mut(start..start + 4) {
        field.copy_from_slice(&len.to_be_bytes());
    }
}

/// Appends a NUL-terminated string.
#[inline]
pub fn put_cstr(buf: &mut BytesMut, s: &[u8]) {
    buf.extend_from_slice(s);
    buf.extend_from_slice(&[0]);
}

/// A cursor over a message body for the fields the pooler parses.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }

    fn malformed(&self) -> FrameError {
        FrameError::Malformed { what: self.what }
    }

    pub fn cstr(&mut self) -> Result<&'a [u8], FrameError> {
        let end = memchr::memchr(0, self.buf).ok_or_else(|| self.malformed())?;
        let (s, rest) = self.buf.split_at(end);
        self.buf = rest.get(1..).unwrap_or_default();
        Ok(s)
    }

    pub fn cstr_utf8(&mut self) -> Result<&'a str, FrameError> {
        let s = self.cstr()?;
        std::str::from_utf8(s).map_err(|_| self.malformed())
    }

    pub fn i16(&mut self) -> Result<i16, FrameError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub fn i32(&mut self) -> Result<i32, FrameError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        let [b] = self.array()?;
        Ok(b)
    }

    /// The next `N` bytes, by value.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let b = self.bytes(N)?;
        b.try_into().map_err(|_| self.malformed())
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.buf.len() < n {
            return Err(self.malformed());
        }
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_complete_messages_and_keeps_partial_ones() {
        let mut buf = BytesMut::new();
        write_message(&mut buf, b'Z', |b| b.extend_from_slice(b"I"));
        buf.extend_from_slice(&[b'C', 0, 0]);
        let m = take_message(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((m.tag, &m.body[..]), (b'Z', &b"I"[..]));
        assert_eq!(take_message(&mut buf, 1024).unwrap(), None);
        assert_eq!(buf.len(), 3);
        assert_eq!(missing(&buf), 2);
    }

    #[test]
    fn a_run_of_plain_messages_goes_in_one_copy_and_stops_at_anything_else() {
        let mut src = BytesMut::new();
        write_message(&mut src, b'T', |b| b.extend_from_slice(b"desc"));
        write_message(&mut src, b'D', |b| b.extend_from_slice(b"row1"));
        write_message(&mut src, b'D', |b| b.extend_from_slice(b"row2"));
        write_message(&mut src, b'C', |b| b.extend_from_slice(b"SELECT 2\0"));
        write_message(&mut src, b'D', |b| b.extend_from_slice(b"late"));
        let whole = src.clone();
        let plain = |t: u8| matches!(t, b'T' | b'D');
        let mut fw = Forwarder::default();
        let mut dst = BytesMut::new();
        assert_eq!(fw.pass_whole(&mut src, &mut dst, 1024, plain), 3);
        assert_eq!(dst.len(), 3 * 9);
        assert_eq!(&dst[..], &whole[..27]);
        assert_eq!(src[0], b'C', "stops at a message it may not pass");
        // An incomplete row stays for the caller, as does a row behind a half-sent message.
        let mut src = BytesMut::new();
        write_message(&mut src, b'D', |b| b.extend_from_slice(b"row1"));
        src.extend_from_slice(&[b'D', 0, 0, 0, 9, b'r']);
        let mut dst = BytesMut::new();
        assert_eq!(fw.pass_whole(&mut src, &mut dst, 1024, plain), 1);
        assert_eq!(src.len(), 6);
        fw.skip(3);
        assert_eq!(fw.pass_whole(&mut src, &mut dst, 1024, plain), 0);
        // A length `peek` refuses is left for `next` to report.
        let mut src = BytesMut::from(&[b'D', 0, 0, 0, 2][..]);
        let mut fw = Forwarder::default();
        assert_eq!(fw.pass_whole(&mut src, &mut dst, 1024, plain), 0);
        assert!(fw
            .next(&mut src, &mut dst, 1024, |_, _| Want::Stream)
            .is_err());
    }

    #[test]
    fn refuses_oversized_and_undersized_lengths_from_the_header_alone() {
        let cases: &[(&[u8], FrameError)] = &[
            (&[b'Q', 0, 0, 0, 3], FrameError::BadLength { len: 3 }),
            (
                &[b'Q', 0x7f, 0, 0, 0],
                FrameError::TooLarge {
                    len: 0x7f00_0000,
                    max: 1024,
                },
            ),
        ];
        for (bytes, err) in cases {
            assert_eq!(message_len(bytes, 1024), Err(err.clone()));
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        write_message(&mut b, tag, |b| b.extend_from_slice(body));
        b.to_vec()
    }

    #[test]
    fn header_peek_waits_for_five_bytes_and_checks_the_length_first() {
        assert_eq!(Header::peek(&[b'Q', 0, 0, 0], 64), Ok(None));
        assert_eq!(
            Header::peek(&[b'Q', 0, 0, 0, 9], 64),
            Ok(Some(Header {
                tag: b'Q',
                body_len: 5
            }))
        );
        assert_eq!(
            Header::peek(&[b'Q', 0, 0, 1, 0], 64),
            Err(FrameError::TooLarge { len: 256, max: 64 })
        );
    }

    #[test]
    fn a_streamed_message_goes_through_in_pieces_and_the_next_header_is_seen_once() {
        let mut wire = msg(b'd', &[7; 100]);
        wire.extend(msg(b'S', b""));
        let mut fwd = Forwarder::default();
        let (mut src, mut dst) = (BytesMut::new(), BytesMut::new());
        let mut seen = Vec::new();
        // Feed the bytes 13 at a time, as a slow socket would.
        for chunk in wire.chunks(13) {
            src.extend_from_slice(chunk);
            loop {
                match fwd
                    .next(&mut src, &mut dst, 1024, |_, _| Want::Stream)
                    .unwrap()
                {
                    Forwarded::NeedMore => break,
                    Forwarded::Finished => seen.push(b'.'),
                    Forwarded::Streamed(h) => seen.push(h.tag),
                    other => panic!("{other:?}"),
                }
            }
            // Nothing waits in the source but an incomplete header.
            assert!(src.len() < HEADER_LEN);
        }
        assert_eq!(
            seen, b"d.S",
            "the end of the body is reported before the next header"
        );
        assert_eq!(&dst[..], &wire[..]);
        assert!(src.is_empty() && !fwd.mid_message());
    }

    #[test]
    fn a_whole_message_waits_in_the_source_until_all_of_it_is_in() {
        let wire = msg(b'Q', b"select 1\0");
        let mut fwd = Forwarder::default();
        let (mut src, mut dst) = (BytesMut::from(&wire[..8]), BytesMut::new());
        let r = fwd
            .next(&mut src, &mut dst, 1024, |_, _| Want::Whole)
            .unwrap();
        assert_eq!(r, Forwarded::NeedMore);
        src.extend_from_slice(&wire[8..]);
        let Forwarded::Whole(h) = fwd
            .next(&mut src, &mut dst, 1024, |_, _| Want::Whole)
            .unwrap()
        else {
            panic!("whole")
        };
        let m = take_whole(&mut src, h);
        assert_eq!((m.tag, &m.body[..]), (b'Q', &b"select 1\0"[..]));
        assert!(dst.is_empty() && src.is_empty());
    }

    #[test]
    fn a_prefix_is_offered_once_in_and_the_rest_streams_after_skip() {
        let wire = msg(b'B', b"\0s1\0------------------------------");
        let mut fwd = Forwarder::default();
        let (mut src, mut dst) = (BytesMut::from(&wire[..7]), BytesMut::new());
        let want = |_: &Header, _: &[u8]| Want::Prefix(4);
        assert_eq!(
            fwd.next(&mut src, &mut dst, 1024, want).unwrap(),
            Forwarded::NeedMore
        );
        src.extend_from_slice(&wire[7..12]);
        let Forwarded::Prefix(h) = fwd.next(&mut src, &mut dst, 1024, want).unwrap() else {
            panic!("prefix")
        };
        // The caller forwards header and prefix itself, then skips the rest.
        move_bytes(&mut src, &mut dst, HEADER_LEN + 4);
        fwd.skip(h.body_len - 4);
        assert!(fwd.mid_message());
        src.extend_from_slice(&wire[12..]);
        assert_eq!(
            fwd.next(&mut src, &mut dst, 1024, want).unwrap(),
            Forwarded::Finished
        );
        assert_eq!(&dst[..], &wire[..]);
        assert!(!fwd.mid_message());
    }

    #[test]
    fn an_oversized_header_is_refused_before_anything_moves() {
        let mut fwd = Forwarder::default();
        let mut src = BytesMut::from(&[b'Q', 0x7f, 0, 0, 0][..]);
        let mut dst = BytesMut::new();
        assert!(fwd
            .next(&mut src, &mut dst, 1024, |_, _| Want::Stream)
            .is_err());
        assert!(dst.is_empty() && src.len() == 5);
    }

    #[test]
    fn reader_reports_truncated_fields_instead_of_panicking() {
        let mut r = Reader::new(b"abc", "test");
        assert!(r.cstr().is_err());
        let mut r = Reader::new(&[0, 1], "test");
        assert!(r.i32().is_err());
    }
}

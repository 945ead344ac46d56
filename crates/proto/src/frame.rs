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

/// If a whole message starts at `buf[0]`, returns its total size (tag + length + body).
/// Refuses lengths below 4 or above `max` as soon as the header is visible, so a peer that
/// announces a huge message is cut off before we buffer it.
#[inline]
pub fn message_len(buf: &[u8], max: usize) -> Result<Option<usize>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len < 4 {
        return Err(FrameError::BadLength { len });
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let total = len + 1;
    Ok((buf.len() >= total).then_some(total))
}

/// Splits the first complete message off `buf`, if there is one.
pub fn take_message(buf: &mut BytesMut, max: usize) -> Result<Option<Message>, FrameError> {
    let Some(total) = message_len(buf, max)? else {
        return Ok(None);
    };
    let mut msg = buf.split_to(total);
    let tag = msg[0];
    msg.advance(HEADER_LEN);
    Ok(Some(Message {
        tag,
        body: msg.freeze(),
    }))
}

/// Bytes still needed before the first message in `buf` is complete (at least 1 when the header
/// itself is incomplete). Lets readers reserve exactly what is missing.
pub fn missing(buf: &[u8]) -> usize {
    match buf.get(..HEADER_LEN) {
        None => HEADER_LEN - buf.len(),
        Some(h) => {
            let total = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize + 1;
            total.saturating_sub(buf.len())
        }
    }
}

/// Appends a message with `tag`, reserving the length and filling it in after `body` wrote.
#[inline]
pub fn write_message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.extend_from_slice(&[tag, 0, 0, 0, 0]);
    let start = buf.len() - 4;
    body(buf);
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
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
        self.buf = &rest[1..];
        Ok(s)
    }

    pub fn cstr_utf8(&mut self) -> Result<&'a str, FrameError> {
        let s = self.cstr()?;
        std::str::from_utf8(s).map_err(|_| self.malformed())
    }

    pub fn i16(&mut self) -> Result<i16, FrameError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, FrameError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.bytes(1)?[0])
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

    #[test]
    fn reader_reports_truncated_fields_instead_of_panicking() {
        let mut r = Reader::new(b"abc", "test");
        assert!(r.cstr().is_err());
        let mut r = Reader::new(&[0, 1], "test");
        assert!(r.i32().is_err());
    }
}

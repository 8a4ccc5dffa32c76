//! Length-prefixed frames: a `u32` big-endian payload length, then the payload.
//!
//! This module owns the byte layout of a frame and nothing else: it never does I/O (see
//! `proto::connection` for reading and writing frames on a stream) and never looks inside a
//! payload. Parsing is split in two steps, "is a whole frame buffered?" ([`check`]) then
//! "take it" ([`parse`]), so a reader can grow its buffer to exactly what it needs.
//!
//! Invariants:
//! - A header announcing more than the caller's maximum is an error as soon as the header is
//!   buffered, before any payload is read or allocated.
//! - A zero-length frame is valid (an empty payload).

use super::ProtoError;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Size of the length header.
pub const HEADER_LEN: usize = 4;

/// Largest payload of a plain (unencrypted) frame on any link. Each link accepts far less:
/// see the `MAX_*` limits of its message module (`proto::api`, `proto::agent`,
/// `proto::peer`), which every connection is given.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Default largest application message of a connection, plain or secure, once reassembled,
/// for links that do not set their own limits. Bigger payloads (snapshots) must be sent as
/// several messages.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Whether a buffer starts with a whole frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A whole frame is buffered; its payload has `len` bytes (the frame `HEADER_LEN + len`).
    Complete { len: usize },
    /// At least `need` more bytes must arrive before the frame is whole.
    Incomplete { need: usize },
}

/// Is a whole frame at the start of `buf`? Errors when the header announces more than `max`.
pub fn check(buf: &[u8], max: usize) -> Result<Status, ProtoError> {
    if buf.len() < HEADER_LEN {
        return Ok(Status::Incomplete { need: HEADER_LEN - buf.len() });
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    let total = HEADER_LEN + len;
    if buf.len() < total {
        Ok(Status::Incomplete { need: total - buf.len() })
    } else {
        Ok(Status::Complete { len })
    }
}

/// Take the first frame's payload out of `buf` when it is whole; `None` when more bytes are
/// needed. The buffer keeps whatever follows the frame.
pub fn parse(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, ProtoError> {
    match check(buf, max)? {
        Status::Incomplete { .. } => Ok(None),
        Status::Complete { len } => {
            buf.advance(HEADER_LEN);
            Ok(Some(buf.split_to(len).freeze()))
        }
    }
}

/// Append one frame carrying `payload` to `out`.
pub fn encode(payload: &[u8], max: usize, out: &mut BytesMut) -> Result<(), ProtoError> {
    let header = header(payload.len(), max)?;
    out.reserve(HEADER_LEN + payload.len());
    out.put_slice(&header);
    out.put_slice(payload);
    Ok(())
}

/// The header of a frame whose payload has `len` bytes.
pub fn header(len: usize, max: usize) -> Result<[u8; HEADER_LEN], ProtoError> {
    if len > max || len > u32::MAX as usize {
        return Err(ProtoError::FrameTooLarge { len, max });
    }
    Ok((len as u32).to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_following_bytes() {
        let mut buf = BytesMut::new();
        encode(b"hello", MAX_FRAME, &mut buf).unwrap();
        encode(b"world!", MAX_FRAME, &mut buf).unwrap();
        assert_eq!(parse(&mut buf, MAX_FRAME).unwrap().unwrap(), &b"hello"[..]);
        assert_eq!(parse(&mut buf, MAX_FRAME).unwrap().unwrap(), &b"world!"[..]);
        assert!(buf.is_empty());
        assert_eq!(parse(&mut buf, MAX_FRAME).unwrap(), None);
    }

    #[test]
    fn truncated_input_is_incomplete_at_every_cut() {
        let mut whole = BytesMut::new();
        encode(b"0123456789", MAX_FRAME, &mut whole).unwrap();
        for cut in 0..whole.len() {
            let st = check(&whole[..cut], MAX_FRAME).unwrap();
            assert_eq!(
                st,
                Status::Incomplete { need: if cut < HEADER_LEN { HEADER_LEN - cut } else { whole.len() - cut } }
            );
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(parse(&mut part, MAX_FRAME).unwrap(), None);
            assert_eq!(part.len(), cut, "an incomplete frame must not be consumed");
        }
        assert_eq!(check(&whole, MAX_FRAME).unwrap(), Status::Complete { len: 10 });
    }

    #[test]
    fn oversize_length_is_rejected_from_the_header_alone() {
        let buf = ((MAX_FRAME + 1) as u32).to_be_bytes();
        match check(&buf, MAX_FRAME) {
            Err(ProtoError::FrameTooLarge { len, max }) => {
                assert_eq!(len, MAX_FRAME + 1);
                assert_eq!(max, MAX_FRAME);
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert!(matches!(parse(&mut buf, 100), Err(ProtoError::FrameTooLarge { .. })));
        let mut out = BytesMut::new();
        assert!(matches!(encode(&[0u8; 101], 100, &mut out), Err(ProtoError::FrameTooLarge { .. })));
        assert!(out.is_empty());
    }

    #[test]
    fn zero_length_frame_is_an_empty_payload() {
        let mut buf = BytesMut::new();
        encode(b"", MAX_FRAME, &mut buf).unwrap();
        assert_eq!(&buf[..], &[0, 0, 0, 0]);
        assert_eq!(parse(&mut buf, MAX_FRAME).unwrap().unwrap().len(), 0);
        assert!(buf.is_empty());
    }

    #[test]
    fn length_is_big_endian() {
        let mut buf = BytesMut::new();
        encode(&[7u8; 258], MAX_FRAME, &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 1, 2]);
    }
}

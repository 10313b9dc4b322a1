//! The HTTP/2 frame codec (RFC 9113 section 4): frames read from and written to a connection's
//! two buffers, and the bounds on those buffers.
//!
//! A frame's length is checked against SETTINGS_MAX_FRAME_SIZE before any room is reserved for
//! it, so a read never asks for more than one frame and a header; both buffers start small and
//! shrink back after a big frame. What the frames mean is [`super::state`]'s business.

/// The client connection preface (RFC 9113 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const FRAME_HEADER: usize = 9;
/// The largest frame a server may send: SETTINGS_MAX_FRAME_SIZE's initial value, which we keep.
pub const MAX_FRAME_SIZE: usize = 16_384;
/// What the read and write buffers start with, and shrink back to after a big frame.
pub const SMALL_BUFFER: usize = 512;

/// Frame types (RFC 9113 6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PUSH_PROMISE: u8 = 0x5;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags (RFC 9113 6).
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

/// SETTINGS parameters we send or heed (RFC 9113 6.5.2).
pub mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// HTTP/2 error codes we send or give meaning to.
pub mod reason {
    pub const NO_ERROR: u32 = 0x0;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const CANCEL: u32 = 0x8;
    pub const REFUSED_STREAM: u32 = 0x7;
}

/// One whole frame, as received.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub flags: u8,
    /// The stream id (the reserved bit cleared).
    pub stream: u32,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Its size on the wire.
    pub fn wire_len(&self) -> usize {
        FRAME_HEADER + self.payload.len()
    }
}

/// The frame at the start of `bytes`: `None` until it is whole; an error once its header
/// announces more than [`MAX_FRAME_SIZE`], naming the protocol the bytes look like.
pub fn decode(bytes: &[u8]) -> Result<Option<Frame<'_>>, &'static str> {
    if bytes.len() < FRAME_HEADER {
        return Ok(None);
    }
    let length = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
    if length > MAX_FRAME_SIZE {
        // Other protocols' first bytes read as huge lengths: name them for the log.
        return Err(if bytes.starts_with(b"HTTP/") {
            "an HTTP/1 response, not HTTP/2"
        } else if bytes[0] == 0x16 && bytes[1] == 0x03 {
            "a TLS record, not plaintext HTTP/2"
        } else {
            "a frame larger than SETTINGS_MAX_FRAME_SIZE"
        });
    }
    let Some(payload) = bytes.get(FRAME_HEADER..FRAME_HEADER + length) else {
        return Ok(None);
    };
    Ok(Some(Frame {
        kind: bytes[3],
        flags: bytes[4],
        stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
        payload,
    }))
}

/// Appends one frame to `dst`.
pub fn encode(dst: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    dst.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    dst.push(kind);
    dst.push(flags);
    dst.extend_from_slice(&stream.to_be_bytes());
    dst.extend_from_slice(payload);
}

/// The payload without its padding (PADDED flag: a length byte first, padding last).
pub fn unpadded(flags: u8, payload: &[u8]) -> Result<&[u8], &'static str> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let (&padding, rest) = payload
        .split_first()
        .ok_or("a padded frame without its padding length")?;
    rest.len()
        .checked_sub(padding as usize)
        .map(|end| &rest[..end])
        .ok_or("padding longer than the frame")
}

/// Bytes received and not yet processed: at most a partial frame between reads.
#[derive(Debug)]
pub struct ReadBuffer {
    bytes: Vec<u8>,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        Self {
            bytes: Vec::with_capacity(SMALL_BUFFER),
        }
    }
}

impl ReadBuffer {
    /// How many bytes to read next: the rest of the frame being received (a length over the
    /// maximum is refused once the header is whole, never reserved), at least a few hundred.
    pub fn room(&self) -> usize {
        let needed = match self.bytes.get(..3) {
            Some(length) => {
                FRAME_HEADER + (u32::from_be_bytes([0, length[0], length[1], length[2]]) as usize).min(MAX_FRAME_SIZE)
            }
            None => FRAME_HEADER,
        };
        needed.saturating_sub(self.bytes.len()).max(SMALL_BUFFER / 2)
    }

    /// The buffer to read into, with [`ReadBuffer::room`] reserved.
    pub fn for_read(&mut self) -> &mut Vec<u8> {
        let room = self.room();
        self.bytes.reserve(room);
        &mut self.bytes
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Drops the first `processed` bytes; shrinks back once empty after a big frame.
    pub fn consume(&mut self, processed: usize) {
        self.bytes.drain(..processed);
        if self.bytes.is_empty() && self.bytes.capacity() > 2 * SMALL_BUFFER {
            self.bytes.shrink_to(SMALL_BUFFER);
        }
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

/// Bytes for the server not yet written.
#[derive(Debug)]
pub struct WriteBuffer {
    bytes: Vec<u8>,
}

impl Default for WriteBuffer {
    fn default() -> Self {
        Self {
            bytes: Vec::with_capacity(SMALL_BUFFER),
        }
    }
}

impl WriteBuffer {
    pub fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        encode(&mut self.bytes, kind, flags, stream, payload);
    }

    /// Bytes that are not a frame (the preface).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.bytes.extend_from_slice(bytes);
    }

    pub fn pending(&self) -> &[u8] {
        &self.bytes
    }

    /// The first `written` bytes went out; shrinks back once empty after a big frame.
    pub fn written(&mut self, written: usize) {
        self.bytes.drain(..written);
        if self.bytes.is_empty() && self.bytes.capacity() > 2 * SMALL_BUFFER {
            self.bytes.shrink_to(SMALL_BUFFER);
        }
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_encoded_as_rfc_9113_lays_it_out_and_decodes_back() {
        let mut bytes = Vec::new();
        encode(&mut bytes, kind::WINDOW_UPDATE, 0, 3, &16_450u32.to_be_bytes());
        assert_eq!(bytes, [0, 0, 4, 0x8, 0, 0, 0, 0, 3, 0, 0, 0x40, 0x42]);
        // The reserved bit of the stream id is not part of the id.
        bytes[5] |= 0x80;
        assert_eq!(
            decode(&bytes),
            Ok(Some(Frame {
                kind: kind::WINDOW_UPDATE,
                flags: 0,
                stream: 3,
                payload: &[0, 0, 0x40, 0x42],
            }))
        );
    }

    #[test]
    fn a_partial_frame_waits_and_a_huge_one_is_named_for_what_it_looks_like() {
        let mut bytes = Vec::new();
        encode(&mut bytes, kind::DATA, 0, 1, &[7; 10]);
        for end in 0..bytes.len() {
            assert_eq!(decode(&bytes[..end]), Ok(None), "{end} bytes");
        }
        assert_eq!(decode(&bytes).unwrap().unwrap().wire_len(), bytes.len());

        let huge = [0, 0x40, 0x01, kind::DATA, 0, 0, 0, 0, 1];
        assert_eq!(decode(&huge), Err("a frame larger than SETTINGS_MAX_FRAME_SIZE"));
        assert_eq!(
            decode(b"HTTP/1.1 400 Bad Request\r\n"),
            Err("an HTTP/1 response, not HTTP/2")
        );
        assert_eq!(
            decode(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]),
            Err("a TLS record, not plaintext HTTP/2")
        );
    }

    #[test]
    fn padding_is_removed_and_bad_padding_refused() {
        assert_eq!(unpadded(flag::PADDED, &[2, 7, 8, 0, 0]), Ok(&[7, 8][..]));
        assert_eq!(unpadded(0, &[2, 7]), Ok(&[2, 7][..]));
        assert_eq!(unpadded(flag::PADDED, &[5, 1]), Err("padding longer than the frame"));
        assert_eq!(
            unpadded(flag::PADDED, &[]),
            Err("a padded frame without its padding length")
        );
    }

    #[test]
    fn a_read_asks_for_the_rest_of_one_frame_at_most_whatever_its_header_announces() {
        let mut read = ReadBuffer::default();
        assert_eq!(read.room(), SMALL_BUFFER / 2);
        // Three bytes of a 16 MiB length: room for the largest allowed frame, no more.
        read.extend(&[0xff, 0xff, 0xff]);
        assert_eq!(read.room(), FRAME_HEADER + MAX_FRAME_SIZE - 3);
        read.for_read();
        assert!(
            read.capacity() < 2 * (FRAME_HEADER + MAX_FRAME_SIZE),
            "{}",
            read.capacity()
        );
        // A 1,000-byte frame with its header and 100 bytes in: the other 900.
        let mut read = ReadBuffer::default();
        read.extend(&[0, 0x03, 0xe8, kind::DATA, 0, 0, 0, 0, 1]);
        read.extend(&[0; 100]);
        assert_eq!(read.room(), 900);
    }

    #[test]
    fn both_buffers_shrink_back_once_a_big_frame_is_through() {
        let mut read = ReadBuffer::default();
        read.extend(&[0; MAX_FRAME_SIZE]);
        read.consume(MAX_FRAME_SIZE - 1);
        assert!(read.capacity() >= MAX_FRAME_SIZE, "not while a byte is left");
        read.consume(1);
        assert!(read.capacity() <= 2 * SMALL_BUFFER, "{}", read.capacity());

        let mut write = WriteBuffer::default();
        write.frame(kind::DATA, 0, 1, &[0; MAX_FRAME_SIZE]);
        write.written(100);
        assert_eq!(write.pending().len(), FRAME_HEADER + MAX_FRAME_SIZE - 100);
        write.written(write.pending().len());
        assert!(write.capacity() <= 2 * SMALL_BUFFER, "{}", write.capacity());
    }
}

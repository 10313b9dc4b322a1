//! HPACK (RFC 7541) for the prober's connection: decoding response header blocks, and encoding
//! requests' fields as literals that are never indexed (so nothing enters the server's table).
//!
//! Decoding is small and bounds-checked: a header block is what a server sends, and a bad one must end the
//! connection with an error, never panic a prober. Huffman-coded strings are decoded by
//! `httlib-huffman` (table driven); integers, representations and the tables are here. The
//! dynamic table is kept (a server may index before it has our SETTINGS) within the size we
//! allow, which is the protocol's initial 4 KiB at most; we advertise 0, so in practice it
//! stays empty.

use std::collections::VecDeque;

/// The largest dynamic table a server may make us keep.
pub const MAX_TABLE_SIZE: usize = 4_096;
/// The longest header name or value accepted.
const MAX_STRING: usize = 8_192;
/// The most a header list may decode to, counted as RFC 7541 section 4.1 counts table entries
/// (32 bytes per field plus name and value) and as we advertise SETTINGS_MAX_HEADER_LIST_SIZE:
/// indexed fields cost a byte on the wire each, so without it a 16 KiB block naming one 4 KiB
/// entry 16,000 times would hand the caller 64 MiB of headers.
pub const MAX_HEADER_LIST_SIZE: usize = 16_384;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid HPACK: {0}")]
pub struct HpackError(&'static str);

/// A header field: name and value.
type Field = (Box<[u8]>, Box<[u8]>);

/// The decoding state of one connection.
#[derive(Debug)]
pub struct Decoder {
    table: VecDeque<Field>,
    /// The table's size as RFC 7541 4.1 counts it (32 bytes per entry plus name and value).
    size: usize,
    max_size: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: MAX_TABLE_SIZE,
        }
    }
}

impl Decoder {
    /// Decodes one whole header block, calling `field` for each header in order.
    pub fn decode(&mut self, mut block: &[u8], field: impl FnMut(&[u8], &[u8])) -> Result<(), HpackError> {
        let mut field = field;
        let mut list_size = 0usize;
        let mut field = |name: &[u8], value: &[u8]| {
            list_size += 32 + name.len() + value.len();
            if list_size > MAX_HEADER_LIST_SIZE {
                return Err(HpackError("a header list over 16 KiB"));
            }
            field(name, value);
            Ok(())
        };
        while let Some(&first) = block.first() {
            if first & 0x80 != 0 {
                // Indexed field.
                let (index, rest) = integer(block, 7)?;
                let (name, value) = self.entry(index)?;
                field(name, value)?;
                block = rest;
            } else if first & 0xc0 == 0x40 {
                // Literal with incremental indexing.
                let (index, rest) = integer(block, 6)?;
                let ((name, value), rest) = self.literal(index, rest)?;
                field(&name, &value)?;
                self.insert(name, value);
                block = rest;
            } else if first & 0xe0 == 0x20 {
                // Dynamic table size update.
                let (size, rest) = integer(block, 5)?;
                if size > MAX_TABLE_SIZE {
                    return Err(HpackError("a dynamic table size over the allowed maximum"));
                }
                self.max_size = size;
                self.evict(0);
                block = rest;
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                let (index, rest) = integer(block, 4)?;
                let ((name, value), rest) = self.literal(index, rest)?;
                field(&name, &value)?;
                block = rest;
            }
        }
        Ok(())
    }

    fn entry(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        match index {
            0 => Err(HpackError("index 0")),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Ok((name.as_bytes(), value.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .map(|(name, value)| (&name[..], &value[..]))
                .ok_or(HpackError("an index past the tables")),
        }
    }

    /// A literal's name (by `index`, or a string when 0) and value; the rest of the block.
    fn literal<'b>(&self, index: usize, block: &'b [u8]) -> Result<(Field, &'b [u8]), HpackError> {
        let (name, block) = if index == 0 {
            string(block)?
        } else {
            (self.entry(index)?.0.into(), block)
        };
        let (value, block) = string(block)?;
        Ok(((name, value), block))
    }

    fn insert(&mut self, name: Box<[u8]>, value: Box<[u8]>) {
        let size = 32 + name.len() + value.len();
        if size > self.max_size {
            // RFC 7541 4.4: an entry larger than the table empties it and is not added.
            self.evict(self.max_size);
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= 32 + name.len() + value.len();
        }
        if self.table.is_empty() {
            self.table = VecDeque::new();
        }
    }
}

/// An integer with an `prefix_bits`-bit prefix (RFC 7541 5.1); the rest of the block.
fn integer(block: &[u8], prefix_bits: u32) -> Result<(usize, &[u8]), HpackError> {
    let (&first, mut rest) = block.split_first().ok_or(HpackError("a truncated integer"))?;
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok((value, rest));
    }
    for shift in (0..=21).step_by(7) {
        let (&byte, after) = rest.split_first().ok_or(HpackError("a truncated integer"))?;
        rest = after;
        value += usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
    Err(HpackError("an integer over 2^28"))
}

/// A string literal, Huffman-coded or not (RFC 7541 5.2); the rest of the block.
fn string(block: &[u8]) -> Result<(Box<[u8]>, &[u8]), HpackError> {
    let huffman = block.first().is_some_and(|b| b & 0x80 != 0);
    let (length, rest) = integer(block, 7)?;
    if length > MAX_STRING || length > rest.len() {
        return Err(HpackError("a string longer than its block or 8 KiB"));
    }
    let (bytes, rest) = rest.split_at(length);
    if !huffman {
        return Ok((bytes.into(), rest));
    }
    let mut decoded = Vec::with_capacity(length * 8 / 5 + 1);
    httlib_huffman::decode(bytes, &mut decoded, httlib_huffman::DecoderSpeed::FourBits)
        .map_err(|_| HpackError("a string that is not valid Huffman code"))?;
    Ok((decoded.into(), rest))
}

// === Encoding ===

/// A header field without indexing whose name is static-table entry `name_index` (RFC 7541
/// 6.2.2): nothing enters the server's dynamic table.
pub fn encode_literal(dst: &mut Vec<u8>, name_index: usize, value: &[u8]) {
    encode_integer(dst, 0x00, 4, name_index);
    encode_string(dst, value);
}

/// A header field without indexing with a literal name.
pub fn encode_literal_new_name(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.push(0x00);
    encode_string(dst, name);
    encode_string(dst, value);
}

/// An integer with an `prefix_bits`-bit prefix after the bits in `first` (RFC 7541 5.1).
fn encode_integer(dst: &mut Vec<u8>, first: u8, prefix_bits: u8, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        dst.push(first | value as u8);
        return;
    }
    dst.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        dst.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    dst.push(rest as u8);
}

/// A string literal, not Huffman-coded.
fn encode_string(dst: &mut Vec<u8>, value: &[u8]) {
    encode_integer(dst, 0, 7, value.len());
    dst.extend_from_slice(value);
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode_all(decoder: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut fields = Vec::new();
        decoder.decode(block, |name, value| {
            fields.push((
                String::from_utf8_lossy(name).into_owned(),
                String::from_utf8_lossy(value).into_owned(),
            ));
        })?;
        Ok(fields)
    }

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn fields(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman_coding_and_the_dynamic_table() {
        let mut decoder = Decoder::default();
        let first = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        assert_eq!(
            decode_all(&mut decoder, &first).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        let second = hex("8286 84be 5886 a8eb 1064 9cbf");
        assert_eq!(
            decode_all(&mut decoder, &second).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        let third = hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf");
        assert_eq!(
            decode_all(&mut decoder, &third).unwrap(),
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
        assert_eq!(decoder.size, 164);
    }

    #[test]
    fn a_size_update_evicts_and_a_larger_one_than_allowed_is_refused() {
        let mut decoder = Decoder::default();
        // Literal with indexing, new name "a", value "b"; then a size update to 0.
        decode_all(&mut decoder, &[0x40, 1, b'a', 1, b'b']).unwrap();
        assert_eq!(decode_all(&mut decoder, &[0xbe]).unwrap(), fields(&[("a", "b")]));
        decode_all(&mut decoder, &[0x20]).unwrap();
        assert_eq!(decoder.table.len(), 0);
        assert_eq!(
            decode_all(&mut decoder, &[0xbe]),
            Err(HpackError("an index past the tables")),
            "the entry is gone"
        );
        // 31 + 98 + 31 x 128 = 4,097: one over.
        assert_eq!(
            decode_all(&mut decoder, &[0x3f, 0xe2, 0x1f]),
            Err(HpackError("a dynamic table size over the allowed maximum"))
        );
        decode_all(&mut decoder, &[0x3f, 0xe1, 0x1f]).unwrap();
    }

    #[test]
    fn a_block_that_decodes_to_more_than_the_header_list_size_is_refused() {
        let mut decoder = Decoder::default();
        // An entry of 1 + 3,000 bytes, then 5 one-byte references to it: 5 x 3,033 > 16 KiB.
        let mut block = vec![0x40, 1, b'a', 0x7f, 0xb9, 0x16];
        block.extend(std::iter::repeat_n(b'x', 3_000));
        decode_all(&mut decoder, &block).unwrap();
        assert_eq!(
            decode_all(&mut decoder, &[0xbe; 5]),
            Ok(vec![("a".into(), "x".repeat(3_000)); 5])
        );
        assert_eq!(
            decode_all(&mut decoder, &[0xbe; 6]),
            Err(HpackError("a header list over 16 KiB"))
        );
    }

    #[test]
    fn truncated_blocks_are_errors() {
        let mut decoder = Decoder::default();
        let truncated = Err(HpackError("a truncated integer"));
        // An indexed field whose index needs more bytes than the block has.
        assert_eq!(decode_all(&mut decoder, &[0xff]), truncated);
        // A name of 5 bytes, one given.
        assert_eq!(
            decode_all(&mut decoder, &[0x00, 5, b'a']),
            Err(HpackError("a string longer than its block or 8 KiB"))
        );
        // A literal named :path (index 4) whose value's length is missing.
        assert_eq!(decode_all(&mut decoder, &[0x04]), truncated);
        // Four continuation bytes, all saying more follows.
        assert_eq!(
            decode_all(&mut decoder, &[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(HpackError("an integer over 2^28"))
        );
        assert_eq!(decode_all(&mut decoder, &[0x80]), Err(HpackError("index 0")));
    }

    #[test]
    fn integers_are_encoded_as_rfc_7541_appendix_c1_shows() {
        let mut dst = Vec::new();
        encode_integer(&mut dst, 0, 5, 10);
        assert_eq!(dst, [0x0a]);
        dst.clear();
        encode_integer(&mut dst, 0, 5, 1337);
        assert_eq!(dst, [0x1f, 0x9a, 0x0a]);
        dst.clear();
        encode_integer(&mut dst, 0, 8, 42);
        assert_eq!(dst, [0x2a]);
    }

    #[test]
    fn encoded_literals_decode_to_the_fields_and_index_nothing() {
        let mut block = Vec::new();
        encode_literal(&mut block, 4, b"/grpc.health.v1.Health/Watch");
        encode_literal_new_name(&mut block, b"te", b"trailers");
        // A value of 200 bytes: its length takes a second byte.
        encode_literal(&mut block, 58, &[b'x'; 200]);
        let mut decoder = Decoder::default();
        assert_eq!(
            decode_all(&mut decoder, &block),
            Ok(vec![
                (":path".into(), "/grpc.health.v1.Health/Watch".into()),
                ("te".into(), "trailers".into()),
                ("user-agent".into(), "x".repeat(200)),
            ])
        );
        assert_eq!(decoder.table.len(), 0);
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_without_panicking(block in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut decoder = Decoder::default();
            let _ = decoder.decode(&block, |_, _| {});
            prop_assert!(decoder.size <= MAX_TABLE_SIZE);
        }

        #[test]
        fn any_huffman_string_decodes_or_fails_without_panicking(code in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut block = vec![0x80 | code.len() as u8];
            block.extend_from_slice(&code);
            let _ = string(&block);
        }
    }
}

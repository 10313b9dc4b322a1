//! gRPC over HTTP/2 (gRPC's PROTOCOL-HTTP2.md) for the prober's calls: a request as a header
//! block and one length-prefixed message; a response's length-prefixed messages decoded as
//! their bytes arrive; its headers and trailers turned into how the call ended.

use std::ops::ControlFlow;

use kubegrpc_orca::OrcaLoadReport;
use prost::Message as _;
use tonic::Code;
use tonic_health::pb::HealthCheckResponse;

use crate::health::hpack;

/// The largest message accepted: a `HealthCheckResponse` is two bytes, an `OrcaLoadReport`
/// a few dozen (more with named metrics).
const MAX_MESSAGE: usize = 4_096;
/// The length prefix of a message: a compressed flag and a 32-bit length.
const PREFIX: usize = 5;

/// A health method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Check,
    Watch,
}

impl Method {
    pub(super) fn path(self) -> &'static [u8] {
        match self {
            Method::Check => b"/grpc.health.v1.Health/Check",
            Method::Watch => b"/grpc.health.v1.Health/Watch",
        }
    }
}

/// What a call's response messages are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Answers {
    Health,
    LoadReports,
}

/// A response message.
#[derive(Debug, PartialEq)]
pub enum Message {
    Health(HealthCheckResponse),
    LoadReport(OrcaLoadReport),
}

/// How a call ended.
#[derive(Debug, PartialEq, Eq)]
pub enum CallEnd {
    /// With a gRPC status (`Ok` or an error code) and its message.
    Status(Code, String),
    /// The server reset the stream (RST_STREAM with this HTTP/2 error code), or left it out
    /// of the calls it will process (GOAWAY: `REFUSED_STREAM`).
    Reset(u32),
    /// A response message over the size accepted (the call was cancelled).
    MessageTooLarge,
    /// A response that breaks gRPC's framing (the call was cancelled): why.
    Malformed(&'static str),
}

/// The `:scheme` of a connection's requests: `https` over TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// A request's header block, every field a literal that is never indexed.
pub(super) fn request_headers(scheme: Scheme, path: &[u8], authority: &[u8]) -> Vec<u8> {
    let mut block = Vec::with_capacity(128);
    block.push(0x80 | 3); // :method POST (static table 3)
    block.push(match scheme {
        Scheme::Http => 0x80 | 6,  // :scheme http (static table 6)
        Scheme::Https => 0x80 | 7, // :scheme https (static table 7)
    });
    hpack::encode_literal(&mut block, 4, path); // :path
    hpack::encode_literal(&mut block, 1, authority); // :authority
    hpack::encode_literal(&mut block, 31, b"application/grpc"); // content-type
    hpack::encode_literal_new_name(&mut block, b"te", b"trailers");
    hpack::encode_literal(
        &mut block,
        58,
        concat!("kubegrpc-operator/", env!("CARGO_PKG_VERSION")).as_bytes(),
    ); // user-agent
    block
}

/// A request message, length-prefixed and not compressed.
pub(super) fn request_message(request: &impl prost::Message) -> Vec<u8> {
    let mut message = Vec::with_capacity(PREFIX + request.encoded_len());
    message.push(0); // not compressed
    message.extend_from_slice(&(request.encoded_len() as u32).to_be_bytes());
    request.encode(&mut message).expect("a Vec grows as needed");
    message
}

/// A call's response messages, decoded as their bytes arrive.
#[derive(Debug)]
pub(super) struct Messages {
    answers: Answers,
    /// Message bytes received but not yet a whole message.
    partial: Vec<u8>,
}

impl Messages {
    pub(super) fn new(answers: Answers) -> Self {
        Self {
            answers,
            partial: Vec::new(),
        }
    }

    /// Takes `data` (DATA payload without padding), handing each whole message to `message`
    /// in order until it breaks; how the call must end if the bytes break gRPC's framing.
    pub(super) fn receive(
        &mut self,
        data: &[u8],
        mut message: impl FnMut(Message) -> ControlFlow<()>,
    ) -> Result<(), CallEnd> {
        self.partial.extend_from_slice(data);
        let mut result = Ok(());
        // Whole messages are taken from the front by moving this offset; the bytes are moved
        // once at the end (a DATA frame can pack thousands of messages).
        let mut taken = 0;
        while self.partial.len() - taken >= PREFIX {
            let partial = &self.partial[taken..];
            let length = u32::from_be_bytes([partial[1], partial[2], partial[3], partial[4]]) as usize;
            if partial[0] != 0 {
                result = Err(CallEnd::Malformed("a compressed message, which was not asked for"));
                break;
            }
            if length > MAX_MESSAGE {
                result = Err(CallEnd::MessageTooLarge);
                break;
            }
            if partial.len() < PREFIX + length {
                break;
            }
            let bytes = &partial[PREFIX..PREFIX + length];
            let decoded = match self.answers {
                Answers::Health => HealthCheckResponse::decode(bytes).map(Message::Health),
                Answers::LoadReports => OrcaLoadReport::decode(bytes).map(Message::LoadReport),
            };
            taken += PREFIX + length;
            match decoded {
                Ok(decoded) => {
                    if message(decoded).is_break() {
                        break;
                    }
                }
                Err(_) => {
                    result = Err(CallEnd::Malformed(
                        "a message that does not decode as the method's response",
                    ));
                    break;
                }
            }
        }
        self.partial.drain(..taken);
        if self.partial.is_empty() {
            self.partial = Vec::new();
        }
        result
    }
}

/// What a response's header block (headers or trailers) says.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct ResponseHead {
    http_status: Option<u16>,
    grpc_status: Option<i32>,
    grpc_message: String,
}

impl ResponseHead {
    /// Decodes `block` with the connection's `hpack` state.
    pub(super) fn decode(hpack: &mut hpack::Decoder, block: &[u8]) -> Result<Self, hpack::HpackError> {
        let mut head = Self::default();
        hpack.decode(block, |name, value| match name {
            b":status" => head.http_status = std::str::from_utf8(value).ok().and_then(|s| s.parse::<u16>().ok()),
            b"grpc-status" => {
                head.grpc_status = std::str::from_utf8(value).ok().and_then(|s| s.parse::<i32>().ok());
            }
            b"grpc-message" => head.grpc_message = percent_decoded(value),
            _ => {}
        })?;
        Ok(head)
    }

    /// A 1xx response: more headers follow.
    pub(super) fn is_informational(&self) -> bool {
        self.http_status.is_some_and(|s| (100..200).contains(&s))
    }

    /// As a response's headers: how the call ends if the HTTP status is not 200.
    pub(super) fn http_failure(&self) -> Option<CallEnd> {
        match self.http_status {
            Some(200) => None,
            other => Some(CallEnd::Status(
                grpc_code_of_http(other),
                format!("HTTP status {}", other.map_or("missing".into(), |s| s.to_string())),
            )),
        }
    }

    /// As trailers (or a trailers-only response): the call's gRPC status.
    pub(super) fn status(self) -> CallEnd {
        match self.grpc_status {
            Some(code) => CallEnd::Status(Code::from_i32(code), self.grpc_message),
            None => CallEnd::Status(Code::Unknown, "the response carried no grpc-status".into()),
        }
    }
}

/// gRPC's mapping of an HTTP status that is not 200 (doc/http-grpc-status-mapping.md).
fn grpc_code_of_http(status: Option<u16>) -> Code {
    match status {
        Some(400) => Code::Internal,
        Some(401) => Code::Unauthenticated,
        Some(403) => Code::PermissionDenied,
        Some(404) => Code::Unimplemented,
        Some(429 | 502 | 503 | 504) => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2).
fn percent_decoded(value: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            value[i],
            value.get(i + 1).copied().and_then(hex),
            value.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                bytes.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, ..) => {
                bytes.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(block: &[u8]) -> Vec<(String, String)> {
        let mut decoded = Vec::new();
        hpack::Decoder::default()
            .decode(block, |n, v| {
                decoded.push((
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                ));
            })
            .unwrap();
        decoded
    }

    #[test]
    fn the_request_header_block_decodes_to_a_grpc_request() {
        let block = request_headers(Scheme::Http, Method::Watch.path(), b"10.250.0.7:8080");
        let user_agent = concat!("kubegrpc-operator/", env!("CARGO_PKG_VERSION"));
        let expected = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Watch"),
            (":authority", "10.250.0.7:8080"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", user_agent),
        ];
        let expected: Vec<(String, String)> = expected.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        assert_eq!(fields(&block), expected);

        // Over TLS: `:scheme https` and the verified name as `:authority`.
        let block = request_headers(Scheme::Https, Method::Check.path(), b"echo.demo.svc");
        let fields = fields(&block);
        assert_eq!(fields[1], (":scheme".into(), "https".into()));
        assert_eq!(fields[3], (":authority".into(), "echo.demo.svc".into()));
    }

    #[test]
    fn a_request_message_is_length_prefixed_and_not_compressed() {
        let request = tonic_health::pb::HealthCheckRequest { service: "echo".into() };
        assert_eq!(
            request_message(&request),
            [0, 0, 0, 0, 6, 0x0a, 4, b'e', b'c', b'h', b'o']
        );
    }

    /// `message` as gRPC frames it.
    fn prefixed(message: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
        bytes.extend_from_slice(message);
        bytes
    }

    /// A message callback that keeps every message in `out`.
    fn collect(out: &mut Vec<Message>) -> impl FnMut(Message) -> ControlFlow<()> + '_ {
        |message| {
            out.push(message);
            ControlFlow::Continue(())
        }
    }

    fn serving(status: i32) -> Message {
        Message::Health(HealthCheckResponse { status })
    }

    #[test]
    fn messages_split_across_frames_or_packed_into_one_come_out_whole_and_in_order() {
        let mut messages = Messages::new(Answers::Health);
        let mut out = Vec::new();
        let two = [
            prefixed(&HealthCheckResponse { status: 1 }.encode_to_vec()),
            prefixed(&HealthCheckResponse { status: 2 }.encode_to_vec()),
        ]
        .concat();
        // Byte by byte: nothing until the first message is whole.
        for byte in &two[..6] {
            messages.receive(&[*byte], collect(&mut out)).unwrap();
        }
        assert_eq!(out, []);
        messages.receive(&two[6..], collect(&mut out)).unwrap();
        assert_eq!(out, [serving(1), serving(2)]);
        // Nothing held once everything was taken.
        assert_eq!(messages.partial.capacity(), 0);

        let mut reports = Messages::new(Answers::LoadReports);
        let report = OrcaLoadReport {
            rps_fractional: 10.0,
            ..Default::default()
        };
        let mut out = Vec::new();
        reports
            .receive(&prefixed(&report.encode_to_vec()), collect(&mut out))
            .unwrap();
        assert_eq!(out, [Message::LoadReport(report)]);
    }

    #[test]
    fn messages_that_break_grpc_framing_end_the_call_with_the_reason() {
        let receive = |bytes: &[u8]| Messages::new(Answers::Health).receive(bytes, |_| ControlFlow::Continue(()));
        assert_eq!(
            receive(&[1, 0, 0, 0, 0]),
            Err(CallEnd::Malformed("a compressed message, which was not asked for"))
        );
        // A length prefix over the limit is refused before the message arrives.
        assert_eq!(receive(&[0, 0, 0, 0x10, 0x01]), Err(CallEnd::MessageTooLarge));
        assert_eq!(receive(&[0, 0, 0, 0x10, 0x00]), Ok(()), "4,096 is allowed");
        // Field 1 as a length-delimited string: not a HealthCheckResponse.
        assert_eq!(
            receive(&prefixed(&[0x0a, 5])),
            Err(CallEnd::Malformed(
                "a message that does not decode as the method's response"
            ))
        );
    }

    fn head(block: &[u8]) -> ResponseHead {
        ResponseHead::decode(&mut hpack::Decoder::default(), block).unwrap()
    }

    #[test]
    fn trailers_give_the_grpc_status_with_its_percent_decoded_message() {
        let mut block = Vec::new();
        hpack::encode_literal_new_name(&mut block, b"grpc-status", b"5");
        hpack::encode_literal_new_name(&mut block, b"grpc-message", b"not%20found%3A x%");
        assert_eq!(
            head(&block).status(),
            CallEnd::Status(Code::NotFound, "not found: x%".into())
        );
        assert_eq!(
            head(&[]).status(),
            CallEnd::Status(Code::Unknown, "the response carried no grpc-status".into())
        );
    }

    #[test]
    fn a_status_other_than_200_ends_the_call_as_grpc_maps_it() {
        // :status 200, 404 (static table 8, 13); 503 and 100 as literals.
        assert_eq!(head(&[0x88]).http_failure(), None);
        assert_eq!(
            head(&[0x8d]).http_failure(),
            Some(CallEnd::Status(Code::Unimplemented, "HTTP status 404".into()))
        );
        let mut block = Vec::new();
        hpack::encode_literal(&mut block, 8, b"503");
        assert_eq!(
            head(&block).http_failure(),
            Some(CallEnd::Status(Code::Unavailable, "HTTP status 503".into()))
        );
        assert_eq!(
            head(&[]).http_failure(),
            Some(CallEnd::Status(Code::Unknown, "HTTP status missing".into()))
        );
        let mut block = Vec::new();
        hpack::encode_literal(&mut block, 8, b"100");
        assert!(head(&block).is_informational());
        assert!(!head(&[0x88]).is_informational());
    }
}

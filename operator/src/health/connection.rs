//! One prober's HTTP/2 connection: just enough of HTTP/2 (RFC 9113) and gRPC to make
//! `grpc.health.v1.Health` `Check` and `Watch` calls, owned and driven by the prober itself.
//!
//! Why not h2 (through tonic or alone): the operator keeps one connection per endpoint, and an
//! h2 connection holds about 30 KiB that no setting shrinks (a 16 KiB write buffer, an 8 KiB
//! read buffer that reads walk through, a 4 KiB HPACK buffer, a stream slab) plus a task of its
//! own. At 5,000 endpoints that was 190 MiB of an operator whose own state is a few MiB. A
//! health call needs none of it: requests are a few hundred bytes, answers a few bytes, at most
//! two calls are open at once. Here a connection is a socket, two small buffers that grow only
//! for a frame that needs it and shrink back, and an HPACK decoder (see [`super::hpack`]) with
//! an empty dynamic table (we advertise SETTINGS_HEADER_TABLE_SIZE 0, so servers index nothing).
//!
//! What it speaks: the client preface and SETTINGS (push off, no dynamic table), requests as
//! HEADERS (HPACK literals, never indexed) and one DATA frame, responses as HEADERS,
//! CONTINUATION and DATA with padding and priority fields, trailers and trailers-only
//! responses, RST_STREAM, SETTINGS and PING acknowledgements, GOAWAY (calls the server will not
//! process end as refused), and flow control for what it receives (WINDOW_UPDATE as received
//! bytes are consumed). It never sends a PING: gRPC servers police client PINGs (see the prober).
//!
//! Bounded whatever the server sends: a frame's length is checked against
//! SETTINGS_MAX_FRAME_SIZE before any room is reserved for it (16 KiB and a header at most);
//! header blocks are at most 16 KiB and decode to at most 16 KiB of headers; a call's message
//! not yet taken is superseded by the next (at most one queued per call, and no frame is
//! processed while [`MAX_QUEUED_EVENTS`] wait); PINGs read together are acknowledged once; the
//! acknowledgements written for one read are no larger than it; and a server sending more than
//! a burst of 1,024 frames, then 256 a second, loses the connection ("a flood of frames").
//!
//! [`HealthConnection::next_event`] is cancel safe: the prober selects on it with its timers.

use std::{
    collections::VecDeque,
    io,
    net::{IpAddr, SocketAddr},
};

use kubegrpc_orca::{OrcaLoadReport, OrcaLoadReportRequest, STREAM_CORE_METRICS_PATH};
use prost::Message as _;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpSocket,
};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::hpack;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
/// The largest frame a server may send: SETTINGS_MAX_FRAME_SIZE's initial value, which we keep.
const MAX_FRAME_SIZE: usize = 16_384;
/// The most header-block bytes (HEADERS and CONTINUATION) one response may take; also
/// advertised as SETTINGS_MAX_HEADER_LIST_SIZE.
const MAX_HEADER_BLOCK: usize = 16_384;
/// The largest message accepted: a `HealthCheckResponse` is two bytes, an `OrcaLoadReport`
/// a few dozen (more with named metrics).
const MAX_MESSAGE: usize = 4_096;
/// What the read and write buffers start with, and shrink back to after a big frame.
const SMALL_BUFFER: usize = 512;
/// Received DATA bytes are given back to the server's flow-control windows in batches.
const WINDOW_UPDATE_BATCH: u32 = 16_384;
/// Events waiting to be taken: past this, no further frame is processed (nor read) until the
/// prober takes some. With a message per call superseding the one before it (see
/// `queue_message`), a valid peer never gets near it.
const MAX_QUEUED_EVENTS: usize = 8;
/// Frames a server may send in a burst, and per second after it: a health service sends a few
/// per answer; a flood of PING, SETTINGS, RST_STREAM, WINDOW_UPDATE or tiny frames past this
/// ends the connection (HTTP/2's ENHANCE_YOUR_CALM case), so that it costs the prober a small
/// multiple of a healthy peer's CPU.
const FRAME_BURST: u32 = 1_024;
const FRAMES_PER_SECOND: u32 = 256;

mod frame {
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

mod flag {
    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY: u8 = 0x20;
}

mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// HTTP/2 error codes we send or give meaning to.
pub mod reason {
    pub const NO_ERROR: u32 = 0x0;
    pub const CANCEL: u32 = 0x8;
    pub const REFUSED_STREAM: u32 = 0x7;
}

/// The most bytes of a GOAWAY's debug data kept (for the log).
const MAX_GOAWAY_DEBUG: usize = 128;

/// A health method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Check,
    Watch,
}

impl Method {
    fn path(self) -> &'static [u8] {
        match self {
            Method::Check => b"/grpc.health.v1.Health/Check",
            Method::Watch => b"/grpc.health.v1.Health/Watch",
        }
    }
}

/// What a call's response messages are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answers {
    Health,
    LoadReports,
}

/// A response message.
#[derive(Debug, PartialEq)]
pub enum Message {
    Health(HealthCheckResponse),
    LoadReport(OrcaLoadReport),
}

/// A call on a connection (its HTTP/2 stream id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallId(u32);

/// What the server said.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// A response message of a call.
    Message(CallId, Message),
    /// A call ended; it gets no further event.
    Ended(CallId, CallEnd),
    /// The server sent GOAWAY (the first one; later ones only refuse more calls): calls it
    /// accepted go on, no new call can start.
    GoAway(GoAway),
}

/// A GOAWAY's error code (`reason::NO_ERROR` for a graceful one) and the start of its debug
/// data, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GoAway {
    pub code: u32,
    pub debug: String,
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

/// The connection cannot carry calls any more.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("the server closed the connection")]
    Closed,
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("HTTP/2 protocol error from the server: {0}")]
    Protocol(&'static str),
    #[error("the server sent GOAWAY: no new calls on this connection")]
    GoingAway,
}

/// What a connection runs over: a TCP stream, or any in-memory stream in tests and fuzzing.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// A client connection for health calls; see the module docs.
pub struct HealthConnection {
    io: Box<dyn Transport>,
    /// The `:authority` of every request (the endpoint's address).
    authority: Box<str>,
    /// Received bytes not yet processed (at most a partial frame between reads).
    read: Vec<u8>,
    /// Bytes for the server not yet written.
    write: Vec<u8>,
    hpack: hpack::Decoder,
    calls: Vec<Call>,
    next_stream_id: u32,
    /// Received DATA bytes not yet given back to the connection's window.
    unacknowledged: u32,
    /// A header block waiting for its CONTINUATION frames: stream, END_STREAM, bytes so far.
    continuation: Option<(u32, bool, Vec<u8>)>,
    going_away: bool,
    events: VecDeque<Event>,
    /// What ended the connection, held back until the events before it are taken.
    failed: Option<ConnectionError>,
    /// The latest PING to acknowledge (a burst of PINGs is acknowledged once, with the last).
    ping_ack: Option<[u8; 8]>,
    /// Frames the server may still send now, and when that was last topped up.
    frame_tokens: u32,
    tokens_at: tokio::time::Instant,
}

struct Call {
    id: u32,
    answers: Answers,
    /// The response's HEADERS arrived (the next HEADERS are its trailers).
    responded: bool,
    /// Message bytes received but not yet a whole message.
    partial: Vec<u8>,
    unacknowledged: u32,
}

impl HealthConnection {
    /// Opens a TCP connection to `target` and queues the HTTP/2 preface and our SETTINGS
    /// (sent with the first call; no round trip is awaited).
    pub async fn connect(target: SocketAddr) -> io::Result<Self> {
        Self::connect_from(target, None).await
    }

    /// [`HealthConnection::connect`] from `source` (any port) when it is of `target`'s address
    /// family; a target of the other family is connected from the system's choice, as a bind
    /// across families could only fail.
    pub async fn connect_from(target: SocketAddr, source: Option<IpAddr>) -> io::Result<Self> {
        let socket = if target.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(source) = source.filter(|source| source.is_ipv4() == target.is_ipv4()) {
            socket.bind(SocketAddr::new(source, 0))?;
        }
        let io = socket.connect(target).await?;
        io.set_nodelay(true)?;
        Ok(Self::handshake(io, &target.to_string()))
    }

    /// A connection over `io` (already open), with `authority` as every request's
    /// `:authority`: queues the HTTP/2 preface and our SETTINGS, sent with the first call.
    pub fn handshake(io: impl Transport + 'static, authority: &str) -> Self {
        let mut connection = Self {
            io: Box::new(io),
            authority: authority.into(),
            read: Vec::with_capacity(SMALL_BUFFER),
            write: Vec::with_capacity(SMALL_BUFFER),
            hpack: hpack::Decoder::default(),
            calls: Vec::with_capacity(2),
            next_stream_id: 1,
            unacknowledged: 0,
            continuation: None,
            going_away: false,
            events: VecDeque::new(),
            failed: None,
            ping_ack: None,
            frame_tokens: FRAME_BURST,
            tokens_at: tokio::time::Instant::now(),
        };
        connection.write.extend_from_slice(PREFACE);
        let settings = [
            (setting::HEADER_TABLE_SIZE, 0),
            (setting::ENABLE_PUSH, 0),
            (setting::MAX_CONCURRENT_STREAMS, 0),
            (setting::MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK as u32),
        ];
        let mut payload = [0u8; 24];
        for (chunk, (id, value)) in payload.chunks_exact_mut(6).zip(settings) {
            chunk[..2].copy_from_slice(&id.to_be_bytes());
            chunk[2..].copy_from_slice(&value.to_be_bytes());
        }
        connection.queue_frame(frame::SETTINGS, 0, 0, &payload);
        connection
    }

    /// Starts a call of `method` for `service`; its answers come as [`Event`]s.
    pub fn start(&mut self, method: Method, service: &str) -> Result<CallId, ConnectionError> {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        self.start_call(method.path(), &request, Answers::Health)
    }

    /// Opens ORCA's out-of-band load-report stream, asking for a report every `interval`;
    /// the reports come as [`Message::LoadReport`]s.
    pub fn start_load_reports(&mut self, interval: std::time::Duration) -> Result<CallId, ConnectionError> {
        let request = OrcaLoadReportRequest {
            report_interval: Some(interval.into()),
            request_cost_names: Vec::new(),
        };
        self.start_call(STREAM_CORE_METRICS_PATH.as_bytes(), &request, Answers::LoadReports)
    }

    fn start_call(
        &mut self,
        path: &[u8],
        request: &impl prost::Message,
        answers: Answers,
    ) -> Result<CallId, ConnectionError> {
        if self.going_away || self.next_stream_id > i32::MAX as u32 {
            return Err(ConnectionError::GoingAway);
        }
        let id = self.next_stream_id;
        self.next_stream_id += 2;

        let mut block = Vec::with_capacity(128);
        block.push(0x80 | 3); // :method POST (static table 3)
        block.push(0x80 | 6); // :scheme http (static table 6)
        literal(&mut block, 4, path); // :path
        literal(&mut block, 1, self.authority.as_bytes()); // :authority
        literal(&mut block, 31, b"application/grpc"); // content-type
        literal_new_name(&mut block, b"te", b"trailers");
        literal(
            &mut block,
            58,
            concat!("kubegrpc-operator/", env!("CARGO_PKG_VERSION")).as_bytes(),
        ); // user-agent
        self.queue_frame(frame::HEADERS, flag::END_HEADERS, id, &block);

        let mut message = Vec::with_capacity(5 + request.encoded_len());
        message.push(0); // not compressed
        message.extend_from_slice(&(request.encoded_len() as u32).to_be_bytes());
        request.encode(&mut message).expect("a Vec grows as needed");
        self.queue_frame(frame::DATA, flag::END_STREAM, id, &message);

        self.calls.push(Call {
            id,
            answers,
            responded: false,
            partial: Vec::new(),
            unacknowledged: 0,
        });
        Ok(CallId(id))
    }

    /// Sends what is queued and returns the server's next [`Event`]. Cancel safe.
    pub async fn next_event(&mut self) -> Result<Event, ConnectionError> {
        loop {
            if let Some(event) = self.events.pop_front() {
                // What the server said before it broke the connection still counts (an answer,
                // then a bad frame), so events come before the error.
                if self.failed.is_none() {
                    self.flush().await?;
                }
                return Ok(event);
            }
            if let Some(error) = self.failed.take() {
                return Err(error);
            }
            self.flush().await?;
            match self.process_buffered() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(error) if !self.events.is_empty() => {
                    self.failed = Some(error);
                    continue;
                }
                Err(error) => return Err(error),
            }
            self.read_more().await?;
        }
    }

    /// Writes the queued bytes; cancel safe (what was written is removed from the queue).
    async fn flush(&mut self) -> io::Result<()> {
        if let Some(ping) = self.ping_ack.take() {
            self.queue_frame(frame::PING, flag::ACK, 0, &ping);
        }
        while !self.write.is_empty() {
            let written = self.io.write(&self.write).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.write.drain(..written);
        }
        if self.write.capacity() > 2 * SMALL_BUFFER {
            self.write.shrink_to(SMALL_BUFFER);
        }
        Ok(())
    }

    /// Reads more bytes, with room for the rest of the frame being received; cancel safe.
    async fn read_more(&mut self) -> Result<(), ConnectionError> {
        let room = self.read_room();
        self.read.reserve(room);
        if self.io.read_buf(&mut self.read).await? == 0 {
            return Err(ConnectionError::Closed);
        }
        Ok(())
    }

    /// How many bytes to read next: the rest of the frame being received (a length over the
    /// maximum is refused once the header is whole, never reserved), at least a few hundred.
    fn read_room(&self) -> usize {
        let needed = match self.read.get(..3) {
            Some(length) => {
                FRAME_HEADER + (u32::from_be_bytes([0, length[0], length[1], length[2]]) as usize).min(MAX_FRAME_SIZE)
            }
            None => FRAME_HEADER,
        };
        needed.saturating_sub(self.read.len()).max(SMALL_BUFFER / 2)
    }

    /// Processes every whole frame received; whether there was one.
    fn process_buffered(&mut self) -> Result<bool, ConnectionError> {
        let read = std::mem::take(&mut self.read);
        let mut consumed = 0;
        let result = loop {
            let rest = &read[consumed..];
            if rest.len() < FRAME_HEADER || self.events.len() >= MAX_QUEUED_EVENTS {
                break Ok(());
            }
            let length = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            if length > MAX_FRAME_SIZE {
                // Other protocols' first bytes read as huge lengths: name them for the log.
                break Err(ConnectionError::Protocol(if rest.starts_with(b"HTTP/") {
                    "an HTTP/1 response, not HTTP/2"
                } else if rest[0] == 0x16 && rest[1] == 0x03 {
                    "a TLS record, not plaintext HTTP/2"
                } else {
                    "a frame larger than SETTINGS_MAX_FRAME_SIZE"
                }));
            }
            if rest.len() < FRAME_HEADER + length {
                break Ok(());
            }
            if !self.take_frame_token() {
                break Err(ConnectionError::Protocol("a flood of frames"));
            }
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
            if let Err(error) = self.frame(rest[3], rest[4], stream, &rest[FRAME_HEADER..FRAME_HEADER + length]) {
                break Err(error);
            }
            consumed += FRAME_HEADER + length;
        };
        self.read = read;
        self.read.drain(..consumed);
        if self.read.is_empty() && self.read.capacity() > 2 * SMALL_BUFFER {
            self.read.shrink_to(SMALL_BUFFER);
        }
        result.map(|()| consumed > 0)
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Result<(), ConnectionError> {
        if self.continuation.is_some() && kind != frame::CONTINUATION {
            return Err(ConnectionError::Protocol("a header block interrupted by another frame"));
        }
        match kind {
            frame::DATA => self.data(flags, stream, payload),
            frame::HEADERS => {
                if stream == 0 {
                    return Err(ConnectionError::Protocol("HEADERS on stream 0"));
                }
                let mut fragment = unpadded(flags, payload)?;
                if flags & flag::PRIORITY != 0 {
                    fragment = fragment
                        .get(5..)
                        .ok_or(ConnectionError::Protocol("HEADERS too short for its priority"))?;
                }
                let end_stream = flags & flag::END_STREAM != 0;
                if flags & flag::END_HEADERS != 0 {
                    self.header_block(stream, end_stream, fragment)
                } else {
                    self.continuation = Some((stream, end_stream, fragment.to_vec()));
                    Ok(())
                }
            }
            frame::CONTINUATION => {
                let Some((expected, end_stream, mut block)) = self.continuation.take() else {
                    return Err(ConnectionError::Protocol("CONTINUATION without HEADERS"));
                };
                if stream != expected {
                    return Err(ConnectionError::Protocol("CONTINUATION on another stream"));
                }
                if block.len() + payload.len() > MAX_HEADER_BLOCK {
                    return Err(ConnectionError::Protocol(
                        "a header block over SETTINGS_MAX_HEADER_LIST_SIZE",
                    ));
                }
                block.extend_from_slice(payload);
                if flags & flag::END_HEADERS != 0 {
                    self.header_block(stream, end_stream, &block)
                } else {
                    self.continuation = Some((stream, end_stream, block));
                    Ok(())
                }
            }
            frame::RST_STREAM => {
                let code = payload
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| ConnectionError::Protocol("RST_STREAM of the wrong size"))?;
                self.end(stream, CallEnd::Reset(code));
                Ok(())
            }
            frame::SETTINGS => {
                if !payload.len().is_multiple_of(6) {
                    return Err(ConnectionError::Protocol("SETTINGS of the wrong size"));
                }
                // The server's settings bound what we send: a few hundred bytes per call, within
                // every limit a server may set. They are acknowledged, as the protocol requires.
                if flags & flag::ACK == 0 {
                    self.queue_frame(frame::SETTINGS, flag::ACK, 0, &[]);
                }
                Ok(())
            }
            frame::PING => {
                if payload.len() != 8 {
                    return Err(ConnectionError::Protocol("PING of the wrong size"));
                }
                if flags & flag::ACK == 0 {
                    let mut ping = [0u8; 8];
                    ping.copy_from_slice(payload);
                    self.ping_ack = Some(ping);
                }
                Ok(())
            }
            frame::GOAWAY => {
                let last = payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .ok_or(ConnectionError::Protocol("GOAWAY too short"))?;
                let refused: Vec<u32> = self.calls.iter().map(|c| c.id).filter(|id| *id > last).collect();
                for id in refused {
                    self.end(id, CallEnd::Reset(reason::REFUSED_STREAM));
                }
                if !self.going_away {
                    self.going_away = true;
                    let code = payload
                        .get(4..8)
                        .map_or(reason::NO_ERROR, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    let debug = payload.get(8..).unwrap_or_default();
                    let debug = String::from_utf8_lossy(&debug[..debug.len().min(MAX_GOAWAY_DEBUG)]).into_owned();
                    self.events.push_back(Event::GoAway(GoAway { code, debug }));
                }
                Ok(())
            }
            frame::PUSH_PROMISE => Err(ConnectionError::Protocol("PUSH_PROMISE with push disabled")),
            // WINDOW_UPDATE: a call sends one message of a few bytes, within any initial window.
            // PRIORITY and unknown types: nothing to do (RFC 9113 5.5).
            _ => Ok(()),
        }
    }

    fn data(&mut self, flags: u8, stream: u32, payload: &[u8]) -> Result<(), ConnectionError> {
        if stream == 0 {
            return Err(ConnectionError::Protocol("DATA on stream 0"));
        }
        let data = unpadded(flags, payload)?;
        // Flow control counts the whole payload, padding included.
        let received = payload.len() as u32;
        self.unacknowledged += received;
        if self.unacknowledged >= WINDOW_UPDATE_BATCH {
            let increment = std::mem::take(&mut self.unacknowledged);
            self.queue_frame(frame::WINDOW_UPDATE, 0, 0, &increment.to_be_bytes());
        }
        let end_stream = flags & flag::END_STREAM != 0;
        let Some(index) = self.calls.iter().position(|c| c.id == stream) else {
            return Ok(());
        };
        let call = &mut self.calls[index];
        call.unacknowledged += received;
        let window_update = (!end_stream && call.unacknowledged >= WINDOW_UPDATE_BATCH)
            .then(|| std::mem::take(&mut call.unacknowledged));
        call.partial.extend_from_slice(data);
        let mut failure = None;
        while call.partial.len() >= 5 {
            let length =
                u32::from_be_bytes([call.partial[1], call.partial[2], call.partial[3], call.partial[4]]) as usize;
            if call.partial[0] != 0 {
                failure = Some(CallEnd::Malformed("a compressed message, which was not asked for"));
                break;
            }
            if length > MAX_MESSAGE {
                failure = Some(CallEnd::MessageTooLarge);
                break;
            }
            if call.partial.len() < 5 + length {
                break;
            }
            let bytes = &call.partial[5..5 + length];
            let message = match call.answers {
                Answers::Health => HealthCheckResponse::decode(bytes).map(Message::Health),
                Answers::LoadReports => OrcaLoadReport::decode(bytes).map(Message::LoadReport),
            };
            match message {
                Ok(message) => queue_message(&mut self.events, CallId(stream), message),
                Err(_) => {
                    failure = Some(CallEnd::Malformed(
                        "a message that does not decode as the method's response",
                    ));
                    break;
                }
            }
            call.partial.drain(..5 + length);
        }
        if call.partial.is_empty() {
            call.partial = Vec::new();
        }
        if let Some(increment) = window_update {
            self.queue_frame(frame::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes());
        }
        if let Some(failure) = failure {
            if !end_stream {
                self.queue_frame(frame::RST_STREAM, 0, stream, &reason::CANCEL.to_be_bytes());
            }
            self.end(stream, failure);
        } else if end_stream {
            self.end(stream, CallEnd::Malformed("the response ended without trailers"));
        }
        Ok(())
    }

    fn header_block(&mut self, stream: u32, end_stream: bool, block: &[u8]) -> Result<(), ConnectionError> {
        let mut http_status = None;
        let mut grpc_status = None;
        let mut grpc_message = String::new();
        // Every block is decoded, a call's or not, to keep the HPACK state in step.
        self.hpack
            .decode(block, |name, value| match name {
                b":status" => http_status = std::str::from_utf8(value).ok().and_then(|s| s.parse::<u16>().ok()),
                b"grpc-status" => {
                    grpc_status = std::str::from_utf8(value).ok().and_then(|s| s.parse::<i32>().ok());
                }
                b"grpc-message" => grpc_message = percent_decoded(value),
                _ => {}
            })
            .map_err(|_| ConnectionError::Protocol("a header block HPACK cannot decode"))?;
        let Some(call) = self.calls.iter_mut().find(|c| c.id == stream) else {
            return Ok(());
        };
        if !call.responded {
            if http_status.is_some_and(|s| (100..200).contains(&s)) {
                return Ok(()); // informational
            }
            call.responded = true;
            match http_status {
                Some(200) => {}
                other => {
                    let code = grpc_code_of_http(other);
                    if !end_stream {
                        self.queue_frame(frame::RST_STREAM, 0, stream, &reason::CANCEL.to_be_bytes());
                    }
                    let message = format!("HTTP status {}", other.map_or("missing".into(), |s| s.to_string()));
                    self.end(stream, CallEnd::Status(code, message));
                    return Ok(());
                }
            }
            if !end_stream {
                return Ok(());
            }
            // Trailers-only: the status came with the headers.
        } else if !end_stream {
            return Err(ConnectionError::Protocol(
                "a second HEADERS that does not end the stream",
            ));
        }
        let end = match grpc_status {
            Some(code) => CallEnd::Status(Code::from_i32(code), grpc_message),
            None => CallEnd::Status(Code::Unknown, "the response carried no grpc-status".into()),
        };
        self.end(stream, end);
        Ok(())
    }

    /// Spends one of the frames the server may send; false when it has sent too many.
    fn take_frame_token(&mut self) -> bool {
        if self.frame_tokens == 0 {
            let now = tokio::time::Instant::now();
            let elapsed = now.saturating_duration_since(self.tokens_at);
            let earned = elapsed.as_millis().saturating_mul(u128::from(FRAMES_PER_SECOND)) / 1_000;
            if earned == 0 {
                return false;
            }
            self.frame_tokens = u32::try_from(earned).unwrap_or(u32::MAX).min(FRAME_BURST);
            self.tokens_at = now;
        }
        self.frame_tokens -= 1;
        true
    }

    /// The call on `stream`, if it is ours and open, ends with `end`.
    fn end(&mut self, stream: u32, end: CallEnd) {
        if let Some(index) = self.calls.iter().position(|c| c.id == stream) {
            self.calls.swap_remove(index);
            self.events.push_back(Event::Ended(CallId(stream), end));
        }
    }

    fn queue_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.write.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        self.write.push(kind);
        self.write.push(flags);
        self.write.extend_from_slice(&stream.to_be_bytes());
        self.write.extend_from_slice(payload);
    }
}

/// Fuzzing entry (not an API): a connection with a `Watch`, a `Check` and a load-report stream
/// open is fed `bytes` as the server's, in reads of at most what the connection would ask its
/// socket for, its events drained between reads and its writes dropped as if flushed. Returns
/// the events in order, then the error that ended the connection, if any. Panics if a bound on
/// the connection's memory does not hold (queued events, read and write buffers).
#[doc(hidden)]
pub fn fuzz_server_bytes(bytes: &[u8]) -> (Vec<Event>, Option<ConnectionError>) {
    let (io, _server) = tokio::io::duplex(64);
    let mut connection = HealthConnection::handshake(io, "fuzz");
    let calls = [
        connection.start(Method::Watch, ""),
        connection.start(Method::Check, ""),
        connection.start_load_reports(std::time::Duration::from_secs(1)),
    ];
    assert!(calls.iter().all(Result::is_ok));
    let mut events = Vec::new();
    let mut rest = bytes;
    loop {
        // As next_event: take events, process what was read, else read more.
        loop {
            assert!(
                connection.events.len() <= MAX_QUEUED_EVENTS + 4,
                "{} events queued",
                connection.events.len()
            );
            if let Some(event) = connection.events.pop_front() {
                events.push(event);
                continue;
            }
            if let Some(error) = connection.failed.take() {
                return (events, Some(error));
            }
            connection.ping_ack = None;
            assert!(
                connection.write.len() <= 4 * (FRAME_HEADER + MAX_FRAME_SIZE),
                "{} bytes to write",
                connection.write.len()
            );
            connection.write.clear();
            match connection.process_buffered() {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) if !connection.events.is_empty() => connection.failed = Some(error),
                Err(error) => return (events, Some(error)),
            }
        }
        if rest.is_empty() {
            return (events, None);
        }
        let room = connection.read_room();
        assert!(room <= FRAME_HEADER + MAX_FRAME_SIZE, "asked for {room} bytes");
        let (now, later) = rest.split_at(room.min(rest.len()));
        connection.read.extend_from_slice(now);
        assert!(connection.read.len() <= 2 * (FRAME_HEADER + MAX_FRAME_SIZE));
        rest = later;
    }
}

/// Queues a call's `message`; one of the call's not yet taken is superseded by it (health and
/// load reports: the latest is what counts), so a server packing thousands of messages into
/// its frames costs one queued event per call.
fn queue_message(events: &mut VecDeque<Event>, call: CallId, message: Message) {
    let queued = events.iter_mut().find_map(|event| match event {
        Event::Message(id, queued) if *id == call => Some(queued),
        _ => None,
    });
    match queued {
        Some(queued) => *queued = message,
        None => events.push_back(Event::Message(call, message)),
    }
}

/// The payload without its padding (PADDED flag: a length byte first, padding last).
fn unpadded(flags: u8, payload: &[u8]) -> Result<&[u8], ConnectionError> {
    if flags & flag::PADDED == 0 {
        return Ok(payload);
    }
    let (&padding, rest) = payload
        .split_first()
        .ok_or(ConnectionError::Protocol("a padded frame without its padding length"))?;
    rest.len()
        .checked_sub(padding as usize)
        .map(|end| &rest[..end])
        .ok_or(ConnectionError::Protocol("padding longer than the frame"))
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

/// An HPACK integer with an `prefix_bits`-bit prefix after the bits in `first` (RFC 7541 5.1).
fn hpack_integer(dst: &mut Vec<u8>, first: u8, prefix_bits: u8, value: usize) {
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

/// An HPACK string literal, not Huffman-coded.
fn hpack_string(dst: &mut Vec<u8>, value: &[u8]) {
    hpack_integer(dst, 0, 7, value.len());
    dst.extend_from_slice(value);
}

/// A header field without indexing whose name is static-table entry `name_index` (RFC 7541
/// 6.2.2): nothing enters the server's dynamic table.
fn literal(dst: &mut Vec<u8>, name_index: usize, value: &[u8]) {
    hpack_integer(dst, 0x00, 4, name_index);
    hpack_string(dst, value);
}

/// A header field without indexing with a literal name.
fn literal_new_name(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.push(0x00);
    hpack_string(dst, name);
    hpack_string(dst, value);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::task::AbortOnDropHandle;
    use tonic_health::{ServingStatus, server::HealthReporter};

    use super::*;

    #[test]
    fn hpack_integers_follow_rfc_7541_appendix_c1() {
        let mut dst = Vec::new();
        hpack_integer(&mut dst, 0, 5, 10);
        assert_eq!(dst, [0x0a]);
        dst.clear();
        hpack_integer(&mut dst, 0, 5, 1337);
        assert_eq!(dst, [0x1f, 0x9a, 0x0a]);
        dst.clear();
        hpack_integer(&mut dst, 0, 8, 42);
        assert_eq!(dst, [0x2a]);
    }

    #[test]
    fn the_request_header_block_decodes_to_a_grpc_request() {
        let mut block = Vec::new();
        block.push(0x83);
        block.push(0x86);
        literal(&mut block, 4, b"/grpc.health.v1.Health/Watch");
        literal(&mut block, 1, b"10.250.0.7:8080");
        literal(&mut block, 31, b"application/grpc");
        literal_new_name(&mut block, b"te", b"trailers");
        literal(&mut block, 58, b"kubegrpc-operator/0.1.0");
        let mut decoded = Vec::new();
        hpack::Decoder::default()
            .decode(&block, |n, v| {
                decoded.push((
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                ))
            })
            .unwrap();
        let expected = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/grpc.health.v1.Health/Watch"),
            (":authority", "10.250.0.7:8080"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "kubegrpc-operator/0.1.0"),
        ];
        let expected: Vec<(String, String)> = expected.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn grpc_messages_are_percent_decoded_and_http_statuses_mapped() {
        assert_eq!(percent_decoded(b"not%20found%3A x%"), "not found: x%");
        assert_eq!(grpc_code_of_http(Some(404)), Code::Unimplemented);
        assert_eq!(grpc_code_of_http(Some(503)), Code::Unavailable);
        assert_eq!(grpc_code_of_http(None), Code::Unknown);
    }

    #[test]
    fn padding_is_removed_and_bad_padding_refused() {
        assert_eq!(unpadded(flag::PADDED, &[2, 7, 8, 0, 0]).unwrap(), &[7, 8]);
        assert_eq!(unpadded(0, &[2, 7]).unwrap(), &[2, 7]);
        assert!(unpadded(flag::PADDED, &[5, 1]).is_err());
    }

    /// A tonic health server on loopback.
    async fn health_server() -> (HealthReporter, SocketAddr, AbortOnDropHandle<()>) {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("", ServingStatus::Serving).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        }));
        (reporter, address, server)
    }

    #[tokio::test]
    async fn load_reports_stream_beside_a_watch_and_a_server_without_orca_says_unimplemented() {
        let (_reporter, service) = tonic_health::server::health_reporter();
        let recorder = kubegrpc_orca::LoadRecorder::with_capacity(2);
        let orca = kubegrpc_orca::OrcaService::new(recorder.clone()).min_report_interval(Duration::from_millis(100));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let _server = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(orca.into_server())
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        }));
        let mut connection = HealthConnection::connect(address).await.unwrap();
        let watch = connection.start(Method::Watch, "").unwrap();
        let reports = connection.start_load_reports(Duration::from_millis(100)).unwrap();
        for _ in 0..10 {
            recorder.record_request(true);
        }
        recorder.record_busy(Duration::from_millis(50));
        // Reports come every 100 ms on the same connection as the Watch; one of them carries
        // the requests and busy time recorded above.
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|r: &OrcaLoadReport| r.rps_fractional > 0.0 && r.application_utilization > 0.0)
        {
            match next(&mut connection).await {
                Event::Message(call, Message::LoadReport(report)) if call == reports => seen.push(report),
                Event::Message(call, Message::Health(_)) if call == watch => {}
                other => panic!("unexpected {other:?}"),
            }
            assert!(seen.len() < 50, "no report with the recorded load: {seen:?}");
        }

        // A health-only server answers the load-report stream UNIMPLEMENTED.
        let (_reporter, address, _server) = health_server().await;
        let mut connection = HealthConnection::connect(address).await.unwrap();
        let reports = connection.start_load_reports(Duration::from_secs(1)).unwrap();
        assert!(matches!(
            next(&mut connection).await,
            Event::Ended(call, CallEnd::Status(Code::Unimplemented, _)) if call == reports
        ));
    }

    async fn next(connection: &mut HealthConnection) -> Event {
        tokio::time::timeout(Duration::from_secs(5), connection.next_event())
            .await
            .expect("an event within 5 s")
            .expect("the connection works")
    }

    fn status(response: &Message) -> ServingStatus {
        let Message::Health(response) = response else {
            return ServingStatus::Unknown;
        };
        match response.status {
            1 => ServingStatus::Serving,
            2 => ServingStatus::NotServing,
            _ => ServingStatus::Unknown,
        }
    }

    #[tokio::test]
    async fn check_watch_and_not_found_against_a_tonic_server() {
        let (reporter, address, _server) = health_server().await;
        let mut connection = HealthConnection::connect(address).await.unwrap();

        let check = connection.start(Method::Check, "").unwrap();
        let Event::Message(call, response) = next(&mut connection).await else {
            panic!("a Check answers with a message")
        };
        assert_eq!((call, status(&response)), (check, ServingStatus::Serving));
        assert_eq!(
            next(&mut connection).await,
            Event::Ended(check, CallEnd::Status(Code::Ok, String::new()))
        );

        let watch = connection.start(Method::Watch, "").unwrap();
        let Event::Message(call, response) = next(&mut connection).await else {
            panic!("a Watch answers with a message")
        };
        assert_eq!((call, status(&response)), (watch, ServingStatus::Serving));
        reporter.set_service_status("", ServingStatus::NotServing).await;
        let Event::Message(call, response) = next(&mut connection).await else {
            panic!("a flip arrives on the Watch")
        };
        assert_eq!((call, status(&response)), (watch, ServingStatus::NotServing));

        // A Check beside the open Watch, for a service the server does not know.
        let unknown = connection.start(Method::Check, "nope").unwrap();
        let Event::Ended(call, CallEnd::Status(code, _)) = next(&mut connection).await else {
            panic!("an unknown service ends the call")
        };
        assert_eq!((call, code), (unknown, Code::NotFound));
    }

    #[tokio::test]
    async fn hundreds_of_calls_on_one_connection_leave_its_buffers_small() {
        let (_reporter, address, _server) = health_server().await;
        let mut connection = HealthConnection::connect(address).await.unwrap();
        for _ in 0..300 {
            let call = connection.start(Method::Check, "").unwrap();
            assert!(matches!(next(&mut connection).await, Event::Message(c, _) if c == call));
            assert_eq!(
                next(&mut connection).await,
                Event::Ended(call, CallEnd::Status(Code::Ok, String::new()))
            );
        }
        assert!(connection.read.capacity() <= 2 * SMALL_BUFFER);
        assert!(connection.write.capacity() <= 2 * SMALL_BUFFER);
    }

    /// One frame as bytes.
    fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        bytes.extend_from_slice(&[kind, flags]);
        bytes.extend_from_slice(&stream.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    /// Reads frames from the client until one of `kind` with `flags` arrives; its payload.
    async fn read_until(socket: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>, kind: u8, flags: u8) -> Vec<u8> {
        loop {
            while buffer.len() >= FRAME_HEADER {
                let length = u32::from_be_bytes([0, buffer[0], buffer[1], buffer[2]]) as usize;
                if buffer.len() < FRAME_HEADER + length {
                    break;
                }
                let frame: Vec<u8> = buffer.drain(..FRAME_HEADER + length).collect();
                if frame[3] == kind && frame[4] == flags {
                    return frame[FRAME_HEADER..].to_vec();
                }
            }
            assert_ne!(socket.read_buf(buffer).await.unwrap(), 0, "the client closed");
        }
    }

    #[tokio::test]
    async fn scripted_server_frames_are_answered_and_decoded_as_the_protocol_says() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut connection = HealthConnection::connect(address).await.unwrap();
        let (mut socket, _) = listener.accept().await.unwrap();
        let first = connection.start(Method::Watch, "").unwrap();
        let second = connection.start(Method::Check, "").unwrap();
        let third = connection.start(Method::Check, "").unwrap();
        // Nothing is written until the connection is driven.
        let pending = tokio::time::timeout(Duration::from_millis(50), connection.next_event()).await;
        assert!(pending.is_err(), "no event yet: {pending:?}");

        let mut received = Vec::new();
        let mut preface = [0u8; PREFACE.len()];
        socket.read_exact(&mut preface).await.unwrap();
        assert_eq!(preface, PREFACE);
        let settings = read_until(&mut socket, &mut received, frame::SETTINGS, 0).await;
        assert!(
            settings.chunks(6).any(|s| s == [0, 1, 0, 0, 0, 0]),
            "SETTINGS_HEADER_TABLE_SIZE 0 is advertised: {settings:?}"
        );

        let mut script = frame_bytes(frame::SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
        script.extend(frame_bytes(frame::PING, 0, 0, b"12345678"));
        // The first call: headers split over HEADERS (padded, with priority) and CONTINUATION,
        // one message in a padded DATA frame, then trailers with a percent-encoded message.
        let mut headers = vec![0x88]; // :status 200 (static table 8)
        literal(&mut headers, 31, b"application/grpc");
        let mut padded_headers = vec![3, 0, 0, 0, 0, 16];
        padded_headers.extend_from_slice(&headers[..2]);
        padded_headers.extend_from_slice(&[0, 0, 0]);
        script.extend(frame_bytes(
            frame::HEADERS,
            flag::PADDED | flag::PRIORITY,
            first.0,
            &padded_headers,
        ));
        script.extend(frame_bytes(
            frame::CONTINUATION,
            flag::END_HEADERS,
            first.0,
            &headers[2..],
        ));
        let serving = HealthCheckResponse { status: 1 }.encode_to_vec();
        let mut data = vec![4, 0, 0, 0, 0, serving.len() as u8];
        data.extend_from_slice(&serving);
        data.extend_from_slice(&[0; 4]);
        script.extend(frame_bytes(frame::DATA, flag::PADDED, first.0, &data));
        let mut trailers = Vec::new();
        literal_new_name(&mut trailers, b"grpc-status", b"14");
        literal_new_name(&mut trailers, b"grpc-message", b"going%20away");
        script.extend(frame_bytes(
            frame::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            first.0,
            &trailers,
        ));
        // The second: a trailers-only answer. The third: never processed (GOAWAY names the second).
        let mut trailers_only = vec![0x88];
        literal_new_name(&mut trailers_only, b"grpc-status", b"12");
        script.extend(frame_bytes(
            frame::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            second.0,
            &trailers_only,
        ));
        script.extend(frame_bytes(frame::GOAWAY, 0, 0, &[0, 0, 0, second.0 as u8, 0, 0, 0, 0]));
        socket.write_all(&script).await.unwrap();

        let mut events = Vec::new();
        for _ in 0..5 {
            events.push(next(&mut connection).await);
        }
        assert_eq!(
            events,
            [
                Event::Message(first, Message::Health(HealthCheckResponse { status: 1 })),
                Event::Ended(first, CallEnd::Status(Code::Unavailable, "going away".into())),
                Event::Ended(second, CallEnd::Status(Code::Unimplemented, String::new())),
                Event::Ended(third, CallEnd::Reset(reason::REFUSED_STREAM)),
                Event::GoAway(GoAway {
                    code: reason::NO_ERROR,
                    debug: String::new()
                }),
            ]
        );
        assert!(matches!(
            connection.start(Method::Check, ""),
            Err(ConnectionError::GoingAway)
        ));
        // The server's SETTINGS and PING were acknowledged (driven by the reads above).
        read_until(&mut socket, &mut received, frame::SETTINGS, flag::ACK).await;
        let pong = read_until(&mut socket, &mut received, frame::PING, flag::ACK).await;
        assert_eq!(pong, b"12345678");

        // A frame over the maximum size ends the connection with a protocol error.
        socket
            .write_all(&frame_bytes(frame::DATA, 0, 1, &vec![0; MAX_FRAME_SIZE + 1]))
            .await
            .unwrap();
        let error = tokio::time::timeout(Duration::from_secs(5), connection.next_event()).await;
        assert!(matches!(error, Ok(Err(ConnectionError::Protocol(_)))), "{error:?}");
    }

    #[tokio::test]
    async fn received_data_is_given_back_to_both_flow_control_windows() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut connection = HealthConnection::connect(address).await.unwrap();
        let (mut socket, _) = listener.accept().await.unwrap();
        let watch = connection.start(Method::Watch, "").unwrap();

        // 3,000 flips of 7 bytes each, 10 to a frame: 21,000 bytes, more than one batch of 16 KiB.
        let mut script = frame_bytes(frame::HEADERS, flag::END_HEADERS, watch.0, &[0x88]);
        let message = HealthCheckResponse { status: 2 }.encode_to_vec();
        for _ in 0..300 {
            let mut data = Vec::new();
            for _ in 0..10 {
                data.extend_from_slice(&[0, 0, 0, 0, message.len() as u8]);
                data.extend_from_slice(&message);
            }
            script.extend(frame_bytes(frame::DATA, 0, watch.0, &data));
        }
        let mut trailers = Vec::new();
        literal_new_name(&mut trailers, b"grpc-status", b"0");
        script.extend(frame_bytes(
            frame::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            watch.0,
            &trailers,
        ));
        socket.write_all(&script).await.unwrap();
        // Messages not yet taken are superseded by later ones: at most 3,000 events, at least one.
        let mut messages = 0;
        loop {
            match next(&mut connection).await {
                Event::Message(c, _) if c == watch => messages += 1,
                Event::Ended(c, _) if c == watch => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!((1..=3_000).contains(&messages), "{messages}");
        // Drive the connection once more so that the queued WINDOW_UPDATEs are written.
        let _ = tokio::time::timeout(Duration::from_millis(50), connection.next_event()).await;

        let mut preface = [0u8; PREFACE.len()];
        socket.read_exact(&mut preface).await.unwrap();
        let mut increments = std::collections::BTreeMap::<u32, u32>::new();
        let read_updates = async {
            while increments.len() < 2 {
                let mut header = [0u8; FRAME_HEADER];
                socket.read_exact(&mut header).await.unwrap();
                let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let mut payload = vec![0; length];
                socket.read_exact(&mut payload).await.unwrap();
                if header[3] == frame::WINDOW_UPDATE {
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                    *increments.entry(stream).or_default() += u32::from_be_bytes(payload[..4].try_into().unwrap());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), read_updates)
            .await
            .expect("WINDOW_UPDATEs for the connection and the stream");
        assert!(increments[&0] >= WINDOW_UPDATE_BATCH, "{increments:?}");
        assert!(increments[&watch.0] >= WINDOW_UPDATE_BATCH, "{increments:?}");
    }

    /// A server's frames, as bytes: the answer HEADERS of `stream`, then `then`.
    fn answered_then(stream: u32, then: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
        let mut bytes = frame_bytes(frame::HEADERS, flag::END_HEADERS, stream, &[0x88]);
        for more in then {
            bytes.extend(more);
        }
        bytes
    }

    #[test]
    fn thousands_of_messages_packed_into_frames_queue_one_event_per_call() {
        let message = HealthCheckResponse { status: 1 }.encode_to_vec();
        let mut data = Vec::new();
        while data.len() + 5 + message.len() <= MAX_FRAME_SIZE {
            data.extend_from_slice(&[0, 0, 0, 0, message.len() as u8]);
            data.extend_from_slice(&message);
        }
        let frames = (0..50).map(|_| frame_bytes(frame::DATA, 0, 1, &data));
        let (events, error) = fuzz_server_bytes(&answered_then(1, frames));
        assert!(error.is_none(), "{error:?}");
        // 50 frames of 2,340 messages each; the fuzz entry takes events between reads.
        assert!(!events.is_empty() && events.len() <= 50, "{} events", events.len());
        assert!(events.iter().all(|e| matches!(e, Event::Message(CallId(1), _))));
    }

    #[test]
    fn a_flood_of_control_frames_ends_the_connection_and_pings_are_acknowledged_once_per_read() {
        let pings = (0..5_000u64).map(|i| frame_bytes(frame::PING, 0, 0, &i.to_be_bytes()));
        let (_, error) = fuzz_server_bytes(&pings.collect::<Vec<_>>().concat());
        assert!(
            matches!(error, Some(ConnectionError::Protocol("a flood of frames"))),
            "{error:?}"
        );
        for kind in [frame::SETTINGS, frame::WINDOW_UPDATE, frame::RST_STREAM] {
            let payload: &[u8] = if kind == frame::SETTINGS { &[] } else { &[0, 0, 0, 1] };
            let flood: Vec<u8> = (0..2_000).flat_map(|_| frame_bytes(kind, 0, 3, payload)).collect();
            let (_, error) = fuzz_server_bytes(&flood);
            assert!(
                matches!(error, Some(ConnectionError::Protocol("a flood of frames"))),
                "{kind}: {error:?}"
            );
        }
        // A valid peer's handful of control frames is fine.
        let (_, error) = fuzz_server_bytes(
            &(0..100)
                .flat_map(|i: u64| frame_bytes(frame::PING, 0, 0, &i.to_be_bytes()))
                .collect::<Vec<_>>(),
        );
        assert!(error.is_none());
    }

    #[tokio::test]
    async fn a_huge_frame_header_is_refused_without_reserving_its_length() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let mut connection = HealthConnection::handshake(client, "test");
        // Three bytes of a 16 MiB length first, the rest of the header later.
        server.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
        let pending = tokio::time::timeout(Duration::from_millis(20), connection.next_event()).await;
        assert!(pending.is_err());
        assert!(
            connection.read.capacity() <= 2 * (FRAME_HEADER + MAX_FRAME_SIZE),
            "{}",
            connection.read.capacity()
        );
        server.write_all(&[0, 0, 0, 0, 0, 1]).await.unwrap();
        let error = connection.next_event().await.err();
        assert!(
            matches!(
                error,
                Some(ConnectionError::Protocol("a frame larger than SETTINGS_MAX_FRAME_SIZE"))
            ),
            "{error:?}"
        );
        let (_, error) = fuzz_server_bytes(b"HTTP/1.1 400 Bad Request\r\n\r\n");
        assert!(
            matches!(error, Some(ConnectionError::Protocol("an HTTP/1 response, not HTTP/2"))),
            "{error:?}"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_server_bytes_end_in_events_or_an_error_within_the_bounds(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2_048)) {
            let _ = fuzz_server_bytes(&bytes);
        }

        #[test]
        fn any_frames_after_an_answer_stay_within_the_bounds(frames in proptest::collection::vec((0u8..10, proptest::prelude::any::<u8>(), 0u32..8, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)), 0..64)) {
            let bytes = answered_then(1, frames.into_iter().map(|(kind, flags, stream, payload)| frame_bytes(kind, flags, stream, &payload)));
            let _ = fuzz_server_bytes(&bytes);
        }
    }
}

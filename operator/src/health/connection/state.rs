//! A connection's state, apart from its transport: the calls open on it, what the server's
//! frames do to them (queued as [`Event`]s), flow control of what it receives, and the frames it
//! owes the server (our preface and SETTINGS, requests, acknowledgements, WINDOW_UPDATEs,
//! RST_STREAMs), queued for the I/O part to write. Fed received bytes, it never waits: it is
//! tested here without a socket.

use std::{collections::VecDeque, ops::ControlFlow};

use kubegrpc_orca::{OrcaLoadReportRequest, STREAM_CORE_METRICS_PATH};
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;

use super::{
    CallId, ConnectionError, Event, GoAway,
    frame::{self, Frame, ReadBuffer, WriteBuffer, flag, kind, reason, setting},
    grpc::{self, Answers, CallEnd, Message, Messages, Method, ResponseHead, Scheme},
};
use crate::health::hpack;

/// The most header-block bytes (HEADERS and CONTINUATION) one response may take; also
/// advertised as SETTINGS_MAX_HEADER_LIST_SIZE.
const MAX_HEADER_BLOCK: usize = 16_384;
/// Received DATA bytes are given back to the server's flow-control windows in batches.
const WINDOW_UPDATE_BATCH: u32 = 16_384;
/// Events waiting to be taken: past this, no further frame is processed (nor read) until the
/// prober takes some. With a message per call superseding the one before it (see
/// `queue_message`), a valid peer never gets near it.
pub(super) const MAX_QUEUED_EVENTS: usize = 8;
/// Frames and gRPC messages a server may send in a burst, and per second after it: a health
/// service sends a few per answer; a flood of PING, SETTINGS, RST_STREAM, WINDOW_UPDATE or tiny
/// frames, or of messages packed thousands to a DATA frame, past this ends the connection
/// (HTTP/2's ENHANCE_YOUR_CALM case), so that it costs the prober a small multiple of a healthy
/// peer's CPU.
const FRAME_BURST: u32 = 1_024;
const FRAMES_PER_SECOND: u32 = 256;
/// The most bytes of a GOAWAY's debug data kept (for the log).
const MAX_GOAWAY_DEBUG: usize = 128;
/// The most calls open at once on one connection, whatever the server allows: the prober's
/// `Watch`, load-report stream and liveness `Check`. With the request each call holds until
/// flow control lets it go (see [`Call::request`]), this bounds what a server that never opens
/// its windows can make us hold.
pub(super) const MAX_CALLS: usize = 3;
/// SETTINGS_INITIAL_WINDOW_SIZE's initial value: both send windows until the server says
/// otherwise (RFC 9113 6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;
/// The largest flow-control window (RFC 9113 6.9.1).
const MAX_WINDOW: i64 = (1 << 31) - 1;

/// See the module docs.
#[derive(Debug)]
pub(super) struct State {
    /// The `:scheme` and `:authority` of every request.
    scheme: Scheme,
    authority: Box<str>,
    write: WriteBuffer,
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
    /// Frames and messages the server may still send now.
    budget: FloodBudget,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS: no call starts beyond it (none until the
    /// server says, RFC 9113 6.5.2).
    peer_max_streams: u32,
    /// The server's SETTINGS_INITIAL_WINDOW_SIZE: a new call's send window.
    peer_initial_window: i64,
    /// How many DATA bytes the connection's send window lets us send now.
    send_window: i64,
}

/// A token bucket of [`FRAME_BURST`] tokens, topped up at [`FRAMES_PER_SECOND`]: a token per
/// frame, and one per response message after the first of a DATA frame.
#[derive(Debug)]
struct FloodBudget {
    tokens: u32,
    topped_up_at: Instant,
}

impl FloodBudget {
    fn new() -> Self {
        Self {
            tokens: FRAME_BURST,
            topped_up_at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.tokens == 0 {
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(self.topped_up_at);
            let earned = elapsed.as_millis().saturating_mul(u128::from(FRAMES_PER_SECOND)) / 1_000;
            if earned == 0 {
                return false;
            }
            self.tokens = u32::try_from(earned).unwrap_or(u32::MAX).min(FRAME_BURST);
            self.topped_up_at = now;
        }
        self.tokens -= 1;
        true
    }
}

#[derive(Debug)]
struct Call {
    id: u32,
    /// The response's HEADERS arrived (the next HEADERS are its trailers).
    responded: bool,
    messages: Messages,
    /// Received DATA bytes not yet given back to the stream's window.
    unacknowledged: u32,
    /// The request message (gRPC-framed) not yet sent: held until both send windows let it
    /// go, then sent in as many DATA frames as they allow, the last with END_STREAM. A few
    /// hundred bytes made from our settings, never from what the server sends.
    request: Vec<u8>,
    /// How many DATA bytes the stream's send window lets us send now (negative after the
    /// server shrinks SETTINGS_INITIAL_WINDOW_SIZE, RFC 9113 6.9.2).
    send_window: i64,
}

impl State {
    /// A new connection's state, with the HTTP/2 preface and our SETTINGS queued (no round
    /// trip is awaited: they go out with the first call).
    pub(super) fn new(scheme: Scheme, authority: &str) -> Self {
        let mut state = Self {
            scheme,
            authority: authority.into(),
            write: WriteBuffer::default(),
            hpack: hpack::Decoder::default(),
            calls: Vec::with_capacity(2),
            next_stream_id: 1,
            unacknowledged: 0,
            continuation: None,
            going_away: false,
            events: VecDeque::new(),
            failed: None,
            ping_ack: None,
            budget: FloodBudget::new(),
            peer_max_streams: u32::MAX,
            peer_initial_window: DEFAULT_WINDOW,
            send_window: DEFAULT_WINDOW,
        };
        state.write.raw(frame::PREFACE);
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
        state.write.frame(kind::SETTINGS, 0, 0, &payload);
        state
    }

    /// Queues a call of `method` for `service`.
    pub(super) fn start(&mut self, method: Method, service: &str) -> Result<CallId, ConnectionError> {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        self.start_call(method.path(), &request, Answers::Health)
    }

    /// Queues ORCA's out-of-band load-report stream, asking for a report every `interval`.
    pub(super) fn start_load_reports(&mut self, interval: std::time::Duration) -> Result<CallId, ConnectionError> {
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
        if self.call_room() == 0 {
            return Err(ConnectionError::NoRoom);
        }
        let id = self.next_stream_id;
        self.next_stream_id += 2;
        let headers = grpc::request_headers(self.scheme, path, self.authority.as_bytes());
        self.write.frame(kind::HEADERS, flag::END_HEADERS, id, &headers);
        self.calls.push(Call {
            id,
            responded: false,
            messages: Messages::new(answers),
            unacknowledged: 0,
            request: grpc::request_message(request),
            send_window: self.peer_initial_window,
        });
        self.send_requests();
        Ok(CallId(id))
    }

    /// How many more calls may start now: the server's SETTINGS_MAX_CONCURRENT_STREAMS (and
    /// [`MAX_CALLS`]) less the calls open. A call counts until its end is received, as the
    /// server counts it until it sends that end.
    pub(super) fn call_room(&self) -> usize {
        let limit = usize::try_from(self.peer_max_streams)
            .unwrap_or(usize::MAX)
            .min(MAX_CALLS);
        limit.saturating_sub(self.calls.len())
    }

    /// Ends `call` from our side (RST_STREAM CANCEL), freeing its room; it gets no further
    /// event. Nothing happens if it has ended already.
    pub(super) fn cancel(&mut self, call: CallId) {
        if let Some(index) = self.calls.iter().position(|c| c.id == call.0) {
            self.calls.swap_remove(index);
            self.write
                .frame(kind::RST_STREAM, 0, call.0, &reason::CANCEL.to_be_bytes());
            self.events.retain(|event| match event {
                Event::Message(id, _) | Event::Ended(id, _) => *id != call,
                Event::GoAway(_) => true,
            });
        }
    }

    /// Queues as much of each call's held request as both send windows allow: the whole rest
    /// with END_STREAM, or a part of it (never an empty frame before the last).
    fn send_requests(&mut self) {
        for call in &mut self.calls {
            while !call.request.is_empty() {
                let allowed = self.send_window.min(call.send_window).min(frame::MAX_FRAME_SIZE as i64);
                let Ok(allowed) = usize::try_from(allowed) else {
                    break;
                };
                if allowed >= call.request.len() {
                    self.write.frame(kind::DATA, flag::END_STREAM, call.id, &call.request);
                    let sent = call.request.len() as i64;
                    self.send_window -= sent;
                    call.send_window -= sent;
                    call.request = Vec::new();
                } else if allowed > 0 {
                    self.write.frame(kind::DATA, 0, call.id, &call.request[..allowed]);
                    self.send_window -= allowed as i64;
                    call.send_window -= allowed as i64;
                    call.request.drain(..allowed);
                } else {
                    break;
                }
            }
        }
    }

    /// The request bytes held for flow control, all calls together.
    #[cfg(test)]
    pub(super) fn held_request_bytes(&self) -> usize {
        self.calls.iter().map(|c| c.request.len()).sum()
    }

    /// The next event for the prober, if one is queued.
    pub(super) fn take_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub(super) fn queued_events(&self) -> usize {
        self.events.len()
    }

    /// What ended the connection, once every event before it was taken.
    pub(super) fn take_failure(&mut self) -> Option<ConnectionError> {
        self.failed.take()
    }

    pub(super) fn has_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// The bytes to write now (the latest PING's acknowledgement queued last).
    pub(super) fn outgoing(&mut self) -> &[u8] {
        if let Some(ping) = self.ping_ack.take() {
            self.write.frame(kind::PING, flag::ACK, 0, &ping);
        }
        self.write.pending()
    }

    /// The first `written` bytes of [`State::outgoing`] were written.
    pub(super) fn written(&mut self, written: usize) {
        self.write.written(written);
    }

    #[cfg(test)]
    pub(super) fn write_capacity(&self) -> usize {
        self.write.capacity()
    }

    /// Processes every whole frame in `read` (while fewer than [`MAX_QUEUED_EVENTS`] wait);
    /// whether there was one. An error that ends the connection after events were queued is
    /// held until they are taken (see [`State::take_failure`]).
    pub(super) fn receive(&mut self, read: &mut ReadBuffer) -> Result<bool, ConnectionError> {
        match self.process(read) {
            // What the server said before it broke the connection still counts (an answer,
            // then a bad frame), so events come before the error.
            Err(error) if !self.events.is_empty() => {
                self.failed = Some(error);
                Ok(true)
            }
            result => result,
        }
    }

    fn process(&mut self, read: &mut ReadBuffer) -> Result<bool, ConnectionError> {
        let mut consumed = 0;
        let result = loop {
            if self.events.len() >= MAX_QUEUED_EVENTS {
                break Ok(());
            }
            let frame = match frame::decode(&read.bytes()[consumed..]) {
                Ok(Some(frame)) => frame,
                Ok(None) => break Ok(()),
                Err(why) => break Err(ConnectionError::Protocol(why)),
            };
            if !self.budget.take() {
                break Err(ConnectionError::Protocol("a flood of frames"));
            }
            let size = frame.wire_len();
            if let Err(error) = self.frame(&frame) {
                break Err(error);
            }
            consumed += size;
        };
        read.consume(consumed);
        result.map(|()| consumed > 0)
    }

    fn frame(&mut self, frame: &Frame<'_>) -> Result<(), ConnectionError> {
        let (flags, stream, payload) = (frame.flags, frame.stream, frame.payload);
        if self.continuation.is_some() && frame.kind != kind::CONTINUATION {
            return Err(ConnectionError::Protocol("a header block interrupted by another frame"));
        }
        match frame.kind {
            kind::DATA => self.data(flags, stream, payload),
            kind::HEADERS => {
                if stream == 0 {
                    return Err(ConnectionError::Protocol("HEADERS on stream 0"));
                }
                let mut fragment = frame::unpadded(flags, payload).map_err(ConnectionError::Protocol)?;
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
            kind::CONTINUATION => {
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
            kind::RST_STREAM => {
                let code = payload
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| ConnectionError::Protocol("RST_STREAM of the wrong size"))?;
                self.end(stream, CallEnd::Reset(code));
                Ok(())
            }
            kind::SETTINGS => {
                if !payload.len().is_multiple_of(6) {
                    return Err(ConnectionError::Protocol("SETTINGS of the wrong size"));
                }
                if flags & flag::ACK == 0 {
                    self.settings(payload)?;
                    self.write.frame(kind::SETTINGS, flag::ACK, 0, &[]);
                }
                Ok(())
            }
            kind::PING => {
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
            kind::GOAWAY => {
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
            kind::PUSH_PROMISE => Err(ConnectionError::Protocol("PUSH_PROMISE with push disabled")),
            kind::WINDOW_UPDATE => self.window_update(stream, payload),
            // PRIORITY and unknown types: nothing to do (RFC 9113 5.5).
            _ => Ok(()),
        }
    }

    /// The server's SETTINGS (not an acknowledgement): those that bound what we send. Our
    /// frames are within every SETTINGS_MAX_FRAME_SIZE and header list size a server may set
    /// (16 KiB at least; our header blocks are a few hundred bytes).
    fn settings(&mut self, payload: &[u8]) -> Result<(), ConnectionError> {
        for entry in payload.chunks_exact(6) {
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            match u16::from_be_bytes([entry[0], entry[1]]) {
                setting::MAX_CONCURRENT_STREAMS => self.peer_max_streams = value,
                setting::INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > MAX_WINDOW {
                        return Err(ConnectionError::Protocol("SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1"));
                    }
                    // Open streams' windows move by the difference (RFC 9113 6.9.2).
                    let delta = value - self.peer_initial_window;
                    self.peer_initial_window = value;
                    for call in &mut self.calls {
                        call.send_window += delta;
                        if call.send_window > MAX_WINDOW {
                            return Err(ConnectionError::Protocol("a stream's send window over 2^31-1"));
                        }
                    }
                }
                _ => {}
            }
        }
        self.send_requests();
        Ok(())
    }

    /// A WINDOW_UPDATE: more room in the connection's send window or a call's.
    fn window_update(&mut self, stream: u32, payload: &[u8]) -> Result<(), ConnectionError> {
        let increment = payload
            .try_into()
            .map(|b: [u8; 4]| i64::from(u32::from_be_bytes(b) & 0x7fff_ffff))
            .map_err(|_| ConnectionError::Protocol("WINDOW_UPDATE of the wrong size"))?;
        if stream == 0 {
            if increment == 0 {
                return Err(ConnectionError::Protocol("a WINDOW_UPDATE of 0"));
            }
            self.send_window += increment;
            if self.send_window > MAX_WINDOW {
                return Err(ConnectionError::Protocol("the connection's send window over 2^31-1"));
            }
        } else if let Some(call) = self.calls.iter_mut().find(|c| c.id == stream) {
            call.send_window += increment;
            // Stream errors (RFC 9113 6.9, 6.9.1): that call ends, the connection goes on.
            let broken = if increment == 0 {
                Some("a WINDOW_UPDATE of 0")
            } else if call.send_window > MAX_WINDOW {
                Some("a stream's send window over 2^31-1")
            } else {
                None
            };
            if let Some(why) = broken {
                self.write
                    .frame(kind::RST_STREAM, 0, stream, &reason::FLOW_CONTROL_ERROR.to_be_bytes());
                self.end(stream, CallEnd::Malformed(why));
            }
        }
        self.send_requests();
        Ok(())
    }

    fn data(&mut self, flags: u8, stream: u32, payload: &[u8]) -> Result<(), ConnectionError> {
        if stream == 0 {
            return Err(ConnectionError::Protocol("DATA on stream 0"));
        }
        let data = frame::unpadded(flags, payload).map_err(ConnectionError::Protocol)?;
        // Flow control counts the whole payload, padding included.
        let received = payload.len() as u32;
        self.unacknowledged += received;
        if self.unacknowledged >= WINDOW_UPDATE_BATCH {
            let increment = std::mem::take(&mut self.unacknowledged);
            self.write.frame(kind::WINDOW_UPDATE, 0, 0, &increment.to_be_bytes());
        }
        let end_stream = flags & flag::END_STREAM != 0;
        let Some(call) = self.calls.iter_mut().find(|c| c.id == stream) else {
            return Ok(());
        };
        call.unacknowledged += received;
        let window_update = (!end_stream && call.unacknowledged >= WINDOW_UPDATE_BATCH)
            .then(|| std::mem::take(&mut call.unacknowledged));
        let (events, budget) = (&mut self.events, &mut self.budget);
        let (mut flooded, mut first) = (false, true);
        let failure = call
            .messages
            .receive(data, |message| {
                // The frame's token pays for its first message.
                if !std::mem::take(&mut first) && !budget.take() {
                    flooded = true;
                    return ControlFlow::Break(());
                }
                queue_message(events, CallId(stream), message);
                ControlFlow::Continue(())
            })
            .err();
        if flooded {
            return Err(ConnectionError::Protocol("a flood of messages"));
        }
        if let Some(increment) = window_update {
            self.write
                .frame(kind::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes());
        }
        if let Some(failure) = failure {
            if !end_stream {
                self.write
                    .frame(kind::RST_STREAM, 0, stream, &reason::CANCEL.to_be_bytes());
            }
            self.end(stream, failure);
        } else if end_stream {
            self.end(stream, CallEnd::Malformed("the response ended without trailers"));
        }
        Ok(())
    }

    fn header_block(&mut self, stream: u32, end_stream: bool, block: &[u8]) -> Result<(), ConnectionError> {
        // Every block is decoded, a call's or not, to keep the HPACK state in step.
        let head = ResponseHead::decode(&mut self.hpack, block)
            .map_err(|_| ConnectionError::Protocol("a header block HPACK cannot decode"))?;
        let Some(call) = self.calls.iter_mut().find(|c| c.id == stream) else {
            return Ok(());
        };
        if !call.responded {
            if head.is_informational() {
                return Ok(());
            }
            call.responded = true;
            if let Some(failure) = head.http_failure() {
                if !end_stream {
                    self.write
                        .frame(kind::RST_STREAM, 0, stream, &reason::CANCEL.to_be_bytes());
                }
                self.end(stream, failure);
                return Ok(());
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
        self.end(stream, head.status());
        Ok(())
    }

    /// The call on `stream`, if it is ours and open, ends with `end`.
    fn end(&mut self, stream: u32, end: CallEnd) {
        if let Some(index) = self.calls.iter().position(|c| c.id == stream) {
            self.calls.swap_remove(index);
            self.events.push_back(Event::Ended(CallId(stream), end));
        }
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

/// The frames in `bytes` (whole ones), as (kind, flags, stream, payload).
#[cfg(test)]
pub(super) fn frames_in(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = frame::decode(bytes) {
        frames.push((frame.kind, frame.flags, frame.stream, frame.payload.to_vec()));
        bytes = &bytes[frame.wire_len()..];
    }
    assert!(
        bytes.len() < frame::FRAME_HEADER,
        "{} bytes after the last frame",
        bytes.len()
    );
    frames
}

#[cfg(test)]
pub(super) mod tests;

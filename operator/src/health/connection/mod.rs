//! One prober's HTTP/2 connection: just enough of HTTP/2 (RFC 9113) and gRPC to make the
//! prober's three calls, `grpc.health.v1.Health` `Watch` and `Check` and ORCA's load-report
//! stream (`OpenRcaService/StreamCoreMetrics`), owned and driven by the prober itself.
//!
//! Why not h2 (through tonic or alone): the operator keeps one connection per endpoint, and an
//! h2 connection holds about 30 KiB that no setting shrinks (a 16 KiB write buffer, an 8 KiB
//! read buffer that reads walk through, a 4 KiB HPACK buffer, a stream slab) plus a task of its
//! own. At 5,000 endpoints that was 190 MiB of an operator whose own state is a few MiB. A
//! health call needs none of it: requests are a few hundred bytes, answers a few bytes, at most
//! three calls are open at once. Here a connection is a socket, two small buffers that grow only
//! for a frame that needs it and shrink back, and an HPACK decoder (see [`super::hpack`]) with
//! an empty dynamic table (we advertise SETTINGS_HEADER_TABLE_SIZE 0, so servers index nothing).
//!
//! What it speaks: the client preface and SETTINGS (push off, no dynamic table), requests as
//! HEADERS (HPACK literals, never indexed) and one DATA frame, responses as HEADERS,
//! CONTINUATION and DATA with padding and priority fields, trailers and trailers-only
//! responses, RST_STREAM, SETTINGS and PING acknowledgements, GOAWAY (calls the server will not
//! process end as refused), and flow control both ways: for what it receives (WINDOW_UPDATE as
//! received bytes are consumed), and for what it sends (the server's
//! SETTINGS_INITIAL_WINDOW_SIZE and WINDOW_UPDATEs: a request's DATA waits, bounded, until the
//! windows let it go). No call starts beyond the server's SETTINGS_MAX_CONCURRENT_STREAMS
//! ([`HealthConnection::call_room`]). It never sends a PING: gRPC servers police client PINGs
//! (see the prober).
//!
//! Bounded whatever the server sends: a frame's length is checked against
//! SETTINGS_MAX_FRAME_SIZE before any room is reserved for it (16 KiB and a header at most);
//! header blocks are at most 16 KiB and decode to at most 16 KiB of headers; a call's message
//! not yet taken is superseded by the next (at most one queued per call, and no frame is
//! processed while a few events wait); PINGs read together are acknowledged once; the
//! acknowledgements written for one read are no larger than it; and a server sending more than
//! a burst of 1,024 frames, then 256 a second, loses the connection ("a flood of frames").
//!
//! The parts, each tested on its own:
//! - `frame`: the frame codec, reading and writing HTTP/2 frames, and the read and write buffers
//!   with their bounds;
//! - `grpc`: gRPC's framing, requests' header blocks and length-prefixed messages, response
//!   messages decoded, headers and trailers turned into how a call ended;
//! - `state`: the connection's state without its transport: calls, what each frame does,
//!   flow control, what is owed the server, the events for the prober;
//! - `io`: [`HealthConnection`], driving the state over any `AsyncRead + AsyncWrite` transport.
//!
//! [`HealthConnection::next_event`] is cancel safe: the prober selects on it with its timers.

mod frame;
mod fuzz;
mod grpc;
mod io;
mod state;

pub use self::{
    frame::reason,
    fuzz::fuzz_server_bytes,
    grpc::{CallEnd, Message, Method, Scheme},
    io::{HealthConnection, Transport, open_tcp},
};

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

/// The connection cannot carry calls any more (or, [`ConnectionError::NoRoom`], a call
/// cannot start on it now).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("the server closed the connection")]
    Closed,
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2 protocol error from the server: {0}")]
    Protocol(&'static str),
    #[error("the server sent GOAWAY: no new calls on this connection")]
    GoingAway,
    /// Not an end of the connection: a call was not started because the server's
    /// SETTINGS_MAX_CONCURRENT_STREAMS leaves no room for it (see
    /// [`HealthConnection::call_room`]).
    #[error("no room for another call: the server's SETTINGS_MAX_CONCURRENT_STREAMS is reached")]
    NoRoom,
}

use std::time::Duration;

use kubegrpc_orca::OrcaLoadReportRequest;
use prost::Message as _;
use tonic::Code;
use tonic_health::pb::HealthCheckResponse;

use super::*;
use crate::health::connection::fuzz_server_bytes;

/// One frame as bytes.
fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    frame::encode(&mut bytes, kind, flags, stream, payload);
    bytes
}

/// A server's frames, as bytes: the answer HEADERS of `stream`, then `then`.
fn answered_then(stream: u32, then: impl IntoIterator<Item = Vec<u8>>) -> Vec<u8> {
    let mut bytes = frame_bytes(kind::HEADERS, flag::END_HEADERS, stream, &[0x88]);
    for more in then {
        bytes.extend(more);
    }
    bytes
}

/// `message` as gRPC frames it.
fn prefixed(message: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0];
    bytes.extend_from_slice(&(message.len() as u32).to_be_bytes());
    bytes.extend_from_slice(message);
    bytes
}

/// A `HealthCheckResponse` of `status` encoded in `length` bytes (5 or more): the status, then
/// an unknown field that decoders skip.
pub(in crate::health::connection) fn padded_health_response(status: u8, length: usize) -> Vec<u8> {
    let padding = length - 4;
    assert!(padding < 128, "one byte of varint length");
    let mut message = vec![0x08, status, (15 << 3) | 2, padding as u8];
    message.resize(length, 0);
    message
}

/// Feeds `bytes` to `state` in one read, taking events as they come; the events.
fn feed(state: &mut State, bytes: &[u8]) -> Vec<Event> {
    let mut read = ReadBuffer::default();
    read.extend(bytes);
    let mut events = Vec::new();
    loop {
        while let Some(event) = state.take_event() {
            events.push(event);
        }
        if !state.receive(&mut read).expect("the frames are valid") {
            return events;
        }
    }
}

/// What `state` has to write, as frames, the preface stripped; taken as written.
fn written_frames(state: &mut State) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let bytes = state.outgoing().to_vec();
    state.written(bytes.len());
    frames_in(bytes.strip_prefix(frame::PREFACE).unwrap_or(&bytes[..]))
}

#[test]
fn the_preface_and_our_settings_come_first_then_each_call_as_headers_and_one_data_frame() {
    let mut state = State::new(Scheme::Http, "10.250.0.7:8080");
    let watch = state.start(Method::Watch, "").unwrap();
    let reports = state.start_load_reports(Duration::from_secs(1)).unwrap();
    assert_eq!((watch, reports), (CallId(1), CallId(3)));
    assert!(state.outgoing().starts_with(frame::PREFACE));
    let request = |path: &[u8]| grpc::request_headers(Scheme::Http, path, b"10.250.0.7:8080");
    let report_request = OrcaLoadReportRequest {
        report_interval: Some(Duration::from_secs(1).into()),
        request_cost_names: Vec::new(),
    };
    // SETTINGS: HEADER_TABLE_SIZE 0, ENABLE_PUSH 0, MAX_CONCURRENT_STREAMS 0,
    // MAX_HEADER_LIST_SIZE 16,384.
    let settings = [
        0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 6, 0, 0, 0x40, 0,
    ];
    assert_eq!(
        written_frames(&mut state),
        [
            (kind::SETTINGS, 0, 0, settings.to_vec()),
            (kind::HEADERS, flag::END_HEADERS, 1, request(Method::Watch.path())),
            (kind::DATA, flag::END_STREAM, 1, vec![0, 0, 0, 0, 0]),
            (
                kind::HEADERS,
                flag::END_HEADERS,
                3,
                request(STREAM_CORE_METRICS_PATH.as_bytes())
            ),
            (kind::DATA, flag::END_STREAM, 3, grpc::request_message(&report_request)),
        ]
    );
    // Written once: the next call queues only its own frames.
    state.start(Method::Check, "echo").unwrap();
    let frames = written_frames(&mut state);
    assert_eq!(
        frames.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>(),
        [(kind::HEADERS, 5), (kind::DATA, 5)]
    );
}

#[test]
fn received_data_is_given_back_to_both_flow_control_windows_in_batches() {
    let mut state = State::new(Scheme::Http, "test");
    let watch = state.start(Method::Watch, "").unwrap();
    written_frames(&mut state);
    // 300 DATA frames of a 70-byte message: 21,000 bytes. The 235th frame brings the count to
    // 16,450 bytes, the first over a batch of 16,384: one WINDOW_UPDATE of 16,450 for the
    // connection and one for the stream; the other 4,550 bytes wait for the next batch.
    let message = prefixed(&padded_health_response(2, 65));
    let frames = (0..300).map(|_| frame_bytes(kind::DATA, 0, 1, &message));
    let mut trailers = Vec::new();
    hpack::encode_literal_new_name(&mut trailers, b"grpc-status", b"0");
    let mut script = answered_then(1, frames);
    script.extend(frame_bytes(
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        1,
        &trailers,
    ));

    let events = feed(&mut state, &script);
    assert_eq!(
        events,
        [
            Event::Message(watch, Message::Health(HealthCheckResponse { status: 2 })),
            Event::Ended(watch, CallEnd::Status(Code::Ok, String::new())),
        ]
    );
    let updates: Vec<(u32, u32)> = written_frames(&mut state)
        .into_iter()
        .map(|(kind, _, stream, payload)| {
            assert_eq!(kind, kind::WINDOW_UPDATE);
            (stream, u32::from_be_bytes(payload.try_into().unwrap()))
        })
        .collect();
    assert_eq!(updates, [(0, 16_450), (1, 16_450)]);
}

/// A SETTINGS frame of `(id, value)` pairs.
fn settings_frame(settings: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = settings
        .iter()
        .flat_map(|(id, value)| [&id.to_be_bytes()[..], &value.to_be_bytes()[..]].concat())
        .collect();
    frame_bytes(kind::SETTINGS, 0, 0, &payload)
}

fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame_bytes(kind::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

#[test]
fn a_request_waits_for_the_servers_send_windows_and_goes_in_the_parts_they_allow() {
    let mut state = State::new(Scheme::Http, "test");
    written_frames(&mut state);
    // A server that opens no stream window until it has seen the request's headers.
    assert_eq!(
        feed(&mut state, &settings_frame(&[(setting::INITIAL_WINDOW_SIZE, 0)])),
        []
    );
    assert_eq!(written_frames(&mut state), [(kind::SETTINGS, flag::ACK, 0, vec![])]);
    let check = state.start(Method::Check, "echo").unwrap();
    // HealthCheckRequest { service: "echo" }, length-prefixed: 11 bytes, held.
    let request = vec![0, 0, 0, 0, 6, 0x0a, 4, b'e', b'c', b'h', b'o'];
    let frames = written_frames(&mut state);
    assert_eq!(
        frames.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>(),
        [(kind::HEADERS, check.0)]
    );
    assert_eq!(state.held_request_bytes(), 11);
    // Driven again without a window: still nothing.
    assert_eq!(written_frames(&mut state), []);
    // 4 bytes of window: 4 bytes of the request, without END_STREAM.
    assert_eq!(feed(&mut state, &window_update(check.0, 4)), []);
    assert_eq!(
        written_frames(&mut state),
        [(kind::DATA, 0, check.0, request[..4].to_vec())]
    );
    // A WINDOW_UPDATE of another stream or of the connection alone lets nothing more go.
    assert_eq!(feed(&mut state, &window_update(99, 100)), []);
    assert_eq!(feed(&mut state, &window_update(0, 100)), []);
    assert_eq!(written_frames(&mut state), []);
    // The rest, with END_STREAM, once the stream's window has room for it.
    assert_eq!(feed(&mut state, &window_update(check.0, 100)), []);
    assert_eq!(
        written_frames(&mut state),
        [(kind::DATA, flag::END_STREAM, check.0, request[4..].to_vec())]
    );
    assert_eq!(state.held_request_bytes(), 0);

    // A window the server shrinks below zero (SETTINGS after the call started) holds the
    // request until WINDOW_UPDATEs bring it back above zero; then the SETTINGS that open it.
    let mut state = State::new(Scheme::Http, "test");
    feed(&mut state, &settings_frame(&[(setting::INITIAL_WINDOW_SIZE, 5)]));
    written_frames(&mut state);
    let watch = state.start(Method::Watch, "").unwrap();
    // The empty request (5 bytes) fits in the 5-byte window.
    assert_eq!(
        written_frames(&mut state).last(),
        Some(&(kind::DATA, flag::END_STREAM, watch.0, vec![0; 5]))
    );
    let check = state.start(Method::Check, "echo").unwrap();
    written_frames(&mut state);
    assert_eq!(state.held_request_bytes(), 11 - 5);
    feed(&mut state, &settings_frame(&[(setting::INITIAL_WINDOW_SIZE, 0)]));
    feed(&mut state, &window_update(check.0, 3));
    assert_eq!(written_frames(&mut state), [(kind::SETTINGS, flag::ACK, 0, vec![])]);
    feed(&mut state, &settings_frame(&[(setting::INITIAL_WINDOW_SIZE, 65_535)]));
    assert_eq!(
        written_frames(&mut state),
        [
            (kind::DATA, flag::END_STREAM, check.0, request[5..].to_vec()),
            (kind::SETTINGS, flag::ACK, 0, vec![]),
        ]
    );
}

#[test]
fn windows_beyond_the_protocols_bounds_are_errors_of_the_connection_or_the_call() {
    let mut state = State::new(Scheme::Http, "test");
    let check = state.start(Method::Check, "").unwrap();
    written_frames(&mut state);
    // A stream's window over 2^31-1: that call ends, the connection goes on.
    let events = feed(&mut state, &window_update(check.0, 0x7fff_ffff));
    assert_eq!(
        events,
        [Event::Ended(
            check,
            CallEnd::Malformed("a stream's send window over 2^31-1")
        )]
    );
    assert_eq!(
        written_frames(&mut state),
        [(
            kind::RST_STREAM,
            0,
            check.0,
            reason::FLOW_CONTROL_ERROR.to_be_bytes().to_vec()
        )]
    );
    for (bytes, why) in [
        (
            window_update(0, 0x7fff_ffff),
            "the connection's send window over 2^31-1",
        ),
        (window_update(0, 0), "a WINDOW_UPDATE of 0"),
        (
            frame_bytes(kind::WINDOW_UPDATE, 0, 0, &[0, 1]),
            "WINDOW_UPDATE of the wrong size",
        ),
        (
            settings_frame(&[(setting::INITIAL_WINDOW_SIZE, 0x8000_0000)]),
            "SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1",
        ),
    ] {
        let (_, error) = fuzz_server_bytes(&bytes);
        assert!(
            matches!(error, Some(ConnectionError::Protocol(said)) if said == why),
            "{why}: {error:?}"
        );
    }
}

#[test]
fn no_call_starts_beyond_the_servers_max_concurrent_streams() {
    let mut state = State::new(Scheme::Http, "test");
    // Before the server's SETTINGS: our own bound only.
    assert_eq!(state.call_room(), MAX_CALLS);
    feed(&mut state, &settings_frame(&[(setting::MAX_CONCURRENT_STREAMS, 2)]));
    assert_eq!(state.call_room(), 2);
    let watch = state.start(Method::Watch, "").unwrap();
    let reports = state.start_load_reports(Duration::from_secs(1)).unwrap();
    assert_eq!(state.call_room(), 0);
    written_frames(&mut state);
    assert!(matches!(state.start(Method::Check, ""), Err(ConnectionError::NoRoom)));
    assert_eq!(written_frames(&mut state), [], "nothing sent for it");
    // A call counts until its end arrives.
    let mut trailers = vec![0x88];
    hpack::encode_literal_new_name(&mut trailers, b"grpc-status", b"12");
    let events = feed(
        &mut state,
        &frame_bytes(
            kind::HEADERS,
            flag::END_HEADERS | flag::END_STREAM,
            reports.0,
            &trailers,
        ),
    );
    assert_eq!(
        events,
        [Event::Ended(
            reports,
            CallEnd::Status(Code::Unimplemented, String::new())
        )]
    );
    assert_eq!(state.call_room(), 1);
    let check = state.start(Method::Check, "").unwrap();
    // Cancelling a call frees its room at once, tells the server, and drops its events.
    let serving = prefixed(&HealthCheckResponse { status: 1 }.encode_to_vec());
    let mut read = ReadBuffer::default();
    read.extend(&answered_then(watch.0, [frame_bytes(kind::DATA, 0, watch.0, &serving)]));
    assert!(state.receive(&mut read).unwrap());
    written_frames(&mut state);
    state.cancel(watch);
    assert_eq!(state.take_event(), None, "the cancelled call's message is dropped");
    assert_eq!(state.call_room(), 1);
    assert_eq!(
        written_frames(&mut state),
        [(kind::RST_STREAM, 0, watch.0, reason::CANCEL.to_be_bytes().to_vec())]
    );
    state.cancel(watch);
    assert_eq!(written_frames(&mut state), [], "cancelled once");
    // A server lowering its limit below the calls open: those go on, no new one starts.
    feed(&mut state, &settings_frame(&[(setting::MAX_CONCURRENT_STREAMS, 0)]));
    assert_eq!(state.call_room(), 0);
    assert!(matches!(state.start(Method::Watch, ""), Err(ConnectionError::NoRoom)));
    let _ = check;
}

#[test]
fn pings_read_together_are_acknowledged_once_with_the_last_and_settings_each() {
    let mut state = State::new(Scheme::Http, "test");
    written_frames(&mut state);
    let mut script = frame_bytes(kind::SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
    for ping in [b"11111111", b"22222222", b"33333333"] {
        script.extend(frame_bytes(kind::PING, 0, 0, ping));
    }
    // An acknowledgement of ours is not acknowledged back.
    script.extend(frame_bytes(kind::PING, flag::ACK, 0, b"44444444"));
    script.extend(frame_bytes(kind::SETTINGS, flag::ACK, 0, &[]));
    assert_eq!(feed(&mut state, &script), []);
    assert_eq!(
        written_frames(&mut state),
        [
            (kind::SETTINGS, flag::ACK, 0, vec![]),
            (kind::PING, flag::ACK, 0, b"33333333".to_vec()),
        ]
    );
}

#[test]
fn an_answer_before_a_protocol_error_comes_first_then_the_error() {
    let serving = prefixed(&HealthCheckResponse { status: 1 }.encode_to_vec());
    let bytes = answered_then(
        1,
        [
            frame_bytes(kind::DATA, 0, 1, &serving),
            frame_bytes(kind::PUSH_PROMISE, flag::END_HEADERS, 1, &[0, 0, 0, 2]),
        ],
    );
    let (events, error) = fuzz_server_bytes(&bytes);
    assert_eq!(
        events,
        [Event::Message(
            CallId(1),
            Message::Health(HealthCheckResponse { status: 1 })
        )]
    );
    assert!(
        matches!(
            error,
            Some(ConnectionError::Protocol("PUSH_PROMISE with push disabled"))
        ),
        "{error:?}"
    );
}

#[test]
fn a_flood_of_control_frames_ends_the_connection() {
    let pings = (0..5_000u64).map(|i| frame_bytes(kind::PING, 0, 0, &i.to_be_bytes()));
    let (_, error) = fuzz_server_bytes(&pings.collect::<Vec<_>>().concat());
    assert!(
        matches!(error, Some(ConnectionError::Protocol("a flood of frames"))),
        "{error:?}"
    );
    for kind in [kind::SETTINGS, kind::WINDOW_UPDATE, kind::RST_STREAM] {
        let payload: &[u8] = if kind == kind::SETTINGS { &[] } else { &[0, 0, 0, 1] };
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
            .flat_map(|i: u64| frame_bytes(kind::PING, 0, 0, &i.to_be_bytes()))
            .collect::<Vec<_>>(),
    );
    assert!(error.is_none(), "{error:?}");
}

#[test]
fn messages_packed_by_the_thousand_into_data_frames_end_the_connection() {
    // What a hostile Watch can send as fast as flow control allows: 3,276 empty messages
    // (5 bytes each) to a 16 KiB DATA frame. Each message costs a token as a frame does.
    let packed = [0u8; 5 * 3_276];
    let (events, error) = fuzz_server_bytes(&answered_then(1, [frame_bytes(kind::DATA, 0, 1, &packed)]));
    assert!(
        matches!(error, Some(ConnectionError::Protocol("a flood of messages"))),
        "{error:?}"
    );
    // What came before the flood is still told, superseded into one event.
    assert_eq!(
        events,
        [Event::Message(
            CallId(1),
            Message::Health(HealthCheckResponse { status: 0 })
        )]
    );
    // Hundreds packed are within the budget, superseded into one event per call.
    let hundreds = prefixed(&HealthCheckResponse { status: 1 }.encode_to_vec()).repeat(500);
    let (events, error) = fuzz_server_bytes(&answered_then(1, [frame_bytes(kind::DATA, 0, 1, &hundreds)]));
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        events,
        [Event::Message(
            CallId(1),
            Message::Health(HealthCheckResponse { status: 1 })
        )]
    );
}

#[test]
fn bytes_of_another_protocol_end_the_connection_with_its_name() {
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

use std::{net::SocketAddr, time::Duration};

use futures::FutureExt as _;
use kubegrpc_orca::OrcaLoadReport;
use prost::Message as _;
use tokio::io::DuplexStream;
use tokio_util::task::AbortOnDropHandle;
use tonic::Code;
use tonic_health::{ServingStatus, pb::HealthCheckResponse, server::HealthReporter};

use super::*;
use crate::health::{
    connection::{
        CallEnd, GoAway, Message,
        frame::{FRAME_HEADER, MAX_FRAME_SIZE, PREFACE, SMALL_BUFFER, flag, kind},
        grpc, reason,
        state::{frames_in, tests::padded_health_response},
    },
    hpack,
};

/// Drives `connection` once, as far as it goes without waiting: what it queued is written, what
/// it received is read and processed. Outside tokio's cooperative budget, so that a test that
/// did a lot before cannot see it pause.
fn drive(connection: &mut HealthConnection) -> Option<Result<Event, ConnectionError>> {
    tokio::task::unconstrained(connection.next_event()).now_or_never()
}

/// What the server end can read now, without waiting.
fn readable_now(server: &mut DuplexStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    while let Some(read) = tokio::task::unconstrained(server.read_buf(&mut bytes)).now_or_never() {
        assert_ne!(read.unwrap(), 0, "the client closed");
    }
    bytes
}

/// One frame as bytes.
fn frame_bytes(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    super::super::frame::encode(&mut bytes, kind, flags, stream, payload);
    bytes
}

#[tokio::test]
async fn nothing_is_written_until_the_connection_is_driven_then_all_that_was_queued() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let mut connection = HealthConnection::handshake(client, Scheme::Http, "10.250.0.7:8080");
    let watch = connection.start(Method::Watch, "").unwrap();
    let check = connection.start(Method::Check, "echo").unwrap();
    assert_eq!(readable_now(&mut server), [0u8; 0], "starting calls writes nothing");

    assert!(drive(&mut connection).is_none(), "the server said nothing");
    let wire = readable_now(&mut server);
    let frames = frames_in(wire.strip_prefix(PREFACE).expect("the preface first"));
    let headers = |method: Method| grpc::request_headers(Scheme::Http, method.path(), b"10.250.0.7:8080");
    let settings = [
        0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 6, 0, 0, 0x40, 0,
    ];
    assert_eq!(
        frames,
        [
            (kind::SETTINGS, 0, 0, settings.to_vec()),
            (kind::HEADERS, flag::END_HEADERS, watch.0, headers(Method::Watch)),
            (kind::DATA, flag::END_STREAM, watch.0, vec![0, 0, 0, 0, 0]),
            (kind::HEADERS, flag::END_HEADERS, check.0, headers(Method::Check)),
            // HealthCheckRequest { service: "echo" }, length-prefixed.
            (
                kind::DATA,
                flag::END_STREAM,
                check.0,
                vec![0, 0, 0, 0, 6, 0x0a, 4, b'e', b'c', b'h', b'o']
            ),
        ]
    );
    // Driven again with nothing queued: nothing more.
    assert!(drive(&mut connection).is_none());
    assert_eq!(readable_now(&mut server), [0u8; 0]);
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
    assert!(connection.state.write_capacity() <= 2 * SMALL_BUFFER);
}

/// Reads frames from the client until one of `kind` with `flags` arrives; its payload.
async fn read_until(socket: &mut DuplexStream, buffer: &mut Vec<u8>, kind: u8, flags: u8) -> Vec<u8> {
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
    let (client, mut socket) = tokio::io::duplex(1 << 16);
    let mut connection = HealthConnection::handshake(client, Scheme::Http, "test");
    let first = connection.start(Method::Watch, "").unwrap();
    let second = connection.start(Method::Check, "").unwrap();
    let third = connection.start(Method::Check, "").unwrap();
    assert!(drive(&mut connection).is_none());

    let mut received = Vec::new();
    let mut preface = [0u8; PREFACE.len()];
    socket.read_exact(&mut preface).await.unwrap();
    assert_eq!(preface, PREFACE);

    let mut script = frame_bytes(kind::SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]);
    script.extend(frame_bytes(kind::PING, 0, 0, b"12345678"));
    // The first call: headers split over HEADERS (padded, with priority) and CONTINUATION,
    // one message in a padded DATA frame, then trailers with a percent-encoded message.
    let mut headers = vec![0x88]; // :status 200 (static table 8)
    hpack::encode_literal(&mut headers, 31, b"application/grpc");
    let mut padded_headers = vec![3, 0, 0, 0, 0, 16];
    padded_headers.extend_from_slice(&headers[..2]);
    padded_headers.extend_from_slice(&[0, 0, 0]);
    script.extend(frame_bytes(
        kind::HEADERS,
        flag::PADDED | flag::PRIORITY,
        first.0,
        &padded_headers,
    ));
    script.extend(frame_bytes(
        kind::CONTINUATION,
        flag::END_HEADERS,
        first.0,
        &headers[2..],
    ));
    let serving = HealthCheckResponse { status: 1 }.encode_to_vec();
    let mut data = vec![4, 0, 0, 0, 0, serving.len() as u8];
    data.extend_from_slice(&serving);
    data.extend_from_slice(&[0; 4]);
    script.extend(frame_bytes(kind::DATA, flag::PADDED, first.0, &data));
    let mut trailers = Vec::new();
    hpack::encode_literal_new_name(&mut trailers, b"grpc-status", b"14");
    hpack::encode_literal_new_name(&mut trailers, b"grpc-message", b"going%20away");
    script.extend(frame_bytes(
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        first.0,
        &trailers,
    ));
    // The second: a trailers-only answer. The third: never processed (GOAWAY names the second).
    let mut trailers_only = vec![0x88];
    hpack::encode_literal_new_name(&mut trailers_only, b"grpc-status", b"12");
    script.extend(frame_bytes(
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        second.0,
        &trailers_only,
    ));
    script.extend(frame_bytes(kind::GOAWAY, 0, 0, &[0, 0, 0, second.0 as u8, 0, 0, 0, 0]));
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
    read_until(&mut socket, &mut received, kind::SETTINGS, flag::ACK).await;
    let pong = read_until(&mut socket, &mut received, kind::PING, flag::ACK).await;
    assert_eq!(pong, b"12345678");

    // A frame over the maximum size ends the connection with a protocol error.
    socket
        .write_all(&frame_bytes(kind::DATA, 0, 1, &vec![0; MAX_FRAME_SIZE + 1]))
        .await
        .unwrap();
    let error = tokio::time::timeout(Duration::from_secs(5), connection.next_event()).await;
    assert!(
        matches!(
            error,
            Ok(Err(ConnectionError::Protocol(
                "a frame larger than SETTINGS_MAX_FRAME_SIZE"
            )))
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn received_data_is_given_back_to_both_flow_control_windows() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let mut connection = HealthConnection::handshake(client, Scheme::Http, "test");
    let watch = connection.start(Method::Watch, "").unwrap();

    // 300 messages of 70 bytes each, one to a frame: 21,000 bytes, more than one batch of 16 KiB.
    let mut script = frame_bytes(kind::HEADERS, flag::END_HEADERS, watch.0, &[0x88]);
    let message = padded_health_response(2, 65);
    for _ in 0..300 {
        let mut data = vec![0, 0, 0, 0, message.len() as u8];
        data.extend_from_slice(&message);
        script.extend(frame_bytes(kind::DATA, 0, watch.0, &data));
    }
    let mut trailers = Vec::new();
    hpack::encode_literal_new_name(&mut trailers, b"grpc-status", b"0");
    script.extend(frame_bytes(
        kind::HEADERS,
        flag::END_HEADERS | flag::END_STREAM,
        watch.0,
        &trailers,
    ));
    server.write_all(&script).await.unwrap();
    // Messages not yet taken are superseded by later ones: at most 300 events, at least one.
    let mut messages = 0;
    loop {
        match next(&mut connection).await {
            Event::Message(c, _) if c == watch => messages += 1,
            Event::Ended(c, _) if c == watch => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((1..=300).contains(&messages), "{messages}");

    // Driven once more, the connection has written all it owes. The 235th frame brought the
    // count to 16,450 bytes, the first over a batch: one WINDOW_UPDATE for the connection and
    // one for the stream, of that; the other 4,550 bytes wait for the next batch.
    assert!(drive(&mut connection).is_none());
    let wire = readable_now(&mut server);
    let updates: Vec<(u32, u32)> = frames_in(wire.strip_prefix(PREFACE).expect("the preface first"))
        .into_iter()
        .filter(|(kind, ..)| *kind == kind::WINDOW_UPDATE)
        .map(|(_, _, stream, payload)| (stream, u32::from_be_bytes(payload.try_into().unwrap())))
        .collect();
    assert_eq!(updates, [(0, 16_450), (watch.0, 16_450)]);
}

#[tokio::test]
async fn a_huge_frame_header_is_refused_without_reserving_its_length() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let mut connection = HealthConnection::handshake(client, Scheme::Http, "test");
    // Three bytes of a 16 MiB length first, the rest of the header later.
    server.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
    assert!(drive(&mut connection).is_none(), "no event from part of a header");
    assert_eq!(connection.read.bytes(), [0xff, 0xff, 0xff], "what was sent was read");
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
}

#[tokio::test]
async fn an_answer_is_told_when_the_server_closed_right_after_it_and_our_writes_fail() {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let mut connection = HealthConnection::handshake(client, Scheme::Http, "test");
    let watch = connection.start(Method::Watch, "").unwrap();
    // The server's SETTINGS (owed an acknowledgement), its answer, and the close, all before
    // the client wrote a byte: every write of the client fails.
    let mut bytes = frame_bytes(kind::SETTINGS, 0, 0, &[]);
    bytes.extend(frame_bytes(kind::HEADERS, flag::END_HEADERS, watch.0, &[0x88]));
    bytes.extend(frame_bytes(kind::DATA, 0, watch.0, &[0, 0, 0, 0, 2, 0x08, 1]));
    server.write_all(&bytes).await.unwrap();
    drop(server);
    assert_eq!(
        next(&mut connection).await,
        Event::Message(watch, Message::Health(HealthCheckResponse { status: 1 }))
    );
    let end = tokio::time::timeout(Duration::from_secs(5), connection.next_event())
        .await
        .expect("the end within 5 s");
    assert!(matches!(end, Err(ConnectionError::Closed)), "{end:?}");
}

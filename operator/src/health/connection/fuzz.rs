//! The connection's fuzzing entry: its state fed a server's bytes without a transport.

use super::{
    ConnectionError, Event,
    frame::{FRAME_HEADER, MAX_FRAME_SIZE, ReadBuffer},
    grpc::{Method, Scheme},
    state::{MAX_QUEUED_EVENTS, State},
};

/// Fuzzing entry (not an API): a connection with a `Watch`, a `Check` and a load-report stream
/// open is fed `bytes` as the server's, in reads of at most what the connection would ask its
/// socket for, its events drained between reads and its writes dropped as if flushed. Returns
/// the events in order, then the error that ended the connection, if any. Panics if a bound on
/// the connection's memory does not hold (queued events, read and write buffers).
#[doc(hidden)]
pub fn fuzz_server_bytes(bytes: &[u8]) -> (Vec<Event>, Option<ConnectionError>) {
    let mut state = State::new(Scheme::Http, "fuzz");
    let mut read = ReadBuffer::default();
    let calls = [
        state.start(Method::Watch, ""),
        state.start(Method::Check, ""),
        state.start_load_reports(std::time::Duration::from_secs(1)),
    ];
    assert!(calls.iter().all(Result::is_ok));
    let mut events = Vec::new();
    let mut rest = bytes;
    loop {
        // As `HealthConnection::next_event`: take events, process what was read, else read more.
        loop {
            assert!(
                state.queued_events() <= MAX_QUEUED_EVENTS + 4,
                "{} events queued",
                state.queued_events()
            );
            if let Some(event) = state.take_event() {
                events.push(event);
                continue;
            }
            if let Some(error) = state.take_failure() {
                return (events, Some(error));
            }
            let written = state.outgoing().len();
            assert!(
                written <= 4 * (FRAME_HEADER + MAX_FRAME_SIZE),
                "{written} bytes to write"
            );
            state.written(written);
            match state.receive(&mut read) {
                Ok(true) => {}
                Ok(false) => break,
                Err(error) => return (events, Some(error)),
            }
        }
        if rest.is_empty() {
            return (events, None);
        }
        let room = read.room();
        assert!(room <= FRAME_HEADER + MAX_FRAME_SIZE, "asked for {room} bytes");
        let (now, later) = rest.split_at(room.min(rest.len()));
        read.extend(now);
        assert!(read.bytes().len() <= 2 * (FRAME_HEADER + MAX_FRAME_SIZE));
        rest = later;
    }
}

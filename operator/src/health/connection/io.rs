//! Driving a connection over its transport: any `AsyncRead + AsyncWrite` stream (a TCP socket,
//! an in-memory stream in tests and fuzzing). Nothing is written until the connection is
//! driven ([`HealthConnection::next_event`]): calls started in a row go out in one write.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

use super::{
    CallId, ConnectionError, Event,
    frame::ReadBuffer,
    grpc::{Method, Scheme},
    state::State,
};

/// What a connection runs over: a TCP stream, or any in-memory stream in tests and fuzzing.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Transport for T {}

/// A client connection for health calls; see the module docs of [`super`].
pub struct HealthConnection {
    io: Box<dyn Transport>,
    /// Received bytes not yet processed (at most a partial frame between reads).
    read: ReadBuffer,
    state: State,
    /// A write failed: the server may have closed the connection right after its last frames
    /// (an answer, then a close), which are still read and told; nothing more is written.
    write_failed: bool,
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
        let io = open_tcp(target, source).await?;
        Ok(Self::handshake(io, Scheme::Http, &target.to_string()))
    }

    /// A connection over `io` (already open, and its TLS handshake done when `scheme` is
    /// `https`), with `authority` as every request's `:authority`: queues the HTTP/2 preface and
    /// our SETTINGS, sent with the first call.
    pub fn handshake(io: impl Transport + 'static, scheme: Scheme, authority: &str) -> Self {
        Self {
            io: Box::new(io),
            read: ReadBuffer::default(),
            state: State::new(scheme, authority),
            write_failed: false,
        }
    }

    /// Starts a call of `method` for `service`; its answers come as [`Event`]s.
    pub fn start(&mut self, method: Method, service: &str) -> Result<CallId, ConnectionError> {
        self.state.start(method, service)
    }

    /// Opens ORCA's out-of-band load-report stream, asking for a report every `interval`;
    /// the reports come as [`super::Message::LoadReport`]s.
    pub fn start_load_reports(&mut self, interval: std::time::Duration) -> Result<CallId, ConnectionError> {
        self.state.start_load_reports(interval)
    }

    /// How many more calls may start now, within the server's SETTINGS_MAX_CONCURRENT_STREAMS
    /// (unlimited until its SETTINGS arrive) and our own bound of three. A call started
    /// without room is refused with [`ConnectionError::NoRoom`].
    pub fn call_room(&self) -> usize {
        self.state.call_room()
    }

    /// Ends `call` from our side (RST_STREAM CANCEL, written when the connection is next
    /// driven), freeing its room; it gets no further event.
    pub fn cancel(&mut self, call: CallId) {
        self.state.cancel(call);
    }

    /// Sends what is queued and returns the server's next [`Event`]. Cancel safe.
    pub async fn next_event(&mut self) -> Result<Event, ConnectionError> {
        loop {
            // Written before an event is taken, so that a cancelled write loses no event.
            if !self.write_failed && !self.state.has_failed() && self.flush().await.is_err() {
                // What the server sent before it closed still counts: read on, until the
                // read side ends too.
                self.write_failed = true;
            }
            if let Some(event) = self.state.take_event() {
                return Ok(event);
            }
            if let Some(error) = self.state.take_failure() {
                return Err(error);
            }
            if self.state.receive(&mut self.read)? {
                continue;
            }
            self.read_more().await?;
        }
    }

    /// Writes the queued bytes; cancel safe (what was written is removed from the queue).
    async fn flush(&mut self) -> io::Result<()> {
        loop {
            let pending = self.state.outgoing();
            if pending.is_empty() {
                return Ok(());
            }
            let written = self.io.write(pending).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.state.written(written);
        }
    }

    /// Reads more bytes, with room for the rest of the frame being received; cancel safe.
    async fn read_more(&mut self) -> Result<(), ConnectionError> {
        if self.io.read_buf(self.read.for_read()).await? == 0 {
            return Err(ConnectionError::Closed);
        }
        Ok(())
    }
}

/// A TCP connection to `target` from `source` (any port) when it is of `target`'s address
/// family, with Nagle off (requests are single small writes).
pub async fn open_tcp(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
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
    Ok(io)
}

#[cfg(test)]
mod tests;

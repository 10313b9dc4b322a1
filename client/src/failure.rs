//! What a failed request says about its endpoint, from the error's kind (never its text).
//!
//! Only evidence against the endpoint may lead to an ejection: it could not be connected to,
//! or the connection failed with the request on it. Routine connection rotation (GOAWAY from
//! `MaxConnectionAge` or a graceful shutdown, REFUSED_STREAM, a connection closed before the
//! request could be sent) is the server managing its connections, and the caller's own
//! outcomes (its per-request timeout, a request body that failed because the caller cancelled
//! or broke its stream) say nothing about the endpoint. grpc-go's outlier detection counts
//! every non-OK call, the caller's deadlines included, so a slow client can eject healthy
//! backends there; this crate does not.

use std::error::Error as StdError;

/// How a request failed, as far as the endpoint is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The caller's per-request timeout (the endpoint settings' `timeout`) expired. The
    /// request may have run; neither evidence nor retried.
    Deadline,
    /// The request's own body failed (the caller cancelled or broke its request stream).
    Caller,
    /// The server was rotating the connection: GOAWAY, REFUSED_STREAM, or the connection
    /// closed before the request was sent. Nothing reached the application.
    Rotation,
    /// No connection could be made: refused, timed out, unreachable. Nothing was sent.
    Connect,
    /// The connection failed with the request on it (reset, closed mid-request).
    Transport,
    /// Like `Transport`, on a connection whose server had sent GOAWAY: the server is rotating
    /// it (its grace period may have ended with the request on it). No evidence; whether the
    /// request was processed is unknown.
    Drained,
}

impl Failure {
    /// Whether this counts toward ejecting the endpoint.
    pub fn is_evidence(self) -> bool {
        matches!(self, Failure::Connect | Failure::Transport)
    }

    /// Whether the request certainly never reached the application, so that it may be sent
    /// again even though the transport read its body.
    pub fn never_processed(self) -> bool {
        matches!(self, Failure::Rotation | Failure::Connect)
    }
}

/// Classifies an error from a tonic connection by walking its sources.
pub fn classify(error: &(dyn StdError + 'static)) -> Failure {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return Failure::Deadline;
        }
        if error.is::<tonic::ConnectError>() {
            return Failure::Connect;
        }
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            // A stream the server refused, or cut off by its GOAWAY that did not include it,
            // was never processed (RFC 9113 8.7).
            if h2.is_remote() && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM)) {
                return Failure::Rotation;
            }
            // A stream reset on this side, not by h2 itself: the request body failed (the
            // caller's stream broke or was cancelled).
            if h2.is_reset() && !h2.is_remote() && !h2.is_library() {
                return Failure::Caller;
            }
        }
        if let Some(hyper) = error.downcast_ref::<hyper::Error>() {
            if hyper.is_canceled() {
                return Failure::Rotation;
            }
            if hyper.is_user() || hyper.is_body_write_aborted() {
                return Failure::Caller;
            }
        }
        source = error.source();
    }
    Failure::Transport
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;

    use super::*;

    fn request() -> http::Request<tonic::body::Body> {
        http::Request::post("/kubegrpc.Test/Call")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(tonic::body::Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        let error = channel.oneshot(request()).await.unwrap_err();
        let failure = classify(&error);
        assert_eq!(failure, Failure::Connect, "{error:?}");
        assert!(failure.is_evidence() && failure.never_processed());
    }

    #[tokio::test]
    async fn the_per_request_timeout_is_the_callers_deadline() {
        // A listener that accepts and never answers: the request times out.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let _accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .timeout(Duration::from_millis(100))
            .connect_lazy();
        let error = channel.oneshot(request()).await.unwrap_err();
        let failure = classify(&error);
        assert_eq!(failure, Failure::Deadline, "{error:?}");
        assert!(!failure.is_evidence() && !failure.never_processed());
    }

    #[tokio::test]
    async fn a_connection_reset_with_the_request_on_it_is_a_transport_failure() {
        // A listener that accepts, reads the request, then resets the connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let _resetting = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buffer = [0u8; 1024];
                let _ = socket.read(&mut buffer).await;
                // SO_LINGER 0 makes the close a reset; blocking on drop does not apply to it.
                #[allow(deprecated)]
                let _ = socket.set_linger(Some(Duration::ZERO));
                drop(socket);
            }
        });
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .unwrap()
            .connect_lazy();
        let error = channel.oneshot(request()).await.unwrap_err();
        let failure = classify(&error);
        assert_eq!(failure, Failure::Transport, "{error:?}");
        assert!(failure.is_evidence() && !failure.never_processed());
    }

    #[test]
    fn an_error_h2_raised_itself_is_evidence() {
        // h2's own errors (a protocol error noticed here) are not the caller's doing.
        let library = h2::Error::from(h2::Reason::PROTOCOL_ERROR);
        assert_eq!(classify(&library), Failure::Transport);
    }
}

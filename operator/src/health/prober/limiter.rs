//! Connect turns: how many probe connections the operator opens at once.

use std::{sync::Arc, time::Duration};

use tokio::{sync::OwnedSemaphorePermit, time::Instant};

/// At most this many probe connections of new or healthy endpoints are being opened at once,
/// operator-wide: a restart or a new leader opens one per endpoint, and thousands of handshakes
/// at once would time out probes of healthy endpoints (a false flap that every client sees).
/// Waiting for a turn does not count against the probe timeout.
///
/// Endpoints retrying after a failure take their turns from a separate, smaller limiter
/// ([`MAX_CONCURRENT_RETRIES`]), so that however many endpoints are silent or drop SYNs, they
/// never hold the turns a new or healthy endpoint needs: a new endpoint's first probe starts
/// within one probe timeout whatever failing endpoints do. And a turn is given back once the
/// connection answered, failed, or after [`MAX_TURN`], whichever comes first, so that silent
/// new endpoints pace the others by at most that much each.
pub const MAX_CONCURRENT_CONNECTS: usize = 64;

/// Turns for endpoints retrying after a failure (see [`MAX_CONCURRENT_CONNECTS`]).
pub const MAX_CONCURRENT_RETRIES: usize = 16;

/// The longest a connection attempt holds its turn (less when the probe timeout is shorter).
pub const MAX_TURN: Duration = Duration::from_millis(250);

/// Limits how many probe connections are being opened at once (see
/// [`MAX_CONCURRENT_CONNECTS`]); shared by every prober of an operator.
pub type ConnectLimiter = Arc<tokio::sync::Semaphore>;

/// A limiter of [`MAX_CONCURRENT_CONNECTS`].
pub fn connect_limiter() -> ConnectLimiter {
    Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_CONNECTS))
}

/// A limiter of [`MAX_CONCURRENT_RETRIES`].
pub fn retry_limiter() -> ConnectLimiter {
    Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_RETRIES))
}

/// A turn held by a connection attempt: given back when dropped, which the prober does once
/// the connection answered or failed, or at [`Turn::until`].
#[derive(Debug)]
pub(super) struct Turn {
    _permit: OwnedSemaphorePermit,
    until: Instant,
}

impl Turn {
    /// A turn taken now by an attempt whose probe `timeout` is given.
    pub(super) fn new(permit: OwnedSemaphorePermit, timeout: Duration) -> Self {
        Self {
            _permit: permit,
            until: Instant::now() + MAX_TURN.min(timeout),
        }
    }

    /// When the turn must be given back at the latest.
    pub(super) fn until(&self) -> Instant {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_turn_lasts_at_most_max_turn_and_is_given_back_when_dropped() {
        let limiter = retry_limiter();
        let turn = Turn::new(limiter.clone().acquire_owned().await.unwrap(), Duration::from_secs(5));
        assert_eq!(turn.until(), Instant::now() + MAX_TURN);
        let short = Turn::new(
            limiter.clone().acquire_owned().await.unwrap(),
            Duration::from_millis(100),
        );
        assert_eq!(short.until(), Instant::now() + Duration::from_millis(100));
        assert_eq!(limiter.available_permits(), MAX_CONCURRENT_RETRIES - 2);
        drop((turn, short));
        assert_eq!(limiter.available_permits(), MAX_CONCURRENT_RETRIES);
    }
}

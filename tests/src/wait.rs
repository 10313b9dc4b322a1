//! Waiting on conditions with a deadline, never sleeping and hoping.

use std::{future::Future, time::Duration};

use anyhow::{Result, bail};
use tokio::time::Instant;

/// How often [`until`] looks again.
const POLL: Duration = Duration::from_millis(50);

/// Calls `check` until it returns `Some`, failing with `what` and the last observation if
/// `deadline` passes first.
pub async fn until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let give_up = Instant::now() + deadline;
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition not met".to_string(),
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= give_up {
            bail!("timed out after {deadline:?} waiting for {what} (last: {last})");
        }
        tokio::time::sleep(POLL).await;
    }
}

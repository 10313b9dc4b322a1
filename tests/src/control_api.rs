//! The small HTTP control API of the client peers (`xds-client-go`, `xds-client-java`,
//! `kuberesolver-client-go`): each prints `control listening on IP:PORT` once it listens, and
//! answers `GET /counts`, `POST /reset`, `GET /last` (and peer-specific paths) with JSON.

use std::{net::SocketAddr, path::Path, process::Command, time::Duration};

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::ManagedProcess;

/// Starts a client peer as `name` (logging to `log`) and waits up to `deadline` for the address
/// of its control API.
pub async fn start_client_peer(
    name: &str,
    command: Command,
    log: &Path,
    deadline: Duration,
) -> Result<(ManagedProcess, SocketAddr)> {
    let _ = std::fs::remove_file(log);
    let process = ManagedProcess::start(name.to_string(), command, log)?;
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(control) = text
            .lines()
            .find_map(|l| l.strip_prefix("control listening on "))
            .and_then(|a| a.trim().parse().ok())
        {
            return Ok((process, control));
        }
        if let Some(status) = process.try_exit_status() {
            bail!("the {name} exited ({status}): {}", process.log_tail(20));
        }
        if tokio::time::Instant::now() > give_up {
            bail!(
                "the {name}'s control API did not start within {deadline:?}: {}",
                process.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `method path` on the control API at `control`, its JSON answer decoded.
pub async fn call<T: DeserializeOwned>(control: SocketAddr, method: &str, path: &str) -> Result<T> {
    let body = request(control, method, path).await?;
    serde_json::from_slice(&body).with_context(|| format!("{method} {path} of the control API at {control}"))
}

async fn request(control: SocketAddr, method: &str, path: &str) -> Result<Vec<u8>> {
    let mut stream = tokio::net::TcpStream::connect(control).await?;
    stream
        // HTTP/1.0: the answer is not chunked and the connection closes after it.
        .write_all(format!("{method} {path} HTTP/1.0\r\nHost: control\r\nContent-Length: 0\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    let head = String::from_utf8_lossy(&response[..split]);
    if head.split_whitespace().nth(1).is_none_or(|code| code != "200") {
        bail!("{method} {path}: {head}");
    }
    Ok(response[split + 4..].to_vec())
}

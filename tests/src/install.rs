//! Installing kubegrpc from `deploy/` on a test control plane, and running the operator binary
//! the way a Deployment would: under its ServiceAccount's identity.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context, Result};

use crate::{ControlPlane, backends::built_binary, controlplane::repository_root, process::ManagedProcess};

/// The operator's namespace and ServiceAccount in `deploy/`.
pub const OPERATOR_NAMESPACE: &str = "kubegrpc-system";
pub const OPERATOR_SERVICE_ACCOUNT: &str = "kubegrpc-operator";

/// `deploy/`, the kustomization directory.
pub fn deploy_dir() -> std::path::PathBuf {
    repository_root().join("deploy")
}

/// Applies `deploy/namespace.yaml` for real: a fresh cluster needs the Namespace before the
/// objects in it (a dry run does not create it).
pub async fn apply_namespace(control_plane: &ControlPlane) -> Result<String> {
    let namespace = deploy_dir().join("namespace.yaml").display().to_string();
    control_plane
        .kubectl_output(&["apply", "--server-side", "-f", &namespace])
        .await
}

/// `kubectl apply -k deploy/` for real, the Namespace first.
pub async fn apply_deploy(control_plane: &ControlPlane) -> Result<String> {
    apply_namespace(control_plane).await?;
    control_plane
        .kubectl_output(&["apply", "--server-side", "-k", &deploy_dir().display().to_string()])
        .await
}

/// A kubeconfig holding a token of the operator's ServiceAccount (TokenRequest API), so that
/// the operator runs with exactly the permissions `deploy/` grants it.
pub async fn operator_kubeconfig(control_plane: &ControlPlane) -> Result<PathBuf> {
    let token = control_plane
        .kubectl_output(&[
            "create",
            "token",
            OPERATOR_SERVICE_ACCOUNT,
            "-n",
            OPERATOR_NAMESPACE,
            "--duration=2h",
        ])
        .await?;
    control_plane.write_token_kubeconfig("operator-sa.kubeconfig", token.trim())
}

/// A free port on loopback for an operator's /metrics.
pub fn free_local_address() -> Result<SocketAddr> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?)
}

/// Starts the operator binary with `kubeconfig`, watching `namespace`, as replica `identity`.
pub fn start_operator_process(
    control_plane: &ControlPlane,
    kubeconfig: &std::path::Path,
    namespace: &str,
    identity: &str,
    metrics: SocketAddr,
    extra: &[&str],
) -> Result<ManagedProcess> {
    let mut command = Command::new(built_binary("kubegrpc-operator")?);
    command
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--namespace", namespace, "--identity", identity])
        .arg("--metrics-address")
        .arg(metrics.to_string())
        .args(extra)
        .env("RUST_LOG", "info,kubegrpc_operator=debug");
    let log = control_plane.dir().join(format!("operator-{identity}.log"));
    ManagedProcess::start(format!("kubegrpc-operator {identity}"), command, &log)
        .with_context(|| format!("cannot start operator {identity}"))
}

/// GET `path` from an HTTP/1.1 server on loopback (the operator's /metrics).
pub async fn http_get(address: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("no HTTP body")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_string())
}

/// The `kubegrpc_*` series of a /metrics scrape: series (name and labels) -> value.
pub fn metric_series(scrape: &str) -> std::collections::BTreeMap<String, String> {
    scrape
        .lines()
        .filter(|l| l.starts_with("kubegrpc_"))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

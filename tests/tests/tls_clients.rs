//! Clients of TLS backends (issue 20): three grpc-go servers serving TLS only, with certificates
//! for `echo.NAMESPACE.svc` from the test's own CA (the CA in ConfigMap `ca`, named by the
//! GrpcBackend's `spec.tls`), probed by an in-process operator against the real apiserver.
//!
//! - the Rust client's channel for the GrpcBackend, built with no TLS settings of its own,
//!   connects with TLS from the spec (server name, roots read from the ConfigMap) and spreads
//!   its calls equally;
//! - the grpc-go xDS client (gRFC A29: its bootstrap's `file_watcher` certificate provider
//!   `kubegrpc-backends` holding the CA file, the Cluster's UpstreamTlsContext naming it and the
//!   server name) does the same through the operator's xDS server.
//!
//! The servers speak TLS only, so every answer came over TLS; the shares are counted at the
//! servers (their Echo counters), each within 5 points of a third.
//!
//! Needs the control plane, `KUBEGRPC_PEERS_DIR` and the network namespace.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, ensure};
use kubegrpc::Channel;
use kubegrpc_echo::{EchoClient, EchoRequest};
use kubegrpc_tests::{
    backends::{BACKEND_PORT, next_backend_ip},
    operator::InProcessOperator,
    peers::{PeerLanguage, PeerOptions, PeerServer, PeerTls},
    scenario::Scenario,
    tls::TestCa,
    xds::{InProcessXds, XdsClient, XdsClientOptions},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);
/// Calls counted per client.
const CALLS: u64 = 1500;
/// The most a backend's share may be off a third.
const TOLERANCE: f64 = 0.05;

/// Three grpc-go TLS servers for `echo.NAMESPACE.svc`, Service `echo` over them, the CA in
/// ConfigMap `ca` and GrpcBackend `echo` with `spec.tls`; the operator runs until the three are
/// Serving. Returns the servers, the CA (its file for the xDS client's bootstrap) and the
/// operator.
async fn tls_backends(scenario: &Scenario) -> Result<(Vec<PeerServer>, TestCa, InProcessOperator)> {
    let ca = TestCa::new("kubegrpc test CA")?;
    let server_cert = ca.server_cert(&[&format!("echo.{}.svc", scenario.namespace)])?;
    let options = PeerOptions {
        tls: Some(PeerTls::server(&server_cert)),
        ..PeerOptions::default()
    };
    let start = || {
        PeerServer::start(
            PeerLanguage::Go,
            SocketAddr::from((next_backend_ip(), BACKEND_PORT)),
            &options,
        )
    };
    let (a, b, c) = tokio::try_join!(start(), start(), start())?;
    let servers = vec![a, b, c];
    ca.create_bundle_config_map(&scenario.client, &scenario.namespace, "ca")
        .await?;
    let addresses: Vec<SocketAddr> = servers.iter().map(|s| s.address).collect();
    scenario.echo_service(&addresses).await?;
    scenario
        .grpc_backend(
            "echo",
            json!({
                "service": "echo",
                "port": "grpc",
                "healthCheck": {"interval": "1s", "timeout": "500ms"},
                "tls": {"caBundle": {"configMap": "ca"}},
            }),
        )
        .await?;
    let operator = InProcessOperator::start(scenario.client.clone(), &scenario.namespace);
    scenario
        .wait_status("echo", "3 TLS endpoints Serving", DEADLINE, |status| {
            status.ready_endpoints == 3
        })
        .await?;
    Ok((servers, ca, operator))
}

/// Each server's Echo count.
async fn served(servers: &[PeerServer]) -> Result<Vec<u64>> {
    let mut counts = Vec::new();
    for server in servers {
        counts.push(server.stats().await?.requests);
    }
    Ok(counts)
}

/// Each server's share of the Echo calls between `before` and `after`, checked within
/// [`TOLERANCE`] of a third.
fn check_equal_shares(who: &str, before: &[u64], after: &[u64]) -> Result<()> {
    let served: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: u64 = served.iter().sum();
    let shares: Vec<f64> = served.iter().map(|n| *n as f64 / total.max(1) as f64).collect();
    println!("{who}: served {served:?}, shares {shares:.3?}");
    // The xDS client keeps calling while the servers are read: a few calls either side.
    ensure!(
        total >= CALLS * 9 / 10,
        "{who}: {total} calls counted at the servers, about {CALLS} expected"
    );
    for share in &shares {
        ensure!(
            (share - 1.0 / 3.0).abs() <= TOLERANCE,
            "{who}: a share of {share:.3} is more than 5 points off a third: {served:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rust_client_balances_over_tls_backends_with_the_grpc_backends_tls_settings() -> Result<()> {
    let scenario = Scenario::new("tls-rust").await?;
    let (servers, _ca, operator) = tls_backends(&scenario).await?;

    // No TLS settings of its own: the spec's server name, the ConfigMap's roots.
    let channel = Channel::builder(scenario.client.clone(), &scenario.namespace, "echo")
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready())
        .await
        .context("no usable endpoint")?;
    let before = served(&servers).await?;
    let mut echo = EchoClient::new(channel.clone());
    for n in 0..CALLS {
        echo.echo(EchoRequest {
            message: n.to_string(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("call {n} over TLS"))?;
    }
    check_equal_shares("Rust client", &before, &served(&servers).await?)?;
    let snapshot = channel.snapshot();
    ensure!(
        snapshot.endpoints.iter().all(|e| e.failures == 0 && e.in_rotation),
        "{snapshot:#?}"
    );
    operator.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpc_go_xds_client_balances_over_tls_backends_with_certificate_providers() -> Result<()> {
    let scenario = Scenario::new("tls-xds").await?;
    let (servers, ca, operator) = tls_backends(&scenario).await?;
    let xds = InProcessXds::start(scenario.client.clone(), Some(scenario.namespace.clone())).await?;

    // The bootstrap's roots: the same CA as the GrpcBackend's bundle, in a file.
    let certificate_providers = json!({
        "kubegrpc-backends": {
            "plugin_name": "file_watcher",
            "config": {"ca_certificate_file": ca.cert_path().display().to_string(), "refresh_interval": "600s"},
        },
    });
    let client = XdsClient::start_with(XdsClientOptions {
        certificate_providers: Some(certificate_providers),
        ..XdsClientOptions::new(&[format!("echo.{}", scenario.namespace)], xds.address, 200)
    })
    .await?;
    // Calls flow (over TLS: the servers speak nothing else); count a window at the servers.
    client.wait_for(100, DEADLINE).await?;
    client.reset().await?;
    let before = served(&servers).await?;
    let counts = client.wait_for(CALLS, DEADLINE).await?;
    let after = served(&servers).await?;
    println!("grpc-go xDS client: {:?}, failed {:?}", counts.ok, counts.failed);
    check_equal_shares("grpc-go xDS client", &before, &after)?;
    ensure!(counts.failures() == 0, "failed calls: {:?}", counts.failed);
    operator.stop().await;
    Ok(())
}

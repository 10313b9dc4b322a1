//! Backends that serve TLS and mutual TLS (issue 20), probed by the operator against the real
//! apiserver: tonic, grpc-go and grpc-java servers with certificates of the test's own CA.
//!
//! - `spec.tls` with the CA bundle in a ConfigMap and the default server name
//!   (`echo.NAMESPACE.svc`): valid servers are Serving, a NOT_SERVING flip reaches the status,
//!   the Checks are counted at the servers; a server whose certificate has expired, names
//!   another host or comes from another CA is NotServing with that reason, the others are not
//!   affected;
//! - mutual TLS: servers that require a client certificate accept the operator's (its serial
//!   logged by each server); the certificate replaced on disk is presented on the next
//!   connections without a restart;
//! - a CA bundle ConfigMap that does not exist: `Ready=False TlsUnavailable` naming it.
//!
//! Needs the control plane, `KUBEGRPC_PEERS_DIR` and the network namespace.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, ensure};
use kubegrpc_crds::{GrpcBackendStatus, Health, condition};
use kubegrpc_echo::BackendOptions;
use kubegrpc_operator::{Settings, health::tls::ClientIdentity};
use kubegrpc_tests::{
    backends::start_backend,
    backends::{BACKEND_PORT, next_backend_ip},
    operator::InProcessOperator,
    peers::{PeerLanguage, PeerOptions, PeerServer, PeerTls},
    scenario::{Scenario, brief, endpoint},
    tls::{ServerCertificates, TestCa},
    wait,
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(60);

/// A GrpcBackend spec for Service `echo` with TLS verified against ConfigMap `ca`.
fn tls_spec() -> serde_json::Value {
    json!({
        "service": "echo",
        "port": "grpc",
        "healthCheck": {"interval": "1s", "timeout": "500ms", "unhealthyThreshold": 1},
        "tls": {"caBundle": {"configMap": "ca"}},
    })
}

async fn ca_config_map(scenario: &Scenario, ca: &TestCa) -> Result<()> {
    ca.create_bundle_config_map(&scenario.client, &scenario.namespace, "ca")
        .await
}

async fn start(language: PeerLanguage, tls: PeerTls, options: &PeerOptions) -> Result<PeerServer> {
    let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
    let options = PeerOptions {
        tls: Some(tls),
        ..options.clone()
    };
    PeerServer::start(language, address, &options).await
}

fn reason_of(status: &GrpcBackendStatus, address: SocketAddr) -> Option<(Health, Option<String>)> {
    endpoint(status, &address).map(|e| (e.health, e.reason.clone()))
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_backends_are_probed_and_each_broken_certificate_is_named() -> Result<()> {
    let scenario = Scenario::new("tls").await?;
    let server_name = format!("echo.{}.svc", scenario.namespace);
    let ca = TestCa::new("kubegrpc test CA")?;
    let certs = ServerCertificates::new(&ca, &[&server_name])?;
    let plain = PeerOptions::default();
    let (go, java, expired, wrong_name, other_ca) = tokio::try_join!(
        start(PeerLanguage::Go, PeerTls::server(&certs.valid), &plain),
        start(PeerLanguage::Java, PeerTls::server(&certs.valid), &plain),
        start(PeerLanguage::Go, PeerTls::server(&certs.expired), &plain),
        start(PeerLanguage::Java, PeerTls::server(&certs.wrong_name), &plain),
        start(PeerLanguage::Go, PeerTls::server(&certs.other_ca), &plain),
    )?;
    let tonic = start_backend(BackendOptions {
        tls: Some((certs.valid.cert_pem.clone(), certs.valid.key_pem.clone())),
        ..BackendOptions::default()
    })
    .await?;
    ca_config_map(&scenario, &ca).await?;
    scenario
        .echo_service(&[
            tonic.address,
            go.address,
            java.address,
            expired.address,
            wrong_name.address,
            other_ca.address,
        ])
        .await?;
    scenario.grpc_backend("echo", tls_spec()).await?;
    let operator = InProcessOperator::start(scenario.client.clone(), &scenario.namespace);

    let expected = [
        (tonic.address, Health::Serving, None),
        (go.address, Health::Serving, None),
        (java.address, Health::Serving, None),
        (
            expired.address,
            Health::NotServing,
            Some("TlsHandshake: certificate expired"),
        ),
        (
            wrong_name.address,
            Health::NotServing,
            Some("TlsHandshake: name mismatch"),
        ),
        (
            other_ca.address,
            Health::NotServing,
            Some("TlsHandshake: unknown authority"),
        ),
    ];
    scenario
        .wait_status("echo", "each endpoint's health and reason", DEADLINE, |status| {
            expected.iter().all(|(address, health, reason)| {
                reason_of(status, *address) == Some((*health, reason.map(str::to_string)))
            })
        })
        .await?;
    // The Serving verdicts came from the servers' own health services, over TLS.
    for peer in [&go, &java] {
        let checks = peer.stats().await?;
        ensure!(
            checks.health_checks + checks.health_watches_open > 0,
            "{}: no health call reached the server: {checks:?}",
            peer.language
        );
    }
    let checks = tonic.counters.snapshot();
    ensure!(
        checks.health_checks + checks.health_watches_open > 0,
        "tonic: no health call reached the server: {checks:?}"
    );
    // A broken certificate ends the handshake: no call ever reaches those servers.
    for peer in [&expired, &wrong_name, &other_ca] {
        let checks = peer.stats().await?;
        ensure!(
            checks.health_checks + checks.health_watches_open == 0,
            "{}: {checks:?}",
            peer.language
        );
    }

    // A NOT_SERVING flip of a TLS backend reaches the status; the others are unaffected.
    java.set_serving("", false).await?;
    tonic.health.set("", kubegrpc_echo::ServingStatus::NotServing);
    let flipped = scenario
        .wait_status(
            "echo",
            "the grpc-java and tonic backends NotServing",
            DEADLINE,
            |status| {
                [java.address, tonic.address]
                    .iter()
                    .all(|address| reason_of(status, *address).is_some_and(|(health, _)| health == Health::NotServing))
            },
        )
        .await?;
    let status = flipped.status.as_ref().context("no status")?;
    ensure!(
        reason_of(status, go.address) == Some((Health::Serving, None)),
        "the grpc-go backend: {}",
        brief(Some(status))
    );
    operator.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_backends_accept_the_operators_certificate_and_its_replacement() -> Result<()> {
    let scenario = Scenario::new("mtls").await?;
    let server_name = format!("echo.{}.svc", scenario.namespace);
    let server_ca = TestCa::new("kubegrpc test server CA")?;
    let client_ca = TestCa::new("kubegrpc test client CA")?;
    let server_cert = server_ca.server_cert(&[&server_name])?;
    // Connections rotate every few seconds, so that the replaced certificate is presented on
    // the next one without waiting for a failure.
    let rotating = PeerOptions {
        max_connection_age: Some(Duration::from_secs(3)),
        ..PeerOptions::default()
    };
    // A server that trusts another CA for client certificates refuses the operator's.
    let stranger_ca = TestCa::new("kubegrpc another client CA")?;
    let (go, java, refusing) = tokio::try_join!(
        start(PeerLanguage::Go, PeerTls::mutual(&server_cert, &client_ca)?, &rotating),
        start(
            PeerLanguage::Java,
            PeerTls::mutual(&server_cert, &client_ca)?,
            &rotating
        ),
        start(
            PeerLanguage::Go,
            PeerTls::mutual(&server_cert, &stranger_ca)?,
            &rotating
        ),
    )?;

    // The operator's certificate, as a Secret mounted into its Pod: two files in a directory.
    let mounted = tempfile::tempdir()?;
    let (cert_file, key_file) = (mounted.path().join("tls.crt"), mounted.path().join("tls.key"));
    let first = client_ca.client_cert("kubegrpc-operator")?;
    replace_file(&cert_file, &first.cert_pem)?;
    replace_file(&key_file, &first.key_pem)?;
    let identity = ClientIdentity::load(&cert_file, &key_file).map_err(anyhow::Error::msg)?;

    ca_config_map(&scenario, &server_ca).await?;
    scenario
        .echo_service(&[go.address, java.address, refusing.address])
        .await?;
    scenario.grpc_backend("echo", tls_spec()).await?;
    let operator = InProcessOperator::start_with(
        scenario.client.clone(),
        Settings {
            namespace: Some(scenario.namespace.clone()),
            identity: format!("test-operator-{}", scenario.namespace),
            probe_client_identity: Some(Arc::new(identity)),
            ..Settings::default()
        },
    );
    scenario
        .wait_status(
            "echo",
            "both mutual-TLS backends Serving, the refusing one NotServing",
            DEADLINE,
            |status| {
                [go.address, java.address]
                    .iter()
                    .all(|address| reason_of(status, *address) == Some((Health::Serving, None)))
                    && reason_of(status, refusing.address)
                        == Some((
                            Health::NotServing,
                            Some("TlsHandshake: client certificate rejected".into()),
                        ))
            },
        )
        .await?;
    for peer in [&go, &java] {
        let serials = peer.client_certificate_serials()?;
        ensure!(
            serials.contains(&first.serial_hex()),
            "{}: the operator's certificate {} is not among the serials the server accepted: {serials:?}",
            peer.language,
            first.serial_hex()
        );
    }

    // cert-manager renews the Secret: the kubelet swaps the mounted files.
    let second = client_ca.client_cert("kubegrpc-operator")?;
    replace_file(&key_file, &second.key_pem)?;
    replace_file(&cert_file, &second.cert_pem)?;
    for peer in [&go, &java] {
        wait::until(
            &format!("{}: the replaced certificate presented", peer.language),
            DEADLINE,
            || async {
                Ok(peer
                    .client_certificate_serials()?
                    .contains(&second.serial_hex())
                    .then_some(()))
            },
        )
        .await?;
    }
    let backend = scenario.backends().get("echo").await?;
    let status = backend.status.as_ref().context("no status")?;
    for peer in [&go, &java] {
        ensure!(
            reason_of(status, peer.address) == Some((Health::Serving, None)),
            "{}: {}",
            peer.language,
            brief(Some(status))
        );
    }
    operator.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_ca_bundle_is_reported_not_a_crash() -> Result<()> {
    let scenario = Scenario::new("tls-missing").await?;
    let ca = TestCa::new("kubegrpc test CA")?;
    let peer = start(
        PeerLanguage::Go,
        PeerTls::server(&ca.server_cert(&[&format!("echo.{}.svc", scenario.namespace)])?),
        &PeerOptions::default(),
    )
    .await?;
    scenario.echo_service(&[peer.address]).await?;
    scenario.grpc_backend("echo", tls_spec()).await?;
    let operator = InProcessOperator::start(scenario.client.clone(), &scenario.namespace);
    scenario
        .wait_status("echo", "Ready=False TlsUnavailable", DEADLINE, |status| {
            status.conditions.iter().any(|c| {
                c.type_ == condition::READY
                    && c.status == "False"
                    && c.reason == condition::reason::TLS_UNAVAILABLE
                    && c.message.contains("ConfigMap ca")
            })
        })
        .await?;
    ensure!(
        peer.stats().await?.health_checks == 0,
        "nothing can be verified without the bundle: no probe may reach the server"
    );
    operator.stop().await;
    Ok(())
}

/// Writes `contents` to `path` as the kubelet updates a mounted Secret: a new file renamed over
/// the old one, so that a reader sees the old or the new file, never half of one.
fn replace_file(path: &std::path::Path, contents: &str) -> Result<()> {
    let staging = path.with_extension("new");
    std::fs::write(&staging, contents)?;
    std::fs::rename(&staging, path)?;
    Ok(())
}

//! The TLS fixtures work (tests/src/tls.rs, the peers' TLS options): grpc-go and grpc-java peer
//! servers given certificates of a test CA serve gRPC over TLS to a client that trusts that CA
//! and verifies the name, and each broken server certificate fails the handshake with its own
//! reason; a mutual-TLS peer refuses clients without a certificate from its client CA, accepts
//! the others and logs the serial number of each certificate it accepted.
//!
//! Needs `KUBEGRPC_PEERS_DIR` (`make test` sets it) and the network namespace; no control plane.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use kubegrpc_tests::{
    backends::{BACKEND_PORT, next_backend_ip},
    peers::{PeerLanguage, PeerOptions, PeerServer, PeerTls},
    tls::{
        AfterHandshake, ClientTls, ServerCertificates, TestCa, TlsConnectError, after_handshake, tls_channel,
        tls_channel_with, tls_handshake,
    },
    wait,
};
use tokio_rustls::rustls::{self, AlertDescription, CertificateError};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// The name clients verify, as a backend's Service name would be.
const SERVER_NAME: &str = "echo.tls-fixtures.svc";

/// How long a server may take to answer a finished handshake with data or an alert.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

// === Server certificates ===

/// Whether a certificate error is the one a broken certificate must cause.
type IsReason = fn(&CertificateError) -> bool;

#[tokio::test]
async fn grpc_go_tls_is_verified_by_ca_name_and_validity() -> Result<()> {
    server_certificates(PeerLanguage::Go).await
}

#[tokio::test]
async fn grpc_java_tls_is_verified_by_ca_name_and_validity() -> Result<()> {
    server_certificates(PeerLanguage::Java).await
}

async fn server_certificates(language: PeerLanguage) -> Result<()> {
    let valid_ip = next_backend_ip();
    let ca = TestCa::new("kubegrpc test CA")?;
    let certs = ServerCertificates::new(&ca, &[SERVER_NAME, &valid_ip.to_string()])?;
    let addresses = [valid_ip, next_backend_ip(), next_backend_ip(), next_backend_ip()]
        .map(|ip| SocketAddr::from((ip, BACKEND_PORT)));
    let served = [&certs.valid, &certs.expired, &certs.wrong_name, &certs.other_ca];
    let [valid, expired, wrong_name, other_ca] = start_peers(
        language,
        addresses
            .into_iter()
            .zip(served)
            .map(|(address, cert)| (address, PeerTls::server(cert))),
    )
    .await?
    .try_into()
    .expect("four peers");
    let client = ClientTls::new(&ca, SERVER_NAME);

    // The valid certificate verifies by name and by IP address, and the calls reach the server.
    assert_eq!(
        health_check(valid.address, &client).await?,
        ServingStatus::Serving,
        "{language}: by name"
    );
    assert_eq!(
        health_check(valid.address, &ClientTls::new(&ca, &valid_ip.to_string())).await?,
        ServingStatus::Serving,
        "{language}: by IP address"
    );
    assert_eq!(
        valid.stats().await?.health_checks,
        2,
        "{language}: Checks counted by the peer"
    );

    // Each broken certificate fails the handshake with its own reason. The peers are up and
    // serving TLS (their Stats answer the harness, which accepts any certificate): the
    // certificate is what fails, and no call reached them.
    let broken: [(&PeerServer, &str, IsReason); 3] = [
        (&expired, "expired", |e| {
            matches!(e, CertificateError::Expired | CertificateError::ExpiredContext { .. })
        }),
        (&wrong_name, "for another name", |e| {
            matches!(
                e,
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        }),
        (&other_ca, "from another CA", |e| {
            matches!(e, CertificateError::UnknownIssuer)
        }),
    ];
    for (peer, what, expected) in broken {
        let error = tls_handshake(peer.address, &client)
            .await
            .expect_err("the handshake must fail");
        match error.handshake_error() {
            Some(rustls::Error::InvalidCertificate(reason)) if expected(reason) => {}
            _ => panic!("{language}, certificate {what}: the handshake failed with {error:?}"),
        }
        let call = health_check(peer.address, &client).await;
        assert!(
            call.is_err(),
            "{language}, certificate {what}: a Check answered {call:?}"
        );
        assert_eq!(
            peer.stats().await?.health_checks,
            0,
            "{language}, certificate {what}: Checks counted by the peer"
        );
    }
    Ok(())
}

// === Mutual TLS ===

#[tokio::test]
async fn grpc_go_mutual_tls_requires_a_client_certificate_from_its_ca_and_logs_serials() -> Result<()> {
    mutual_tls(PeerLanguage::Go).await
}

#[tokio::test]
async fn grpc_java_mutual_tls_requires_a_client_certificate_from_its_ca_and_logs_serials() -> Result<()> {
    mutual_tls(PeerLanguage::Java).await
}

async fn mutual_tls(language: PeerLanguage) -> Result<()> {
    let server_ca = TestCa::new("kubegrpc test server CA")?;
    let client_ca = TestCa::new("kubegrpc test client CA")?;
    let stranger_ca = TestCa::new("kubegrpc untrusted client CA")?;
    let tls = PeerTls::mutual(&server_ca.server_cert(&[SERVER_NAME])?, &client_ca)?;
    let harness_serial = tls.mutual.as_ref().expect("mutual").harness_cert.serial_hex();
    let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
    let [peer] = start_peers(language, [(address, tls)])
        .await?
        .try_into()
        .expect("one peer");
    let anonymous = ClientTls::new(&server_ca, SERVER_NAME);

    // Without a client certificate: refused. A TLS 1.3 server judges the client's certificate
    // after the client has finished its side of the handshake, and refuses with an alert.
    assert_eq!(
        refusal(address, &anonymous).await,
        AfterHandshake::Alert(AlertDescription::CertificateRequired),
        "{language}: without a client certificate"
    );
    let call = health_check(address, &anonymous).await;
    assert!(
        call.is_err(),
        "{language}: a Check without a client certificate answered {call:?}"
    );

    // With a certificate from a CA the server does not trust: refused too. grpc-go says
    // unknown_ca; grpc-java's TLS (BoringSSL through netty-tcnative, verifying with a Java
    // trust manager) turns the trust manager's rejection into internal_error.
    let stranger = stranger_ca.client_cert("stranger")?;
    let untrusted_alert = match language {
        PeerLanguage::Go => AlertDescription::UnknownCA,
        PeerLanguage::Java => AlertDescription::InternalError,
    };
    assert_eq!(
        refusal(address, &anonymous.clone().with_client_cert(&stranger)).await,
        AfterHandshake::Alert(untrusted_alert),
        "{language}: a client certificate from an untrusted CA"
    );

    // With certificates from the client CA: served, and each serial logged by the server. Two
    // certificates, as when the operator's is replaced.
    let first = client_ca.client_cert("kubegrpc-operator")?;
    let second = client_ca.client_cert("kubegrpc-operator")?;
    assert_ne!(first.serial, second.serial);
    for cert in [&first, &second] {
        assert_eq!(
            health_check(address, &anonymous.clone().with_client_cert(cert)).await?,
            ServingStatus::Serving,
            "{language}: with client certificate {cert:?}"
        );
    }
    let expected = vec![first.serial_hex(), second.serial_hex()];
    let seen = wait::until(
        "the peer to log both client serials",
        Duration::from_secs(10),
        || async {
            let seen = clients_serials(&peer, &harness_serial)?;
            Ok((seen.len() >= expected.len()).then_some(seen))
        },
    )
    .await?;
    assert_eq!(
        seen, expected,
        "{language}: client certificate serials logged (the refused ones never)"
    );
    assert_eq!(
        peer.stats().await?.health_checks,
        2,
        "{language}: Checks counted by the peer"
    );

    // The control for the refusals above: an accepted client's finished handshake is answered
    // with data (the server's HTTP/2 SETTINGS), not an alert.
    let stream = tls_handshake(address, &anonymous.clone().with_client_cert(&first)).await?;
    assert_eq!(
        after_handshake(stream, ANSWER_WAIT).await,
        AfterHandshake::Data,
        "{language}: an accepted client certificate"
    );
    Ok(())
}

// === too_many_pings over TLS ===

#[tokio::test]
async fn grpc_go_counts_too_many_pings_over_tls() -> Result<()> {
    too_many_pings_over_tls(PeerLanguage::Go).await
}

#[tokio::test]
async fn grpc_java_counts_too_many_pings_over_tls() -> Result<()> {
    too_many_pings_over_tls(PeerLanguage::Java).await
}

/// The peers count GOAWAY too_many_pings in the HTTP/2 frames they write, which TLS hides from
/// the socket: with TLS the watcher sits above it, and still counts exactly one.
async fn too_many_pings_over_tls(language: PeerLanguage) -> Result<()> {
    let ca = TestCa::new("kubegrpc test CA")?;
    let address = SocketAddr::from((next_backend_ip(), BACKEND_PORT));
    let [peer] = start_peers(language, [(address, PeerTls::server(&ca.server_cert(&[SERVER_NAME])?))])
        .await?
        .try_into()
        .expect("one peer");
    // Pings every 200 ms, with or without calls, against the library's default enforcement
    // (at most every 5 minutes): GOAWAY ENHANCE_YOUR_CALM "too_many_pings" after a few, which
    // ends the Watch stream held on the connection.
    let channel = tls_channel_with(address, &ClientTls::new(&ca, SERVER_NAME), |endpoint| {
        endpoint
            .http2_keep_alive_interval(Duration::from_millis(200))
            .keep_alive_while_idle(true)
    })
    .await?;
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest { service: String::new() })
        .await?
        .into_inner();
    let first = watch.message().await?.context("the Watch stream's first status")?;
    assert_eq!(first.status(), ServingStatus::Serving, "{language}");
    let ended = tokio::time::timeout(Duration::from_secs(30), watch.message())
        .await
        .with_context(|| format!("{language}: the Watch stream outlived the keepalive enforcement"))?;
    assert!(
        !matches!(ended, Ok(Some(_))),
        "{language}: the Watch stream sent a message instead of ending: {ended:?}"
    );
    let stats = wait::until("too_many_pings >= 1", Duration::from_secs(10), || async {
        let stats = peer.stats().await?;
        Ok((stats.too_many_pings >= 1).then_some(stats))
    })
    .await?;
    assert_eq!(stats.too_many_pings, 1, "{language}: {stats:?}");
    Ok(())
}

/// How the server answers a client's handshake: an alert during the handshake (TLS 1.2) or
/// right after the client's side finished (TLS 1.3), or anything else.
async fn refusal(address: SocketAddr, tls: &ClientTls) -> AfterHandshake {
    match tls_handshake(address, tls).await {
        Ok(stream) => after_handshake(stream, ANSWER_WAIT).await,
        Err(TlsConnectError::Handshake(rustls::Error::AlertReceived(alert))) => AfterHandshake::Alert(alert),
        Err(error) => AfterHandshake::Error(error.to_string()),
    }
}

/// The client certificate serials the peer logged, but for the harness's own connections.
fn clients_serials(peer: &PeerServer, harness_serial: &str) -> Result<Vec<String>> {
    Ok(peer
        .client_certificate_serials()?
        .into_iter()
        .filter(|serial| serial != harness_serial)
        .collect())
}

async fn health_check(address: SocketAddr, tls: &ClientTls) -> Result<ServingStatus> {
    let channel = tls_channel(address, tls).await?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .with_context(|| format!("Health/Check on {address} over TLS ({})", tls.server_name()))?;
    Ok(reply.into_inner().status())
}

async fn start_peers(
    language: PeerLanguage,
    peers: impl IntoIterator<Item = (SocketAddr, PeerTls)>,
) -> Result<Vec<PeerServer>> {
    let starts = peers.into_iter().map(|(address, tls)| async move {
        let options = PeerOptions {
            tls: Some(tls),
            ..PeerOptions::default()
        };
        PeerServer::start(language, address, &options).await
    });
    futures::future::try_join_all(starts).await
}

//! TLS as the prober sees it, over in-memory streams: each broken certificate gives its
//! reason, a valid one negotiates `h2`, and the client identity is read again when its files
//! change (the server records the serial of every client certificate it accepts).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, date_time_ymd,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{ServerConfig, server::WebPkiClientVerifier},
};

use super::*;

const NAME: &str = "echo.demo.svc";

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

/// A certificate and its key, as PEM.
struct Issued {
    cert: String,
    key: String,
}

impl Issued {
    fn der(&self) -> Vec<u8> {
        CertificateDer::from_pem_slice(self.cert.as_bytes()).unwrap().to_vec()
    }
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = params(name, 2100);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn server(&self, name: &str, not_after_year: i32) -> Issued {
        let mut params = params(name, not_after_year);
        params.subject_alt_names = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .subject_alt_names;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, 1)
    }

    fn client(&self, serial: u64) -> Issued {
        let mut params = params("kubegrpc-operator", 2100);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, serial)
    }

    fn issue(&self, mut params: CertificateParams, serial: u64) -> Issued {
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

fn params(common_name: &str, not_after_year: i32) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(not_after_year, 1, 1);
    params
}

fn server_config(served: &Issued, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let provider = Arc::new(ring::default_provider());
    let chain = vec![CertificateDer::from_pem_slice(served.cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(served.key.as_bytes()).unwrap();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from_pem(&ca.pem).unwrap()), provider)
                .build()
                .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// One handshake of `tls` with a server of `config` over an in-memory stream: the ALPN
/// protocol and the client certificate (DER) the server accepted, or the client's error.
async fn handshake(
    tls: &ProbeTls,
    config: Arc<ServerConfig>,
) -> Result<(Option<Vec<u8>>, Option<Vec<u8>>), std::io::Error> {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let stream = TlsAcceptor::from(config).accept(server).await.ok()?;
        let (_, connection) = stream.get_ref();
        let serial = connection
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|cert| cert.to_vec());
        // Keep the stream open until the client's side is done.
        Some((stream, serial))
    });
    let result = tls.connector().connect(tls.server_name().clone(), client).await;
    let served = server.await.unwrap();
    let stream = result?;
    let alpn = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    Ok((alpn, served.and_then(|(_, serial)| serial)))
}

#[test]
fn a_ca_bundle_must_hold_certificates_and_fit() {
    assert_eq!(
        roots_from_pem("").unwrap_err(),
        "the CA bundle holds no PEM certificate"
    );
    assert_eq!(
        roots_from_pem("just text\n").unwrap_err(),
        "the CA bundle holds no PEM certificate"
    );
    let garbled = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(
        roots_from_pem(garbled).unwrap_err().contains("cannot be a root"),
        "{:?}",
        roots_from_pem(garbled)
    );
    let huge = "x".repeat(MAX_CA_BUNDLE + 1);
    assert!(roots_from_pem(&huge).unwrap_err().contains("more than the"));
    let ca = Ca::new("test CA");
    assert_eq!(roots_from_pem(&ca.pem).unwrap().len(), 1);
    assert_eq!(
        roots_from_pem(&format!("{}{}", ca.pem, Ca::new("second").pem))
            .unwrap()
            .len(),
        2
    );
    assert!(ProbeTls::new("Not A Name!", Some(ca.pem.clone().into()), None).is_err());
}

#[tokio::test]
async fn each_broken_certificate_fails_the_handshake_with_its_reason() {
    let ca = Ca::new("test CA");
    let tls = ProbeTls::new(NAME, Some(ca.pem.clone().into()), None).unwrap();
    assert_eq!(tls.authority(), NAME);

    let (alpn, _) = handshake(&tls, server_config(&ca.server(NAME, 2100), None))
        .await
        .unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]), "ALPN h2 negotiated");

    let cases = [
        (ca.server(NAME, 2021), TlsFailure::CertificateExpired),
        (ca.server("other.demo.svc", 2100), TlsFailure::NameMismatch),
        (Ca::new("another CA").server(NAME, 2100), TlsFailure::UnknownAuthority),
    ];
    for (served, expected) in cases {
        let error = handshake(&tls, server_config(&served, None)).await.unwrap_err();
        assert_eq!(tls_failure(&error), Some(expected), "{error}");
        assert!(expected.to_string().starts_with("TlsHandshake: "));
    }
    // Not a TLS error at all: the caller classifies it as a connection failure.
    let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
    assert_eq!(tls_failure(&reset), None);
}

#[tokio::test]
async fn the_client_certificate_is_read_again_when_its_files_change() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let config = server_config(&server_ca.server(NAME, 2100), Some(&client_ca));
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let swap = |issued: &Issued| {
        for (path, pem) in [(&key_file, &issued.key), (&cert_file, &issued.cert)] {
            let staging = path.with_extension("new");
            std::fs::write(&staging, pem).unwrap();
            std::fs::rename(&staging, path).unwrap();
        }
    };
    let first = client_ca.client(0x51);
    swap(&first);
    let identity = Arc::new(ClientIdentity::load_rechecking(&cert_file, &key_file, Duration::ZERO).unwrap());
    let tls = ProbeTls::new(NAME, Some(server_ca.pem.clone().into()), Some(identity.clone())).unwrap();

    let (_, presented) = handshake(&tls, config.clone()).await.unwrap();
    assert_eq!(presented, Some(first.der()));

    // Renewed: the next handshake presents the new certificate, with the same ProbeTls.
    let renewed = client_ca.client(0x52);
    swap(&renewed);
    let (_, presented) = handshake(&tls, config.clone()).await.unwrap();
    assert_eq!(presented, Some(renewed.der()));

    // Half a rotation (a new key beside the old certificate) is not used: the last good pair is.
    let stray = client_ca.client(0x53);
    std::fs::write(&key_file, &stray.key).unwrap();
    let (_, presented) = handshake(&tls, config.clone()).await.unwrap();
    assert_eq!(presented, Some(renewed.der()));

    // Without a client certificate, the server refuses: the reason says so.
    let anonymous = ProbeTls::new(NAME, Some(server_ca.pem.clone().into()), None).unwrap();
    match handshake(&anonymous, config).await {
        // TLS 1.3: the client finishes first; the server refuses (its alert comes on the
        // client's first read, where the prober's connection reports it).
        Ok((_, accepted)) => assert_eq!(accepted, None, "the server accepted a client without a certificate"),
        Err(error) => assert_eq!(
            tls_failure(&error),
            Some(TlsFailure::ClientCertificateRejected),
            "{error}"
        ),
    }
}

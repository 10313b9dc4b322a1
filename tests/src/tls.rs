//! TLS fixtures for the tests: a CA made fresh for each test, the certificates it signs written
//! as PEM files (valid, expired, for another name, from another CA; client certificates with
//! distinct serial numbers for mutual TLS), and a Rust TLS client (rustls with `ring`, ALPN `h2`)
//! that reports handshake failures as rustls errors, so a test can tell an expired certificate
//! from a name mismatch or an unknown authority.
//!
//! The files live in a temporary directory that lasts as long as the CA or any certificate it
//! issued: peer servers read them when they start.

use std::{
    error::Error as StdError,
    fmt, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, date_time_ymd,
};
use tempfile::TempDir;
use tokio::{io::AsyncReadExt, net::TcpStream};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        self, AlertDescription, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::{CryptoProvider, ring, verify_tls12_signature, verify_tls13_signature},
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    },
};
use tonic::transport::{Channel, Endpoint};

/// How long a TCP connect plus TLS handshake may take before [`tls_handshake`] gives up.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// The ALPN protocol of gRPC: grpc-go refuses TLS clients that do not offer it.
const ALPN_H2: &[u8] = b"h2";

// === The CA ===

/// A certificate authority made for one test, with its certificate in `ca.pem` of its own
/// temporary directory. Every certificate it issues gets a serial number unique in the process.
pub struct TestCa {
    name: String,
    dir: Arc<TempDir>,
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_path: PathBuf,
}

/// A certificate issued by a [`TestCa`] and its private key, as PEM text and as files.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (PEM file).
    pub cert_path: PathBuf,
    /// Its private key (PKCS#8 PEM file).
    pub key_path: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number.
    pub serial: u64,
    /// The DNS names and IP addresses a server certificate is for; a client certificate's
    /// common name.
    pub names: Vec<String>,
    /// The files' directory, kept while the certificate is in use.
    _dir: Arc<TempDir>,
}

impl TestCa {
    /// A new CA called `name`, valid from 2020 to 2100.
    pub fn new(name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kubegrpc-test-ca-")
            .tempdir()
            .context("cannot make a directory for the test CA")?;
        let key = KeyPair::generate()?;
        let mut params = params_for(name, Validity::Valid)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert_pem = params.self_signed(&key)?.pem();
        let cert_path = dir.path().join("ca.pem");
        std::fs::write(&cert_path, &cert_pem).with_context(|| format!("cannot write {}", cert_path.display()))?;
        Ok(Self {
            name: name.to_string(),
            dir: Arc::new(dir),
            issuer: Issuer::new(params, key),
            cert_pem,
            cert_path,
        })
    }

    /// The CA certificate (PEM file): what clients trust, or what a mutual-TLS server
    /// verifies client certificates against.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Publishes the CA certificate as ConfigMap `name` of `namespace`, key `ca.crt`: the CA
    /// bundle a GrpcBackend's `spec.tls.caBundle` names.
    pub async fn create_bundle_config_map(&self, client: &kube::Client, namespace: &str, name: &str) -> Result<()> {
        let config_map = k8s_openapi::api::core::v1::ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            data: Some([("ca.crt".to_string(), self.cert_pem.clone())].into()),
            ..Default::default()
        };
        kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), namespace)
            .create(&kube::api::PostParams::default(), &config_map)
            .await
            .context("cannot create the CA bundle ConfigMap")?;
        Ok(())
    }

    /// A server certificate valid now for `names` (DNS names or IP addresses, the first also its
    /// common name).
    pub fn server_cert(&self, names: &[&str]) -> Result<IssuedCert> {
        self.server_cert_with(names, Validity::Valid)
    }

    /// A server certificate for `names` that expired in 2021.
    pub fn expired_server_cert(&self, names: &[&str]) -> Result<IssuedCert> {
        self.server_cert_with(names, Validity::Expired)
    }

    /// A client certificate (extended key usage clientAuth) with common name `common_name`.
    pub fn client_cert(&self, common_name: &str) -> Result<IssuedCert> {
        let mut params = params_for(common_name, Validity::Valid)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue("client", params, vec![common_name.to_string()])
    }

    fn server_cert_with(&self, names: &[&str], validity: Validity) -> Result<IssuedCert> {
        let first = names.first().context("a server certificate needs at least one name")?;
        let mut params = params_for(first, validity)?;
        let names: Vec<String> = names.iter().map(std::string::ToString::to_string).collect();
        // CertificateParams::new tells IP addresses from DNS names.
        params.subject_alt_names = CertificateParams::new(names.clone())
            .with_context(|| format!("bad server names {names:?}"))?
            .subject_alt_names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("server", params, names)
    }

    fn issue(&self, kind: &str, mut params: CertificateParams, names: Vec<String>) -> Result<IssuedCert> {
        let serial = next_serial();
        params.serial_number = Some(SerialNumber::from(serial));
        let key = KeyPair::generate()?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("{} cannot sign a {kind} certificate for {names:?}", self.name))?;
        let stem = format!("{kind}-{serial:x}");
        let cert_path = self.dir.path().join(format!("{stem}.pem"));
        let key_path = self.dir.path().join(format!("{stem}-key.pem"));
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        std::fs::write(&cert_path, &cert_pem).with_context(|| format!("cannot write {}", cert_path.display()))?;
        std::fs::write(&key_path, &key_pem).with_context(|| format!("cannot write {}", key_path.display()))?;
        Ok(IssuedCert {
            cert_path,
            key_path,
            cert_pem,
            key_pem,
            serial,
            names,
            _dir: self.dir.clone(),
        })
    }
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("cert_path", &self.cert_path)
            .finish()
    }
}

impl IssuedCert {
    /// The serial number as grpc-go (`big.Int.Text(16)`) and grpc-java (`BigInteger.toString(16)`)
    /// print it: lowercase hexadecimal without leading zeros.
    pub fn serial_hex(&self) -> String {
        format!("{:x}", self.serial)
    }
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("names", &self.names)
            .field("serial", &self.serial_hex())
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// The server certificates a TLS test needs for one verified name: one that verifies, and one
/// for each way a handshake must fail.
#[derive(Clone, Debug)]
pub struct ServerCertificates {
    /// Signed by the CA, valid now, for the names.
    pub valid: IssuedCert,
    /// Signed by the CA, for the names, expired in 2021.
    pub expired: IssuedCert,
    /// Signed by the CA, valid now, for `wrong-name.invalid` only.
    pub wrong_name: IssuedCert,
    /// For the names, valid now, signed by another CA that clients do not trust.
    pub other_ca: IssuedCert,
}

impl ServerCertificates {
    pub fn new(ca: &TestCa, names: &[&str]) -> Result<Self> {
        let other_ca = TestCa::new(&format!("not {}", ca.name))?;
        Ok(Self {
            valid: ca.server_cert(names)?,
            expired: ca.expired_server_cert(names)?,
            wrong_name: ca.server_cert(&["wrong-name.invalid"])?,
            other_ca: other_ca.server_cert(names)?,
        })
    }
}

#[derive(Clone, Copy)]
enum Validity {
    Valid,
    Expired,
}

fn params_for(common_name: &str, validity: Validity) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = match validity {
        Validity::Valid => date_time_ymd(2100, 1, 1),
        Validity::Expired => date_time_ymd(2021, 1, 1),
    };
    Ok(params)
}

/// Serial numbers unique in the process and, with the clock in the start, across runs: positive,
/// non-zero, at most 63 bits.
fn next_serial() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = || {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        (nanos ^ u64::from(std::process::id()) << 40) & (u64::MAX >> 2) | 1 << 61
    };
    let _ = NEXT.compare_exchange(0, start(), Ordering::SeqCst, Ordering::SeqCst);
    NEXT.fetch_add(1, Ordering::SeqCst)
}

// === The client ===

/// How a Rust TLS client connects: the roots it trusts and the name it verifies, and for mutual
/// TLS its own certificate.
#[derive(Clone)]
pub struct ClientTls {
    verification: Verification,
    server_name: String,
    identity: Option<IssuedCert>,
}

#[derive(Clone)]
enum Verification {
    TrustedCa(String),
    /// The harness's own control connections to a peer it started (Stats, SetHealth): they
    /// must work whatever certificate the peer was given to serve.
    AnyServer,
}

impl ClientTls {
    /// Trusts `ca` only and verifies `server_name` (a DNS name or an IP address).
    pub fn new(ca: &TestCa, server_name: &str) -> Self {
        Self {
            verification: Verification::TrustedCa(ca.cert_pem().to_string()),
            server_name: server_name.to_string(),
            identity: None,
        }
    }

    /// Accepts any server certificate: only for the harness's own Stats and SetHealth calls to a
    /// peer it started, never for what a test verifies.
    pub fn unverified(address: SocketAddr) -> Self {
        Self {
            verification: Verification::AnyServer,
            server_name: address.ip().to_string(),
            identity: None,
        }
    }

    /// Presents `cert` when the server asks for a client certificate.
    #[must_use]
    pub fn with_client_cert(mut self, cert: &IssuedCert) -> Self {
        self.identity = Some(cert.clone());
        self
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    fn config(&self) -> Result<ClientConfig, rustls::Error> {
        let provider = Arc::new(ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let builder = match &self.verification {
            Verification::TrustedCa(ca_pem) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                    roots.add(cert.map_err(pem_error)?)?;
                }
                builder.with_root_certificates(roots)
            }
            Verification::AnyServer => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider))),
        };
        let mut config = match &self.identity {
            Some(identity) => {
                let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(pem_error)?;
                let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(pem_error)?;
                builder.with_client_auth_cert(chain, key)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verification = match &self.verification {
            Verification::TrustedCa(_) => "trusted CA",
            Verification::AnyServer => "any server certificate",
        };
        f.debug_struct("ClientTls")
            .field("verification", &verification)
            .field("server_name", &self.server_name)
            .field("identity", &self.identity)
            .finish()
    }
}

fn pem_error(error: rustls::pki_types::pem::Error) -> rustls::Error {
    rustls::Error::General(format!("bad PEM: {error}"))
}

/// Why a TLS connection could not be made.
#[derive(Debug)]
pub enum TlsConnectError {
    /// The client configuration (certificates, key) is unusable.
    Config(rustls::Error),
    /// No TCP connection.
    Connect(io::Error),
    /// The TLS handshake failed: a certificate rejected (`InvalidCertificate(..)`), an alert from
    /// the server (`AlertReceived(..)`), ...
    Handshake(rustls::Error),
    /// The connection failed during the handshake without a TLS error (e.g. closed).
    HandshakeIo(io::Error),
    /// No answer within the deadline.
    Timeout(Duration),
    /// The server did not select ALPN `h2`.
    NoH2(Option<Vec<u8>>),
    /// tonic could not start HTTP/2 over the TLS connection.
    Channel(tonic::transport::Error),
}

impl fmt::Display for TlsConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(error) => write!(f, "bad client TLS configuration: {error}"),
            Self::Connect(error) => write!(f, "cannot connect: {error}"),
            Self::Handshake(error) => write!(f, "TLS handshake failed: {error}"),
            Self::HandshakeIo(error) => write!(f, "TLS handshake failed: {error}"),
            Self::Timeout(deadline) => write!(f, "no TLS connection within {deadline:?}"),
            Self::NoH2(protocol) => write!(
                f,
                "the server selected ALPN {:?}, not h2",
                protocol.as_ref().map(|p| String::from_utf8_lossy(p).into_owned())
            ),
            Self::Channel(error) => write!(f, "no HTTP/2 over TLS: {error}"),
        }
    }
}

impl StdError for TlsConnectError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Self::Config(error) | Self::Handshake(error) => Some(error),
            Self::Connect(error) | Self::HandshakeIo(error) => Some(error),
            Self::Channel(error) => Some(error),
            Self::Timeout(_) | Self::NoH2(_) => None,
        }
    }
}

impl TlsConnectError {
    /// The rustls error the handshake failed with, if it failed with one.
    pub fn handshake_error(&self) -> Option<&rustls::Error> {
        match self {
            Self::Handshake(error) => Some(error),
            _ => None,
        }
    }
}

/// Connects to `address` and completes a TLS handshake (ALPN `h2` required), within 10 s.
pub async fn tls_handshake(address: SocketAddr, tls: &ClientTls) -> Result<TlsStream<TcpStream>, TlsConnectError> {
    let config = tls.config().map_err(TlsConnectError::Config)?;
    let name = ServerName::try_from(tls.server_name.clone())
        .map_err(|error| TlsConnectError::Config(rustls::Error::General(format!("bad server name: {error}"))))?;
    let handshake = async {
        let tcp = TcpStream::connect(address).await.map_err(TlsConnectError::Connect)?;
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|error| match rustls_error_of(&error) {
                Some(tls_error) => TlsConnectError::Handshake(tls_error.clone()),
                None => TlsConnectError::HandshakeIo(error),
            })
    };
    let stream = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake)
        .await
        .map_err(|_| TlsConnectError::Timeout(HANDSHAKE_DEADLINE))??;
    match stream.get_ref().1.alpn_protocol() {
        Some(ALPN_H2) => Ok(stream),
        other => Err(TlsConnectError::NoH2(other.map(<[u8]>::to_vec))),
    }
}

/// A tonic channel to `address` over one TLS connection, made first with [`tls_handshake`] so
/// that a handshake failure comes back as such. Requests carry `:scheme https` and the verified
/// name as `:authority`. The channel never reconnects: a test gets exactly the connection it
/// made.
pub async fn tls_channel(address: SocketAddr, tls: &ClientTls) -> Result<Channel, TlsConnectError> {
    tls_channel_with(address, tls, |endpoint| endpoint).await
}

/// [`tls_channel`] with the endpoint's settings (keepalive, window sizes...) set by `configure`.
pub async fn tls_channel_with(
    address: SocketAddr,
    tls: &ClientTls,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, TlsConnectError> {
    let stream = tls_handshake(address, tls).await?;
    let connection = Arc::new(Mutex::new(Some(stream)));
    let connector = tower::service_fn(move |_: http::Uri| {
        let stream = connection
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        async move {
            stream
                .map(TokioIo::new)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "this test channel had its one connection"))
        }
    });
    let origin = format!("https://{}", authority(&tls.server_name, address.port()));
    let origin: http::Uri = origin
        .parse()
        .map_err(|error| TlsConnectError::Config(rustls::Error::General(format!("bad origin {origin}: {error}"))))?;
    let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(TlsConnectError::Channel)?;
    configure(endpoint.origin(origin))
        .connect_with_connector(connector)
        .await
        .map_err(TlsConnectError::Channel)
}

fn authority(server_name: &str, port: u16) -> String {
    if server_name.contains(':') {
        format!("[{server_name}]:{port}")
    } else {
        format!("{server_name}:{port}")
    }
}

/// What a server did right after the client's side of the handshake completed, seen by reading
/// the connection without writing to it (so that no reset can hide an alert).
#[derive(Debug, PartialEq, Eq)]
pub enum AfterHandshake {
    /// It sent application data: an HTTP/2 server's SETTINGS. The connection is accepted.
    Data,
    /// It refused the connection with this TLS alert (TLS 1.3 servers judge the client's
    /// certificate after the client has finished its handshake).
    Alert(AlertDescription),
    /// It closed the connection without an alert.
    Closed,
    /// The connection failed otherwise.
    Error(String),
    /// Nothing within the wait.
    Silent,
}

/// Reads from `stream` until the server sends data, an alert or closes, for at most `wait`.
pub async fn after_handshake(mut stream: TlsStream<TcpStream>, wait: Duration) -> AfterHandshake {
    let mut buffer = [0u8; 1024];
    match tokio::time::timeout(wait, stream.read(&mut buffer)).await {
        Err(_) => AfterHandshake::Silent,
        Ok(Ok(0)) => AfterHandshake::Closed,
        Ok(Ok(_)) => AfterHandshake::Data,
        Ok(Err(error)) => match rustls_error_of(&error) {
            Some(rustls::Error::AlertReceived(alert)) => AfterHandshake::Alert(*alert),
            _ => AfterHandshake::Error(error.to_string()),
        },
    }
}

/// The rustls error in `error`'s chain, if any. `io::Error` hides the error it wraps from
/// `source()` (it returns that error's own source), so each is opened with `get_ref`.
pub fn rustls_error_of<'a>(error: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(error);
    while let Some(error) = next {
        if let Some(tls_error) = error.downcast_ref::<rustls::Error>() {
            return Some(tls_error);
        }
        if let Some(inner) = error.downcast_ref::<io::Error>().and_then(io::Error::get_ref)
            && let Some(tls_error) = rustls_error_of(inner)
        {
            return Some(tls_error);
        }
        next = error.source();
    }
    None
}

/// Verifies the server's handshake signature but not its certificate (see
/// [`ClientTls::unverified`]).
#[derive(Debug)]
struct AnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, signature, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, signature, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

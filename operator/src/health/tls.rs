//! TLS to backends that serve it (`spec.tls`): what the prober's connections verify and present.
//!
//! - The roots come from a GrpcBackend's CA bundle (PEM in a ConfigMap, read by the
//!   reconciler) or the system's; a [`ProbeTls`] is built per GrpcBackend and shared by its
//!   probers, so the per-connection cost is rustls's session alone.
//! - The operator's own certificate, for backends that ask for one (mutual TLS), comes from
//!   files mounted into its Pod ([`ClientIdentity`]): the operator reads no Secrets. The files
//!   are read again when they change (cert-manager rotates them), checked at most once a second
//!   at a handshake, so the next connections present the new certificate without a restart.
//!   (Checked at a handshake rather than watched: no task or inotify watch to keep, and a
//!   handshake is rare next to a second.)
//! - ALPN offers `h2` only: a backend that does not select it is not a gRPC server.
//! - A handshake that fails says why in the endpoint's reason ([`TlsFailure`]).

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, AlertDescription, CertificateError, ClientConfig, RootCertStore,
        client::ResolvesClientCert,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
        sign::CertifiedKey,
    },
};
use tracing::{info, warn};

/// How often, at most, the client certificate's files are looked at for a change.
const IDENTITY_RECHECK: Duration = Duration::from_secs(1);
/// The most bytes of PEM a CA bundle may have (a ConfigMap holds at most 1 MiB anyway).
pub const MAX_CA_BUNDLE: usize = 512 * 1024;

/// What a GrpcBackend's probers need to connect with TLS. Equal when built from the same name,
/// roots and identity: a change restarts the GrpcBackend's probers.
#[derive(Clone)]
pub struct ProbeTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    /// The PEM the roots came from (`None`: the system's), for equality.
    roots_pem: Option<Arc<str>>,
    identity: Option<Arc<ClientIdentity>>,
}

impl ProbeTls {
    /// TLS verifying `server_name` against `roots` (PEM; `None` for the system's), presenting
    /// `identity` when a backend asks for a client certificate.
    pub fn new(
        server_name: &str,
        roots_pem: Option<Arc<str>>,
        identity: Option<Arc<ClientIdentity>>,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| format!("spec.tls.serverName {server_name:?} is not a valid DNS name"))?;
        let roots = match &roots_pem {
            Some(pem) => roots_from_pem(pem)?,
            None => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let mut config = match &identity {
            Some(identity) => builder.with_client_cert_resolver(identity.clone()),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            roots_pem,
            identity,
        })
    }

    pub fn connector(&self) -> &TlsConnector {
        &self.connector
    }

    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// The requests' `:authority`: the verified name.
    pub fn authority(&self) -> String {
        self.server_name.to_str().into_owned()
    }
}

impl PartialEq for ProbeTls {
    fn eq(&self, other: &Self) -> bool {
        self.server_name == other.server_name
            && self.roots_pem == other.roots_pem
            && match (&self.identity, &other.identity) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl Eq for ProbeTls {}

impl fmt::Debug for ProbeTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProbeTls")
            .field("server_name", &self.server_name)
            .field("roots", &if self.roots_pem.is_some() { "bundle" } else { "system" })
            .field("client_identity", &self.identity.is_some())
            .finish()
    }
}

/// The certificates of a PEM bundle as roots; an error names what is wrong with it.
pub fn roots_from_pem(pem: &str) -> Result<RootCertStore, String> {
    if pem.len() > MAX_CA_BUNDLE {
        return Err(format!(
            "the CA bundle has {} bytes, more than the {MAX_CA_BUNDLE} accepted",
            pem.len()
        ));
    }
    let mut roots = RootCertStore::empty();
    let mut count = 0;
    for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let certificate = certificate.map_err(|e| format!("the CA bundle is not valid PEM: {e}"))?;
        roots
            .add(certificate)
            .map_err(|e| format!("the CA bundle holds a certificate that cannot be a root: {e}"))?;
        count += 1;
    }
    if count == 0 {
        return Err("the CA bundle holds no PEM certificate".into());
    }
    Ok(roots)
}

/// The system's roots (read once: the operator's image does not change under it).
fn system_roots() -> Result<RootCertStore, String> {
    static SYSTEM: std::sync::OnceLock<Result<RootCertStore, String>> = std::sync::OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let loaded = rustls_native_certs::load_native_certs();
            for error in &loaded.errors {
                warn!(%error, "a system root certificate cannot be read");
            }
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err("the system has no root certificates: set spec.tls.caBundle".into());
            }
            Ok(roots)
        })
        .clone()
}

/// Why a TLS handshake with a backend failed, as its reason in the status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The backend's certificate has expired (or is not valid yet).
    CertificateExpired,
    /// The backend's certificate is not signed by the trusted roots.
    UnknownAuthority,
    /// The backend's certificate is not valid for the server name.
    NameMismatch,
    /// The backend refused the operator's client certificate, or wanted one it did not get.
    ClientCertificateRejected,
    /// The backend did not select ALPN `h2`.
    NoHttp2,
    /// Any other handshake failure (bad records, no common cipher suite...).
    Failed,
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFailure::CertificateExpired => "TlsHandshake: certificate expired",
            TlsFailure::UnknownAuthority => "TlsHandshake: unknown authority",
            TlsFailure::NameMismatch => "TlsHandshake: name mismatch",
            TlsFailure::ClientCertificateRejected => "TlsHandshake: client certificate rejected",
            TlsFailure::NoHttp2 => "TlsHandshake: no h2 in ALPN",
            TlsFailure::Failed => "TlsHandshake: failed",
        })
    }
}

/// What a failed handshake's error says, if it came from TLS at all (`None`: a transport
/// error, such as a reset, for the caller to classify).
pub fn tls_failure(error: &std::io::Error) -> Option<TlsFailure> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(match tls {
        rustls::Error::InvalidCertificate(certificate) => match certificate {
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => TlsFailure::CertificateExpired,
            CertificateError::UnknownIssuer | CertificateError::BadSignature => TlsFailure::UnknownAuthority,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsFailure::NameMismatch
            }
            _ => TlsFailure::Failed,
        },
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::AccessDenied,
        ) => TlsFailure::ClientCertificateRejected,
        rustls::Error::NoApplicationProtocol => TlsFailure::NoHttp2,
        _ => TlsFailure::Failed,
    })
}

/// The operator's client certificate and key, read from files and read again when they change.
#[derive(Debug)]
pub struct ClientIdentity {
    certificate: PathBuf,
    key: PathBuf,
    /// How often, at most, the files are looked at ([`IDENTITY_RECHECK`]; tests use zero).
    recheck: Duration,
    state: Mutex<IdentityState>,
}

#[derive(Debug)]
struct IdentityState {
    current: Arc<CertifiedKey>,
    /// The files as they were when `current` was read.
    read_from: (Option<FileStamp>, Option<FileStamp>),
    checked_at: Instant,
}

impl ClientIdentity {
    /// Reads the PEM certificate chain and private key; an error says which file is wrong.
    pub fn load(certificate: &Path, key: &Path) -> Result<Self, String> {
        Self::load_rechecking(certificate, key, IDENTITY_RECHECK)
    }

    fn load_rechecking(certificate: &Path, key: &Path, recheck: Duration) -> Result<Self, String> {
        let current = certified_key(certificate, key)?;
        Ok(Self {
            certificate: certificate.into(),
            key: key.into(),
            recheck,
            state: Mutex::new(IdentityState {
                current,
                read_from: (FileStamp::of(certificate), FileStamp::of(key)),
                checked_at: Instant::now(),
            }),
        })
    }

    /// The certificate to present now, read again if its files changed since.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked_at.elapsed() >= self.recheck {
            state.checked_at = Instant::now();
            let now = (FileStamp::of(&self.certificate), FileStamp::of(&self.key));
            if now != state.read_from {
                // A rotation writes two files: read both, and keep the old pair until they
                // match (a key that does not fit the certificate is an error).
                match certified_key(&self.certificate, &self.key) {
                    Ok(fresh) => {
                        info!(certificate = %self.certificate.display(), "client certificate reloaded");
                        state.current = fresh;
                        state.read_from = now;
                    }
                    Err(error) => warn!(%error, "the client certificate files changed but cannot be used yet"),
                }
            }
        }
        state.current.clone()
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What tells a file's versions apart: a rewrite changes its modification time or size, and
/// a swap (the kubelet renames a new directory over a Secret's mount) its inode, even within
/// the file system's clock tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let metadata = std::fs::metadata(path).ok()?;
        Some(Self {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            inode: metadata.ino(),
        })
    }
}

fn certified_key(certificate: &Path, key: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certificate)
        .map_err(|e| format!("client certificate {}: {e}", certificate.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("client certificate {}: {e}", certificate.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "client certificate {}: no PEM certificate",
            certificate.display()
        ));
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("client key {}: {e}", key.display()))?;
    let provider = ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private_key, &provider).map_err(|e| {
        format!(
            "client certificate {} and key {}: {e}",
            certificate.display(),
            key.display()
        )
    })?;
    Ok(Arc::new(certified))
}

#[cfg(test)]
mod tests;

//! TLS to the endpoints when the GrpcBackend says its backends serve it (`spec.tls`).
//!
//! The client verifies what the operator's health checks verify: every endpoint's certificate
//! must be valid for the GrpcBackend's server name (`spec.tls.serverName`, by default
//! `SERVICE.NAMESPACE.svc`; sent as SNI, and tonic's `domain_name`) and chain to the same roots:
//! the PEM bundle in the ConfigMap `spec.tls.caBundle` names, or the system's without one.
//!
//! The client reads that ConfigMap itself (one GET, again every [`CA_BUNDLE_REFRESH`]) rather
//! than asking the user for the roots: the GrpcBackend is then the one place that says how its
//! backends are verified, for the operator and every client alike, and a rotated bundle reaches
//! both. A CA bundle holds only public certificates, so `get` on that one ConfigMap (a Role
//! with `resourceNames`) is all it costs. A user's own `ClientTlsConfig` ([`Builder::tls`])
//! wins: then nothing is read and the spec's settings are not used.
//!
//! Failing safe, never open: a GrpcBackend that says TLS is never dialed in plaintext. When the
//! client cannot connect with TLS (built without the `tls` feature, a bundle it may not read or
//! that holds no certificate, a `spec.tls` it cannot parse) no endpoint is used and every request
//! fails at once with `Unavailable` and that reason. Once a bundle was read, failing to read it
//! again keeps the last one in use (with a warning), as the operator does.
//!
//! [`Builder::tls`]: crate::Builder::tls

use std::{sync::Arc, time::Duration};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
};
use kubegrpc_crds::BackendTls;
use serde_json::Value;
use tokio::time::Instant;
use tracing::warn;

#[cfg(feature = "tls")]
use crate::endpoint::EndpointTemplate;

/// How long a CA bundle read from its ConfigMap is used before it is read again (the operator
/// reads it once a minute; a client need not be faster than a CA rotation's overlap).
pub const CA_BUNDLE_REFRESH: Duration = Duration::from_secs(300);
/// How long reading the ConfigMap may take.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most bytes of PEM a CA bundle may have (the operator's limit; a ConfigMap holds 1 MiB).
const MAX_CA_BUNDLE: usize = 512 * 1024;

/// `spec.tls` of the GrpcBackend: the name to verify and where the roots are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecTls {
    /// `spec.tls.serverName`, or `SERVICE.NAMESPACE.svc`.
    pub server_name: String,
    /// The CA bundle's ConfigMap and key; `None`: the system's roots.
    pub ca_bundle: Option<(String, String)>,
}

/// Reads `spec.tls` of a GrpcBackend's `spec` (of namespace `namespace`): `Ok(None)` without
/// one, an error (the reason) when it is there but cannot be read, so that it is never taken
/// for plaintext.
pub fn parse_spec_tls(spec: Option<&Value>, namespace: &str) -> Result<Option<SpecTls>, String> {
    let Some(tls) = spec.and_then(|spec| spec.get("tls")).filter(|tls| !tls.is_null()) else {
        return Ok(None);
    };
    let tls: BackendTls = serde_json::from_value(tls.clone()).map_err(|e| format!("spec.tls cannot be read: {e}"))?;
    let server_name = match tls.server_name {
        Some(name) if !name.is_empty() => name,
        _ => {
            let service = spec
                .and_then(|spec| spec.get("service"))
                .and_then(Value::as_str)
                .filter(|service| !service.is_empty())
                .ok_or("spec.tls has no serverName and spec.service cannot be read")?;
            format!("{service}.{namespace}.svc")
        }
    };
    Ok(Some(SpecTls {
        server_name,
        ca_bundle: tls.ca_bundle.map(|bundle| (bundle.config_map, bundle.key)),
    }))
}

/// How the pool connects to the endpoints, as the GrpcBackend's spec says.
#[derive(Clone, Default)]
pub enum Transport {
    /// No `spec.tls` (or the user's own TLS settings, which win).
    #[default]
    Plaintext,
    /// TLS with the settings from the GrpcBackend (only with the `tls` feature).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Tls(SpecTlsConfig),
    /// The GrpcBackend's backends serve TLS but the client cannot connect so: why, naming the
    /// GrpcBackend. No endpoint is used.
    Unavailable(String),
}

impl Transport {
    /// The same connections would be made (a change reconnects every endpoint).
    pub fn same(&self, other: &Transport) -> bool {
        match (self, other) {
            (Transport::Plaintext, Transport::Plaintext) => true,
            (Transport::Tls(a), Transport::Tls(b)) => a.source == b.source,
            (Transport::Unavailable(a), Transport::Unavailable(b)) => a == b,
            _ => false,
        }
    }

    /// A short description for the logs.
    pub fn describe(&self) -> String {
        match self {
            Transport::Plaintext => "plaintext".into(),
            Transport::Tls(tls) => match &tls.source.1 {
                Some(_) => format!("TLS verifying {} against the GrpcBackend's CA bundle", tls.source.0),
                None => format!("TLS verifying {} against the system's roots", tls.source.0),
            },
            Transport::Unavailable(why) => format!("unavailable: {why}"),
        }
    }
}

/// TLS settings built from `spec.tls`.
#[derive(Clone)]
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
pub struct SpecTlsConfig {
    /// What they were built from: the server name and the roots' PEM (`None`: the system's).
    pub source: (String, Option<Arc<str>>),
    #[cfg(feature = "tls")]
    config: tonic::transport::ClientTlsConfig,
}

#[cfg(feature = "tls")]
impl SpecTlsConfig {
    /// `template` (the user's per-endpoint settings), then these TLS settings.
    pub fn template(&self, template: &EndpointTemplate) -> EndpointTemplate {
        let (template, config) = (template.clone(), self.config.clone());
        Arc::new(move |endpoint| template(endpoint)?.tls_config(config.clone()))
    }
}

/// Turns `spec.tls` into a [`Transport`], reading the CA bundle's ConfigMap (see the module
/// docs); keeps the last bundle read.
pub struct TlsResolver {
    client: Client,
    namespace: String,
    /// The GrpcBackend, `namespace/name`.
    backend: String,
    /// The last bundle read: from which ConfigMap and key, its PEM, and when.
    bundle: Option<ReadBundle>,
}

struct ReadBundle {
    source: (String, String),
    pem: Arc<str>,
    read_at: Instant,
}

impl TlsResolver {
    pub fn new(client: Client, namespace: String, backend: String) -> Self {
        Self {
            client,
            namespace,
            backend,
            bundle: None,
        }
    }

    /// When the bundle in use should be read again (`None`: none in use).
    pub fn refresh_due(&self) -> Option<Instant> {
        self.bundle.as_ref().map(|bundle| bundle.read_at + CA_BUNDLE_REFRESH)
    }

    /// How to connect for `spec` (what [`parse_spec_tls`] read). Reads the bundle when the
    /// spec names another one than the last read, or the last read is older than
    /// [`CA_BUNDLE_REFRESH`].
    pub async fn resolve(&mut self, spec: &Result<Option<SpecTls>, String>) -> Transport {
        let spec = match spec {
            Ok(None) => {
                self.bundle = None;
                return Transport::Plaintext;
            }
            Ok(Some(spec)) => spec,
            Err(why) => return self.unavailable(why),
        };
        if cfg!(not(feature = "tls")) {
            return self.build(&spec.server_name, None);
        }
        let Some(source) = spec.ca_bundle.clone() else {
            self.bundle = None;
            return self.build(&spec.server_name, None);
        };
        let fresh = self
            .bundle
            .as_ref()
            .filter(|bundle| bundle.source == source && bundle.read_at.elapsed() < CA_BUNDLE_REFRESH);
        if let Some(bundle) = fresh {
            let pem = bundle.pem.clone();
            return self.build(&spec.server_name, Some(pem));
        }
        match self.read_bundle(&source).await {
            Ok(pem) => {
                let pem: Arc<str> = match &self.bundle {
                    // The same PEM keeps its Arc: equal settings, no reconnection.
                    Some(last) if last.source == source && *last.pem == *pem => last.pem.clone(),
                    _ => pem.into(),
                };
                self.bundle = Some(ReadBundle {
                    source,
                    pem: pem.clone(),
                    read_at: Instant::now(),
                });
                self.build(&spec.server_name, Some(pem))
            }
            Err(why) => match self.bundle.as_mut().filter(|bundle| bundle.source == source) {
                Some(last) => {
                    warn!("{why}; keeping the CA bundle read before");
                    // Try again after another refresh interval, not at every status.
                    last.read_at = Instant::now();
                    let pem = last.pem.clone();
                    self.build(&spec.server_name, Some(pem))
                }
                None => self.unavailable(&format!(
                    "{why}. The workload needs RBAC get on that ConfigMap, or the roots given with \
                     Builder::tls"
                )),
            },
        }
    }

    fn unavailable(&self, why: &str) -> Transport {
        Transport::Unavailable(format!("GrpcBackend {}: {why}", self.backend))
    }

    /// TLS settings verifying `server_name` against `pem` (the system's roots for `None`).
    #[cfg(feature = "tls")]
    fn build(&self, server_name: &str, pem: Option<Arc<str>>) -> Transport {
        use tonic::transport::{Certificate, ClientTlsConfig};

        let config = ClientTlsConfig::new().domain_name(server_name);
        let config = match &pem {
            Some(pem) => config.ca_certificate(Certificate::from_pem(pem.as_bytes())),
            None => config.with_native_roots(),
        };
        Transport::Tls(SpecTlsConfig {
            source: (server_name.to_string(), pem),
            config,
        })
    }

    /// Without the `tls` feature there is no TLS to connect with: the reason.
    #[cfg(not(feature = "tls"))]
    fn build(&self, server_name: &str, _pem: Option<Arc<str>>) -> Transport {
        self.unavailable(&format!(
            "its backends serve TLS (spec.tls, server name {server_name}), but this program was built without \
             the kubegrpc crate's `tls` feature"
        ))
    }

    /// The PEM of ConfigMap `name` key `key`, checked to hold at least one certificate, or why
    /// it cannot be had.
    async fn read_bundle(&self, (name, key): &(String, String)) -> Result<String, String> {
        let what = format!("ConfigMap {}/{name} key {key} (spec.tls.caBundle)", self.namespace);
        let config_maps = ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            plural: "configmaps".into(),
        };
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &self.namespace, &config_maps);
        let config_map = match tokio::time::timeout(READ_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(Some(config_map))) => config_map,
            Ok(Ok(None)) => return Err(format!("its CA bundle, {what}, does not exist")),
            Ok(Err(error)) => return Err(format!("cannot read its CA bundle, {what}: {error}")),
            Err(_) => return Err(format!("reading its CA bundle, {what}, timed out")),
        };
        let pem = config_map
            .data
            .get("data")
            .and_then(|data| data.get(key))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("its CA bundle, {what}: no such key"))?;
        check_bundle(pem).map_err(|why| format!("its CA bundle, {what}: {why}"))?;
        Ok(pem.to_string())
    }
}

/// Whether `pem` is a usable bundle: within the size limit, with at least one certificate and
/// nothing unreadable.
fn check_bundle(pem: &str) -> Result<(), String> {
    if pem.len() > MAX_CA_BUNDLE {
        return Err(format!(
            "{} bytes, over the {MAX_CA_BUNDLE} bytes a bundle may have",
            pem.len()
        ));
    }
    #[cfg(feature = "tls")]
    {
        use rustls_pki_types::{CertificateDer, pem::PemObject};

        let mut count = 0;
        for certificate in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            certificate.map_err(|e| format!("not valid PEM: {e}"))?;
            count += 1;
        }
        if count == 0 {
            return Err("no PEM certificate in it".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn spec_tls_gives_the_server_name_and_the_bundle_with_their_defaults() {
        let spec = json!({"service": "echo", "port": "grpc", "tls": {"caBundle": {"configMap": "ca"}}});
        assert_eq!(
            parse_spec_tls(Some(&spec), "shop"),
            Ok(Some(SpecTls {
                server_name: "echo.shop.svc".into(),
                ca_bundle: Some(("ca".into(), "ca.crt".into())),
            }))
        );
        let spec = json!({"service": "echo", "tls": {"serverName": "api.example.com"}});
        assert_eq!(
            parse_spec_tls(Some(&spec), "shop"),
            Ok(Some(SpecTls {
                server_name: "api.example.com".into(),
                ca_bundle: None,
            }))
        );
        assert_eq!(parse_spec_tls(Some(&json!({"service": "echo"})), "shop"), Ok(None));
        assert_eq!(
            parse_spec_tls(Some(&json!({"service": "echo", "tls": null})), "shop"),
            Ok(None)
        );
        assert_eq!(parse_spec_tls(None, "shop"), Ok(None));
    }

    #[test]
    fn a_spec_tls_that_cannot_be_read_is_an_error_never_plaintext() {
        let bad = json!({"service": "echo", "tls": {"caBundle": "ca"}});
        let why = parse_spec_tls(Some(&bad), "shop").expect_err("unreadable");
        assert!(why.starts_with("spec.tls cannot be read"), "{why}");
        let no_service = json!({"tls": {}});
        assert!(parse_spec_tls(Some(&no_service), "shop").is_err());
    }

    /// A self-signed CA certificate (P-256), for bundles.
    const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBpTCCAUugAwIBAgIUD5SufSmQJEgqkHUMJv0dFTZwAl0wCgYIKoZIzj0EAwIw\nJzElMCMGA1UEAwwca3ViZWdycGMgY2xpZW50IHVuaXQtdGVzdCBDQTAgFw0yNjEy\nMDYwMTIxMTVaGA8yMTI2MTExMjAxMjExNVowJzElMCMGA1UEAwwca3ViZWdycGMg\nY2xpZW50IHVuaXQtdGVzdCBDQTBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABE4i\nb/wQSJgpTk5c76GXC8/G7Lf6QlsXyB8ASVI/cLe3HxLvS4cLZOBvGaJKt1EgEhwB\nPWQ6UpYmzpvlBKZNMrKjUzBRMB0GA1UdDgQWBBTY8n1Q6o0ajRn3Ur9T3LGESLPz\nDzAfBgNVHSMEGDAWgBTY8n1Q6o0ajRn3Ur9T3LGESLPzDzAPBgNVHRMBAf8EBTAD\nAQH/MAoGCCqGSM49BAMCA0gAMEUCIFfO+qqEPHfNQLPFMH+Y//h9XKmqbyjbwNO4\ndUEYsMl5AiEA5T+dAj4gfBez5Iwj8ZkLiM1HAqsPukDV95qq6oiYelk=\n-----END CERTIFICATE-----\n";

    /// A kube client whose API server answers the requests in turn with `answers` (status,
    /// body; the last one again once they run out), and the paths it was asked for.
    fn client_answering(answers: Vec<(u16, Value)>) -> (Client, Arc<std::sync::Mutex<Vec<String>>>) {
        let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = paths.clone();
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let mut seen = seen.lock().unwrap();
            seen.push(request.uri().path().to_string());
            let (status, body) = answers[(seen.len() - 1).min(answers.len() - 1)].clone();
            let response = http::Response::builder()
                .status(status)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))
                .expect("a valid response");
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
        (Client::new(service, "shop"), paths)
    }

    fn config_map(pem: &str) -> (u16, Value) {
        (
            200,
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ca", "namespace": "shop"},
                "data": {"ca.crt": pem}}),
        )
    }

    #[cfg(feature = "tls")]
    fn not_found() -> (u16, Value) {
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404,
                "message": "configmaps \"ca\" not found"}),
        )
    }

    #[cfg(feature = "tls")]
    fn forbidden() -> (u16, Value) {
        (
            403,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": "configmaps \"ca\" is forbidden"}),
        )
    }

    fn with_bundle() -> Result<Option<SpecTls>, String> {
        Ok(Some(SpecTls {
            server_name: "echo.shop.svc".into(),
            ca_bundle: Some(("ca".into(), "ca.crt".into())),
        }))
    }

    fn unavailable_reason(transport: &Transport) -> &str {
        match transport {
            Transport::Unavailable(why) => why,
            other => panic!("unavailable expected, got {}", other.describe()),
        }
    }

    #[cfg(not(feature = "tls"))]
    #[tokio::test]
    async fn without_the_tls_feature_a_tls_backend_is_unavailable_and_says_why() {
        let (client, paths) = client_answering(vec![config_map(CA_PEM)]);
        let mut resolver = TlsResolver::new(client, "shop".into(), "shop/echo".into());
        let transport = resolver.resolve(&with_bundle()).await;
        let why = unavailable_reason(&transport);
        assert!(
            why.starts_with("GrpcBackend shop/echo: its backends serve TLS"),
            "{why}"
        );
        assert!(why.contains("`tls` feature"), "{why}");
        assert!(paths.lock().unwrap().is_empty(), "nothing read for nothing");
        assert!(matches!(resolver.resolve(&Ok(None)).await, Transport::Plaintext));
    }

    #[tokio::test]
    async fn a_spec_tls_that_cannot_be_read_makes_the_backend_unavailable() {
        let (client, _) = client_answering(vec![config_map(CA_PEM)]);
        let mut resolver = TlsResolver::new(client, "shop".into(), "shop/echo".into());
        let transport = resolver.resolve(&Err("spec.tls cannot be read: oops".into())).await;
        assert_eq!(
            unavailable_reason(&transport),
            "GrpcBackend shop/echo: spec.tls cannot be read: oops"
        );
    }

    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn the_bundle_is_read_from_its_config_map_with_the_server_name_from_the_spec() {
        let (client, paths) = client_answering(vec![config_map(CA_PEM)]);
        let mut resolver = TlsResolver::new(client, "shop".into(), "shop/echo".into());
        let Transport::Tls(tls) = resolver.resolve(&with_bundle()).await else {
            panic!("TLS expected")
        };
        assert_eq!(tls.source.0, "echo.shop.svc");
        assert_eq!(tls.source.1.as_deref(), Some(CA_PEM));
        assert_eq!(*paths.lock().unwrap(), ["/api/v1/namespaces/shop/configmaps/ca"]);
        // The next status within the refresh interval reads nothing.
        let again = resolver.resolve(&with_bundle()).await;
        assert!(again.same(&Transport::Tls(tls)));
        assert_eq!(paths.lock().unwrap().len(), 1);
        // No bundle: the system's roots, nothing read.
        let system = Ok(Some(SpecTls {
            server_name: "echo.shop.svc".into(),
            ca_bundle: None,
        }));
        let Transport::Tls(tls) = resolver.resolve(&system).await else {
            panic!("TLS expected")
        };
        assert_eq!(tls.source, ("echo.shop.svc".to_string(), None));
        assert_eq!(paths.lock().unwrap().len(), 1);
    }

    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn a_bundle_that_cannot_be_read_first_is_unavailable_naming_the_config_map_and_the_rbac() {
        for (answer, says) in [
            (
                forbidden(),
                "cannot read its CA bundle, ConfigMap shop/ca key ca.crt (spec.tls.caBundle)",
            ),
            (
                not_found(),
                "its CA bundle, ConfigMap shop/ca key ca.crt (spec.tls.caBundle), does not exist",
            ),
            (config_map("not a certificate"), "no PEM certificate in it"),
        ] {
            let (client, _) = client_answering(vec![answer]);
            let mut resolver = TlsResolver::new(client, "shop".into(), "shop/echo".into());
            let transport = resolver.resolve(&with_bundle()).await;
            let why = unavailable_reason(&transport);
            assert!(why.starts_with("GrpcBackend shop/echo: "), "{why}");
            assert!(why.contains(says), "{why}");
            assert!(why.contains("RBAC get on that ConfigMap"), "{why}");
        }
    }

    #[cfg(feature = "tls")]
    #[tokio::test(start_paused = true)]
    async fn once_read_a_bundle_that_goes_missing_stays_in_use_and_is_read_again_later() {
        let (client, paths) = client_answering(vec![config_map(CA_PEM), not_found(), config_map(CA_PEM)]);
        let mut resolver = TlsResolver::new(client, "shop".into(), "shop/echo".into());
        let first = resolver.resolve(&with_bundle()).await;
        assert!(matches!(first, Transport::Tls(_)));
        assert_eq!(resolver.refresh_due(), Some(Instant::now() + CA_BUNDLE_REFRESH));
        tokio::time::advance(CA_BUNDLE_REFRESH).await;
        let kept = resolver.resolve(&with_bundle()).await;
        assert!(
            kept.same(&first),
            "the last bundle, not unavailable: {}",
            kept.describe()
        );
        assert_eq!(paths.lock().unwrap().len(), 2, "read again");
        tokio::time::advance(CA_BUNDLE_REFRESH).await;
        let back = resolver.resolve(&with_bundle()).await;
        assert!(back.same(&first), "the same bundle: no reconnection");
        assert_eq!(paths.lock().unwrap().len(), 3);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn a_bundle_must_hold_a_certificate() {
        assert_eq!(check_bundle(CA_PEM), Ok(()));
        assert_eq!(check_bundle(""), Err("no PEM certificate in it".into()));
        assert_eq!(check_bundle("hello"), Err("no PEM certificate in it".into()));
        let broken = "-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        assert!(check_bundle(broken).is_err());
        assert!(check_bundle(&"x".repeat(MAX_CA_BUNDLE + 1)).is_err());
    }
}

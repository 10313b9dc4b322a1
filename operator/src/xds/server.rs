//! The Aggregated Discovery Service, state of the world (what grpc-go and grpc-java clients
//! speak), served from the [`XdsCache`].
//!
//! One task per stream. It answers nothing before the cache has synced (a state-of-the-world
//! response that lacks a resource deletes it). For each resource type a client subscribes to, it
//! sends the subscribed resources that exist whenever their versions differ from what it last
//! sent on this stream, or the subscription changed; every response has a new nonce. A NACK is
//! counted (`kubegrpc_xds_nacks_total` by type) and logged with its error text, and the
//! client keeps what it had; requests with a stale nonce are ignored, as the protocol says.
//!
//! Bounded per client: at most [`MAX_NAMES`] names per type are kept (the rest are ignored
//! with a warning), responses go through a channel of [`RESPONSE_BUFFER`], and a client that
//! does not read only blocks its own task, which always sends the current state, never a
//! backlog.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    pin::Pin,
    sync::Arc,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use super::cache::{XdsCache, is_served};
use crate::metrics::Metrics;

/// The most resource names one client may subscribe to per type.
pub const MAX_NAMES: usize = 10_000;
/// Responses queued for one client at most.
pub const RESPONSE_BUFFER: usize = 4;

/// The ADS service; see the module docs.
pub struct AdsServer {
    cache: Arc<XdsCache>,
    metrics: Arc<Metrics>,
    /// Turns true when the server shuts down: every stream ends, so that the clients reconnect
    /// (to another replica, or to this address once it is back) and a graceful shutdown,
    /// which waits for open streams, completes.
    closing: tokio::sync::watch::Receiver<bool>,
}

impl AdsServer {
    pub fn new(cache: Arc<XdsCache>, metrics: Arc<Metrics>, closing: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            cache,
            metrics,
            closing,
        }
    }
}

/// What one stream subscribed to for one type, and what it was last sent.
#[derive(Default)]
struct Subscription {
    /// `None`: the wildcard (every resource of the type).
    names: Option<BTreeSet<String>>,
    /// Name -> version last sent; `None` before the first response.
    sent: Option<BTreeMap<String, String>>,
    /// The nonce of the latest response.
    nonce: String,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let (responses, receiver) = mpsc::channel(RESPONSE_BUFFER);
        let closing = self.closing.clone();
        let stream = ClientStream {
            cache: self.cache.clone(),
            metrics: self.metrics.clone(),
            peer,
            subscriptions: HashMap::new(),
            nonces: 0,
        };
        tokio::spawn(stream.run(request.into_inner(), responses, closing));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn delta_aggregated_resources(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "kubegrpc serves state-of-the-world ADS only (what grpc-go and grpc-java clients use)",
        ))
    }
}

/// Not API: one stream's request handling without a transport, for the fuzz targets (fuzz/):
/// feeds `requests` in order and returns what the stream would send after each, as it does once
/// `cache` is synced.
#[doc(hidden)]
pub fn respond_to_requests(
    cache: Arc<XdsCache>,
    requests: impl IntoIterator<Item = DiscoveryRequest>,
) -> Vec<Vec<DiscoveryResponse>> {
    let mut stream = ClientStream {
        cache,
        metrics: Arc::default(),
        peer: "fuzz".into(),
        subscriptions: HashMap::new(),
        nonces: 0,
    };
    requests
        .into_iter()
        .map(|request| {
            stream.on_request(request);
            stream.due_responses()
        })
        .collect()
}

/// One client stream.
struct ClientStream {
    cache: Arc<XdsCache>,
    metrics: Arc<Metrics>,
    peer: String,
    subscriptions: HashMap<String, Subscription>,
    nonces: u64,
}

impl ClientStream {
    async fn run(
        mut self,
        mut requests: Streaming<DiscoveryRequest>,
        responses: mpsc::Sender<Result<DiscoveryResponse, Status>>,
        mut closing: tokio::sync::watch::Receiver<bool>,
    ) {
        self.metrics.xds_streams.inc();
        let mut generation = self.cache.subscribe();
        loop {
            tokio::select! {
                request = requests.message() => match request {
                    Ok(Some(request)) => self.on_request(request),
                    Ok(None) => break,
                    Err(status) => {
                        debug!(peer = %self.peer, %status, "xDS stream ended");
                        break;
                    }
                },
                changed = generation.changed() => if changed.is_err() { break },
                () = responses.closed() => break,
                _ = closing.wait_for(|closing| *closing) => break,
            }
            if !self.cache.is_synced() {
                continue;
            }
            for response in self.due_responses() {
                self.metrics
                    .xds_responses
                    .get_or_create(&crate::metrics::XdsTypeLabels {
                        type_url: response.type_url.clone(),
                    })
                    .inc();
                if responses.send(Ok(response)).await.is_err() {
                    self.metrics.xds_streams.dec();
                    return;
                }
            }
        }
        self.metrics.xds_streams.dec();
    }

    fn on_request(&mut self, request: DiscoveryRequest) {
        if !is_served(&request.type_url) {
            debug!(peer = %self.peer, type_url = %request.type_url, "xDS request for a type not served; ignored");
            return;
        }
        let subscription = self.subscriptions.entry(request.type_url.clone()).or_default();
        // A request answering an older response than the latest is stale: ignore it.
        if !request.response_nonce.is_empty() && request.response_nonce != subscription.nonce {
            return;
        }
        if let Some(error) = &request.error_detail {
            self.metrics
                .xds_nacks
                .get_or_create(&crate::metrics::XdsTypeLabels {
                    type_url: request.type_url.clone(),
                })
                .inc();
            let node = request.node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
            warn!(peer = %self.peer, %node, type_url = %request.type_url, version = %request.version_info,
                error = %error.message, "xDS client rejected a response (NACK)");
        }
        let mut names: Vec<String> = request.resource_names;
        if names.len() > MAX_NAMES {
            warn!(peer = %self.peer, type_url = %request.type_url, asked = names.len(), kept = MAX_NAMES,
                "xDS client subscribed to too many names; the rest are ignored");
            names.truncate(MAX_NAMES);
        }
        // An empty list is the wildcard for Listeners and Clusters; for the others it means none.
        let wildcard = names.is_empty()
            && (request.type_url == super::resources::type_url::LISTENER
                || request.type_url == super::resources::type_url::CLUSTER);
        let names = (!wildcard).then(|| names.into_iter().collect::<BTreeSet<_>>());
        if subscription.names != names {
            subscription.names = names;
            // A changed subscription is answered even when no resource changed.
            subscription.sent = None;
        }
    }

    /// The responses the stream owes: per type, when what would be sent differs from what was.
    fn due_responses(&mut self) -> Vec<DiscoveryResponse> {
        let mut due = Vec::new();
        let mut types: Vec<&String> = self.subscriptions.keys().collect();
        types.sort();
        let types: Vec<String> = types.into_iter().cloned().collect();
        for type_url in types {
            let subscription = self.subscriptions.get_mut(&type_url).expect("listed above");
            let current = self.cache.get(&type_url, subscription.names.as_ref());
            let versions: BTreeMap<String, String> =
                current.iter().map(|(n, r)| (n.clone(), r.version.clone())).collect();
            if subscription.sent.as_ref() == Some(&versions) {
                continue;
            }
            self.nonces += 1;
            let nonce = self.nonces.to_string();
            let version_info = {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::hash::DefaultHasher::new();
                versions.hash(&mut hasher);
                format!("{:016x}", hasher.finish())
            };
            debug!(peer = %self.peer, %type_url, resources = versions.len(), %nonce, "xDS push");
            subscription.nonce = nonce.clone();
            subscription.sent = Some(versions);
            due.push(DiscoveryResponse {
                version_info,
                resources: current.into_iter().map(|(_, r)| r.resource).collect(),
                type_url,
                nonce,
                ..Default::default()
            });
        }
        due
    }
}

/// TLS for the xDS port: the server's certificate chain and key (PEM), and, for mutual TLS, the
/// CA bundle that client certificates must chain to (clients without one are refused).
#[derive(Clone)]
pub struct XdsTls {
    pub certificate_chain: Vec<u8>,
    pub private_key: Vec<u8>,
    pub client_ca: Option<Vec<u8>>,
}

impl XdsTls {
    /// Reads the PEM files (read once, at start: a rotated certificate takes a restart).
    pub fn read(
        certificate_file: &std::path::Path,
        key_file: &std::path::Path,
        client_ca_file: Option<&std::path::Path>,
    ) -> std::io::Result<Self> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        };
        let tls = Self {
            certificate_chain: read(certificate_file)?,
            private_key: read(key_file)?,
            client_ca: client_ca_file.map(read).transpose()?,
        };
        // Refuse bad PEM now, at start, rather than when the server starts listening.
        tonic::transport::Server::builder()
            .tls_config(tls.config())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("xDS TLS: {e}")))?;
        Ok(tls)
    }

    fn config(&self) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.certificate_chain, &self.private_key));
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// Serves ADS on `address` until `shutdown` resolves, over TLS when `tls` is given.
pub async fn serve(
    address: std::net::SocketAddr,
    cache: Arc<XdsCache>,
    metrics: Arc<Metrics>,
    tls: Option<XdsTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    serve_tls_on(listener, cache, metrics, tls, shutdown).await
}

/// Serves ADS in plain text on `listener` until `shutdown` resolves.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    cache: Arc<XdsCache>,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls_on(listener, cache, metrics, None, shutdown).await
}

/// Serves ADS on `listener` until `shutdown` resolves, over TLS when `tls` is given.
pub async fn serve_tls_on(
    listener: tokio::net::TcpListener,
    cache: Arc<XdsCache>,
    metrics: Arc<Metrics>,
    tls: Option<XdsTls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
    let security = match &tls {
        None => "plain text",
        Some(XdsTls { client_ca: None, .. }) => "TLS",
        Some(XdsTls { client_ca: Some(_), .. }) => "mutual TLS",
    };
    info!(address = %listener.local_addr()?, security, "serving xDS (ADS, state of the world)");
    let (close, closing) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown.await;
        let _ = close.send(true);
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.config())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("xDS TLS: {e}")))?;
    }
    builder
        .add_service(AggregatedDiscoveryServiceServer::new(AdsServer::new(
            cache, metrics, closing,
        )))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(std::io::Error::other)
}

//! The channel: a clonable `tower::Service` that any tonic-generated client runs on.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use kube::Client;
use tokio::sync::oneshot;
use tonic::{Status, body::Body};
use tracing::debug;

use crate::{
    Error,
    connection::Dial,
    endpoint::{EndpointTemplate, ReplayBody},
    failure::Failure,
    outlier::OutlierDetection,
    pool::{Pool, PoolConfig},
    router::{PoolTasks, Routed, Router, Spawner},
    routes::BackendKey,
    snapshot::{DiscoveryState, Snapshot},
};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A gRPC channel balanced over the endpoints of one GrpcBackend, by weight.
///
/// ```no_run
/// # async fn example(kube_client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let channel = kubegrpc::Channel::builder(kube_client, "default", "echo").connect().await?;
/// // Any tonic-generated client: EchoClient::new(channel.clone())
/// channel.ready().await; // optional: wait for a usable endpoint
/// # Ok(()) }
/// ```
///
/// Requests go to usable endpoints (Serving, weight above 0, not ejected) in proportion to
/// their weights: with a zone ([`Builder::zone`]), to those for the client's zone while there
/// is one; while an endpoint slow-starts (the GrpcBackend's `spec.weighting.slowStartWindow`),
/// with part of its weight. With none usable, a request fails at once with `Unavailable` and a
/// message naming the GrpcBackend and why. Clones share the connections and the discovery task;
/// the task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Arc<Pool>,
    /// Where each call goes: the pool, or the pool a routing table picks.
    router: Arc<Router>,
    /// The discovery task and the outlier-detection timer end with the last clone.
    _tasks: PoolTasks,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("backend", &self.pool.backend).finish()
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("backend", &self.inner.pool.backend)
            .finish()
    }
}

impl Channel {
    /// Starts configuring a channel for GrpcBackend `namespace/name`.
    pub fn builder(client: Client, namespace: impl Into<String>, name: impl Into<String>) -> Builder {
        Builder {
            client,
            namespace: namespace.into(),
            name: name.into(),
            template: Arc::new(|endpoint| Ok(endpoint.connect_timeout(Duration::from_secs(5)))),
            tls: false,
            outlier_detection: None,
            panic_threshold: 50,
            transparent_retry: true,
            zone: None,
        }
    }

    /// Resolves once a request can be sent to a usable endpoint. Bound it with the caller's
    /// deadline, e.g. `tokio::time::timeout(deadline, channel.ready())`.
    ///
    /// With a routing table (`status.routes`, see the crate docs), once every entry that names
    /// a backend of weight above 0 has at least one such backend with a usable endpoint: then
    /// no call the table routes fails for want of an endpoint (shares follow the weights once
    /// every weighted backend has one; the snapshot shows each). A table that routes nothing
    /// (no entry with a weighted backend) is never ready.
    pub async fn ready(&self) {
        self.inner.router.ready().await;
    }

    /// A read-only copy of the channel's state: endpoints, weights, health, ejections and
    /// per-endpoint counters; with a routing table, the table and each routed-to GrpcBackend's
    /// pool ([`Snapshot::routing`]).
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.inner.pool.snapshot();
        snapshot.routing = self.inner.router.snapshot();
        snapshot
    }

    /// How the channel's view of the GrpcBackend is kept (synced, not found, stale).
    pub fn discovery_state(&self) -> DiscoveryState {
        self.inner.pool.discovery()
    }

    /// The GrpcBackend followed, `namespace/name`.
    pub fn backend(&self) -> &str {
        &self.inner.pool.backend
    }

    /// A handle that does not keep the channel (and its discovery task) alive.
    #[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
    pub(crate) fn downgrade(&self) -> WeakChannel {
        WeakChannel(Arc::downgrade(&self.inner))
    }
}

/// A [`Channel`] that may be gone.
#[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
#[derive(Clone, Debug)]
pub(crate) struct WeakChannel(std::sync::Weak<Inner>);

#[cfg_attr(not(feature = "prometheus"), allow(dead_code))]
impl WeakChannel {
    pub(crate) fn upgrade(&self) -> Option<Channel> {
        self.0.upgrade().map(|inner| Channel { inner })
    }
}

/// Configures a [`Channel`].
#[must_use]
pub struct Builder {
    client: Client,
    namespace: String,
    name: String,
    template: EndpointTemplate,
    tls: bool,
    outlier_detection: Option<OutlierDetection>,
    panic_threshold: u8,
    transparent_retry: bool,
    zone: Option<ZoneSource>,
}

/// Where the client's zone comes from.
enum ZoneSource {
    Named(String),
    Node(String),
}

impl Builder {
    /// Per-endpoint connection settings: called with a `tonic::transport::Endpoint` for each
    /// endpoint's address (connect timeout 5s unless changed here).
    ///
    /// ```no_run
    /// # fn example(builder: kubegrpc::Builder) -> kubegrpc::Builder {
    /// use std::time::Duration;
    /// builder.endpoint(|endpoint| {
    ///     Ok(endpoint
    ///         .timeout(Duration::from_secs(2))
    ///         .connect_timeout(Duration::from_secs(1)))
    /// })
    /// # }
    /// ```
    ///
    /// HTTP/2 keepalive PINGs are rarely needed (the operator health-checks every endpoint for
    /// all clients). If you set `http2_keep_alive_interval`, keep it at 5 minutes or more and
    /// leave `keep_alive_while_idle` off: grpc-go and grpc-java servers by default allow one
    /// PING per 5 minutes and close connections that send more (GOAWAY "too_many_pings").
    pub fn endpoint(
        mut self,
        configure: impl Fn(tonic::transport::Endpoint) -> Result<tonic::transport::Endpoint, tonic::transport::Error>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        self.template = Arc::new(configure);
        self
    }

    /// TLS to every endpoint (`https`), with tonic's client TLS settings, whatever the
    /// GrpcBackend's `spec.tls` says: these settings win, and the spec's CA bundle is not read.
    /// Give the config the name the certificates carry (`domain_name`, e.g. the GrpcBackend's
    /// `spec.tls.serverName` or `SERVICE.NAMESPACE.svc`): otherwise tonic verifies the
    /// endpoint's IP address, which certificates rarely name.
    ///
    /// Without this call a GrpcBackend with `spec.tls` is connected to with TLS built from the
    /// spec (the server name, and the roots from its CA bundle ConfigMap, which the workload
    /// then needs RBAC `get` on, or the system's roots); see the crate docs.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: tonic::transport::ClientTlsConfig) -> Self {
        let previous = self.template.clone();
        self.tls = true;
        self.template = Arc::new(move |endpoint| previous(endpoint)?.tls_config(config.clone()));
        self
    }

    /// Passive outlier detection settings for this channel, instead of the GrpcBackend's
    /// `spec.outlierDetection`: settings given here win, and changes to the spec are then not
    /// followed. Without this call the channel follows the spec (unset: gRFC A50's defaults, a
    /// 10s interval, failure percentage above 85% over at least 5 endpoints with 50 requests
    /// each, 30s base ejection, 300s max, at most 10% of endpoints rounded up; plus ejection
    /// after 5 connection attempts failed in a row), the same settings xDS clients get.
    /// Connection rotation and the caller's own deadlines and cancellations never count.
    pub fn outlier_detection(mut self, outlier_detection: OutlierDetection) -> Self {
        self.outlier_detection = Some(outlier_detection);
        self
    }

    /// Below this percentage of Kubernetes-ready endpoints usable, spread requests over all
    /// Kubernetes-ready endpoints (default 50; 0 turns it off).
    pub fn panic_threshold(mut self, percent: u8) -> Self {
        self.panic_threshold = percent.min(100);
        self
    }

    /// Send again a request that certainly never reached a backend's application (no
    /// connection, a refused stream, a GOAWAY that left it out; the body is kept up to 64 KiB
    /// for that), or that failed on a broken connection before its body was read: at most
    /// two more attempts, on another endpoint unless the first was only rotating its connection
    /// (default on).
    pub fn transparent_retry(mut self, enabled: bool) -> Self {
        self.transparent_retry = enabled;
        self
    }

    /// The client's zone: requests go only to the usable endpoints for this zone while there is
    /// at least one, and to every usable endpoint (in every zone) while there is none; they
    /// move back as soon as an endpoint for the zone is usable again. These are kube-proxy's
    /// semantics for Services with `trafficDistribution: PreferClose` (or `PreferSameZone`) or
    /// topology-aware routing: an endpoint is for zone Z when its EndpointSlice hints
    /// (`hints.forZones`, published as `forZones`) name Z, or, when it has no hints, when its
    /// own zone is Z. An empty string means no zone (every endpoint, as without this call).
    ///
    /// Panic mode ([`Builder::panic_threshold`]) is decided over every zone and, when it is on,
    /// spreads requests over every Kubernetes-ready endpoint of every zone: too few endpoints
    /// are usable to trust the health view, so the load goes as wide as it can (Envoy, too,
    /// routes zone-aware only outside panic mode). Outlier detection counts every zone.
    ///
    /// Slow start shapes the shares within the rotation: an endpoint that becomes usable while
    /// it is alone in the client's zone takes the zone's whole traffic at once.
    ///
    /// Connections are opened to the endpoints in rotation only: while the zone has usable
    /// endpoints, no connection is held to other zones; falling back opens them.
    ///
    /// In a Pod, the zone is best passed in from the downward API. The downward API cannot read
    /// Node labels, but Kubernetes copies the Node's `topology.kubernetes.io/zone` label onto
    /// the Pod when it binds the Pod to its Node, if the `PodTopologyLabels` admission plugin
    /// is on (feature gate `PodTopologyLabelsAdmission`: alpha in Kubernetes 1.33, beta from
    /// 1.35, KEP-4742); the Pod's label can then be read into an env var:
    ///
    /// ```yaml
    /// env:
    ///   - name: ZONE
    ///     valueFrom:
    ///       fieldRef:
    ///         fieldPath: metadata.labels['topology.kubernetes.io/zone']
    /// ```
    ///
    /// ```no_run
    /// # fn example(builder: kubegrpc::Builder) -> kubegrpc::Builder {
    /// builder.zone(std::env::var("ZONE").unwrap_or_default())
    /// # }
    /// ```
    ///
    /// Otherwise read the Node's label with [`Builder::zone_from_node`].
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(ZoneSource::Named(zone.into()));
        self
    }

    /// The client's zone (see [`Builder::zone`]) from the `topology.kubernetes.io/zone` label of
    /// Node `node_name` (typically the Pod's `spec.nodeName`, from the downward API:
    /// `fieldRef: {fieldPath: spec.nodeName}`), read once at connect through the kube client.
    /// If it cannot be read within 10 s (no such Node, no permission, no label), the channel
    /// logs a warning and runs without a zone.
    ///
    /// Needs RBAC `get` on `nodes` (cluster-scoped: a ClusterRole and a ClusterRoleBinding to
    /// the workload's ServiceAccount):
    ///
    /// ```yaml
    /// apiVersion: rbac.authorization.k8s.io/v1
    /// kind: ClusterRole
    /// metadata:
    ///   name: kubegrpc-client-node-reader
    /// rules:
    ///   - apiGroups: [""]
    ///     resources: ["nodes"]
    ///     verbs: ["get"]
    /// ```
    pub fn zone_from_node(mut self, node_name: impl Into<String>) -> Self {
        self.zone = Some(ZoneSource::Node(node_name.into()));
        self
    }

    /// Starts following the GrpcBackend and waits for its first read (found or not). Fails if
    /// the Kubernetes API cannot be read. With [`Builder::zone_from_node`], the Node is read
    /// first.
    pub async fn connect(self) -> Result<Channel, Error> {
        let backend = format!("{}/{}", self.namespace, self.name);
        let (first, first_read) = oneshot::channel();
        let channel = self.start(Some(first));
        match first_read.await {
            Ok(Ok(())) => {
                // The GrpcBackends its routing table names, if any, are read before it returns.
                channel.inner.router.first_reads().await;
                Ok(channel)
            }
            Ok(Err(source)) => Err(Error::Discovery { backend, source }),
            Err(_) => Err(Error::DiscoveryStopped { backend }),
        }
    }

    /// Starts following the GrpcBackend and returns at once; requests fail fast until its
    /// status has been read.
    pub fn connect_lazy(self) -> Channel {
        self.start(None)
    }

    fn start(self, first: Option<oneshot::Sender<Result<(), kube::runtime::watcher::Error>>>) -> Channel {
        let backend = format!("{}/{}", self.namespace, self.name);
        let pool = Pool::new(
            backend,
            PoolConfig {
                template: self.template,
                tls: self.tls,
                outlier_detection: self.outlier_detection,
                panic_threshold: self.panic_threshold,
                transparent_retry: self.transparent_retry,
                dial: Dial::Tcp,
            },
        );
        let router = Router::new(
            BackendKey::new(&self.namespace, &self.name),
            pool.clone(),
            Spawner::Kube(self.client.clone()),
        );
        let node = match self.zone {
            Some(ZoneSource::Named(zone)) => {
                pool.set_zone(Some(zone));
                None
            }
            Some(ZoneSource::Node(node)) => Some((self.client.clone(), node)),
            None => None,
        };
        // The routed-to GrpcBackends' pools are started the same way ([`PoolTasks::spawn`]).
        let tasks = PoolTasks::spawn(
            self.client,
            &self.namespace,
            self.name,
            pool.clone(),
            node,
            first,
            Some(router.clone()),
        );
        Channel {
            inner: Arc::new(Inner {
                pool,
                router,
                _tasks: tasks,
            }),
        }
    }
}

// === impl Service ===

impl tower::Service<http::Request<Body>> for Channel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    /// Always ready: a request with no endpoint to go to fails in its own future with
    /// `Unavailable` (tonic's generated clients would turn an error here into `Unknown`).
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.inner.router.route(&request) {
            Ok(Routed { pool, policy: None }) => Box::pin(send(pool, request)),
            Ok(Routed {
                pool,
                policy: Some(policy),
            }) => Box::pin(crate::route_call::call(pool, policy, request)),
            Err(unavailable) => Box::pin(std::future::ready(Err(Box::new(unavailable) as BoxError))),
        }
    }
}

/// At most this many attempts per request (gRPC's transparent retry is for requests that never
/// reached the application; two more cover a rotation racing another).
const MAX_ATTEMPTS: usize = 3;

async fn send(pool: Arc<Pool>, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
    send_avoiding(&pool, request, &[]).await.result
}

/// How a request went on a pool (after its transparent retries, if any).
pub(crate) struct Sent {
    pub result: Result<http::Response<Body>, BoxError>,
    /// The endpoint of the last attempt; `None` if none could be picked.
    pub endpoint: Option<SocketAddr>,
    /// How the last attempt failed before a response, if it did.
    pub failure: Option<Failure>,
}

impl Sent {
    fn unpicked(error: BoxError) -> Self {
        Self {
            result: Err(error),
            endpoint: None,
            failure: None,
        }
    }
}

/// Sends `request` to an endpoint of `pool` other than those in `avoid` if it has one (a retry
/// of a route's policy avoids the endpoints that failed the call), with transparent retries.
pub(crate) async fn send_avoiding(pool: &Pool, request: http::Request<Body>, avoid: &[SocketAddr]) -> Sent {
    let (parts, body) = request.into_parts();
    if !pool.config.transparent_retry {
        let endpoint = match pick(pool, avoid, None) {
            Ok(endpoint) => endpoint,
            Err(error) => return Sent::unpicked(error),
        };
        return match endpoint.send(http::Request::from_parts(parts, body)).await {
            Ok(response) => Sent {
                result: Ok(response),
                endpoint: Some(endpoint.address),
                failure: None,
            },
            Err(failed) => {
                pool.report_failure(endpoint.address, &failed);
                Sent {
                    endpoint: Some(endpoint.address),
                    failure: Some(failed.failure),
                    result: Err(failed.error.into()),
                }
            }
        };
    }
    let mut parts = parts;
    // The extensions go with the first attempt, uncloned (cloning boxes every entry again): no
    // layer below this channel reads them, and a retried attempt never reached the server.
    let mut extensions = Some(std::mem::take(&mut parts.extensions));
    let mut body = body;
    let mut also_avoid = None;
    for attempt in 1..=MAX_ATTEMPTS {
        let endpoint = match pick(pool, avoid, also_avoid) {
            Ok(endpoint) => endpoint,
            Err(error) => return Sent::unpicked(error),
        };
        let (sent, replay) = ReplayBody::new(body);
        let mut attempt_parts = clone_parts(&parts);
        if let Some(extensions) = extensions.take() {
            attempt_parts.extensions = extensions;
        }
        let failed = match endpoint
            .send(http::Request::from_parts(attempt_parts, Body::new(sent)))
            .await
        {
            Ok(response) => {
                return Sent {
                    result: Ok(response),
                    endpoint: Some(endpoint.address),
                    failure: None,
                };
            }
            Err(failed) => failed,
        };
        pool.report_failure(endpoint.address, &failed);
        let again = match failed.failure {
            failure if failure.never_processed() => replay.replayable(),
            // The connection broke: only a request whose body was never read is certainly
            // unprocessed.
            Failure::Transport | Failure::Drained => replay.unread(),
            Failure::Deadline | Failure::Caller | Failure::Rotation | Failure::Connect => None,
        };
        match again {
            Some(unsent) if attempt < MAX_ATTEMPTS => {
                debug!(backend = %pool.backend, from = %endpoint.address, failure = ?failed.failure, attempt,
                    "transparent retry");
                body = unsent;
                // A rotating endpoint is healthy and has reconnected; a failing one is avoided.
                also_avoid = failed.failure.is_evidence().then_some(endpoint.address);
            }
            _ => {
                return Sent {
                    endpoint: Some(endpoint.address),
                    failure: Some(failed.failure),
                    result: Err(failed.error.into()),
                };
            }
        }
    }
    unreachable!("the last attempt returns")
}

/// Picks an endpoint (one not in `avoid` nor `also_avoid` if there is one), or fails with
/// `Unavailable`.
fn pick(
    pool: &Pool,
    avoid: &[SocketAddr],
    also_avoid: Option<SocketAddr>,
) -> Result<Arc<crate::endpoint::Endpoint>, BoxError> {
    let rotation = pool.rotation();
    let picked = if avoid.is_empty() && also_avoid.is_none() {
        rotation.picker.pick()
    } else {
        rotation
            .picker
            .pick_where(|e| !avoid.contains(&e.address) && also_avoid != Some(e.address))
            .or_else(|| rotation.picker.pick())
    };
    match picked {
        Some(endpoint) => Ok(endpoint.clone()),
        None => Err(Box::new(Status::unavailable(format!(
            "kubegrpc: {}",
            rotation.unavailable
        )))),
    }
}

/// The request line and headers of `parts`, for another attempt (without extensions).
pub(crate) fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let (mut clone, ()) = http::Request::new(()).into_parts();
    clone.method = parts.method.clone();
    clone.uri = parts.uri.clone();
    clone.version = parts.version;
    clone.headers = parts.headers.clone();
    clone
}

#[cfg(test)]
mod tests {
    use crate::{
        outlier::OutlierDetection,
        pool::{Pool, PoolConfig},
        test_support::{BACKEND, MemoryNetwork, apply, entry},
    };

    use super::*;

    fn request() -> http::Request<Body> {
        http::Request::post("/kubegrpc.Test/Call")
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(Body::new(http_body_util::Full::new(bytes::Bytes::from_static(
                b"\0\0\0\0\x05hello",
            ))))
            .expect("a valid request")
    }

    /// A pool on `net` without outlier detection, so that a refusing endpoint stays in rotation.
    fn new_pool(net: &MemoryNetwork, transparent_retry: bool) -> Arc<Pool> {
        Pool::new(
            BACKEND.into(),
            PoolConfig {
                transparent_retry,
                ..net.config(
                    OutlierDetection {
                        enabled: false,
                        ..OutlierDetection::default()
                    },
                    0,
                )
            },
        )
    }

    fn requests_at(pool: &Pool, address: std::net::SocketAddr) -> (u64, u64) {
        let snapshot = pool.snapshot();
        let endpoint = snapshot.endpoint(&address).expect("listed");
        (endpoint.requests, endpoint.failures)
    }

    #[tokio::test]
    async fn with_no_endpoint_a_request_fails_unavailable_with_the_reason() {
        let net = MemoryNetwork::default();
        let pool = new_pool(&net, true);
        let error = send(pool, request()).await.expect_err("nowhere to send");
        let status = error.downcast::<Status>().expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().starts_with("kubegrpc: "), "{status:?}");
    }

    #[tokio::test]
    async fn a_refused_attempt_is_sent_again_to_another_endpoint() {
        let net = MemoryNetwork::default();
        let (up, down) = (net.answering(), net.refusing());
        let pool = new_pool(&net, true);
        apply(&pool, &[entry(up, 100, "Serving"), entry(down, 100, "Serving")]);
        for _ in 0..20 {
            send(pool.clone(), request()).await.expect("every request is served");
        }
        let (down_requests, down_failures) = requests_at(&pool, down);
        let (up_requests, up_failures) = requests_at(&pool, up);
        assert!(down_requests >= 1, "the refusing endpoint was picked first sometimes");
        assert_eq!(down_failures, down_requests, "each attempt there was refused");
        assert_eq!(
            (up_requests, up_failures),
            (20, 0),
            "each request answered once, by the live one"
        );
    }

    #[tokio::test]
    async fn without_transparent_retry_a_refused_attempt_fails_as_a_connect_error() {
        let net = MemoryNetwork::default();
        let down = net.refusing();
        let pool = new_pool(&net, false);
        apply(&pool, &[entry(down, 100, "Serving")]);
        let error = send(pool.clone(), request()).await.expect_err("refused");
        assert_eq!(crate::failure::classify(&*error), Failure::Connect, "{error:?}");
        assert_eq!(requests_at(&pool, down), (1, 1), "one attempt");
    }

    #[tokio::test]
    async fn a_request_is_attempted_at_most_three_times() {
        let net = MemoryNetwork::default();
        let (first, second) = (net.refusing(), net.refusing());
        let pool = new_pool(&net, true);
        apply(&pool, &[entry(first, 100, "Serving"), entry(second, 100, "Serving")]);
        let error = send(pool.clone(), request()).await.expect_err("every endpoint refuses");
        assert_eq!(crate::failure::classify(&*error), Failure::Connect, "{error:?}");
        let attempts = requests_at(&pool, first).0 + requests_at(&pool, second).0;
        assert_eq!(attempts, MAX_ATTEMPTS as u64);
    }

    #[test]
    fn a_retried_request_keeps_its_method_uri_and_headers() {
        let mut original = request();
        original.extensions_mut().insert(42u32);
        let (parts, _) = original.into_parts();
        let clone = clone_parts(&parts);
        assert_eq!(
            (&clone.method, &clone.uri, &clone.version, &clone.headers),
            (&parts.method, &parts.uri, &parts.version, &parts.headers)
        );
        // Extensions go with the first attempt only (nothing below the channel reads them).
        assert!(clone.extensions.is_empty());
    }
}

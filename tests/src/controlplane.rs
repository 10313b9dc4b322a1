//! A real Kubernetes control plane for tests and the demo: etcd and kube-apiserver (and, on
//! request, kube-controller-manager) built from the Go module proxy by
//! `tests/controlplane/build.sh`, started the way controller-runtime's envtest starts them.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};
use tempfile::TempDir;

use crate::{
    certs::{CertificateAuthority, service_account_key},
    netns::{NAMESPACE_ADDRESS, assert_private_network},
    process::{ManagedProcess, log_tail},
};

/// The environment variable naming the directory of the built control-plane binaries
/// (what `tests/controlplane/build.sh` prints). `make test` and `make demo` set it.
pub const BIN_DIR_ENV: &str = "KUBEGRPC_CONTROLPLANE_BIN";

const FIELD_MANAGER: &str = "kubegrpc-tests";
const STARTUP_DEADLINE: Duration = Duration::from_secs(120);

/// What to start besides etcd and kube-apiserver.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneOptions {
    /// Run kube-controller-manager (its EndpointSlice controller writes slices from Pods).
    pub controller_manager: bool,
    /// Write an audit log of every write to GrpcBackends (who patched what, with user agent).
    pub audit_log: bool,
    /// Serve the apiserver's `/debug/pprof` (see [`ControlPlane::apiserver_cpu_profile`]).
    pub profiling: bool,
}

/// A running etcd + kube-apiserver (+ kube-controller-manager), stopped and cleaned up when
/// dropped. Its files (certificates, kubeconfig, logs, etcd data) live in a temporary directory.
pub struct ControlPlane {
    dir: Mutex<Option<TempDir>>,
    path: PathBuf,
    bin: PathBuf,
    etcd: Mutex<Option<ManagedProcess>>,
    apiserver: Mutex<Option<ManagedProcess>>,
    controller_manager: Mutex<Option<ManagedProcess>>,
    apiserver_args: Vec<String>,
    apiserver_port: u16,
    kubeconfig: PathBuf,
    audit_log: Option<PathBuf>,
}

impl ControlPlane {
    /// Starts a control plane, applies `crds/` and waits until the CRDs are Established.
    pub async fn start(options: ControlPlaneOptions) -> Result<Self> {
        assert_private_network();
        let bin = binaries_dir()?;
        let dir = tempfile::Builder::new().prefix("kubegrpc-controlplane-").tempdir()?;
        let path = dir.path().to_path_buf();

        let ca = CertificateAuthority::new("kubegrpc-test-ca")?;
        let serving = ca.serving(
            "kube-apiserver",
            &[
                "localhost",
                "127.0.0.1",
                &NAMESPACE_ADDRESS.to_string(),
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
        )?;
        let admin = ca.client("kubegrpc-admin", Some("system:masters"))?;
        write(&path.join("ca.crt"), ca.cert_pem())?;
        write(&path.join("apiserver.crt"), &serving.cert_pem)?;
        write(&path.join("apiserver.key"), &serving.key_pem)?;
        write(&path.join("admin.crt"), &admin.cert_pem)?;
        write(&path.join("admin.key"), &admin.key_pem)?;
        let (service_account_private, service_account_public) = service_account_key()?;
        write(&path.join("service-account.key"), &service_account_private)?;
        write(&path.join("service-account.pub"), &service_account_public)?;

        // A free port is picked by binding port 0 and closing it, so another process (a test
        // binary beside this one) may take it before etcd binds it: try again on fresh ports.
        let mut attempt = 0;
        let (etcd, etcd_client_port) = loop {
            attempt += 1;
            let etcd_client_port = free_port()?;
            let etcd_peer_port = free_port()?;
            let _ = std::fs::remove_dir_all(path.join("etcd"));
            let etcd = start_etcd(&bin, &path, etcd_client_port, etcd_peer_port)?;
            match wait_for_etcd(&etcd, etcd_client_port) {
                Ok(()) => break (etcd, etcd_client_port),
                Err(error) if attempt < 5 && format!("{error:#}").contains("address already in use") => {
                    eprintln!("etcd lost a port race ({error:#}); trying other ports");
                }
                Err(error) => return Err(error),
            }
        };

        let apiserver_port = free_port()?;
        let audit_log = options.audit_log.then(|| path.join("audit.log"));
        if audit_log.is_some() {
            write(&path.join("audit-policy.yaml"), AUDIT_POLICY)?;
        }
        let apiserver_args = apiserver_args(
            &path,
            apiserver_port,
            etcd_client_port,
            audit_log.is_some(),
            options.profiling,
        );
        let kubeconfig = path.join("admin.kubeconfig");
        write(
            &kubeconfig,
            &kubeconfig_yaml(
                apiserver_port,
                &path.join("ca.crt"),
                Credentials::ClientCert(&path.join("admin.crt"), &path.join("admin.key")),
            ),
        )?;

        let control_plane = Self {
            dir: Mutex::new(Some(dir)),
            path,
            bin,
            etcd: Mutex::new(Some(etcd)),
            apiserver: Mutex::new(None),
            controller_manager: Mutex::new(None),
            apiserver_args,
            apiserver_port,
            kubeconfig,
            audit_log,
        };
        control_plane.start_apiserver().await?;
        control_plane.apply_crds().await?;
        if options.controller_manager {
            control_plane.start_controller_manager()?;
        }
        Ok(control_plane)
    }

    /// The control plane shared by every test of one test binary (each test uses its own
    /// namespace). Started on first use; stopped and removed when the test binary exits.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        extern "C" fn stop_shared() {
            if let Some(Ok(control_plane)) = SHARED.get() {
                control_plane.shutdown();
            }
        }
        let shared = SHARED.get_or_init(|| {
            // Started on a thread of its own with its own runtime: each test has its own
            // runtime, and what is made on one must not depend on another that may be gone.
            let started = std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?
                    .block_on(ControlPlane::start(ControlPlaneOptions::default()))
                    .map_err(|e| format!("{e:#}"))
            })
            .join()
            .unwrap_or_else(|_| Err("starting the control plane panicked".into()));
            // SAFETY: registering a plain extern "C" function.
            #[allow(
                unsafe_code,
                reason = "libc::atexit stops the shared control plane when the test binary exits"
            )]
            unsafe {
                libc::atexit(stop_shared)
            };
            started
        });
        match shared {
            Ok(control_plane) => control_plane,
            Err(error) => panic!("the shared test control plane did not start: {error}"),
        }
    }

    /// A client with the admin's credentials, for the calling runtime.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// The admin kubeconfig (client certificate of a `system:masters` user).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The directory holding this control plane's files; removed with it.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The running apiserver's process id (to read its CPU time from /proc).
    pub fn apiserver_pid(&self) -> Option<i32> {
        self.apiserver.lock().unwrap().as_ref().map(ManagedProcess::pid)
    }

    /// The directory of the control-plane binaries (for `go tool pprof`, which reads the
    /// apiserver binary's symbols).
    pub fn binaries(&self) -> &Path {
        &self.bin
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// The audit log, when started with [`ControlPlaneOptions::audit_log`].
    pub fn audit_log(&self) -> Option<&Path> {
        self.audit_log.as_deref()
    }

    /// Writes a kubeconfig that authenticates with a bearer token (e.g. a ServiceAccount's).
    pub fn write_token_kubeconfig(&self, file_name: &str, token: &str) -> Result<PathBuf> {
        let path = self.path.join(file_name);
        write(
            &path,
            &kubeconfig_yaml(
                self.apiserver_port,
                &self.path.join("ca.crt"),
                Credentials::Token(token),
            ),
        )?;
        Ok(path)
    }

    /// A `kubectl` command (the built one) aimed at this control plane as admin.
    pub fn kubectl(&self) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(self.bin.join("kubectl"));
        command.arg("--kubeconfig").arg(&self.kubeconfig);
        command.kill_on_drop(true);
        command
    }

    /// Runs kubectl with `args` and returns its stdout; fails with its stderr.
    pub async fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        let output = self.kubectl().args(args).output().await.context("cannot run kubectl")?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(String::from_utf8(output.stdout)?)
    }

    /// Creates a namespace with a generated name starting with `prefix` and returns its name.
    pub async fn create_namespace(&self, client: &Client, prefix: &str) -> Result<String> {
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await?;
        created
            .metadata
            .name
            .ok_or_else(|| anyhow!("created namespace has no name"))
    }

    /// Stops kube-apiserver (SIGTERM), leaving etcd running.
    pub fn stop_apiserver(&self) {
        if let Some(apiserver) = self
            .apiserver
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            apiserver.stop(Duration::from_secs(20));
        }
    }

    /// Starts kube-apiserver (again) on the same port and data, and waits until it is ready.
    pub async fn start_apiserver(&self) -> Result<()> {
        let log = self.path.join("kube-apiserver.log");
        let mut command = Command::new(self.bin.join("kube-apiserver"));
        command.args(&self.apiserver_args);
        let apiserver = ManagedProcess::start("kube-apiserver", command, &log)?;
        *self.apiserver.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(apiserver);
        self.wait_until_ready().await
    }

    async fn wait_until_ready(&self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_DEADLINE;
        let client = self.client().await?;
        let mut last_error = String::from("not asked yet");
        while Instant::now() < deadline {
            if let Some(status) = self
                .apiserver
                .lock()
                .unwrap()
                .as_ref()
                .and_then(super::process::ManagedProcess::try_exit_status)
            {
                bail!(
                    "kube-apiserver exited ({status}) during startup; its log ends with:\n{}",
                    log_tail(&self.path.join("kube-apiserver.log"), 30)
                );
            }
            let request = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last_error = body,
                Err(error) => last_error = error.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "kube-apiserver not ready after {STARTUP_DEADLINE:?} ({last_error}); its log ends with:\n{}",
            log_tail(&self.path.join("kube-apiserver.log"), 30)
        )
    }

    async fn apply_crds(&self) -> Result<()> {
        self.apply_crds_from(&repository_root().join("crds")).await
    }

    /// Installs the Gateway API CRDs (GRPCRoute, ReferenceGrant) that `tests/gateway-api/fetch.sh`
    /// fetched, named by `KUBEGRPC_GATEWAY_API_CRDS` (`make test` sets it), and waits until they
    /// are Established. Idempotent: tests sharing a control plane each call it.
    pub async fn install_gateway_api(&self) -> Result<()> {
        let dir = std::env::var_os("KUBEGRPC_GATEWAY_API_CRDS").ok_or_else(|| {
            anyhow!("KUBEGRPC_GATEWAY_API_CRDS is not set: run tests/gateway-api/fetch.sh and set it to the directory it prints")
        })?;
        self.apply_crds_from(Path::new(&dir)).await
    }

    async fn apply_crds_from(&self, crds_dir: &Path) -> Result<()> {
        let client = self.client().await?;
        let api = Api::<CustomResourceDefinition>::all(client);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(crds_dir).with_context(|| format!("cannot read {}", crds_dir.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path)?;
                let document: serde_json::Value =
                    serde_saphyr::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
                if document["kind"] != "CustomResourceDefinition" {
                    continue; // kustomization.yaml
                }
                let crd: CustomResourceDefinition =
                    serde_json::from_value(document).with_context(|| format!("{} is not a CRD", path.display()))?;
                let name = crd
                    .metadata
                    .name
                    .clone()
                    .ok_or_else(|| anyhow!("{} has no name", path.display()))?;
                api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
                    .await
                    .with_context(|| format!("the apiserver refused {}", path.display()))?;
                names.push(name);
            }
        }
        for name in names {
            tokio::time::timeout(
                STARTUP_DEADLINE,
                await_condition(api.clone(), &name, conditions::is_crd_established()),
            )
            .await
            .with_context(|| format!("CRD {name} not Established in time"))??;
        }
        Ok(())
    }

    fn start_controller_manager(&self) -> Result<()> {
        let log = self.path.join("kube-controller-manager.log");
        let mut command = Command::new(self.bin.join("kube-controller-manager"));
        command.args([
            format!("--kubeconfig={}", self.kubeconfig.display()),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
            // No kubelet heartbeats here: without these two off, the controllers would evict
            // and collect the pods of the test's Node.
            "--controllers=*,-nodelifecycle,-podgc".into(),
            "--use-service-account-credentials=false".into(),
            format!(
                "--service-account-private-key-file={}",
                self.path.join("service-account.key").display()
            ),
            format!("--root-ca-file={}", self.path.join("ca.crt").display()),
            "--cluster-cidr=10.250.0.0/16".into(),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
        ]);
        let process = ManagedProcess::start("kube-controller-manager", command, &log)?;
        *self.controller_manager.lock().unwrap() = Some(process);
        Ok(())
    }

    /// Stops every process and removes the directory. Idempotent.
    pub fn shutdown(&self) {
        for slot in [&self.controller_manager, &self.apiserver, &self.etcd] {
            if let Some(process) = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
                process.stop(Duration::from_secs(10));
            }
        }
        drop(
            self.dir
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(),
        );
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A kube client from a kubeconfig file, for the calling runtime.
/// A CPU profile of the apiserver over the next `seconds` (pprof's gzipped protobuf), from
/// `/debug/pprof/profile`; needs [`ControlPlaneOptions::profiling`] and an admin `client`.
pub async fn apiserver_cpu_profile(client: Client, seconds: u64) -> Result<Vec<u8>> {
    let request = http::Request::get(format!("/debug/pprof/profile?seconds={seconds}"))
        .body(kube::client::Body::empty())
        .context("profile request")?;
    let response = client.send(request).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "apiserver profile: HTTP {} (is profiling on?)",
        response.status()
    );
    let body = http_body_util::BodyExt::collect(response.into_body()).await?;
    Ok(body.to_bytes().to_vec())
}

pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The directory of the control-plane binaries, from [`BIN_DIR_ENV`].
pub fn binaries_dir() -> Result<PathBuf> {
    let dir = std::env::var_os(BIN_DIR_ENV).map(PathBuf::from).ok_or_else(|| {
        anyhow!(
            "{BIN_DIR_ENV} is not set. `make test` and `make demo` build the control plane with \
             tests/controlplane/build.sh and set it to the directory that script prints."
        )
    })?;
    for binary in ["etcd", "kube-apiserver", "kube-controller-manager", "kubectl"] {
        if !dir.join(binary).is_file() {
            bail!("{} has no {binary}: run tests/controlplane/build.sh", dir.display());
        }
    }
    Ok(dir)
}

/// The repository's root directory.
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn start_etcd(bin: &Path, dir: &Path, client_port: u16, peer_port: u16) -> Result<ManagedProcess> {
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut command = Command::new(bin.join("etcd"));
    command.args([
        "--name=default".to_string(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={client_url}"),
        format!("--advertise-client-urls={client_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=default={peer_url}"),
        // Test data is thrown away: no need to wait for the disk.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ]);
    Ok(ManagedProcess::start("etcd", command, &dir.join("etcd.log"))?)
}

fn wait_for_etcd(etcd: &ManagedProcess, port: u16) -> Result<()> {
    let deadline = Instant::now() + STARTUP_DEADLINE;
    while Instant::now() < deadline {
        if let Some(status) = etcd.try_exit_status() {
            bail!(
                "etcd exited ({status}) during startup; its log ends with:\n{}",
                etcd.log_tail(30)
            );
        }
        if http_get_plain(port, "/health").is_ok_and(|body| body.contains(r#""health":"true""#)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "etcd not healthy after {STARTUP_DEADLINE:?}; its log ends with:\n{}",
        etcd.log_tail(30)
    )
}

/// A plain HTTP/1.0 GET on loopback, enough for etcd's /health.
fn http_get_plain(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream =
        TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn apiserver_args(dir: &Path, port: u16, etcd_port: u16, audit: bool, profiling: bool) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut args = vec![
        // kube-apiserver refuses to start without a default route unless told its address.
        format!("--advertise-address={NAMESPACE_ADDRESS}"),
        format!("--secure-port={port}"),
        format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
        format!("--tls-cert-file={}", file("apiserver.crt")),
        format!("--tls-private-key-file={}", file("apiserver.key")),
        format!("--client-ca-file={}", file("ca.crt")),
        format!("--service-account-key-file={}", file("service-account.pub")),
        format!("--service-account-signing-key-file={}", file("service-account.key")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        "--allow-privileged=true".into(),
        "--authorization-mode=RBAC".into(),
        // As envtest: no token controller mounts tokens here.
        "--disable-admission-plugins=ServiceAccount".into(),
        format!("--profiling={profiling}"),
    ];
    if audit {
        args.push(format!("--audit-policy-file={}", file("audit-policy.yaml")));
        args.push(format!("--audit-log-path={}", file("audit.log")));
        args.push("--audit-log-format=json".into());
    }
    args
}

/// Records who writes GrpcBackends and their status, with the user agent, and nothing else.
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["create", "update", "patch", "delete"]
  resources:
  - group: kubegrpc.io
    resources: ["grpcbackends", "grpcbackends/status"]
- level: None
"#;

enum Credentials<'a> {
    ClientCert(&'a Path, &'a Path),
    Token(&'a str),
}

fn kubeconfig_yaml(port: u16, ca: &Path, credentials: Credentials<'_>) -> String {
    let mut user = String::new();
    match credentials {
        Credentials::ClientCert(cert, key) => {
            let _ = write!(
                user,
                "    client-certificate: {}\n    client-key: {}\n",
                cert.display(),
                key.display()
            );
        }
        Credentials::Token(token) => {
            let _ = writeln!(user, "    token: {token}");
        }
    }
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kubegrpc-test\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {}\n\
         users:\n- name: kubegrpc-test\n  user:\n{user}contexts:\n- name: kubegrpc-test\n  context:\n    cluster: kubegrpc-test\n    user: kubegrpc-test\n\
         current-context: kubegrpc-test\n",
        ca.display()
    )
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("cannot write {}", path.display()))
}

//! The cost of one change in a big status, against the real apiserver and without the
//! operator, so that only the write path is measured: a GrpcBackend's status is written as the
//! operator writes it (server-side apply of the whole status, field manager
//! `kubegrpc-operator`), then one endpoint's health is flipped and written again, over and over.
//! Per size it prints the bytes of one write, the bytes each watcher receives, the time of the
//! operator's serialization, the apply's round trip, and the time until a watcher has the change.
//! With `STATUS_COST_PROFILE=DIR` it also takes a CPU profile of the apiserver while it applies
//! changes back to back, saves it in DIR and prints where the time goes (`go tool pprof -top`).
//!
//!   make status-cost      (release build, inside the private network namespace)
//!
//! Options (environment): STATUS_COST_SIZES ("1000,5000,10000"), STATUS_COST_WRITES (10),
//! STATUS_COST_PROFILE (a directory; unset: no profile), STATUS_COST_PROFILE_SECONDS (15),
//! STATUS_COST_VERB (how a change is written: `apply`, the operator's server-side apply; or, to
//! compare, `apply-warn`, `put`, `merge`, `jsonpatch`), STATUS_COST_MINIMAL (set: entries with
//! address and health only, to see what the other fields cost).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Resource,
    api::{DynamicObject, Patch, PatchParams, WatchEvent, WatchParams},
};
use kubegrpc_crds::{EndpointStatus, GrpcBackend, GrpcBackendStatus, Health, OPERATOR_FIELD_MANAGER};
use kubegrpc_tests::{
    ControlPlane, ControlPlaneOptions,
    controlplane::apiserver_cpu_profile,
    objects::create_grpc_backend,
    scale::{cpu_ticks, median, realistic_endpoint, ticks_per_second},
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("STATUS_COST_SIZES")
        .unwrap_or_else(|_| "1000,5000,10000".into())
        .split(',')
        .map(|s| s.trim().parse().context("STATUS_COST_SIZES is a list of numbers"))
        .collect::<Result<_>>()?;
    let writes: usize = env_number("STATUS_COST_WRITES", 10)?;
    let profile_dir = std::env::var_os("STATUS_COST_PROFILE").map(PathBuf::from);
    let profile_seconds: u64 = env_number("STATUS_COST_PROFILE_SECONDS", 15)?;
    let verb = Verb::from_env()?;

    let control_plane = ControlPlane::start(ControlPlaneOptions {
        profiling: profile_dir.is_some(),
        ..Default::default()
    })
    .await?;
    let client = control_plane.client().await?;
    println!("status writes by {verb:?}");
    println!(
        "| endpoints | bytes written | bytes per watcher | serialize | write (median, max) | seen by a watcher (median) | apiserver CPU per write |"
    );
    println!("|---|---|---|---|---|---|---|");
    let apiserver = control_plane.apiserver_pid().context("no apiserver")?;
    let mut profiles = Vec::new();
    for size in sizes {
        let namespace = control_plane.create_namespace(&client, "cost").await?;
        create_grpc_backend(&client, &namespace, "big", json!({"service": "big", "port": "grpc"})).await?;
        let api = Api::<GrpcBackend>::namespaced(client.clone(), &namespace);
        let raw: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &namespace,
            &kube::api::ApiResource::erase::<GrpcBackend>(&()),
        );
        let mut status = big_status(size);
        apply(&api, &status).await?;
        let mut published = status.clone();

        let mut serialize = Vec::new();
        let mut applies = Vec::new();
        let mut seen = Vec::new();
        let mut written_bytes = 0;
        let mut watcher_bytes = 0;
        let mut apiserver_cpu = Duration::ZERO;
        for round in 0..writes {
            let version = raw.get("big").await?.metadata.resource_version.unwrap_or_default();
            let mut events = raw
                .watch(&WatchParams::default().fields("metadata.name=big"), &version)
                .await?
                .boxed();
            flip(&mut status, round);
            let started = Instant::now();
            let body = verb.body(&published, &status, &version)?;
            serialize.push(started.elapsed());
            written_bytes = body.len();
            let applied = Instant::now();
            let cpu_before = cpu_ticks(apiserver)?;
            verb.write(&client, &namespace, body).await?;
            applies.push(applied.elapsed());
            published = status.clone();
            let event = tokio::time::timeout(Duration::from_secs(60), events.next())
                .await
                .context("no watch event within 60 s")?
                .context("the watch ended")??;
            match event {
                WatchEvent::Modified(object) => watcher_bytes = serde_json::to_vec(&object)?.len(),
                other => bail!("unexpected watch event {other:?}"),
            }
            seen.push(started.elapsed());
            // The write and its watch event, as the apiserver's CPU time: steadier than
            // latencies on a machine whose cores the apiserver shares.
            apiserver_cpu += Duration::from_secs_f64((cpu_ticks(apiserver)? - cpu_before) as f64 / ticks_per_second());
        }
        println!(
            "| {size} | {written_bytes} | {watcher_bytes} | {:.1} ms | {} ms, {} ms | {} ms | {} ms |",
            median(&serialize).as_secs_f64() * 1000.0,
            median(&applies).as_millis(),
            applies.iter().max().copied().unwrap_or_default().as_millis(),
            median(&seen).as_millis(),
            (apiserver_cpu / writes as u32).as_millis(),
        );

        if let Some(dir) = &profile_dir {
            std::fs::create_dir_all(dir)?;
            let profile = tokio::spawn(apiserver_cpu_profile(client.clone(), profile_seconds));
            let started = Instant::now();
            let mut round = writes;
            while !profile.is_finished() {
                let version = raw.get("big").await?.metadata.resource_version.unwrap_or_default();
                flip(&mut status, round);
                let body = verb.body(&published, &status, &version)?;
                verb.write(&client, &namespace, body).await?;
                published = status.clone();
                round += 1;
            }
            let profiled_writes = round - writes;
            let path = dir.join(format!("apiserver-{size}.pb.gz"));
            std::fs::write(&path, profile.await??)?;
            println!(
                "profile of {profiled_writes} writes at {size} endpoints over {:.1?}: {}",
                started.elapsed(),
                path.display()
            );
            profiles.push((size, profiled_writes, path));
        }
    }
    for (size, profiled_writes, path) in profiles {
        println!("\n== apiserver CPU at {size} endpoints, {profiled_writes} status writes (go tool pprof -top)");
        let output = std::process::Command::new("go")
            .args(["tool", "pprof", "-top", "-cum", "-nodecount=45"])
            .arg(control_plane.binaries().join("kube-apiserver"))
            .arg(&path)
            .output()
            .context("go tool pprof")?;
        println!("{}", String::from_utf8_lossy(&output.stdout));
    }
    Ok(())
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|_| anyhow::anyhow!("{name} is not a number: {value}")),
        Err(_) => Ok(default),
    }
}

/// `size` endpoints as the operator publishes a Deployment's Pods: all Serving.
fn big_status(size: usize) -> GrpcBackendStatus {
    let minimal = std::env::var("STATUS_COST_MINIMAL").is_ok();
    let endpoints: Vec<EndpointStatus> = (0..size)
        .map(realistic_endpoint)
        .map(|e| {
            if minimal {
                EndpointStatus {
                    zone: None,
                    for_zones: Vec::new(),
                    pod: None,
                    ..e
                }
            } else {
                e
            }
        })
        .collect();
    GrpcBackendStatus {
        observed_generation: Some(1),
        ready_endpoints: size as i32,
        total_endpoints: size as i32,
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: "True".into(),
            reason: "EndpointsReady".into(),
            message: format!("{size} of {size} endpoints ready"),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::from_second(1_700_000_000).expect("a valid time")),
        }],
        endpoints,
        routes: Vec::new(),
    }
}

/// Endpoint `round % len` changes health, as a probe flip does.
fn flip(status: &mut GrpcBackendStatus, round: usize) {
    let count = status.endpoints.len();
    let endpoint = &mut status.endpoints[round % count];
    let serving = endpoint.health == Health::Serving;
    endpoint.health = if serving { Health::NotServing } else { Health::Serving };
    endpoint.reason = serving.then(|| "NotServing".into());
    endpoint.last_transition_time = Some(Time(Timestamp::now()));
    status.ready_endpoints += if serving { -1 } else { 1 };
}

fn apply_body(status: &GrpcBackendStatus) -> serde_json::Value {
    json!({
        "apiVersion": GrpcBackend::api_version(&()),
        "kind": GrpcBackend::kind(&()),
        "status": status,
    })
}

/// The operator's status write: server-side apply of the whole status, forced.
async fn apply(api: &Api<GrpcBackend>, status: &GrpcBackendStatus) -> Result<()> {
    api.patch_status(
        "big",
        &PatchParams::apply(OPERATOR_FIELD_MANAGER).force().validation_ignore(),
        &Patch::Apply(&apply_body(status)),
    )
    .await?;
    Ok(())
}

/// How a change is written.
#[derive(Clone, Copy, Debug)]
enum Verb {
    /// Server-side apply of the whole status with `fieldValidation=Ignore` (what the operator
    /// does).
    Apply,
    /// The same with the default field validation (`Warn`): the apiserver parses the YAML body
    /// a second time, to look for unknown fields.
    ApplyWarn,
    /// An update (PUT) of the status, conditional on the resourceVersion.
    Put,
    /// A JSON merge patch carrying the whole status.
    Merge,
    /// A JSON patch (RFC 6902) replacing only the changed entries, guarded by a test of the
    /// resourceVersion it was computed from.
    JsonPatch,
}

impl Verb {
    fn from_env() -> Result<Self> {
        Ok(match std::env::var("STATUS_COST_VERB").as_deref() {
            Err(_) | Ok("apply") => Verb::Apply,
            Ok("merge") => Verb::Merge,
            Ok("apply-warn") => Verb::ApplyWarn,
            Ok("put") => Verb::Put,
            Ok("jsonpatch") => Verb::JsonPatch,
            Ok(other) => bail!("STATUS_COST_VERB {other:?}: apply, apply-warn, put, merge or jsonpatch"),
        })
    }

    fn body(self, published: &GrpcBackendStatus, desired: &GrpcBackendStatus, version: &str) -> Result<Vec<u8>> {
        Ok(match self {
            Verb::Apply | Verb::ApplyWarn => serde_json::to_vec(&apply_body(desired))?,
            Verb::Put => serde_json::to_vec(&json!({
                "apiVersion": GrpcBackend::api_version(&()),
                "kind": GrpcBackend::kind(&()),
                "metadata": {"name": "big", "resourceVersion": version},
                "spec": {"service": "big", "port": "grpc"},
                "status": desired,
            }))?,
            Verb::Merge => serde_json::to_vec(&json!({ "status": desired }))?,
            Verb::JsonPatch => {
                let wire_published = serde_json::to_value(published)?;
                let wire_desired = serde_json::to_value(desired)?;
                let mut ops = vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": version})];
                for key in [
                    "readyEndpoints",
                    "totalEndpoints",
                    "observedGeneration",
                    "port",
                    "conditions",
                ] {
                    if wire_published.get(key) != wire_desired.get(key) {
                        ops.push(
                            json!({"op": "replace", "path": format!("/status/{key}"), "value": wire_desired[key]}),
                        );
                    }
                }
                let old = wire_published["endpoints"].as_array().context("endpoints")?;
                let new = wire_desired["endpoints"].as_array().context("endpoints")?;
                for (index, (old, new)) in old.iter().zip(new).enumerate() {
                    if old != new {
                        ops.push(json!({"op": "replace", "path": format!("/status/endpoints/{index}"), "value": new}));
                    }
                }
                serde_json::to_vec(&ops)?
            }
        })
    }

    async fn write(&self, client: &kube::Client, namespace: &str, body: Vec<u8>) -> Result<()> {
        let (content_type, query) = match self {
            Verb::Apply => (
                "application/apply-patch+yaml",
                "?fieldManager=kubegrpc-operator&force=true&fieldValidation=Ignore",
            ),
            Verb::ApplyWarn => (
                "application/apply-patch+yaml",
                "?fieldManager=kubegrpc-operator&force=true",
            ),
            Verb::Put => ("application/json", "?fieldManager=kubegrpc-operator"),
            Verb::Merge => ("application/merge-patch+json", "?fieldManager=kubegrpc-operator"),
            Verb::JsonPatch => ("application/json-patch+json", "?fieldManager=kubegrpc-operator"),
        };
        let uri = format!("/apis/kubegrpc.io/v1alpha1/namespaces/{namespace}/grpcbackends/big/status{query}");
        let request = match self {
            Verb::Put => http::Request::put(uri),
            _ => http::Request::patch(uri),
        }
        .header(http::header::CONTENT_TYPE, content_type)
        .body(body)?;
        let _: serde_json::Value = client.request(request).await?;
        Ok(())
    }
}

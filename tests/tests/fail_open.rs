//! Fail safe: the operator's probes are cut off from healthy backends while clients still reach
//! them (a NetworkPolicy admitting the application's namespaces but not the operator). Every
//! client — a grpc-go xDS client, a grpc-java xDS client and the kubegrpc Rust client — must keep
//! every call succeeding: the operator fails open instead of publishing an empty endpoint list.
//!
//! How the partition is made: the operator binds its probe connections to a source address of
//! its own (10.250.250.1, as an operator Pod has its own IP), and an nftables rule in the test's
//! private network namespace drops packets from that address to the backends' port, as a
//! NetworkPolicy's default deny does (no reset: SYNs and the open connections' packets vanish).

use std::{net::SocketAddr, process::Command, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api,
    api::ListParams,
    runtime::{WatchStreamExt, watcher},
};
use kubegrpc::Channel;
use kubegrpc_crds::{GrpcBackend, condition};
use kubegrpc_operator::Settings;
use kubegrpc_tests::{
    backends::{BACKEND_PORT, start_backends},
    load::Load,
    netns::assert_private_network,
    operator::InProcessOperator,
    scenario::Scenario,
    xds::{InProcessXds, XdsClient, XdsPeer},
};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(90);
const RATE: u32 = 200;
/// The operator's own address: its probes come from here, nothing else does.
const OPERATOR_SOURCE: &str = "10.250.250.1";

/// An nftables table dropping the operator's packets to the backends' port; removed on drop.
struct Partition {
    table: String,
}

impl Partition {
    fn cut(table: &str) -> Result<Self> {
        assert_private_network();
        let rules = format!(
            "table inet {table} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  \
             ip saddr {OPERATOR_SOURCE} tcp dport {BACKEND_PORT} drop\n }}\n}}\n"
        );
        nft(&["-f", "-"], Some(&rules)).context(
            "cannot add the nftables rule that cuts the operator off (is nftables installed? .ci/run installs it)",
        )?;
        Ok(Self { table: table.into() })
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "inet", &self.table], None);
    }
}

fn nft(args: &[&str], stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("nft")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("nft")?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    drop(child.stdin.take());
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("nft {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_between_the_operator_and_healthy_backends_fails_no_call_of_any_client() -> Result<()> {
    let s = Scenario::new("partition").await?;
    assert_private_network();
    // The operator's address: local to the namespace (all of 10.250.0.0/16 is on lo), but its
    // own, so that a rule can tell its packets apart.
    let source: std::net::IpAddr = OPERATOR_SOURCE.parse()?;
    let operator = InProcessOperator::start_with(
        s.client.clone(),
        Settings {
            namespace: Some(s.namespace.clone()),
            identity: format!("test-operator-{}", s.namespace),
            probe_source_address: Some(source),
            ..Settings::default()
        },
    );
    let xds = InProcessXds::start(s.client.clone(), Some(s.namespace.clone())).await?;
    let backends = start_backends(3).await?;
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.address).collect();
    s.echo_service(&addresses).await?;
    s.grpc_backend(
        "echo",
        json!({"service": "echo", "port": "grpc",
               "healthCheck": {"interval": "1s", "timeout": "500ms", "unhealthyThreshold": 2}}),
    )
    .await?;
    s.wait_status("echo", "3 Serving", DEADLINE, |st| {
        st.ready_endpoints == 3 && st.endpoints.iter().all(|e| !e.fail_open)
    })
    .await?;

    let name = format!("echo.{}", s.namespace);
    let go = XdsClient::start_peer(XdsPeer::Go, &name, xds.address, RATE).await?;
    let java = XdsClient::start_peer(XdsPeer::Java, &name, xds.address, RATE).await?;
    let channel = Channel::builder(s.client.clone(), &s.namespace, "echo")
        .connect()
        .await?;
    tokio::time::timeout(DEADLINE, channel.ready()).await?;
    let load = Load::start(channel.clone(), 4);
    for (client, peer) in [(&go, "grpc-go"), (&java, "grpc-java")] {
        client
            .wait_for(u64::from(RATE), DEADLINE)
            .await
            .with_context(|| format!("{peer} serves"))?;
    }
    load.wait_for_more(200, DEADLINE).await?;

    // Watch every status from now on: no status may ever leave clients nothing to call.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let statuses = tokio::spawn({
        let api: Api<GrpcBackend> = s.backends();
        let seen = seen.clone();
        async move {
            let mut stream = watcher(api, watcher::Config::default().fields("metadata.name=echo"))
                .applied_objects()
                .boxed();
            while let Some(Ok(backend)) = stream.next().await {
                if let Some(status) = backend.status {
                    seen.lock().unwrap().push(status);
                }
            }
        }
    });

    go.reset().await?;
    java.reset().await?;
    let before = backends.iter().map(|b| b.counters.snapshot().requests).sum::<u64>();
    let partition = Partition::cut(&format!("partition{}", std::process::id()))?;
    println!("partition: the operator's probes to port {BACKEND_PORT} dropped");
    let failing_open = s
        .wait_status("echo", "FailingOpen", DEADLINE, |st| {
            st.condition(condition::FAILING_OPEN)
                .is_some_and(|c| c.status == "True")
                && st.endpoints.iter().all(|e| e.fail_open)
        })
        .await?
        .status
        .context("a status")?;
    let condition = failing_open.condition(condition::FAILING_OPEN).unwrap();
    println!(
        "during the partition: FailingOpen {} {}: {}",
        condition.status, condition.reason, condition.message
    );
    assert!(
        matches!(
            condition.reason.as_str(),
            "ProbesFailingToConnect" | "NoEndpointPassesChecks"
        ),
        "{condition:?}"
    );
    assert_eq!(failing_open.condition(condition::READY).unwrap().reason, "FailingOpen");
    assert_eq!(failing_open.ready_endpoints, 3, "Ready says what clients do");
    assert!(
        failing_open
            .endpoints
            .iter()
            .all(|e| e.health.to_string() == "NotServing" && e.weight > 0),
        "health stays what the probes saw, the weight what clients use: {:?}",
        failing_open.endpoints
    );

    // A grpc-go client started during the partition gets the endpoints too.
    let late = XdsClient::start_peer(XdsPeer::Go, &name, xds.address, RATE).await?;
    let late_counts = late.wait_for(u64::from(RATE), DEADLINE).await?;
    // Hold the partition for about 30 s of calls (the clients send RATE a second): each keeps
    // calling all three.
    let go_counts = go.wait_for(u64::from(RATE) * 30, DEADLINE).await?;
    let java_counts = java.wait_for(u64::from(RATE) * 30, DEADLINE).await?;
    load.wait_for_more(2_000, DEADLINE).await?;
    drop(partition);
    println!("partition lifted");

    s.wait_status("echo", "trusted again", DEADLINE, |st| {
        st.condition(condition::FAILING_OPEN)
            .is_some_and(|c| c.status == "False")
            && st.ready_endpoints == 3
            && st
                .endpoints
                .iter()
                .all(|e| !e.fail_open && e.health.to_string() == "Serving")
    })
    .await?;
    let go_after = go.counts().await?;
    let java_after = java.counts().await?;
    let rust = load.stop().await;
    let served = backends.iter().map(|b| b.counters.snapshot().requests).sum::<u64>() - before;
    println!(
        "grpc-go: {go_after:?}\ngrpc-java: {java_after:?}\ngrpc-go started during the partition: {late_counts:?}\n\
         Rust client: {} succeeded, {} failed; served at the backends since the cut: {served}",
        rust.succeeded(),
        rust.failed()
    );
    for (peer, counts) in [
        ("grpc-go", &go_after),
        ("grpc-java", &java_after),
        ("late grpc-go", &late_counts),
    ] {
        assert_eq!(counts.failures(), 0, "{peer} failed calls: {counts:?}");
        for address in &addresses {
            assert!(counts.of(*address) > 0, "{peer}: {address} got nothing: {counts:?}");
        }
    }
    assert!(go_counts.succeeded() > 0 && java_counts.succeeded() > 0);
    assert_eq!(rust.failed(), 0, "Rust client failures: {:?}", rust.failures());
    ensure!(
        served >= go_after.succeeded() + java_after.succeeded(),
        "the backends counted what the clients claim"
    );

    // Every status written meanwhile left clients something to call.
    let operator_writes = operator.status_writes(&s.namespace, "echo");
    operator.stop().await;
    statuses.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    ensure!(
        seen.iter().any(|st| st.endpoints.iter().any(|e| e.fail_open)),
        "the watch saw the failing-open status"
    );
    for status in &seen {
        ensure!(
            status.ready_endpoints > 0 && status.endpoints.iter().any(kubegrpc_crds::EndpointStatus::is_usable),
            "a status left clients nothing: {status:?}"
        );
    }
    println!("{} statuses seen, {operator_writes} writes, none empty", seen.len());

    // The Event.
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.namespace);
    let warnings: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| e.reason)
        .collect();
    // The Event marks the turn to failing open, with the reason of that moment: the probes
    // fail one by one, so the first of them can already be below the panic threshold (2 of 3
    // failing on a loaded machine) before all three fail to connect.
    assert!(
        warnings.iter().any(|r| {
            [
                condition::reason::PROBES_FAILING_TO_CONNECT,
                condition::reason::NONE_PASSING,
                condition::reason::BELOW_PANIC_THRESHOLD,
            ]
            .contains(&r.as_str())
        }),
        "a Warning Event says the GrpcBackend failed open: {warnings:?}"
    );
    Ok(())
}

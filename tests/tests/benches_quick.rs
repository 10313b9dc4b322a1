//! The benchmarks of `make bench`, each in a quick mode (a second or two of measuring): they
//! run to the end and print their figures. What the figures are is for `make bench` and
//! BENCHMARKS.md; here only that the benchmarks still work, so that `make bench` is not found
//! broken the day someone needs it.

use std::process::Command;

use anyhow::{Context, Result};
use kubegrpc_tests::{backends::built_binary, netns::assert_private_network};

/// One bench at a time: each starts its backends on the same addresses.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs bench binary `name` with `settings` and returns what it printed, after checking that it
/// succeeded and printed every one of `expected`.
fn run_quick(name: &str, settings: &[(&str, &str)], expected: &[&str]) -> Result<String> {
    assert_private_network();
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let output = Command::new(built_binary(name)?)
        .envs(settings.iter().copied())
        .output()
        .with_context(|| format!("cannot run {name}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{name} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for line in expected {
        assert!(stdout.contains(line), "{name} printed no {line:?}:\n{stdout}");
    }
    Ok(stdout)
}

/// A figure printed as `label = number`: present and a finite number.
fn figure(stdout: &str, label: &str) -> Option<f64> {
    let rest = &stdout[stdout.find(label)? + label.len()..];
    let number: String = rest
        .trim_start_matches([' ', '='])
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+'))
        .collect();
    number.parse().ok().filter(|n: &f64| n.is_finite())
}

#[test]
fn the_unary_bench_measures_every_variant_with_allocations() -> Result<()> {
    let stdout = run_quick(
        "bench",
        &[
            ("BENCH_SECONDS", "1"),
            ("BENCH_ROUNDS", "1"),
            ("BENCH_CONCURRENCY", "1,8"),
        ],
        &["concurrency 1,", "concurrency 8,", "D ideal: 3 Channels, atomic RR"],
    )?;
    for label in ["A/D", "CPU per request A/D", "allocations per request A - D"] {
        assert!(figure(&stdout, label).is_some(), "no {label} figure:\n{stdout}");
    }
    Ok(())
}

#[test]
fn the_weights_bench_runs_every_variant_at_both_loads() -> Result<()> {
    run_quick(
        "bench_weights",
        &[("BENCH_WEIGHTS_SECONDS", "1"), ("BENCH_WEIGHTS_ROUNDS", "1")],
        &[
            "kubegrpc LoadReport",
            "tower p2c PeakEwma",
            "load 60%: p99 LoadReport / balance_list",
            "load 80%: p99 LoadReport / balance_list",
            "status writes of the LoadReport GrpcBackend",
        ],
    )?;
    Ok(())
}

#[test]
fn the_xds_flip_bench_measures_both_clients() -> Result<()> {
    let stdout = run_quick(
        "bench_xds_flip",
        &[("BENCH_XDS_FLIPS", "3")],
        &[
            "grpc-go xDS client: t0 -> last reply from B",
            "kubegrpc Rust client: t0 -> last reply from B",
            "grpc-go / kubegrpc: p50",
        ],
    )?;
    assert!(stdout.contains("3 NOT_SERVING flips"), "{stdout}");
    Ok(())
}

#[test]
fn the_convergence_bench_measures_kubegrpc_and_kuberesolver() -> Result<()> {
    run_quick(
        "bench_convergence",
        &[("BENCH_CONVERGENCE_TRIALS", "2")],
        &[
            "(a) endpoint added -> first reply",
            "goal (a) kubegrpc p95 <= 300 ms",
            "goal (b) kubegrpc p95 <= 200 ms",
            "goal (c) kubegrpc p95 <= 100 ms",
        ],
    )?;
    Ok(())
}

#[test]
fn the_fanout_bench_measures_both_watches() -> Result<()> {
    // At this size the CPU per follower is below the timer's resolution: only that the
    // figures are printed is checked.
    let stdout = run_quick(
        "bench_fanout",
        &[("BENCH_FANOUT_QUICK", "1")],
        &[
            "| GrpcBackend |",
            "| EndpointSlice |",
            "baseline (no followers)",
            "per follower, GrpcBackend / EndpointSlice",
        ],
    )?;
    for label in [
        "GrpcBackend followers: flip -> seen p50 =",
        "EndpointSlice followers: flip -> seen p50 =",
        "goals: GrpcBackend p95",
    ] {
        assert!(figure(&stdout, label).is_some(), "no {label} figure:\n{stdout}");
    }
    Ok(())
}

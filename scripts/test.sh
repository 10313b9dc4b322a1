#!/usr/bin/env bash
# The whole verification, as `make test` and CI run it:
#   1. build the control plane (cached under target/controlplane) and the grpc-go/grpc-java peers
#      (cached under target/peers); fetch the Gateway API CRDs (cached under target/gateway-api),
#   2. format and lint checks,
#   3. build every test and binary (outside the network namespace: crates.io is reachable here),
#   4. replay the fuzz targets (fuzz/) on stable,
#   5. run the other tests inside a private network namespace, offline.
# Prints the time of each phase. Extra arguments go to `cargo test` (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$SECONDS
phase_started=$SECONDS
phase() {
  local now=$SECONDS
  if [[ -n "${current_phase:-}" ]]; then
    echo "=== ${current_phase}: $(( now - phase_started ))s" >&2
  fi
  current_phase="$1"
  phase_started=$now
  [[ -n "$1" ]] && echo "=== $1 ..." >&2
  return 0
}

phase "control plane (first build: about 11-15 minutes on 2 cores; cached afterwards)"
bin_dir="$(tests/controlplane/build.sh)"

phase "peers (grpc-go, grpc-java; first build: about 1 minute, Maven Central and the Go module proxy needed; cached afterwards)"
peers_dir="$(tests/peers/build.sh)"

phase "Gateway API CRDs (GRPCRoute, ReferenceGrant; cached)"
gateway_api_crds="$(tests/gateway-api/fetch.sh)"

phase "cargo fmt --check"
cargo fmt --all -- --check

phase "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

phase "cargo build (tests and binaries)"
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-run

phase "fuzz targets, replayed on stable (committed corpus + ${KUBEGRPC_FUZZ_MUTATIONS:=20000} fixed-seed mutations each; make fuzz runs libFuzzer)"
# The same target functions cargo-fuzz runs (fuzz/src), without libFuzzer: its instrumented build
# of the operator's dependency tree takes about 6 minutes cold (and cargo-fuzz 2 to install), over
# this command's budget.
KUBEGRPC_FUZZ_MUTATIONS="$KUBEGRPC_FUZZ_MUTATIONS" cargo test --locked --offline -p kubegrpc-operator -p kubegrpc \
  --test fuzz_targets -- --show-output

phase "cargo test, inside a private network namespace"
# --show-output: the measurements some tests print (latencies, counts, the ceiling) land in the log.
# --no-fail-fast: one failing binary does not hide the others'. The log is kept so that a failure's
# message is printed again at the end, after the backtraces (a CI log's tail is what gets read).
test_log=target/test-output.log
if ! KUBEGRPC_CONTROLPLANE_BIN="$bin_dir" KUBEGRPC_PEERS_DIR="$peers_dir" KUBEGRPC_GATEWAY_API_CRDS="$gateway_api_crds" \
  tests/netns-run.sh \
  cargo test --workspace --offline --locked --no-fail-fast "$@" -- --show-output --skip fuzz_target_ \
  2>&1 | tee "$test_log"; then
  echo "=== cargo test failed (whole log: $test_log); what the failing tests said:" >&2
  grep -E -A8 "panicked at|^Error: " "$test_log" \
    | grep -v -E '^ +([0-9]+: |at )' | tail -n 150 >&2 || true
  grep -E "^    [a-z_0-9:]+$|^error: test failed" "$test_log" | tail -n 40 >&2 || true
  exit 1
fi

phase "picker benchmark, quick mode (test profile: that it runs and prints figures, not what they are)"
picker_output="$(cargo bench --profile dev --locked --offline -p kubegrpc --bench picker -- \
  --warm-up-time 0.05 --measurement-time 0.1 --sample-size 10 2>&1)" || { echo "$picker_output" >&2; exit 1; }
picker_figures="$(grep -c 'time:' <<<"$picker_output" || true)"
echo "picker benchmark: $picker_figures figures" >&2
if (( picker_figures < 40 )); then
  echo "$picker_output" >&2
  echo "the picker benchmark printed $picker_figures figures, not the 45 expected" >&2
  exit 1
fi

phase ""
echo "=== all phases: $(( SECONDS - started ))s" >&2

#!/usr/bin/env bash
# The whole verification, as `make test` and CI run it:
#   1. build the control plane (cached under target/controlplane) and the grpc-go/grpc-java peers
#      (cached under target/peers),
#   2. format and lint checks,
#   3. build every test and binary (outside the network namespace: crates.io is reachable here),
#   4. run the tests inside a private network namespace, offline.
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

phase "cargo fmt --check"
cargo fmt --all -- --check

phase "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

phase "cargo build (tests and binaries)"
cargo build --workspace --all-targets --locked
cargo test --workspace --locked --no-run

phase "cargo test, inside a private network namespace"
# --show-output: the measurements some tests print (latencies, counts, the ceiling) land in the log.
KUBEGRPC_CONTROLPLANE_BIN="$bin_dir" KUBEGRPC_PEERS_DIR="$peers_dir" tests/netns-run.sh \
  cargo test --workspace --offline --locked "$@" -- --show-output

phase ""
echo "=== all phases: $(( SECONDS - started ))s" >&2

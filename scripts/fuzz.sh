#!/usr/bin/env bash
# `make fuzz`: the fuzz targets under libFuzzer (cargo-fuzz, nightly toolchain), each for
# FUZZ_SECONDS (default 300), on top of the committed corpus (fuzz/corpus/TARGET). Installs the
# nightly toolchain and cargo-fuzz when missing. New inputs land in fuzz/target/corpus/TARGET;
# with FUZZ_MERGE=1 those that add coverage are merged into fuzz/corpus/TARGET (commit them).
# A crash stops the run; its input is in fuzz/artifacts/TARGET/ (`cargo +nightly fuzz run
# TARGET FILE` reproduces it, `cargo +nightly fuzz tmin TARGET FILE` minimizes it).
# Usage: scripts/fuzz.sh [TARGET...]   (default: every target)
#
# `make test` does not run this: building the targets with cargo-fuzz's instrumentation on a cold
# machine takes about 6 minutes (the operator's whole dependency tree again, on nightly), over
# its budget. It replays the same targets on stable instead (the `fuzz_targets` tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds="${FUZZ_SECONDS:-300}"
# Target and its longest input (as in fuzz/src: Target::max_len).
declare -A max_len=(
  [hpack]=4096 [connection]=4096 [orca_weights]=2048 [xds_requests]=4096 [status_json]=4096 [status_structured]=2048
)
targets=("$@")
if (( ${#targets[@]} == 0 )); then
  mapfile -t targets < <(printf '%s\n' "${!max_len[@]}" | sort)
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null; then
  # A debug build: cargo-fuzz only drives cargo and the fuzzer, and builds in half the time.
  cargo install cargo-fuzz --locked --debug
fi

# No sanitizer: the code is safe Rust, and ASan would double the build for little.
build=(-s none --codegen-units 16)
started=$SECONDS
cargo +nightly fuzz build "${build[@]}"
echo "=== fuzz build: $(( SECONDS - started ))s" >&2

for target in "${targets[@]}"; do
  [[ -n "${max_len[$target]:-}" ]] || { echo "unknown fuzz target $target" >&2; exit 2; }
  mkdir -p "target/corpus/$target" "corpus/$target"
  echo "=== $target: ${seconds}s" >&2
  log="target/$target.log"
  if ! cargo +nightly fuzz run "${build[@]}" "$target" "target/corpus/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len="${max_len[$target]}" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "=== $target: crashed; the input is in fuzz/artifacts/$target/ (log: fuzz/$log)" >&2
    exit 1
  fi
  grep -E '(DONE|^Done|stat::(number_of_executed_units|new_units_added|peak_rss_mb))' "$log" >&2 || true
  if [[ "${FUZZ_MERGE:-0}" == 1 ]]; then
    cargo +nightly fuzz run "${build[@]}" "$target" "corpus/$target" "target/corpus/$target" -- \
      -set_cover_merge=1 -max_len="${max_len[$target]}" 2>&1 | grep -E '^MERGE-OUTER: [0-9]+ new files' || true
  fi
done
echo "=== make fuzz: $(( SECONDS - started ))s, no crash" >&2

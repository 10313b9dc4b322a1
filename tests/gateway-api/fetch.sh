#!/usr/bin/env bash
# Fetches the Gateway API CRDs the tests install (GRPCRoute, ReferenceGrant: the standard
# channel) from the Go module proxy, at the release go.mod pins (go.sum verifies it), into a cache
# directory keyed by that version, and prints that directory.
#
#   tests/gateway-api/fetch.sh [CACHE_ROOT]     (default: <repo>/target/gateway-api)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache_root="${1:-$repo/target/gateway-api}"

version="$(cd "$here" && go list -m -f '{{.Version}}' sigs.k8s.io/gateway-api)"
[[ -n "$version" ]] || { echo "fetch.sh: cannot read the pinned gateway-api version from go.mod" >&2; exit 1; }
out="$cache_root/$version"
crds=(gateway.networking.k8s.io_grpcroutes.yaml gateway.networking.k8s.io_referencegrants.yaml)

complete() { for f in "${crds[@]}"; do [[ -s "$out/$f" ]] || return 1; done; }
if complete; then
  echo "gateway-api: cached CRDs in $out" >&2
  echo "$out"
  exit 0
fi

# -mod=mod: read go.mod as is; go.sum checks the module's hash.
module_dir="$(cd "$here" && GOFLAGS=-mod=mod go mod download -json sigs.k8s.io/gateway-api \
  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$module_dir" ]] || { echo "fetch.sh: go mod download gave no directory for sigs.k8s.io/gateway-api" >&2; exit 1; }
mkdir -p "$out.partial"
for f in "${crds[@]}"; do
  cp "$module_dir/config/crd/standard/$f" "$out.partial/$f"
done
chmod -R u+w "$out.partial"
rm -rf "$out"
mv "$out.partial" "$out"
echo "gateway-api: CRDs of $version in $out" >&2
echo "$out"

#!/usr/bin/env bash
# Builds the test control plane (etcd, kube-apiserver, kube-controller-manager, kubectl) from the
# Go module proxy into a cache directory keyed by the pinned versions, and prints that directory.
#
#   tests/controlplane/build.sh [CACHE_ROOT]     (default: <repo>/target/controlplane)
#
# A second run with the same go.mod/go.sum files and Go version reuses the cached binaries.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache_root="${1:-$repo/target/controlplane}"

pinned_version() { (cd "$here/$1" && go list -m -f '{{.Version}}' "$2"); }
kubernetes_version="$(pinned_version kubernetes k8s.io/kubernetes)"
etcd_version="$(pinned_version etcd go.etcd.io/etcd/server/v3)"
[[ -n "$kubernetes_version" && -n "$etcd_version" ]] || { echo "build.sh: cannot read pinned versions from go.mod files" >&2; exit 1; }

key="$( { go env GOVERSION; cat "$here"/kubernetes/go.mod "$here"/kubernetes/go.sum "$here"/etcd/go.mod "$here"/etcd/go.sum "$here"/etcd/main.go "$0"; } | sha256sum | cut -c1-16)"
out="$cache_root/kubernetes-$kubernetes_version-etcd-$etcd_version-$key"
binaries=(etcd kube-apiserver kube-controller-manager kubectl)

complete() { for b in "${binaries[@]}"; do [[ -x "$out/$b" ]] || return 1; done; }

if complete; then
  echo "controlplane: cached binaries in $out" >&2
  echo "$out"
  exit 0
fi

mkdir -p "$out.partial"
started=$SECONDS
step() { echo "controlplane: [$(( SECONDS - started ))s] $*" >&2; }

# Kubernetes stamps its version through ldflags (hack/lib/version.sh); without them the apiserver
# reports v0.0.0 and kubectl warns about version skew.
minor="${kubernetes_version#v1.}"; minor="${minor%%.*}"
version_ldflags=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  version_ldflags+=" -X $pkg.gitVersion=$kubernetes_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  version_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

step "building etcd $etcd_version (first build takes a few minutes)"
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w" -o "$out.partial/etcd" .)

for cmd in kubectl kube-apiserver kube-controller-manager; do
  step "building $cmd $kubernetes_version (the first build of Kubernetes takes 10-25 minutes on 2 cores)"
  (cd "$here/kubernetes" && go build -trimpath -ldflags "-s -w $version_ldflags" -o "$out.partial/$cmd" "k8s.io/kubernetes/cmd/$cmd")
done

rm -rf "$out"
mv "$out.partial" "$out"
step "done: $out"
echo "$out"

#!/usr/bin/env bash
# Builds the grpc-go and grpc-java peers of the test suite into a cache directory keyed by the
# pinned versions and a hash of every input, and prints that directory:
#
#   tests/peers/build.sh [CACHE_ROOT]     (default: <repo>/target/peers)
#
# The directory holds peer-server-go, xds-client-go and kuberesolver-client-go (binaries: the
# grpc-go echo server, a grpc-go xDS client calling it through xds:/// targets, and a grpc-go
# client resolving kubernetes:/// targets with github.com/sercand/kuberesolver/v6), and
# peer-server-java and xds-client-java (the grpc-java twins of the first two: launcher scripts
# running the compiled classes with the dependency jars in lib/, grpc-xds among them). A second
# run with unchanged inputs reuses it and runs no build. Needs Go, Java 17+ and Maven (which
# fetches from Maven Central into ~/.m2); the Go module proxy and Maven Central must be reachable
# on the first build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache_root="${1:-$repo/target/peers}"

for tool in go java mvn; do
  if ! command -v "$tool" >/dev/null; then
    echo "peers/build.sh: $tool is missing: the test peers need Go (grpc-go), Java 17+ and Maven (grpc-java)" >&2
    echo "peers/build.sh: e.g. apt-get install -y maven openjdk-17-jdk-headless; Go from https://go.dev/dl/" >&2
    exit 1
  fi
done

# The pinned versions, read from the files (no go or mvn run needed).
grpc_go_version="$(awk '$1 == "google.golang.org/grpc" { print $2; exit }' "$here/go/go.mod")"
grpc_java_version="$(sed -n 's:.*<grpc.version>\(.*\)</grpc.version>.*:\1:p' "$here/java/pom.xml" | head -1)"
[[ -n "$grpc_go_version" && -n "$grpc_java_version" ]] || { echo "peers/build.sh: cannot read the pinned gRPC versions from go.mod and pom.xml" >&2; exit 1; }

java_bin="$(command -v java)"
inputs() {
  go env GOVERSION
  "$java_bin" -version 2>&1
  mvn -v -B 2>/dev/null | head -1 | sed 's/\x1b\[[0-9;]*m//g'
  local file
  while IFS= read -r file; do
    printf '== %s\n' "${file#"$here"/}"
    cat "$file"
  done < <(find "$here" \( -name target -prune \) -o -type f \( -name go.mod -o -name go.sum -o -name '*.go' -o -name pom.xml -o -name '*.java' \) -print | LC_ALL=C sort)
  cat "$0"
}
key="$(inputs | sha256sum | cut -c1-16)"
out="$cache_root/grpc-go-$grpc_go_version-grpc-java-$grpc_java_version-$key"

complete() {
  [[ -x "$out/peer-server-go" && -x "$out/xds-client-go" && -x "$out/kuberesolver-client-go" && -x "$out/peer-server-java" && -x "$out/xds-client-java" \
    && -d "$out/classes" && -d "$out/lib" ]]
}

if complete; then
  echo "peers: cached build in $out" >&2
  echo "$out"
  exit 0
fi

partial="$out.partial"
rm -rf "$partial"
mkdir -p "$partial"
started=$SECONDS
step() { echo "peers: [$(( SECONDS - started ))s] $*" >&2; }

step "building the grpc-go peers (grpc-go $grpc_go_version)"
# stdout carries only the directory: every tool's output goes to stderr.
(
  cd "$here/go"
  go build -trimpath -ldflags "-s -w" -o "$partial/peer-server-go" ./cmd/peer-server
  # grpc-go's xDS client (with the envoy protos) makes this the bigger build of the two.
  go build -trimpath -ldflags "-s -w" -o "$partial/xds-client-go" ./cmd/xds-client
  go build -trimpath -ldflags "-s -w" -o "$partial/kuberesolver-client-go" ./cmd/kuberesolver-client
) >&2

step "building the grpc-java peers (grpc-java $grpc_java_version; the first build fetches about 45 MB from Maven Central)"
# Builds into the cache directory, never into the source tree; only the runtime jars are copied.
mvn -B -q -Dstyle.color=never -f "$here/java/pom.xml" \
  -Dpeers.build.dir="$partial/maven" \
  compile dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$partial/lib" >&2
mv "$partial/maven/classes" "$partial/classes"
rm -rf "$partial/maven"

# Small, quick-starting JVMs: a test starts several at once on a 2-core machine. C1 only and a
# small heap suit both peers (the xDS client's few hundred calls a second included).
launcher() { # NAME MAIN-CLASS DESCRIPTION
  cat > "$partial/$1" <<LAUNCHER
#!/bin/sh
# $3 (grpc-java $grpc_java_version), built by tests/peers/build.sh.
# Extra JVM flags: PEER_JAVA_OPTS.
dir="\$(cd "\$(dirname "\$0")" && pwd)"
exec "$java_bin" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xss512k -Xmx128m -XX:-UsePerfData \\
  '-Djava.util.logging.SimpleFormatter.format=%1\$tT.%1\$tL %4\$s %3\$s: %5\$s%6\$s%n' \\
  \${PEER_JAVA_OPTS:-} -cp "\$dir/classes:\$dir/lib/*" $2 "\$@"
LAUNCHER
  chmod +x "$partial/$1"
}
launcher peer-server-java io.kubegrpc.peers.PeerServer "The grpc-java peer server"
launcher xds-client-java io.kubegrpc.peers.XdsClient "The grpc-java xDS client peer"

rm -rf "$out"
mv "$partial" "$out"
step "done: $out"
echo "$out"

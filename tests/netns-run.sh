#!/usr/bin/env bash
# Runs a command inside a private network namespace made for this run, with no route out:
#
#   tests/netns-run.sh COMMAND [ARGS...]
#
# Everything that opens sockets (etcd, kube-apiserver, the operator, backends, clients) runs in
# here. `lo` carries 127.0.0.1 and 10.250.0.1/16, so every 10.250.x.y address is local and the
# apiserver accepts them in EndpointSlices. New PID and mount namespaces make sure that no process
# outlives the run, even when it is killed, and temporary files live on a tmpfs that vanishes
# with it.
# Needs root (unshare --net).
set -euo pipefail

if [[ "${KUBEGRPC_IN_NETNS:-}" != "1" ]]; then
  if [[ $EUID -ne 0 ]]; then
    echo "netns-run.sh: needs root to create a network namespace (unshare --net); run as root or with sudo" >&2
    exit 1
  fi
  export KUBEGRPC_IN_NETNS=1
  exec unshare --net --pid --fork --kill-child --mount-proc "$0" "$@"
fi

ip link set lo up
ip addr add 10.250.0.1/16 dev lo
if ip route show default | grep -q . || ip -6 route show default | grep -q .; then
  echo "netns-run.sh: the new network namespace has a default route; refusing to run" >&2
  exit 1
fi
# Temporary files (control-plane data, logs) go to a tmpfs private to this mount namespace:
# they vanish with it however the run ends. Not over /tmp, which may hold the checkout.
run_tmp="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/netns-tmp"
mkdir -p "$run_tmp"
mount -t tmpfs -o size=8g,mode=1777 kubegrpc-tmp "$run_tmp"
export TMPDIR="$run_tmp"

# Not exec: this shell stays PID 1 of the namespace and reaps orphans.
"$@"

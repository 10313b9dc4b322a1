# kubegrpc: the commands a newcomer runs. See README.md.
SHELL := bash
.DEFAULT_GOAL := help

.PHONY: help demo test fuzz bench scale soak status-cost controlplane peers crds fmt lint

help:
	@echo "make demo          the product end to end on a local control plane (needs root, Go, Rust)"
	@echo "make test          build everything (control plane included) and run every test (needs root, Go, Rust)"
	@echo "make fuzz          the fuzz targets under libFuzzer (cargo-fuzz, nightly; installed if missing), FUZZ_SECONDS"
	@echo "                   each (default 300); FUZZ_MERGE=1 adds new coverage to fuzz/corpus (make test replays them)"
	@echo "make bench         unary echo throughput/latency: kubegrpc vs tonic Channel vs balance_list; heterogeneous"
	@echo "                   backends: Equal vs LoadReport vs balance_list vs p2c PeakEwma; a NOT_SERVING flip to the"
	@echo "                   last request: grpc-go xDS client vs kubegrpc; convergence vs kuberesolver; watch fan-out; picker"
	@echo "                   (criterion); release build; needs the peers too"
	@echo "make scale         10,000 endpoints in one GrpcBackend and 500 x 20: memory, CPU, writes (release build, ~15 min)"
	@echo "make soak          pods churned under load for 10 minutes: operator and client back at their baseline (release build)"
	@echo "make status-cost   the apiserver's cost of one change in a 1k/5k/10k-endpoint status, with a CPU profile"
	@echo "make controlplane  build etcd, kube-apiserver, kube-controller-manager and kubectl (cached)"
	@echo "make peers         build the grpc-go and grpc-java test peers (cached; needs Go, Java 17, Maven)"
	@echo "make crds          regenerate crds/grpcbackend.yaml from the Rust types"
	@echo "make fmt           cargo fmt"
	@echo "make lint          cargo fmt --check and clippy -D warnings"

demo:
	@echo "== building the control plane (first time: about 11-15 minutes on 2 cores, cached afterwards)"
	@bin="$$(tests/controlplane/build.sh)" && \
	echo "== building the workspace (same profile as the tests)" && \
	cargo build --locked --workspace --bins && \
	echo "== running the demo in a private network namespace" && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" tests/netns-run.sh target/debug/demo

test:
	scripts/test.sh

fuzz:
	scripts/fuzz.sh

bench:
	@cargo bench --locked -p kubegrpc --bench picker && \
	bin="$$(tests/controlplane/build.sh)" && \
	peers="$$(tests/peers/build.sh)" && \
	cargo build --release --locked -p kubegrpc-tests --bin bench --bin bench_weights --bin bench_xds_flip --bin bench_convergence --bin bench_fanout && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" tests/netns-run.sh target/release/bench && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" tests/netns-run.sh target/release/bench_weights && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" KUBEGRPC_PEERS_DIR="$$peers" tests/netns-run.sh target/release/bench_xds_flip && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" KUBEGRPC_PEERS_DIR="$$peers" tests/netns-run.sh target/release/bench_convergence && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" tests/netns-run.sh target/release/bench_fanout

scale:
	@bin="$$(tests/controlplane/build.sh)" && \
	cargo build --release --locked -p kubegrpc-operator -p kubegrpc-tests --bin kubegrpc-operator --bin scale && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" tests/netns-run.sh target/release/scale

soak:
	@bin="$$(tests/controlplane/build.sh)" && \
	cargo build --release --locked -p kubegrpc-operator -p kubegrpc-tests --bin kubegrpc-operator --bin soak && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" tests/netns-run.sh target/release/soak

status-cost:
	@bin="$$(tests/controlplane/build.sh)" && \
	cargo build --release --locked -p kubegrpc-tests --bin status_cost && \
	KUBEGRPC_CONTROLPLANE_BIN="$$bin" STATUS_COST_PROFILE="$${STATUS_COST_PROFILE-target/status-cost}" \
	  tests/netns-run.sh target/release/status_cost

controlplane:
	tests/controlplane/build.sh

peers:
	tests/peers/build.sh

crds:
	cargo run --quiet -p kubegrpc-crds --example crdgen > crds/grpcbackend.yaml

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

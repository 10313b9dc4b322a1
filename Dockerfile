# The kubegrpc operator image: built with the workspace's pinned toolchain, run on a
# distroless glibc base as a non-root user with nothing but the binary.
#
#   docker build -t ghcr.io/kubegrpc/kubegrpc-operator:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kubegrpc-operator \
 && cp target/release/kubegrpc-operator /kubegrpc-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /kubegrpc-operator /usr/local/bin/kubegrpc-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kubegrpc-operator"]

//! Prints the GrpcBackend CustomResourceDefinition: `make crds` writes it to crds/grpcbackend.yaml.
fn main() {
    print!("{}", kubegrpc_crds::crd_yaml());
}

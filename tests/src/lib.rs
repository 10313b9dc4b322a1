//! The kubegrpc test harness: a real control plane (etcd, kube-apiserver, optionally
//! kube-controller-manager) in a private network namespace, real tonic backends, grpc-go and
//! grpc-java peers, and helpers to wait on conditions with deadlines. Used by the end-to-end
//! tests and by the demo.

pub mod backends;
pub mod bench_support;
pub mod certs;
pub mod control_api;
pub mod controlplane;
pub mod hostile;
pub mod install;
pub mod kubelet;
pub mod kuberesolver;
pub mod load;
pub mod netns;
pub mod objects;
pub mod operator;
pub mod peers;
pub mod process;
pub mod proxy;
pub mod routes;
pub mod scale;
pub mod scenario;
pub mod soak;
pub mod tls;
pub mod wait;
pub mod xds;

pub use controlplane::{ControlPlane, ControlPlaneOptions};

//! End-to-end harness: a real Kubernetes control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler built from their Go modules by `cargo xtask tools`),
//! a node agent that runs the pods bound to its nodes as real local processes inside per-node
//! network namespaces, and a Service proxy that plays kube-proxy on loopback.
//!
//! Start one with [`Cluster::start`]; dropping the [`Cluster`] stops everything it started, by
//! process id. Needs root (network namespaces).
//!
//! Networking model: every node has its own network namespace reached over a veth pair from the
//! host (`10.201.<slot>.<4j+1>` host side, `10.201.<slot>.<4j+2>` node side). Pods share their
//! node's namespace (like `hostNetwork: true`), so the pod IP is the node IP and **two pods on
//! one node must listen on different ports**. The namespaces have no default route: traffic can
//! only go to loopback or to these addresses.

pub mod chaos;
pub mod cluster;
pub mod cluster_dns;
pub mod controlplane;
pub mod disk_full;
pub mod error;
pub mod faults;
pub mod netns;
pub mod node_agent;
pub mod operator_env;
pub mod pki;
pub mod pod_runtime;
pub mod probe;
pub mod process;
pub mod service_proxy;
pub mod tools;

pub use cluster::{Cluster, ClusterOptions};
pub use error::{Error, Result};

/// Log lines of the harness into the test's output (shown when a test fails), at `default`
/// (e.g. `identitymesh_tests=info`) unless RUST_LOG says otherwise. Once per process.
pub fn init_test_tracing(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .with_test_writer()
        .try_init();
}

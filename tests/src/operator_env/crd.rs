//! Installing the CRD and waiting until the apiserver serves it.

use crate::Cluster;

use super::*;

/// `kubectl apply` of the CRD from crds/.
pub async fn install_crd(cluster: &Cluster) {
    cluster
        .kubectl(&["apply", "-f", crd_path().to_str().expect("utf-8 path")])
        .await
        .expect("kubectl apply the CRD from crds/");
}

/// Waits until the apiserver serves the IdentityMeshCluster CRD.
pub async fn wait_crd_established(cluster: &Cluster) {
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/identitymeshclusters.identitymesh.io",
            "--timeout=60s",
        ])
        .await
        .expect("CRD established");
}

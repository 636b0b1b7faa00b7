//! Which clusters a change of a watched object that the clusters do not own concerns.

use std::sync::Arc;

use kube::runtime::reflector::ObjectRef;

use crate::crd::IdentityMeshCluster;

/// The clusters with a server pod on node `node`, from the nodes their status records
/// (status.instances[].node, written each time a pod is scheduled: the pod watch reconciles
/// the cluster then). A cordon, an uncordon or a readiness change of the node reconciles just
/// them; a pod whose node status does not show yet is caught by the steady requeue.
pub(super) fn clusters_on_node(
    node: &str,
    clusters: &[Arc<IdentityMeshCluster>],
) -> Vec<ObjectRef<IdentityMeshCluster>> {
    clusters
        .iter()
        .filter(|c| {
            c.status
                .as_ref()
                .is_some_and(|s| s.instances.iter().any(|i| i.node.as_deref() == Some(node)))
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;
    use crate::crd::{IdentityMeshClusterStatus, InstanceStatus, Role};

    fn on(name: &str, ns: &str, nodes: &[Option<&str>]) -> Arc<IdentityMeshCluster> {
        let mut c = cluster(name, ns);
        c.status = Some(IdentityMeshClusterStatus {
            instances: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| InstanceStatus {
                    name: format!("{name}-{i}"),
                    node: n.map(str::to_string),
                    ready: true,
                    version: None,
                    role: Role::Unknown,
                })
                .collect(),
            ..Default::default()
        });
        Arc::new(c)
    }

    #[test]
    fn a_node_maps_to_the_clusters_with_a_pod_on_it() {
        let clusters = vec![
            on("im", "prod", &[Some("node-1"), Some("node-2")]),
            on("im", "test", &[Some("node-2"), Some("node-3")]),
            on("other", "prod", &[Some("node-3"), None]),
            Arc::new(cluster("new", "prod")),
        ];
        let names = |node: &str| {
            clusters_on_node(node, &clusters)
                .into_iter()
                .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
                .collect::<Vec<_>>()
        };
        assert_eq!(names("node-1"), ["prod/im"]);
        assert_eq!(names("node-2"), ["prod/im", "test/im"]);
        assert_eq!(names("node-3"), ["test/im", "prod/other"]);
        assert!(names("node-9").is_empty(), "no pod there: no reconcile");
    }
}

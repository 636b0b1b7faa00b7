//! Observing the world: both server slots as the pods, their nodes and their internal API show
//! them, and the registry in SQL through whichever pod answers. Reads only (besides the
//! controller's own memory of when a pod was first seen unhealthy).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams};
use kube::ResourceExt;

use super::{Error, Reconciler};
use crate::builders::pod::build_pod;
use crate::builders::{hash_of, LABEL_CLUSTER};
use crate::certs::CertAndKey;
use crate::cutover::{health, InstanceView, ServerView};
use crate::observe;
use crate::podclient::{InstanceApi, InstanceRow, PodTarget};
use crate::refusals::{self, Stuck};

/// What the controller observed of both slots.
pub(super) struct World {
    pub(super) views: [InstanceView; 2],
    pub(super) pods: HashMap<String, Pod>,
    pub(super) targets: HashMap<String, PodTarget>,
    /// Alive registry rows from SQL, when a pod answered.
    pub(super) rows: Option<Vec<InstanceRow>>,
}

impl World {
    pub(super) fn target(&self, pod: &str) -> Option<PodTarget> {
        self.targets.get(pod).cloned()
    }
}

/// Exactly one alive row reports active, it is `pod`, and (if given) it holds `epoch`.
pub(super) fn single_active_row(rows: &[InstanceRow], pod: &str, epoch: Option<i64>) -> bool {
    let mut actives = rows.iter().filter(|r| r.is_active());
    match (actives.next(), actives.next()) {
        (Some(r), None) => r.instance == pod && epoch.is_none_or(|e| r.epoch == e),
        _ => false,
    }
}

impl Reconciler {
    /// The client of the pods' internal API; None without the cluster CA.
    pub(super) fn pod_client(
        &self,
        ca: Option<&CertAndKey>,
    ) -> Result<Option<Arc<dyn InstanceApi>>, Error> {
        ca.map(|ca| {
            self.ctx
                .instances
                .for_cluster(&self.cluster_key(), ca)
                .map_err(|e| Error::PodClient(e.to_string()))
        })
        .transpose()
    }

    pub(super) async fn observe(&mut self, api: Option<&dyn InstanceApi>) -> Result<World, Error> {
        let pods: Api<Pod> = self.api();
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_CLUSTER}={}", self.names.cluster)))
            .await
            .map_err(Error::ReadPods)?;
        let mut by_name: HashMap<String, Pod> = HashMap::new();
        for p in list.items {
            // Our labels on someone else's pod do not make it a server of this cluster.
            if !self.owned_elsewhere(&p) {
                by_name.insert(p.name_any(), p);
            }
        }
        let nodes: Api<Node> = Api::all(self.ctx.client.clone());
        let mut views = Vec::new();
        let mut targets: HashMap<String, PodTarget> = HashMap::new();
        for name in self.names.pods() {
            let pod = by_name.get(&name);
            let node = match pod.and_then(observe::pod_node) {
                // Reading the node is best effort: without it, pod conditions still decide.
                Some(n) => nodes.get_opt(&n).await.ok().flatten(),
                None => None,
            };
            let target = pod
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .and_then(observe::pod_ip)
                .map(|ip| PodTarget::new(&name, ip, self.names.pod_dns_name(&name)));
            let server = match (&target, api) {
                (Some(t), Some(api)) => api.status(t).await.ok().map(|s| ServerView {
                    role: s.role.into(),
                    epoch: s.epoch,
                    version: s.version.clone(),
                }),
                _ => None,
            };
            if let Some(t) = target {
                targets.insert(name.clone(), t);
            }
            let desired = build_pod(&self.imc, &self.names, &name);
            let key = format!("{}/{}", self.names.namespace, name);
            let seen = self.unhealthy_seen(&key);
            let mut v = observe::instance_view(
                &name,
                pod,
                node.as_ref(),
                server,
                seen,
                hash_of(&desired.metadata),
            );
            if health(&v).is_healthy() {
                self.forget_unhealthy(&key);
            } else if seen.is_none() {
                self.note_unhealthy(&key);
            }
            // Keep the first-seen time we just noted out of this round's decision.
            v.first_seen_unhealthy = seen;
            views.push(v);
        }
        let views: [InstanceView; 2] = views
            .try_into()
            .map_err(|_| Error::Invalid("expected exactly two instance slots".into()))?;
        // The SQL registry through the recorded active (else any answering pod), for the
        // SingleActive condition. Reads only.
        let mut rows = None;
        if let Some(api) = api {
            let active = self.imc.status.as_ref().and_then(|s| s.active_pod.clone());
            let mut order: Vec<&PodTarget> = targets.values().collect();
            order.sort_by_key(|t| Some(&t.pod) != active.as_ref());
            for t in order {
                if views.iter().any(|v| v.name == t.pod && v.server.is_some()) {
                    if let Ok(r) = api.instances(t).await {
                        rows = Some(r);
                        break;
                    }
                }
            }
        }
        Ok(World {
            views,
            pods: by_name,
            targets,
            rows,
        })
    }

    fn unhealthy_seen(&self, key: &str) -> Option<Timestamp> {
        self.ctx
            .unhealthy_seen
            .lock()
            .ok()
            .and_then(|m| m.get(key).copied())
    }
    fn note_unhealthy(&self, key: &str) {
        if let Ok(mut m) = self.ctx.unhealthy_seen.lock() {
            m.entry(key.to_string()).or_insert(self.now);
        }
    }
    fn forget_unhealthy(&self, key: &str) {
        if let Ok(mut m) = self.ctx.unhealthy_seen.lock() {
            m.remove(key);
        }
    }

    /// The server pods whose containers cannot start, with the kubelet's reason. ImagePullBackOff
    /// only says "Back-off pulling image": the registry's error from the last ErrImagePull is
    /// kept (in the Context) and shown instead.
    pub(super) fn stuck_pods(&self, world: &World) -> Vec<(String, Stuck)> {
        let mut found = Vec::new();
        for name in self.names.pods() {
            let key = format!("{}/{name}", self.names.namespace);
            let stuck = world
                .pods
                .get(&name)
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .and_then(refusals::stuck_container);
            let Some(mut stuck) = stuck else {
                if let Ok(mut m) = self.ctx.pull_errors.lock() {
                    m.remove(&key);
                }
                continue;
            };
            if let Ok(mut m) = self.ctx.pull_errors.lock() {
                if stuck.reason == "ErrImagePull" {
                    m.insert(key, stuck.message.clone());
                } else if stuck.reason == "ImagePullBackOff" {
                    // Keep the registry's error from the last pull attempt.
                    if let Some(prev) = m.get(&key) {
                        stuck.reason = "ErrImagePull".into();
                        stuck.message = prev.clone();
                    }
                } else {
                    m.remove(&key);
                }
            }
            found.push((name, stuck));
        }
        found
    }
}

//! Pods: the two server pods exist (a missing slot gets a fresh standby), and finished
//! (evicted, failed) ones are removed so they are recreated. Which pod is active is the
//! cutover's business, not this step's.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::events::EventType;

use super::world::World;
use super::{Error, Reconciler};
use crate::builders::hash_of;
use crate::builders::pod::build_pod;
use crate::observe;

impl Reconciler {
    /// Create any missing pod; remove finished (evicted/failed) pods so they are recreated.
    pub(super) async fn ensure_pods(&mut self, world: &World) -> Result<(), Error> {
        let api: Api<Pod> = self.api();
        for name in self.names.pods() {
            match world.pods.get(&name) {
                None => {
                    let pod = build_pod(&self.imc, &self.names, &name);
                    let hash = hash_of(&pod.metadata).map(str::to_string);
                    if self.backing_off("Pod", &name, hash.as_deref()) {
                        continue;
                    }
                    match api.create(&PostParams::default(), &pod).await {
                        Err(kube::Error::Api(e)) if e.code == 409 => {
                            // Not one of ours (else observe would have listed it)?
                            if let Some(p) = api.get_opt(&name).await.map_err(Error::ReadPods)? {
                                self.owned_elsewhere(&p);
                            }
                        }
                        r => {
                            let created = self
                                .write_result("Pod", &name, hash.as_deref(), r)
                                .map_err(Error::WritePod)?;
                            self.writes += 1;
                            if created.is_some() {
                                self.event_about(
                                    Some(&name),
                                    EventType::Normal,
                                    "PodCreated",
                                    "Create",
                                    format!("created server pod {name}"),
                                )
                                .await;
                            }
                        }
                    }
                }
                Some(p) if observe::pod_finished(p) && p.metadata.deletion_timestamp.is_none() => {
                    self.delete_pod(&name, Some(0)).await?;
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    pub(super) async fn delete_pod(&mut self, name: &str, grace: Option<u32>) -> Result<(), Error> {
        let dp = DeleteParams {
            grace_period_seconds: grace,
            ..Default::default()
        };
        match self.api::<Pod>().delete(name, &dp).await {
            Ok(_) => {
                self.writes += 1;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(Error::WritePod(e)),
        }
    }
}

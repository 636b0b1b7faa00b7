//! Writing the cluster object: its status, and the removal of a switchover request. Every
//! write is conditional on the resourceVersion this reconcile builds on, and our own write
//! becomes the version later writes build on.

use std::sync::Arc;

use kube::api::{Api, Patch, PatchParams, PostParams};

use super::status::{self, Inputs, Steps};
use super::{Error, Reconciler};
use crate::builders::{ANNOTATION_SWITCHOVER, FIELD_MANAGER};
use crate::conditions::SWITCHOVER_CONDITION;
use crate::crd::{IdentityMeshCluster, IdentityMeshClusterStatus};
use crate::observe::set_condition;

impl Reconciler {
    /// The status step: compose (pure), publish the Events the change calls for, write status
    /// if anything changed.
    pub(super) async fn update_status(
        &mut self,
        old: &IdentityMeshClusterStatus,
        st: &mut IdentityMeshClusterStatus,
        steps: &Steps<'_>,
    ) -> Result<(), Error> {
        let stuck = self.stuck_pods(steps.world);
        let notices = status::compose(
            st,
            &Inputs {
                imc: &self.imc,
                names: &self.names,
                now: self.now,
                steps,
                conflicts: &self.conflicts,
                refused: &self.refused,
                stuck: &stuck,
            },
        );
        for n in notices {
            self.event_about(n.pod.as_deref(), n.type_, n.reason, n.action, n.note)
                .await;
        }
        self.write_status_if_changed(old, st).await
    }

    pub(super) async fn write_status_if_changed(
        &mut self,
        old: &IdentityMeshClusterStatus,
        new: &IdentityMeshClusterStatus,
    ) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        self.write_status(new).await
    }

    /// Replace status, conditional on the resourceVersion this reconcile read (409 when anyone
    /// wrote the object since: the reconcile is recomputed from a fresh read instead).
    pub(super) async fn write_status(
        &mut self,
        st: &IdentityMeshClusterStatus,
    ) -> Result<(), Error> {
        let api: Api<IdentityMeshCluster> = self.api();
        let mut obj = (*self.imc).clone();
        obj.status = Some(st.clone());
        obj.metadata.resource_version = self.rv.clone();
        obj.metadata.managed_fields = None;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        let written = api
            .replace_status(&self.names.cluster, &pp, &obj)
            .await
            .map_err(|e| self.conflict(e))?;
        self.writes += 1;
        self.adopt(written);
        Ok(())
    }

    /// Remove the switchover request, conditional on the resourceVersion read (a request
    /// written meanwhile is not lost).
    pub(super) async fn clear_switchover_annotation(&mut self) -> Result<(), Error> {
        let api: Api<IdentityMeshCluster> = self.api();
        let patch = serde_json::json!({"metadata": {
            "resourceVersion": self.rv,
            "annotations": {ANNOTATION_SWITCHOVER: null},
        }});
        let written = api
            .patch(
                &self.names.cluster,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| self.conflict(e))?;
        self.writes += 1;
        self.adopt(written);
        Ok(())
    }

    /// The answer to a switchover request goes to status before the request is removed, so a
    /// request is never consumed without a trace (a failed write leaves it for the next try).
    pub(super) async fn record_request(
        &mut self,
        st: &mut IdentityMeshClusterStatus,
        status: &str,
        reason: &str,
        msg: &str,
    ) -> Result<(), Error> {
        let gen = self.imc.metadata.generation;
        set_condition(
            &mut st.conditions,
            SWITCHOVER_CONDITION,
            status,
            reason,
            msg,
            gen,
            self.now,
        );
        self.write_status(st).await?;
        self.clear_switchover_annotation().await
    }

    /// Our own write is the newest version: later writes this reconcile build on it.
    fn adopt(&mut self, written: IdentityMeshCluster) {
        self.rv = written.metadata.resource_version.clone();
        self.imc = Arc::new(written);
    }

    /// A 409 is a lost race (recomputed from a fresh read), anything else a failed write.
    fn conflict(&self, e: kube::Error) -> Error {
        match e {
            kube::Error::Api(s) if s.code == 409 => Error::Conflict(self.names.cluster.clone()),
            e => Error::WriteStatus(e),
        }
    }
}

//! Applying objects: server-side apply of what differs from the live object (by hash
//! annotation), leaving alone what belongs to someone else, and backing off writes the
//! apiserver refuses as invalid.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Error, Reconciler, RefusedWrite};
use crate::builders::config::build_config_map;
use crate::builders::disruption::{budget_matches, build_disruption_budget};
use crate::builders::service::{build_client_service, build_headless_service};
use crate::builders::{foreign_owner, hash_of, FIELD_MANAGER};
use crate::refusals;

impl Reconciler {
    /// The children that follow the spec alone: server.toml and the headless Service.
    pub(super) async fn apply_config(&mut self) -> Result<(), Error> {
        let imc = self.imc.clone();
        self.apply_if_changed(&build_config_map(&imc, &self.names)?)
            .await?;
        self.apply_if_changed(&build_headless_service(&imc, &self.names))
            .await?;
        Ok(())
    }

    /// Server-side apply `obj` unless the live object already carries its hash.
    pub(super) async fn apply_if_changed<K>(&mut self, obj: &K) -> Result<bool, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        self.apply_unless_same(obj, |_| true).await
    }

    /// Server-side apply `obj` unless the live object carries its hash and `same(live)` holds
    /// (`same` catches edits of fields that must never drift, which leave the hash alone).
    async fn apply_unless_same<K>(
        &mut self,
        obj: &K,
        same: impl Fn(&K) -> bool,
    ) -> Result<bool, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + Serialize
            + DeserializeOwned
            + std::fmt::Debug,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        let api: Api<K> = self.api();
        if let Some(live) = api.get_opt(&name).await.map_err(Error::ApplyObject)? {
            if self.owned_elsewhere(&live) {
                return Ok(false);
            }
            if hash_of(live.meta()).is_some()
                && hash_of(live.meta()) == hash_of(obj.meta())
                && same(&live)
            {
                return Ok(false);
            }
        }
        let (kind, hash) = (K::kind(&()), hash_of(obj.meta()).map(str::to_string));
        if self.backing_off(&kind, &name, hash.as_deref()) {
            return Ok(false);
        }
        let r = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await;
        self.writes += 1;
        Ok(self
            .write_result(&kind, &name, hash.as_deref(), r)
            .map_err(Error::ApplyObject)?
            .is_some())
    }

    /// The client Service, also repaired when someone edited its selector: routing to the
    /// wrong pod is the one drift that must never persist.
    pub(super) async fn ensure_client_service(
        &mut self,
        active: Option<&str>,
    ) -> Result<bool, Error> {
        let svc = build_client_service(&self.imc, &self.names, active);
        let live: Option<Service> = self
            .api::<Service>()
            .get_opt(&self.names.client_service())
            .await
            .map_err(Error::ApplyObject)?;
        let selector_ok = live
            .as_ref()
            .and_then(|l| l.spec.as_ref())
            .map(|s| &s.selector)
            == svc.spec.as_ref().map(|s| &s.selector);
        if let Some(live) = &live {
            if self.owned_elsewhere(live) {
                return Ok(false);
            }
            if selector_ok
                && hash_of(&live.metadata).is_some()
                && hash_of(&live.metadata) == hash_of(&svc.metadata)
            {
                return Ok(false);
            }
        }
        let name = self.names.client_service();
        // The selector is part of what is written: a new target is tried at once.
        let hash = format!(
            "{}/{}",
            hash_of(&svc.metadata).unwrap_or_default(),
            active.unwrap_or_default()
        );
        if self.backing_off("Service", &name, Some(&hash)) {
            return Ok(false);
        }
        let r = self
            .api::<Service>()
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&svc),
            )
            .await;
        self.writes += 1;
        Ok(self
            .write_result("Service", &name, Some(&hash), r)
            .map_err(Error::ApplyObject)?
            .is_some())
    }

    /// The active's PodDisruptionBudget: it names the pod `active` names for the client
    /// Service, and is applied right after the Service (in the routing step, and in the swing
    /// once the Service write went through). That order is the safe one: the budget never
    /// leaves the pod that still receives traffic (a failed or refused swing leaves both where
    /// they were). Between the two writes the old active, already demoted and fenced by the new
    /// epoch, is still covered and the new one not yet, for one API round trip; the reverse
    /// order would expose the pod that still serves. Once written, the apiserver refuses
    /// evictions under the budget until the disruption controller has processed the new
    /// selector (observedGeneration < generation answers 429), so the new active is covered
    /// before the budget's status catches up. A live budget whose selector or limits were edited
    /// is rewritten like the Service's selector.
    pub(super) async fn ensure_disruption_budget(
        &mut self,
        active: Option<&str>,
    ) -> Result<bool, Error> {
        let pdb = build_disruption_budget(&self.imc, &self.names, active);
        self.apply_unless_same(&pdb, |live| budget_matches(live, &pdb))
            .await
    }

    fn refused_key(&self, kind: &str, name: &str) -> String {
        format!("{}/{kind}/{name}", self.cluster_key())
    }

    /// True while a write of `kind` `name` that the apiserver refused backs off (same object,
    /// retry time not reached): the write is skipped and the refusal stays reported.
    pub(super) fn backing_off(&mut self, kind: &str, name: &str, hash: Option<&str>) -> bool {
        let key = self.refused_key(kind, name);
        let Some(r) = self
            .ctx
            .refused_writes
            .lock()
            .ok()
            .and_then(|m| m.get(&key).cloned())
        else {
            return false;
        };
        if r.hash.as_deref() != hash || self.now >= r.next_try {
            return false;
        }
        self.refused.insert(format!("{kind}/{name}"), r.message);
        true
    }

    /// The outcome of a write of `kind` `name`: a refusal (400/422) is recorded and backs off
    /// (Ok: the reconcile goes on and reports it); any other error is returned.
    pub(super) fn write_result<T>(
        &mut self,
        kind: &str,
        name: &str,
        hash: Option<&str>,
        r: Result<T, kube::Error>,
    ) -> Result<Option<T>, kube::Error> {
        let key = self.refused_key(kind, name);
        match r {
            Ok(v) => {
                if let Ok(mut m) = self.ctx.refused_writes.lock() {
                    m.remove(&key);
                }
                Ok(Some(v))
            }
            Err(e) => {
                let Some(status) = refusals::refused_status(&e) else {
                    return Err(e);
                };
                let message = refusals::refused_message(kind, name, status);
                let attempts = self
                    .ctx
                    .refused_writes
                    .lock()
                    .ok()
                    .and_then(|m| m.get(&key).map(|r| r.attempts))
                    .unwrap_or(0)
                    .saturating_add(1);
                let delay = refusals::backoff(attempts);
                tracing::warn!(%message, attempts, retry_in_s = delay.as_secs(), "write refused");
                let next_try = self.now.checked_add(delay).unwrap_or(self.now);
                if let Ok(mut m) = self.ctx.refused_writes.lock() {
                    m.insert(
                        key,
                        RefusedWrite {
                            attempts,
                            next_try,
                            hash: hash.map(str::to_string),
                            message: message.clone(),
                        },
                    );
                }
                self.refused.insert(format!("{kind}/{name}"), message);
                Ok(None)
            }
        }
    }

    /// True (and a conflict noted) when `live` is not this cluster's: the caller leaves it
    /// alone instead of two controllers rewriting it.
    pub(super) fn owned_elsewhere<K: Resource<DynamicType = ()>>(&mut self, live: &K) -> bool {
        let Some(owner) = foreign_owner(live.meta(), &self.imc) else {
            return false;
        };
        let (kind, name) = (K::kind(&()), live.name_any());
        self.conflicts.insert(
            format!("{kind}/{name}"),
            format!("{kind} {name} already exists and belongs to {owner}: left alone (delete or rename it, or give this cluster another name)"),
        );
        true
    }
}

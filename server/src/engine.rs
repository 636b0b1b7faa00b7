//! The engine's role and its fencing: standby until promoted, active while the stored epoch is
//! its own, and back to standby on demotion or as soon as a fenced write tells it the epoch moved.
//!
//! The heartbeat loop keeps the instance's registry row fresh and, while active, makes one fenced
//! write per interval (`engine_tick`), so a stale active learns it was fenced within one interval
//! even when it has no import running.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{watch, Mutex, OwnedRwLockReadGuard, RwLock};

use crate::config::EngineConfig;
use crate::store::{
    now_ms, AuditEntry, FenceToken, Heartbeat, PromoteOutcome, Role, Store, StoreError,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RoleStatus {
    pub role: Role,
    pub epoch: i64,
}

#[derive(Debug, Clone)]
pub struct DemoteOutcome {
    pub role: Role,
    pub epoch: i64,
    /// False when an in-flight request or batch outlived the drain bound (the new epoch fences
    /// it anyway).
    pub drained: bool,
}

pub struct Engine {
    store: Arc<dyn Store>,
    instance: String,
    /// Random per process: with the name, the fence holder (see `store::fencing`).
    incarnation: String,
    host: String,
    version: String,
    started_at_ms: i64,
    cfg: EngineConfig,
    status: watch::Sender<RoleStatus>,
    /// Serialises role changes so a promote and a demote never interleave.
    transitions: Mutex<()>,
    /// In-flight batches hold a read guard; a drain waits for the write guard.
    work: Arc<RwLock<()>>,
    /// Admin API and UI requests served as active hold a read guard (the forwarding layer takes
    /// it); a planned demotion waits for them while still active, so a request that started on
    /// the active finishes there, and those arriving meanwhile are held and then forwarded.
    requests: Arc<RwLock<()>>,
}

/// Permission to write one batch: the fence token and a guard a drain waits for.
pub struct BatchPermit {
    pub token: FenceToken,
    _guard: OwnedRwLockReadGuard<()>,
}

/// Permission to serve one request as the active instance (see [`Engine::begin_request`]).
pub struct RequestPermit {
    _guard: OwnedRwLockReadGuard<()>,
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        instance: String,
        host: String,
        version: String,
        cfg: EngineConfig,
    ) -> Arc<Self> {
        let (status, _) = watch::channel(RoleStatus {
            role: Role::Standby,
            epoch: 0,
        });
        Arc::new(Self {
            store,
            instance,
            incarnation: uuid::Uuid::new_v4().simple().to_string(),
            host,
            version,
            started_at_ms: now_ms(),
            cfg,
            status,
            transitions: Mutex::new(()),
            work: Arc::new(RwLock::new(())),
            requests: Arc::new(RwLock::new(())),
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }
    pub fn incarnation(&self) -> &str {
        &self.incarnation
    }
    fn token(&self, epoch: i64) -> FenceToken {
        FenceToken {
            instance: self.instance.clone(),
            incarnation: self.incarnation.clone(),
            epoch,
        }
    }
    pub fn version(&self) -> &str {
        &self.version
    }
    pub fn status(&self) -> RoleStatus {
        *self.status.borrow()
    }
    pub fn subscribe(&self) -> watch::Receiver<RoleStatus> {
        self.status.subscribe()
    }

    /// Becomes active with `epoch` iff the store accepts it (greater than stored, or already ours).
    pub async fn promote(&self, epoch: i64, actor: &str) -> Result<RoleStatus, StoreError> {
        let _t = self.transitions.lock().await;
        let outcome = self.store.promote(&self.token(epoch)).await?;
        let st = RoleStatus {
            role: Role::Active,
            epoch,
        };
        self.status.send_replace(st);
        tracing::info!(instance = %self.instance, epoch, ?outcome, actor, "promoted to active");
        if outcome == PromoteOutcome::Promoted {
            self.audit(actor, "promote", format!("{{\"epoch\":{epoch}}}"))
                .await;
        }
        self.beat().await;
        Ok(st)
    }

    /// A planned demotion: stops taking requests, lets those in flight finish as active, then
    /// stops new work and waits for the in-flight batch, all within one drain bound; then standby.
    pub async fn demote(&self, actor: &str, reason: &str) -> DemoteOutcome {
        self.demote_with(actor, reason, true).await
    }

    /// A fence error's demotion does not wait for requests: the epoch is lost, so they cannot
    /// write anyway, and the request that saw the error may be one of them.
    async fn demote_with(&self, actor: &str, reason: &str, finish_requests: bool) -> DemoteOutcome {
        let _t = self.transitions.lock().await;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.cfg.drain_timeout_ms);
        let prev = self.status();
        // Held until the role has flipped: no request starts as active in between.
        let requests = if finish_requests && prev.role == Role::Active {
            Some(tokio::time::timeout_at(deadline, self.requests.write()).await)
        } else {
            None
        };
        let requests_drained = !matches!(requests, Some(Err(_)));
        self.status.send_replace(RoleStatus {
            role: Role::Standby,
            epoch: prev.epoch,
        });
        drop(requests);
        let drained = tokio::time::timeout_at(deadline, self.work.write())
            .await
            .is_ok()
            && requests_drained;
        if prev.role == Role::Active {
            tracing::warn!(instance = %self.instance, epoch = prev.epoch, drained, actor, reason, "demoted to standby");
            self.audit(
                actor,
                "demote",
                serde_json::json!({"epoch": prev.epoch, "reason": reason, "drained": drained})
                    .to_string(),
            )
            .await;
        }
        self.beat().await;
        DemoteOutcome {
            role: Role::Standby,
            epoch: prev.epoch,
            drained,
        }
    }

    /// A permit to serve one request as active, or None when not active or demoting.
    pub fn begin_request(&self) -> Option<RequestPermit> {
        if self.status().role != Role::Active {
            return None;
        }
        // Fails once a demotion waits for the write guard.
        let guard = self.requests.clone().try_read_owned().ok()?;
        (self.status().role == Role::Active).then_some(RequestPermit { _guard: guard })
    }

    /// A permit for one engine write, or None when not active (standby, draining or fenced).
    pub fn begin_batch(&self) -> Option<BatchPermit> {
        let st = self.status();
        if st.role != Role::Active {
            return None;
        }
        let guard = self.work.clone().try_read_owned().ok()?;
        // Re-check: a demotion may have started between the two reads.
        (self.status() == st).then(|| BatchPermit {
            token: self.token(st.epoch),
            _guard: guard,
        })
    }

    /// Awaits one engine write made under `permit`, releases the permit, then reports a
    /// failure: the demotion a fence error starts waits for permits, this one included, so
    /// reporting while holding it would stall the demotion for the whole drain bound.
    pub async fn commit<T>(
        &self,
        permit: BatchPermit,
        write: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let r = write.await;
        drop(permit);
        self.reported(r).await
    }

    /// One engine write under a fresh permit, `write` given the permit's token; the permit is
    /// released before a failure is reported (see [`Self::commit`]). None when not active.
    pub async fn write<T, F>(
        &self,
        write: impl FnOnce(FenceToken) -> F,
    ) -> Option<Result<T, StoreError>>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let permit = self.begin_batch()?;
        let write = write(permit.token.clone());
        Some(self.commit(permit, write).await)
    }

    /// Reacts to a store error from an engine write: a fence means another instance holds a
    /// newer epoch, so this one stops being active at once.
    pub async fn on_write_error(&self, err: &StoreError) {
        if let StoreError::Fenced {
            stored,
            holder,
            own,
        } = err
        {
            if !fence_error_demotes(self.status(), *stored) {
                // A write under an older epoch of this same process, refused because the
                // process was promoted again meanwhile: it is still the holder.
                tracing::info!(instance = %self.instance, own_epoch = own, stored_epoch = stored, "a write under an older epoch of this instance was refused; still active");
                return;
            }
            tracing::error!(
                instance = %self.instance, own_epoch = own, stored_epoch = stored, holder = %holder,
                "fenced: another instance holds a newer epoch; demoting to standby"
            );
            let reason = format!("fenced by epoch {stored} held by {holder}");
            self.demote_with("engine", &reason, false).await;
        }
    }

    /// Passes an engine write's result through, reacting to a failure as
    /// [`Self::on_write_error`] does. Call it after dropping the write's permit where possible:
    /// a demotion waits for permits.
    pub async fn reported<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &r {
            self.on_write_error(e).await;
        }
        r
    }

    async fn beat(&self) {
        let st = self.status();
        let hb = Heartbeat {
            instance: self.instance.clone(),
            incarnation: self.incarnation.clone(),
            host: self.host.clone(),
            role: st.role,
            epoch: st.epoch,
            version: self.version.clone(),
            started_at_ms: self.started_at_ms,
            now_ms: now_ms(),
        };
        if let Err(e) = self.store.heartbeat(&hb).await {
            if matches!(e, StoreError::Fenced { .. }) {
                // Do not recurse through demote's own heartbeat: flip the role here, then log.
                if self.status() == st {
                    self.status.send_replace(RoleStatus {
                        role: Role::Standby,
                        epoch: st.epoch,
                    });
                }
                tracing::error!(instance = %self.instance, error = %e, "fenced at heartbeat; now standby");
            } else {
                tracing::warn!(instance = %self.instance, error = %e, "registry heartbeat failed");
            }
        }
    }

    async fn tick(&self) {
        self.beat().await;
        if let Some(permit) = self.begin_batch() {
            let r = self.store.engine_tick(&permit.token, now_ms()).await;
            drop(permit);
            if let Err(e) = r {
                if matches!(e, StoreError::Fenced { .. }) {
                    self.on_write_error(&e).await;
                } else {
                    tracing::warn!(instance = %self.instance, error = %e, "engine tick failed");
                }
            }
        }
    }

    /// Runs heartbeats and fenced ticks until `shutdown` fires.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut every =
            tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_interval_ms));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => self.tick().await,
                _ = shutdown.changed() => break,
            }
        }
    }

    /// How far back a heartbeat still counts as alive.
    pub fn alive_since_ms(&self) -> i64 {
        now_ms() - self.cfg.instance_ttl_ms as i64
    }

    async fn audit(&self, actor: &str, action: &str, detail: String) {
        let entry = AuditEntry::now(actor, action, self.instance.clone(), detail);
        crate::store::audit(self.store.as_ref(), entry).await;
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

/// Whether a fence error seen by an instance in `status` means it lost the fence. Epochs are
/// unique to one holder, so a stored epoch equal to the one this instance is active with means
/// this process holds it (the refused write carried an older epoch of its own).
fn fence_error_demotes(status: RoleStatus, stored_epoch: i64) -> bool {
    !(status.role == Role::Active && status.epoch == stored_epoch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    /// Two engines on one database, each with its own connection pool (as two processes).
    async fn two(names: [&str; 2]) -> (tempfile::TempDir, Arc<Engine>, Arc<Engine>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("im.db");
        let mk = |name: &str, s: Arc<dyn Store>| {
            Engine::new(
                s,
                name.into(),
                "host".into(),
                "1".into(),
                EngineConfig {
                    heartbeat_interval_ms: 50,
                    instance_ttl_ms: 500,
                    drain_timeout_ms: 200,
                },
            )
        };
        let sa: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
        sa.migrate().await.unwrap();
        let sb: Arc<dyn Store> = Arc::new(SqliteStore::open(&path).await.unwrap());
        (dir, mk(names[0], sa), mk(names[1], sb))
    }

    async fn pair() -> (tempfile::TempDir, Arc<Engine>, Arc<Engine>) {
        two(["a", "b"]).await
    }

    /// One fenced write through the engine, as a request handler makes it.
    async fn fenced_tick(e: &Arc<Engine>) -> Option<Result<(), StoreError>> {
        let store = e.store().clone();
        e.write(|t| async move { store.engine_tick(&t, now_ms()).await })
            .await
    }

    async fn demote_entries(e: &Engine) -> Vec<serde_json::Value> {
        let log = e
            .store()
            .audit(&crate::store::AuditFilter::latest(100))
            .await
            .unwrap();
        log.iter()
            .filter(|a| a.action == "demote")
            .map(|a| serde_json::from_str(&a.detail).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_fenced_write_releases_its_permit_before_the_demotion_drains() {
        let (_d, a, b) = pair().await;
        a.promote(1, "test").await.unwrap();
        let permit = a.begin_batch().unwrap();
        let token = permit.token.clone();
        b.promote(2, "test").await.unwrap();
        let r = a
            .commit(permit, a.store().engine_tick(&token, now_ms()))
            .await;
        assert!(
            matches!(r, Err(StoreError::Fenced { stored: 2, .. })),
            "{r:?}"
        );
        assert_eq!(a.status().role, Role::Standby);
        let demotes = demote_entries(&a).await;
        assert_eq!(demotes.len(), 1, "{demotes:?}");
        // Reporting while still holding the permit made the demotion wait for it: drained false.
        assert_eq!(
            demotes[0]["drained"],
            serde_json::json!(true),
            "{demotes:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_write_under_an_older_epoch_of_this_process_does_not_demote_it() {
        let (_d, a, _b) = pair().await;
        a.promote(1, "test").await.unwrap();
        let old = a.begin_batch().unwrap();
        let token = old.token.clone();
        // Promoted again (an operator retry with a greater epoch) while a write is in flight.
        a.promote(2, "test").await.unwrap();
        let r = a.commit(old, a.store().engine_tick(&token, now_ms())).await;
        assert!(
            matches!(r, Err(StoreError::Fenced { stored: 2, .. })),
            "{r:?}"
        );
        assert_eq!(
            a.status(),
            RoleStatus {
                role: Role::Active,
                epoch: 2
            }
        );
        let permit = a.begin_batch().expect("still active");
        assert_eq!(permit.token.epoch, 2);
    }

    #[tokio::test]
    async fn same_name_other_incarnation_cannot_share_an_epoch() {
        // A recreated pod `im-b` and its predecessor still running on a cut-off node.
        let (_d, old, new) = two(["im-b", "im-b"]).await;
        assert_ne!(old.incarnation(), new.incarnation());
        old.promote(3, "operator").await.unwrap();
        // The operator retries promote(3) after a lost response, but reaches the new pod.
        let e = new.promote(3, "operator").await.unwrap_err();
        assert!(matches!(e, StoreError::StaleEpoch { stored: 3, .. }), "{e}");
        assert_eq!(new.status().role, Role::Standby);
        // Exactly one of them commits a fenced write at epoch 3.
        let mut committed = 0;
        for e in [&old, &new] {
            if e.store().engine_tick(&e.token(3), now_ms()).await.is_ok() {
                committed += 1;
            }
        }
        assert_eq!(committed, 1);
        // The new incarnation takes a greater epoch; from then on only it writes.
        new.promote(4, "operator").await.unwrap();
        assert!(old
            .store()
            .engine_tick(&old.token(3), now_ms())
            .await
            .is_err());
        new.store()
            .engine_tick(&new.token(4), now_ms())
            .await
            .unwrap();
        // One registry row per process: the new one active, its predecessor fenced.
        let rows = new.store().instances(0).await.unwrap();
        let role_of = |inc: &str| rows.iter().find(|r| r.incarnation == inc).map(|r| r.role);
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(role_of(new.incarnation()), Some(Role::Active), "{rows:?}");
        assert_eq!(role_of(old.incarnation()), Some(Role::Fenced), "{rows:?}");
    }

    #[test]
    fn a_fence_error_demotes_unless_this_instance_is_active_with_the_stored_epoch() {
        let st = |role, epoch| RoleStatus { role, epoch };
        assert!(!fence_error_demotes(st(Role::Active, 5), 5));
        assert!(fence_error_demotes(st(Role::Active, 5), 6));
        assert!(fence_error_demotes(st(Role::Active, 5), 4));
        assert!(fence_error_demotes(st(Role::Standby, 5), 5));
    }

    #[tokio::test]
    async fn fenced_active_demotes_itself_on_its_next_write() {
        let (_d, a, b) = pair().await;
        a.promote(1, "test").await.unwrap();
        b.promote(2, "test").await.unwrap();
        assert_eq!(a.status().role, Role::Active, "a does not know yet");
        a.tick().await;
        assert_eq!(a.status().role, Role::Standby);
        assert!(a.begin_batch().is_none());
        let rows = a.store().instances(a.alive_since_ms()).await.unwrap();
        let actives: Vec<_> = rows.iter().filter(|r| r.role == Role::Active).collect();
        assert_eq!(actives.len(), 1);
        assert_eq!(actives[0].instance, "b");
    }

    #[tokio::test]
    async fn promote_with_old_epoch_is_refused_and_role_unchanged() {
        let (_d, a, b) = pair().await;
        a.promote(5, "test").await.unwrap();
        let e = b.promote(5, "test").await.unwrap_err();
        assert!(matches!(e, StoreError::StaleEpoch { stored: 5, .. }));
        assert_eq!(b.status().role, Role::Standby);
        // Idempotent retry by the holder.
        assert_eq!(a.promote(5, "test").await.unwrap().epoch, 5);
    }

    #[tokio::test]
    async fn demote_waits_for_the_in_flight_batch_within_the_bound() {
        let (_d, a, _b) = pair().await;
        a.promote(1, "test").await.unwrap();
        let permit = a.begin_batch().unwrap();
        let a2 = a.clone();
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(permit);
        });
        let out = a2.demote("test", "planned").await;
        release.await.unwrap();
        assert!(out.drained);
        assert!(a.begin_batch().is_none(), "no new work after demotion");

        a.promote(2, "test").await.unwrap();
        let _stuck = a.begin_batch().unwrap();
        let out = a.demote("test", "planned").await;
        assert!(!out.drained, "the bound is respected");
        assert_eq!(out.role, Role::Standby);
    }

    #[tokio::test]
    async fn a_planned_demotion_lets_requests_in_flight_finish_as_active() {
        let (_d, a, _b) = pair().await;
        a.promote(1, "test").await.unwrap();
        let request = a.begin_request().unwrap();
        let a2 = a.clone();
        let demotion = tokio::spawn(async move { a2.demote("test", "planned").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The demotion waits for the request: still active, so its write goes through, and no
        // new request starts as active meanwhile.
        assert_eq!(a.status().role, Role::Active);
        assert!(
            a.begin_request().is_none(),
            "demoting: new requests are held"
        );
        let wrote = fenced_tick(&a).await;
        assert!(
            matches!(wrote, Some(Ok(_))),
            "the request in flight still writes"
        );
        drop(request);
        let out = demotion.await.unwrap();
        assert!(out.drained);
        assert_eq!(a.status().role, Role::Standby);
        assert!(a.begin_request().is_none());

        // A request that outlives the bound: the demotion goes on, and says it did not drain.
        a.promote(2, "test").await.unwrap();
        let _stuck = a.begin_request().unwrap();
        let out = a.demote("test", "planned").await;
        assert!(!out.drained);
        assert_eq!(out.role, Role::Standby);
    }

    #[tokio::test]
    async fn a_fenced_demotion_does_not_wait_for_requests() {
        let (_d, a, b) = pair().await;
        a.promote(1, "test").await.unwrap();
        b.promote(2, "test").await.unwrap();
        let _request = a.begin_request().unwrap();
        let wrote = fenced_tick(&a).await;
        assert!(matches!(wrote, Some(Err(StoreError::Fenced { .. }))));
        assert_eq!(a.status().role, Role::Standby);
        // Waiting for the request still held would have run out the bound: drained false.
        let demotes = demote_entries(&a).await;
        assert_eq!(demotes.len(), 1, "{demotes:?}");
        assert_eq!(demotes[0]["drained"], true, "{demotes:?}");
    }
}

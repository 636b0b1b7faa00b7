//! Connector runs: import every object type page by page, each page one fenced batch, the
//! watermark committed only after the whole read; the composer follows the committed pages. One run per connector at a
//! time across the cluster (the store refuses a second), and none while the engine is paused
//! or this instance is not active.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use identitymesh_connectors::model::{ConnectorObject, ImportMode, Page};
use identitymesh_signalr::hub::HubHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use super::compose_rules::ConnectorRules;
use super::compose_writes::{self, ComposeContext, ObjectError};
use super::source::{Source, SourceError};
use crate::engine::Engine;
use crate::secrets::Secrets;
use identitymesh_connectors::roots::DropRoots;

use crate::store::{
    now_ms, AuditEntry, ConnectorRow, CsObject, ImportBatch, PageCompose, Role, RunRow,
    ScheduleAdvance, Store, StoreError, StoredObject,
};

/// The setting that pauses the engine (the runbook's drain step).
pub const PAUSED_SETTING: &str = "sync.paused";
/// Pages buffered between a reader and the writer: enough to overlap one read with one commit.
const PAGE_BUFFER: usize = 2;
const MAX_ERRORS: usize = 100;

/// The setting holding the identity attributes the join keys were last indexed by.
const KEY_ATTRIBUTES_SETTING: &str = "sync.key_attributes";

/// The setting holding a hash of the rules a connector's objects were last composed with.
fn composed_rules_setting(connector_id: &str) -> String {
    format!("sync.composed_rules.{connector_id}")
}

fn rules_hash(rules_json: &str) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(rules_json.as_bytes()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunMode {
    Full,
    Delta,
    /// Removes every object of the connector (and so its identity contributions), so the
    /// connector can be deleted.
    Clear,
}

impl RunMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RunMode::Full => "full",
            RunMode::Delta => "delta",
            RunMode::Clear => "clear",
        }
    }
    pub fn parse(s: &str) -> Option<RunMode> {
        match s {
            "full" => Some(RunMode::Full),
            "delta" => Some(RunMode::Delta),
            "clear" => Some(RunMode::Clear),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("this instance is not active; runs happen on the active instance only")]
    NotActive,
    #[error("the sync engine is paused; resume it (POST /api/sync/resume) to run connectors")]
    Paused,
    #[error("no connector with id {0:?}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyRunning(String),
    #[error("connector {id}: {reason}")]
    Invalid { id: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct SyncEngine {
    store: Arc<dyn Store>,
    engine: Arc<Engine>,
    secrets: Secrets,
    hub: Option<HubHandle>,
    /// Where CSV connectors running here may read.
    csv_roots: DropRoots,
    /// Runs this process is executing: connector id → run id.
    active: Mutex<HashMap<String, String>>,
    /// One composer chunk at a time across this process's runs (see `compose_pending`).
    compose_serial: tokio::sync::Mutex<()>,
}

impl SyncEngine {
    pub fn new(
        engine: Arc<Engine>,
        secrets: Secrets,
        hub: Option<HubHandle>,
        csv_roots: DropRoots,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: engine.store().clone(),
            engine,
            secrets,
            hub,
            csv_roots,
            active: Mutex::new(HashMap::new()),
            compose_serial: tokio::sync::Mutex::new(()),
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }
    pub fn hub(&self) -> Option<&HubHandle> {
        self.hub.as_ref()
    }
    pub fn csv_roots(&self) -> &DropRoots {
        &self.csv_roots
    }

    pub async fn paused(&self) -> Result<bool, StoreError> {
        Ok(self.store.setting(PAUSED_SETTING).await?.as_deref() == Some("true"))
    }

    pub async fn set_paused(&self, paused: bool, actor: &str) -> Result<(), StoreError> {
        self.store
            .set_setting(PAUSED_SETTING, if paused { "true" } else { "false" })
            .await?;
        let action = if paused { "sync.pause" } else { "sync.resume" };
        tracing::warn!(
            actor,
            action,
            "sync engine {}",
            if paused { "paused" } else { "resumed" }
        );
        self.store
            .append_audit(&AuditEntry::now(actor, action, "sync", "{}"))
            .await
    }

    /// Connector ids with a run in this process.
    pub fn running(&self) -> Vec<(String, String)> {
        let m = self.active.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(c, r)| (c.clone(), r.clone())).collect();
        v.sort();
        v
    }

    /// Records a run and starts it in the background; returns the `running` row.
    pub async fn start(
        self: &Arc<Self>,
        connector_id: &str,
        mode: RunMode,
        trigger: &str,
    ) -> Result<(RunRow, tokio::task::JoinHandle<RunRow>), RunError> {
        self.start_with(connector_id, mode, trigger, None).await
    }

    /// Moves a schedule on without a run (one skipped on purpose), fenced.
    pub async fn advance_schedule(&self, advance: &ScheduleAdvance) -> Result<(), RunError> {
        let written = self
            .engine
            .write(|t| async move {
                self.store
                    .set_schedule_next_run(&t, &advance.schedule_id, advance.next_run_ms)
                    .await
            })
            .await;
        Ok(written.ok_or(RunError::NotActive)??)
    }

    /// As [`Self::start`]; with `advance`, the schedule moves on in the run's own transaction.
    pub async fn start_with(
        self: &Arc<Self>,
        connector_id: &str,
        mode: RunMode,
        trigger: &str,
        advance: Option<ScheduleAdvance>,
    ) -> Result<(RunRow, tokio::task::JoinHandle<RunRow>), RunError> {
        if self.engine.status().role != Role::Active {
            return Err(RunError::NotActive);
        }
        if trigger != "canary" && self.paused().await? {
            return Err(RunError::Paused);
        }
        let row = self
            .store
            .connector(connector_id)
            .await?
            .ok_or_else(|| RunError::NotFound(connector_id.to_string()))?;
        let rules: ConnectorRules =
            serde_json::from_str(&row.rules_json).map_err(|e| RunError::Invalid {
                id: row.id.clone(),
                reason: format!("stored rules are unreadable: {e}"),
            })?;
        let compiled = rules.compile().map_err(|e| RunError::Invalid {
            id: row.id.clone(),
            reason: e.to_string(),
        })?;
        let key_attributes = self.key_attributes().await?;
        let permit = self.engine.begin_batch().ok_or(RunError::NotActive)?;
        let run = RunRow {
            id: uuid::Uuid::new_v4().to_string(),
            connector_id: row.id.clone(),
            instance: permit.token.instance.clone(),
            epoch: permit.token.epoch,
            mode: mode.as_str().into(),
            trigger: trigger.into(),
            status: "running".into(),
            started_at_ms: now_ms(),
            finished_at_ms: None,
            added: 0,
            updated: 0,
            unchanged: 0,
            deleted: 0,
            failed: 0,
            error: None,
            errors_json: None,
        };
        {
            let mut m = self.active.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(other) = m.get(&row.id) {
                return Err(RunError::AlreadyRunning(format!(
                    "connector {} is already running (run {other}); wait for it to finish",
                    row.id
                )));
            }
            m.insert(row.id.clone(), run.id.clone());
        }
        let token = permit.token.clone();
        let start = self.store.start_run(&token, &run, advance.as_ref());
        if let Err(e) = self.engine.commit(permit, start).await {
            self.forget(&row.id);
            return Err(match e {
                StoreError::Conflict(m) => RunError::AlreadyRunning(m),
                other => other.into(),
            });
        }
        tracing::info!(connector = %row.name, run = %run.id, mode = mode.as_str(), trigger, "run started");
        let this = self.clone();
        let first = run.clone();
        let task = tokio::spawn(async move {
            let done = this
                .execute(&row, &compiled, &key_attributes, mode, run)
                .await;
            this.forget(&row.id);
            if let Err(e) = this.store.finish_run(&done).await {
                tracing::error!(run = %done.id, error = %e, "cannot record the end of the run");
            }
            tracing::info!(
                connector = %row.name, run = %done.id, status = %done.status,
                added = done.added, updated = done.updated, deleted = done.deleted, failed = done.failed,
                "run finished"
            );
            done
        });
        Ok((first, task))
    }

    fn forget(&self, connector_id: &str) {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(connector_id);
    }

    /// Identity attributes some connector joins on.
    async fn key_attributes(&self) -> Result<BTreeSet<String>, StoreError> {
        let mut keys = BTreeSet::new();
        for c in self.store.connectors().await? {
            if let Ok(r) = serde_json::from_str::<ConnectorRules>(&c.rules_json) {
                for ot in r.object_types.values() {
                    keys.extend(ot.join.iter().map(|j| j.identity_attribute.clone()));
                }
            }
        }
        Ok(keys)
    }

    async fn execute(
        &self,
        row: &ConnectorRow,
        rules: &super::compose_rules::CompiledRules,
        key_attributes: &BTreeSet<String>,
        mode: RunMode,
        mut run: RunRow,
    ) -> RunRow {
        let mut errors: Vec<ObjectError> = Vec::new();
        let result = self
            .import_and_compose(row, rules, key_attributes, mode, &mut run, &mut errors)
            .await;
        run.finished_at_ms = Some(now_ms());
        run.errors_json =
            (!errors.is_empty()).then(|| serde_json::to_string(&errors).unwrap_or_default());
        match result {
            Ok(()) if run.failed == 0 => run.status = "succeeded".into(),
            Ok(()) => run.status = "completed_with_errors".into(),
            Err(e) => {
                run.status = "failed".into();
                run.error = Some(e.to_string());
            }
        }
        run
    }

    async fn import_and_compose(
        &self,
        row: &ConnectorRow,
        rules: &super::compose_rules::CompiledRules,
        key_attributes: &BTreeSet<String>,
        mode: RunMode,
        run: &mut RunRow,
        errors: &mut Vec<ObjectError>,
    ) -> Result<(), RunFailure> {
        if mode == RunMode::Clear {
            let cfg = super::source::SourceConfig::parse(&row.kind, &row.config_json)
                .map_err(|e| SourceError::Invalid(e.join("; ")))?;
            // Every type the connector has objects of, not only the configured ones: a type
            // removed from the configuration still holds objects that block the delete.
            let mut types: BTreeSet<String> = cfg.object_types().into_iter().collect();
            types.extend(self.store.object_types_of(&row.id).await?);
            for object_type in types {
                // No object was seen by this run, so every one is marked deleted.
                self.sweep_unseen(row, &object_type, run).await?;
            }
        }
        let recomposed = self.prepare_compose(row, rules, key_attributes).await?;
        let run_id = run.id.clone();
        let ctx = ComposeContext {
            connector_id: &row.id,
            connector_name: &row.name,
            rules,
            key_attributes,
            run_id: &run_id,
        };
        let t = std::time::Instant::now();
        let counts = if mode == RunMode::Clear {
            self.compose_pending(&ctx, true).await?
        } else if rules.object_types().next().is_none() {
            // Nothing to compose while importing: only links left by earlier rules.
            self.import(row, rules, mode, run, errors, None).await?;
            self.compose_pending(&ctx, true).await?
        } else {
            // Each page of a ruled type is composed from the objects in hand and committed with
            // them (see `write_pages`). The composer follows the import page by page for what
            // is still marked (objects marked before the run, deletions), so its work overlaps
            // the directory read instead of starting after it. Safe at any point: an object
            // marked at a newer revision than the one composed stays marked.
            let imported = AtomicBool::new(false);
            let wake = Notify::new();
            let following = Following {
                ctx: &ctx,
                committed: &wake,
            };
            let import = async {
                let r = self
                    .import(row, rules, mode, run, errors, Some(&following))
                    .await;
                imported.store(true, Ordering::SeqCst);
                wake.notify_one();
                r
            };
            let (imported_r, composed) =
                tokio::join!(import, self.compose_following(&ctx, &imported, &wake));
            imported_r?;
            composed?
        };
        tracing::info!(run = %run.id, elapsed_ms = t.elapsed().as_millis() as u64, "import and compose done");
        if let Some((setting, hash)) = recomposed {
            let (setting, hash) = (&setting, &hash);
            self.fenced(|t| async move { self.store.set_engine_setting(&t, setting, hash).await })
                .await?;
        }
        run.failed += counts.failed as i64;
        for e in counts.errors {
            if errors.len() < MAX_ERRORS {
                errors.push(e);
            }
        }
        Ok(())
    }

    /// Composes what the import has committed each time it commits a page, and once more after
    /// it ends (`imported`), so nothing committed before the end is left marked.
    async fn compose_following(
        &self,
        ctx: &ComposeContext<'_>,
        imported: &AtomicBool,
        wake: &Notify,
    ) -> Result<compose_writes::ComposeCounts, RunFailure> {
        let mut counts = compose_writes::ComposeCounts::default();
        loop {
            let last = imported.load(Ordering::SeqCst);
            counts.add(self.compose_pending(ctx, last).await?);
            if last {
                return Ok(counts);
            }
            wake.notified().await;
        }
    }

    /// One pass of the composer; `settle` also clears the marks nothing reads, a write
    /// transaction of its own, so only the last pass of a run does it.
    async fn compose_pending(
        &self,
        ctx: &ComposeContext<'_>,
        settle: bool,
    ) -> Result<compose_writes::ComposeCounts, RunFailure> {
        if settle {
            compose_writes::settle_unruled(&self.store, &self.engine, ctx).await?;
        }
        Ok(
            compose_writes::compose_pending(&self.store, &self.engine, &self.compose_serial, ctx)
                .await?,
        )
    }

    async fn import(
        &self,
        row: &ConnectorRow,
        rules: &super::compose_rules::CompiledRules,
        mode: RunMode,
        run: &mut RunRow,
        errors: &mut Vec<ObjectError>,
        following: Option<&Following<'_>>,
    ) -> Result<(), RunFailure> {
        let (source, cfg) =
            Source::build(row, &self.secrets, self.hub.as_ref(), &self.csv_roots).await?;
        for object_type in cfg.object_types() {
            let watermark = match mode {
                RunMode::Delta => self.store.watermark(&row.id, &object_type).await?,
                RunMode::Full | RunMode::Clear => None,
            };
            // A delta with no watermark yet is a full read (and may detect deletions).
            let import_mode = match watermark {
                Some(w) => ImportMode::Delta { watermark: w },
                None => ImportMode::Full,
            };
            let full = import_mode == ImportMode::Full;
            let (tx, rx) = mpsc::channel::<Page>(PAGE_BUFFER);
            let read = source.import(&object_type, &import_mode, tx);
            let template = ImportBatch {
                connector: row.id.clone(),
                object_type: object_type.clone(),
                objects: Vec::new(),
                watermark: None,
                seen_in_run: full.then(|| run.id.clone()),
                compose: rules.has(&object_type),
                composed: None,
            };
            let write = self.write_pages(template, rx, run, errors, following);
            let (read, write) = tokio::join!(read, write);
            // A write failure (fenced, demoted) is the cause when both failed: the reader only
            // saw its channel close.
            write?;
            let summary = read?;
            if summary.watermark.is_some() {
                let batch = ImportBatch {
                    connector: row.id.clone(),
                    object_type: object_type.clone(),
                    objects: Vec::new(),
                    watermark: summary.watermark.clone(),
                    seen_in_run: None,
                    compose: false,
                    composed: None,
                };
                let batch = &batch;
                self.fenced(|t| async move {
                    self.store.commit_import_batch(&t, batch, now_ms()).await
                })
                .await?;
            }
            if full {
                self.sweep_unseen(row, &object_type, run).await?;
            }
        }
        Ok(())
    }

    /// Marks the objects of this type the run did not see as deleted (fenced).
    async fn sweep_unseen(
        &self,
        row: &ConnectorRow,
        object_type: &str,
        run: &mut RunRow,
    ) -> Result<(), RunFailure> {
        let run_id = run.id.as_str();
        let gone = self
            .fenced(|t| async move {
                self.store
                    .finish_full_import(&t, &row.id, object_type, run_id, now_ms())
                    .await
            })
            .await?;
        run.deleted += gone as i64;
        Ok(())
    }

    /// Before a run composes: identities indexed by every join attribute, and every object
    /// marked again when the rules changed since its objects were composed. Returns the rules
    /// setting to record once the run has composed everything.
    async fn prepare_compose(
        &self,
        row: &ConnectorRow,
        rules: &super::compose_rules::CompiledRules,
        key_attributes: &BTreeSet<String>,
    ) -> Result<Option<(String, String)>, RunFailure> {
        // Identities are indexed by the attributes some connector joins on; a new join attribute
        // needs the identities written before it indexed too.
        let keys_json = serde_json::to_string(key_attributes).unwrap_or_default();
        if self.store.setting(KEY_ATTRIBUTES_SETTING).await?.as_deref() != Some(keys_json.as_str())
        {
            let n = compose_writes::reindex_keys(
                &self.store,
                &self.engine,
                &self.compose_serial,
                key_attributes,
            )
            .await?;
            let keys_json = &keys_json;
            self.fenced(|t| async move {
                self.store
                    .set_engine_setting(&t, KEY_ATTRIBUTES_SETTING, keys_json)
                    .await
            })
            .await?;
            if n > 0 {
                tracing::info!(identities = n, attributes = %keys_json, "join attributes changed: identities indexed again");
            }
        }
        // Objects are marked for the composer when they change; new rules must see them all.
        let setting = composed_rules_setting(&row.id);
        let hash = rules_hash(&row.rules_json);
        if self.store.setting(&setting).await?.as_deref() == Some(hash.as_str()) {
            return Ok(None);
        }
        let ruled: Vec<String> = rules.object_types().map(str::to_string).collect();
        let ruled = &ruled;
        let marked = self
            .fenced(|t| async move { self.store.mark_for_recompose(&t, &row.id, ruled).await })
            .await?;
        if marked > 0 {
            tracing::info!(connector = %row.name, objects = marked, "rules changed: composing every object again");
        }
        Ok(Some((setting, hash)))
    }

    /// One fenced write under a fresh permit, reported to the engine after the permit is
    /// released (see [`crate::engine::Engine::commit`]).
    async fn fenced<T, F>(
        &self,
        write: impl FnOnce(crate::store::FenceToken) -> F,
    ) -> Result<T, RunFailure>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        Ok(self
            .engine
            .write(write)
            .await
            .ok_or(RunFailure::NotActive)??)
    }

    /// Commits each page as one fenced batch like `template` (its objects empty). With the
    /// composer following, a page of a type the rules read carries the composer's writes for
    /// the objects it changes, so they are composed without being marked, read back and parsed
    /// again, and rewritten to clear the mark.
    async fn write_pages(
        &self,
        template: ImportBatch,
        mut rx: mpsc::Receiver<Page>,
        run: &mut RunRow,
        errors: &mut Vec<ObjectError>,
        following: Option<&Following<'_>>,
    ) -> Result<(), RunFailure> {
        while let Some(page) = rx.recv().await {
            for r in &page.rejected {
                run.failed += 1;
                if errors.len() < MAX_ERRORS {
                    errors.push(ObjectError {
                        location: r.location.clone(),
                        reason: r.reason.clone(),
                    });
                }
            }
            if page.objects.is_empty() {
                continue;
            }
            // Where each object came from (a CSV row), for the store's duplicate refusals.
            let mut locations = Vec::with_capacity(page.objects.len());
            let objects: Vec<ConnectorObject> = page
                .objects
                .into_iter()
                .map(|mut o| {
                    locations.push(o.location.take());
                    o
                })
                .collect();
            let inline = following.filter(|_| template.compose);
            // Held from the reads the page's compose makes to its commit, as for any chunk.
            let _serial = match inline {
                Some(_) => Some(self.compose_serial.lock().await),
                None => None,
            };
            let (batch, counts) = match inline {
                Some(f) => self.composed_page(&template, objects, f.ctx).await?,
                None => (
                    ImportBatch {
                        objects: objects.into_iter().map(cs_object).collect(),
                        ..template.clone()
                    },
                    compose_writes::ComposeCounts::default(),
                ),
            };
            let batch = &batch;
            let out = self
                .fenced(
                    |t| async move { self.store.commit_import_batch(&t, batch, now_ms()).await },
                )
                .await?;
            drop(_serial);
            if let Some(f) = following {
                f.committed.notify_one();
            }
            run.added += out.added as i64;
            run.updated += out.updated as i64;
            run.unchanged += out.unchanged as i64;
            report_duplicates(batch, &locations, &out.duplicates, run, errors);
            run.failed += counts.failed as i64;
            for e in counts.errors {
                if errors.len() < MAX_ERRORS {
                    errors.push(e);
                }
            }
        }
        Ok(())
    }

    /// The page as a batch carrying the composer's writes for the objects it changes (the
    /// store's own rules, [`StoredObject::changed_by`] and, for duplicates the store will
    /// refuse, [`StoredObject::seen_by`]); unchanged ones keep whatever mark they have, for
    /// the composer that follows.
    async fn composed_page(
        &self,
        template: &ImportBatch,
        page: Vec<ConnectorObject>,
        ctx: &ComposeContext<'_>,
    ) -> Result<(ImportBatch, compose_writes::ComposeCounts), RunFailure> {
        let anchors: Vec<String> = page.iter().map(|o| o.anchor.clone()).collect();
        let stored = self
            .store
            .stored_objects(&template.connector, &anchors)
            .await?;
        let mut objects = Vec::with_capacity(page.len());
        let mut items = Vec::new();
        let mut composed = PageCompose::default();
        let mut in_page = HashSet::new();
        for o in page {
            let cs = CsObject {
                attributes_json: o.attributes_json(),
                anchor: o.anchor.clone(),
                object_type: o.object_type.clone(),
            };
            let s = stored.get(&cs.anchor);
            let first = in_page.insert(cs.anchor.clone());
            if first
                && !StoredObject::seen_by(s, template.seen_in_run.as_ref())
                && StoredObject::changed_by(s, &cs)
            {
                composed.anchors.insert(cs.anchor.clone());
                items.push(compose_writes::Item::imported(o));
            }
            objects.push(cs);
        }
        let mut counts = compose_writes::ComposeCounts::default();
        composed.writes =
            compose_writes::compose_items(&self.store, ctx, items, &mut counts).await?;
        let batch = ImportBatch {
            objects,
            composed: Some(composed),
            ..template.clone()
        };
        Ok((batch, counts))
    }
}

/// What the composer following an import needs from it.
struct Following<'a> {
    ctx: &'a ComposeContext<'a>,
    /// Woken after each page commits.
    committed: &'a Notify,
}

fn cs_object(o: ConnectorObject) -> CsObject {
    CsObject {
        attributes_json: o.attributes_json(),
        anchor: o.anchor,
        object_type: o.object_type,
    }
}

/// The objects a batch's store refused because the run had already imported their anchor (an
/// earlier page held it; see [`crate::store::BatchOutcome::duplicates`]), as per-object errors
/// where the source says they are, as a CSV connector reports a duplicate within one page.
fn report_duplicates(
    batch: &ImportBatch,
    locations: &[Option<String>],
    duplicates: &[String],
    run: &mut RunRow,
    errors: &mut Vec<ObjectError>,
) {
    for anchor in duplicates {
        run.failed += 1;
        if errors.len() >= MAX_ERRORS {
            continue;
        }
        // The last of the batch's objects with it: an earlier one may be the one written.
        let at = batch.objects.iter().rposition(|o| o.anchor == *anchor);
        let (location, what) = match at.and_then(|i| locations[i].clone()) {
            Some(l) => (l, "row"),
            None => (format!("{}:{anchor}", batch.object_type), "object"),
        };
        errors.push(ObjectError {
            location,
            reason: format!(
                "duplicate anchor \"{}\" (already imported in this run); the {what} was skipped",
                identitymesh_connectors::error::excerpt(anchor)
            ),
        });
    }
}

impl From<compose_writes::ComposeError> for RunFailure {
    fn from(e: compose_writes::ComposeError) -> Self {
        match e {
            compose_writes::ComposeError::NotActive => RunFailure::NotActive,
            compose_writes::ComposeError::Store(s) => RunFailure::Store(s),
        }
    }
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    #[error("this instance lost the active role; the new active resumes from the last committed watermark")]
    NotActive,
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

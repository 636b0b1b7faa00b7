//! Applies the composer to a connector's changed objects: join or project, recompute each
//! touched identity from all its contributions, and write identities, links, join keys, audit
//! entries and the "composed" marks in one fenced transaction per chunk.
//!
//! Decisions are the pure functions of [`super::compose_rules`]; this module only looks things up
//! and keeps an overlay of what the current chunk already changed, so an object later in the
//! chunk sees an identity created or re-keyed earlier in it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tokio::sync::Mutex;

use identitymesh_connectors::model::{Attributes, ConnectorObject, Value};
use serde::{Deserialize, Serialize};

use super::compose_rules::{self, CompiledRules, Contribution, JoinDecision, MergedIdentity};
use crate::engine::Engine;
use crate::store::{
    now_ms, AuditEntry, ComposeWrite, DirtyObject, IdentityRow, LinkRow, Store, StoreError,
};

/// Objects composed per transaction.
pub const CHUNK: i64 = 500;
/// Objects marked composed per transaction when nothing is to be done for them: big enough to
/// be cheap, small enough not to hold SQLite's writer for long.
const SETTLE_CHUNK: i64 = 5000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ComposeCounts {
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub failed: u64,
    pub errors: Vec<ObjectError>,
}

impl ComposeCounts {
    /// Adds another pass's counts (errors up to the cap).
    pub fn add(&mut self, other: ComposeCounts) {
        self.created += other.created;
        self.updated += other.updated;
        self.deleted += other.deleted;
        self.unchanged += other.unchanged;
        self.failed += other.failed;
        let room = MAX_ERRORS.saturating_sub(self.errors.len());
        self.errors.extend(other.errors.into_iter().take(room));
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectError {
    pub location: String,
    pub reason: String,
}

/// An object as stored in `cs_objects.attributes_json` (see the connectors' model).
#[derive(Deserialize)]
struct StoredObject {
    #[serde(default)]
    dn: Option<String>,
    #[serde(default)]
    attributes: Attributes,
}

/// An object's attributes, parsed once for the join-key prefetch and the compose.
enum Parsed {
    /// Deleted, or of a type no rule reads: its attributes are not needed.
    Skipped,
    Object(StoredObject),
    Unreadable(String),
}

/// One object for the composer: a marked one read back from the store, or one of an import
/// page still in hand (`rev` None: no mark to clear).
pub struct Item {
    anchor: String,
    object_type: String,
    deleted: bool,
    rev: Option<i64>,
    parsed: Parsed,
}

impl Item {
    fn marked(obj: DirtyObject, rules: &CompiledRules) -> Item {
        let parsed = if obj.deleted || !rules.has(&obj.object_type) {
            Parsed::Skipped
        } else {
            match serde_json::from_str(&obj.attributes_json) {
                Ok(s) => Parsed::Object(s),
                Err(e) => Parsed::Unreadable(e.to_string()),
            }
        };
        Item {
            anchor: obj.anchor,
            object_type: obj.object_type,
            deleted: obj.deleted,
            rev: Some(obj.rev),
            parsed,
        }
    }

    /// An imported object of a type the rules read, composed before its page commits.
    pub fn imported(o: ConnectorObject) -> Item {
        Item {
            anchor: o.anchor,
            object_type: o.object_type,
            deleted: false,
            rev: None,
            parsed: Parsed::Object(StoredObject {
                dn: o.dn,
                attributes: o.attributes,
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("this instance is no longer active; the run stops here and the new active resumes")]
    NotActive,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the composer needs to know about a connector.
pub struct ComposeContext<'a> {
    pub connector_id: &'a str,
    pub connector_name: &'a str,
    pub rules: &'a CompiledRules,
    /// Identity attributes any connector joins on: their values are indexed as join keys.
    pub key_attributes: &'a BTreeSet<String>,
    pub run_id: &'a str,
}

#[derive(Clone)]
struct IdentityState {
    row: IdentityRow,
    links: Vec<LinkRow>,
}

/// The chunk's view: identities it changed (None = deleted) over what the store holds, with
/// the join keys of the changed ones indexed.
#[derive(Default)]
struct Overlay {
    identities: HashMap<String, Option<IdentityState>>,
    keys: HashMap<(String, String), BTreeSet<String>>,
    keys_of: HashMap<String, Vec<(String, String)>>,
    /// What the store held when the chunk began, read in a few batched queries: the chunk's
    /// links, the identities its join keys find, and the identities involved.
    base: Prefetch,
}

#[derive(Default)]
struct Prefetch {
    links: HashMap<String, LinkRow>,
    keys: HashMap<(String, String), Vec<String>>,
    identities: HashMap<String, Option<IdentityState>>,
}

impl Prefetch {
    async fn load(
        store: &Arc<dyn Store>,
        ctx: &ComposeContext<'_>,
        items: &[Item],
    ) -> Result<Prefetch, StoreError> {
        let anchors: Vec<String> = items.iter().map(|o| o.anchor.clone()).collect();
        let links: HashMap<String, LinkRow> = store
            .links_for(ctx.connector_id, &anchors)
            .await?
            .into_iter()
            .map(|l| (l.anchor.clone(), l))
            .collect();
        let mut wanted = BTreeSet::new();
        for o in items {
            if links.contains_key(&o.anchor) {
                continue;
            }
            if let Parsed::Object(stored) = &o.parsed {
                wanted.extend(ctx.rules.join_keys(
                    &o.object_type,
                    &stored.attributes,
                    stored.dn.as_deref(),
                ));
            }
        }
        let wanted: Vec<(String, String)> = wanted.into_iter().collect();
        let mut keys: HashMap<(String, String), Vec<String>> =
            wanted.iter().map(|k| (k.clone(), Vec::new())).collect();
        let mut ids: BTreeSet<String> = links.values().map(|l| l.identity_id.clone()).collect();
        for (a, v, id) in store.identities_by_keys(&wanted).await? {
            ids.insert(id.clone());
            keys.entry((a, v)).or_default().push(id);
        }
        let ids: Vec<String> = ids.into_iter().collect();
        let (rows, all_links) = store.identities_with_links(&ids).await?;
        let mut identities: HashMap<String, Option<IdentityState>> =
            ids.iter().map(|id| (id.clone(), None)).collect();
        let mut by_identity: HashMap<String, Vec<LinkRow>> = HashMap::new();
        for l in all_links {
            by_identity
                .entry(l.identity_id.clone())
                .or_default()
                .push(l);
        }
        for row in rows {
            let links = by_identity.remove(&row.id).unwrap_or_default();
            identities.insert(row.id.clone(), Some(IdentityState { row, links }));
        }
        Ok(Prefetch {
            links,
            keys,
            identities,
        })
    }
}

impl Overlay {
    fn put(&mut self, id: &str, state: Option<IdentityState>, keys: Vec<(String, String)>) {
        for old in self.keys_of.remove(id).unwrap_or_default() {
            if let Some(ids) = self.keys.get_mut(&old) {
                ids.remove(id);
            }
        }
        for k in &keys {
            self.keys
                .entry(k.clone())
                .or_default()
                .insert(id.to_string());
        }
        self.keys_of.insert(id.to_string(), keys);
        self.identities.insert(id.to_string(), state);
    }
}

const MAX_ERRORS: usize = 100;

/// Clears the marks of the connector's objects that no rule reads and no identity links to:
/// they need nothing else, so it is done in the store without loading them (an import-only
/// connector's whole run is this case).
pub async fn settle_unruled(
    store: &Arc<dyn Store>,
    engine: &Engine,
    ctx: &ComposeContext<'_>,
) -> Result<(), ComposeError> {
    let ruled: Vec<String> = ctx.rules.object_types().map(str::to_string).collect();
    let ruled = &ruled;
    loop {
        let settled = engine
            .write(|t| async move {
                store
                    .settle_unruled(&t, ctx.connector_id, ruled, SETTLE_CHUNK)
                    .await
            })
            .await
            .ok_or(ComposeError::NotActive)??;
        if (settled as i64) < SETTLE_CHUNK {
            return Ok(());
        }
    }
}

/// Composes every changed object of the connector that a rule reads or an identity links to,
/// chunk by chunk, until none is left (see [`settle_unruled`] for the rest).
/// `serial` is held from a chunk's first read to its commit: two connectors' runs may touch
/// the same identity, and each chunk merges what it read.
pub async fn compose_pending(
    store: &Arc<dyn Store>,
    engine: &Engine,
    serial: &Mutex<()>,
    ctx: &ComposeContext<'_>,
) -> Result<ComposeCounts, ComposeError> {
    let mut counts = ComposeCounts::default();
    loop {
        let _serial = serial.lock().await;
        let chunk = store.dirty_objects(ctx.connector_id, CHUNK).await?;
        if chunk.is_empty() {
            return Ok(counts);
        }
        let items: Vec<Item> = chunk
            .into_iter()
            .map(|o| Item::marked(o, ctx.rules))
            .collect();
        let writes = compose_items(store, ctx, items, &mut counts).await?;
        commit(store, engine, &writes).await?;
    }
}

/// The composer's writes for these objects, as one transaction must commit them; each marked
/// object's mark is cleared at the revision read. The caller holds the composer's serial lock
/// from its reads to the commit.
pub async fn compose_items(
    store: &Arc<dyn Store>,
    ctx: &ComposeContext<'_>,
    items: Vec<Item>,
    counts: &mut ComposeCounts,
) -> Result<Vec<ComposeWrite>, StoreError> {
    let mut overlay = Overlay {
        base: Prefetch::load(store, ctx, &items).await?,
        ..Overlay::default()
    };
    let mut writes = Vec::new();
    for item in items {
        let (anchor, rev) = (item.anchor.clone(), item.rev);
        compose_one(store, ctx, item, &mut overlay, &mut writes, counts).await?;
        if let Some(rev) = rev {
            writes.push(ComposeWrite::Composed {
                connector_id: ctx.connector_id.to_string(),
                anchor,
                rev,
            });
        }
    }
    Ok(writes)
}

/// Rewrites every identity's join keys for a new set of key attributes (a connector started
/// joining on an attribute no one joined on before: identities written earlier were not
/// indexed by it). Page by page under `serial`; returns how many identities.
pub async fn reindex_keys(
    store: &Arc<dyn Store>,
    engine: &Engine,
    serial: &Mutex<()>,
    key_attributes: &BTreeSet<String>,
) -> Result<u64, ComposeError> {
    let mut after: Option<String> = None;
    let mut n = 0;
    loop {
        let _serial = serial.lock().await;
        let page = store.identities(None, after.as_deref(), CHUNK).await?;
        let Some(last) = page.last() else {
            return Ok(n);
        };
        after = Some(last.id.clone());
        n += page.len() as u64;
        let writes: Vec<ComposeWrite> = page
            .into_iter()
            .map(|row| ComposeWrite::PutIdentity {
                keys: keys_of(&merged_of(&row), key_attributes),
                identity: row,
            })
            .collect();
        commit(store, engine, &writes).await?;
    }
}

/// One fenced commit of composer writes; a failure is reported to the engine (it may mean this
/// instance was fenced).
async fn commit(
    store: &Arc<dyn Store>,
    engine: &Engine,
    writes: &[ComposeWrite],
) -> Result<(), ComposeError> {
    engine
        .write(|t| async move { store.commit_compose(&t, writes, now_ms()).await })
        .await
        .ok_or(ComposeError::NotActive)??;
    Ok(())
}

fn push_error(counts: &mut ComposeCounts, location: String, reason: String) {
    counts.failed += 1;
    if counts.errors.len() < MAX_ERRORS {
        counts.errors.push(ObjectError { location, reason });
    }
}

async fn load_identity(
    store: &Arc<dyn Store>,
    overlay: &Overlay,
    id: &str,
) -> Result<Option<IdentityState>, StoreError> {
    if let Some(s) = overlay.identities.get(id) {
        return Ok(s.clone());
    }
    if let Some(s) = overlay.base.identities.get(id) {
        return Ok(s.clone());
    }
    let Some(row) = store.identity(id).await? else {
        return Ok(None);
    };
    let links = store.links_of_identity(id).await?;
    Ok(Some(IdentityState { row, links }))
}

/// Identity ids whose join key matches, as the chunk sees them.
async fn lookup_key(
    store: &Arc<dyn Store>,
    overlay: &Overlay,
    attr: &str,
    value: &str,
) -> Result<Vec<String>, StoreError> {
    let key = (attr.to_string(), value.to_string());
    let stored = match overlay.base.keys.get(&key) {
        Some(ids) => ids.clone(),
        None => store.identities_by_key(attr, value).await?,
    };
    let mut ids: Vec<String> = stored
        .into_iter()
        .filter(|id| !overlay.identities.contains_key(id))
        .collect();
    if let Some(found) = overlay.keys.get(&key) {
        ids.extend(found.iter().cloned());
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

fn merged_of(row: &IdentityRow) -> MergedIdentity {
    serde_json::from_str(&row.attributes_json).unwrap_or_default()
}

/// The join keys an identity is found by: each key attribute's text values, normalised.
fn keys_of(m: &MergedIdentity, key_attributes: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut keys = Vec::new();
    for attr in key_attributes {
        for v in m.attributes.get(attr).into_iter().flatten() {
            if let Value::Text(t) = v {
                if !t.is_empty() {
                    keys.push((attr.clone(), compose_rules::join_value(t)));
                }
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

fn contributions(links: &[LinkRow]) -> Vec<compose_rules::SourceContribution> {
    links
        .iter()
        .map(|l| {
            let c: Contribution = serde_json::from_str(&l.contribution_json).unwrap_or_default();
            c.from_connector(l.connector_id.clone(), l.precedence as i32)
        })
        .collect()
}

fn display_name(m: &MergedIdentity, fallback: &str) -> String {
    m.display_name
        .clone()
        .or_else(|| {
            ["displayName", "cn", "mail"].iter().find_map(|a| {
                m.attributes
                    .get(*a)
                    .and_then(|v| v.iter().find_map(|x| x.as_text().map(str::to_string)))
            })
        })
        .unwrap_or_else(|| fallback.to_string())
}

async fn compose_one(
    store: &Arc<dyn Store>,
    ctx: &ComposeContext<'_>,
    item: Item,
    overlay: &mut Overlay,
    writes: &mut Vec<ComposeWrite>,
    counts: &mut ComposeCounts,
) -> Result<(), StoreError> {
    let Item {
        anchor,
        object_type,
        deleted,
        parsed,
        ..
    } = item;
    // Every anchor of the chunk was prefetched: absent means not linked.
    let link = overlay.base.links.get(&anchor).cloned();
    if link.is_none() && !ctx.rules.has(&object_type) {
        // Nothing to join or supply, and no contribution to remove.
        return Ok(());
    }
    let location = format!("{}:{}", object_type, anchor);
    // Gone from the directory, or no longer read by any rule: the contribution goes.
    if deleted || !ctx.rules.has(&object_type) {
        if let Some(l) = link {
            writes.push(ComposeWrite::DeleteLink {
                connector_id: ctx.connector_id.to_string(),
                anchor: anchor.clone(),
            });
            apply(
                store,
                ctx,
                &anchor,
                &l.identity_id,
                None,
                overlay,
                writes,
                counts,
            )
            .await?;
        }
        return Ok(());
    }
    let stored = match parsed {
        Parsed::Object(s) => s,
        Parsed::Unreadable(e) => {
            push_error(
                counts,
                location,
                format!("stored object is not readable: {e}"),
            );
            return Ok(());
        }
        // Deleted and unruled objects returned above.
        Parsed::Skipped => return Ok(()),
    };
    let dn = stored.dn.as_deref();
    let identity_id = match &link {
        Some(l) => l.identity_id.clone(),
        None => {
            let keys = ctx.rules.join_keys(&object_type, &stored.attributes, dn);
            let mut per_rule = Vec::with_capacity(keys.len());
            for (attr, value) in &keys {
                let mut found = lookup_key(store, overlay, attr, value).await?;
                // One object per connector per identity: an identity this connector already
                // supplies is not a join candidate for another of its objects.
                let mut free = Vec::new();
                for id in found.drain(..) {
                    let taken = load_identity(store, overlay, &id).await?.is_some_and(|s| {
                        s.links.iter().any(|l| l.connector_id == ctx.connector_id)
                    });
                    if !taken {
                        free.push(id);
                    }
                }
                per_rule.push(free);
            }
            match compose_rules::decide(None, &per_rule, ctx.rules.project(&object_type)) {
                JoinDecision::Join(id) | JoinDecision::Linked(id) => id,
                JoinDecision::Project => {
                    // A fresh id: known absent, so nothing is looked up for it. Time-ordered
                    // (v7), so new identities append to the id indexes instead of dirtying
                    // pages all over them.
                    let id = uuid::Uuid::now_v7().to_string();
                    overlay.base.identities.insert(id.clone(), None);
                    id
                }
                JoinDecision::NoMatch => return Ok(()),
                JoinDecision::Ambiguous {
                    rule_index,
                    candidates,
                } => {
                    let (attr, value) = &keys[rule_index];
                    push_error(
                        counts,
                        location,
                        format!(
                            "join on {attr} = {value:?} matches {} identities ({}); fix the data or the join rules",
                            candidates.len(),
                            candidates.join(", ")
                        ),
                    );
                    return Ok(());
                }
            }
        }
    };
    let contribution = ctx.rules.contribution(&object_type, &stored.attributes, dn);
    let new_link = LinkRow {
        connector_id: ctx.connector_id.to_string(),
        anchor: anchor.clone(),
        identity_id: identity_id.clone(),
        precedence: ctx.rules.precedence() as i64,
        contribution_json: serde_json::to_string(&contribution).unwrap_or_else(|_| "{}".into()),
    };
    if link.as_ref() != Some(&new_link) {
        writes.push(ComposeWrite::PutLink(new_link.clone()));
    }
    apply(
        store,
        ctx,
        &anchor,
        &identity_id,
        Some(new_link),
        overlay,
        writes,
        counts,
    )
    .await
}

/// Recomputes one identity after this object's link changed (`new_link` None = removed).
#[allow(clippy::too_many_arguments)]
async fn apply(
    store: &Arc<dyn Store>,
    ctx: &ComposeContext<'_>,
    anchor: &str,
    identity_id: &str,
    new_link: Option<LinkRow>,
    overlay: &mut Overlay,
    writes: &mut Vec<ComposeWrite>,
    counts: &mut ComposeCounts,
) -> Result<(), StoreError> {
    let before = load_identity(store, overlay, identity_id).await?;
    let mut links: Vec<LinkRow> = before
        .as_ref()
        .map(|s| s.links.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|l| !(l.connector_id == ctx.connector_id && l.anchor == anchor))
        .collect();
    if let Some(l) = new_link {
        links.push(l);
    }
    let before_merged = before
        .as_ref()
        .map(|s| merged_of(&s.row))
        .unwrap_or_default();
    let now = now_ms();
    let actor = format!("sync:{}", ctx.connector_name);
    if links.is_empty() {
        if before.is_some() {
            writes.push(ComposeWrite::DeleteIdentity {
                id: identity_id.to_string(),
            });
            writes.push(audit(
                &actor,
                "identity.delete",
                identity_id,
                ctx,
                anchor,
                &before_merged.attributes,
                &Attributes::new(),
                now,
            ));
            counts.deleted += 1;
            overlay.put(identity_id, None, Vec::new());
        }
        return Ok(());
    }
    let merged = compose_rules::merge(&contributions(&links));
    let row = IdentityRow {
        id: identity_id.to_string(),
        display_name: display_name(&merged, identity_id),
        attributes_json: serde_json::to_string(&merged).unwrap_or_else(|_| "{}".into()),
        created_at_ms: before.as_ref().map(|s| s.row.created_at_ms).unwrap_or(now),
        updated_at_ms: now,
    };
    let changed = before
        .as_ref()
        .map(|s| before_merged != merged || s.row.display_name != row.display_name)
        .unwrap_or(true);
    let keys = keys_of(&merged, ctx.key_attributes);
    if changed {
        writes.push(ComposeWrite::PutIdentity {
            identity: row.clone(),
            keys: keys.clone(),
        });
        let action = if before.is_some() {
            counts.updated += 1;
            "identity.update"
        } else {
            counts.created += 1;
            "identity.create"
        };
        writes.push(audit(
            &actor,
            action,
            identity_id,
            ctx,
            anchor,
            &before_merged.attributes,
            &merged.attributes,
            now,
        ));
    } else {
        counts.unchanged += 1;
    }
    let row = if changed {
        row
    } else {
        before.map(|s| s.row).unwrap_or(row)
    };
    overlay.put(identity_id, Some(IdentityState { row, links }), keys);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn audit(
    actor: &str,
    action: &str,
    identity_id: &str,
    ctx: &ComposeContext<'_>,
    anchor: &str,
    before: &Attributes,
    after: &Attributes,
    now: i64,
) -> ComposeWrite {
    let detail = serde_json::json!({
        "run": ctx.run_id,
        "connector": ctx.connector_id,
        "anchor": anchor,
        "changes": compose_rules::diff(before, after),
    });
    ComposeWrite::Audit(AuditEntry {
        at_ms: now,
        actor: actor.to_string(),
        action: action.to_string(),
        target: format!("identity/{identity_id}"),
        detail: detail.to_string(),
    })
}

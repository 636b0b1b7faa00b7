//! The changing directory: a background writer that adds, modifies, renames (modrdn) and
//! deletes people in slapd, recording every change it made and when, and the reader that takes
//! the directory's final state for the convergence check.
//!
//! Both talk to slapd directly with ldap3 (plain LDAP on loopback, bound as the root DN), never
//! through the connector under test. The writer keeps a model of the people it may change
//! (anchor, DN, naming attribute); after any failed request (slapd restarting, a lost answer)
//! the outcome is unknown, so it reads the people again before its next change.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Mod, Scope, SearchEntry};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::history::{DirectoryOp, Event, Object, Recorder};
use crate::error::{Error, Result};

/// Where the directory is and how to bind.
#[derive(Clone, Debug)]
pub struct Target {
    /// `ldap://127.0.0.1:<port>`
    pub url: String,
    pub bind_dn: String,
    pub password: String,
    /// Where the writer adds, changes and deletes people (inetOrgPerson, one level).
    pub people_base: String,
}

/// Binary values are compared as this prefix plus their base64 (the stored form's
/// `{"base64": …}` maps to the same text).
pub const BINARY_PREFIX: &str = "base64:";

const TIMEOUT: Duration = Duration::from_secs(5);

async fn connect(t: &Target) -> Result<Ldap> {
    let settings = LdapConnSettings::new().set_conn_timeout(TIMEOUT);
    let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &t.url)
        .await
        .map_err(|e| Error::Other(format!("connecting to {}: {e}", t.url)))?;
    tokio::spawn(async move {
        let _ = conn.drive().await;
    });
    ldap.with_timeout(TIMEOUT)
        .simple_bind(&t.bind_dn, &t.password)
        .await
        .and_then(|r| r.success())
        .map_err(|e| Error::Other(format!("binding to {} as {}: {e}", t.url, t.bind_dn)))?;
    Ok(ldap)
}

/// One search's entries, with every user attribute and `extra` operational ones.
async fn search(
    ldap: &mut Ldap,
    base: &str,
    scope: Scope,
    filter: &str,
    extra: &[&str],
) -> Result<Vec<SearchEntry>> {
    let mut attrs = vec!["*"];
    attrs.extend_from_slice(extra);
    let (entries, _) = ldap
        .with_timeout(TIMEOUT)
        .search(base, scope, filter, attrs)
        .await
        .and_then(|r| r.success())
        .map_err(|e| Error::Other(format!("searching {base}: {e}")))?;
    Ok(entries.into_iter().map(SearchEntry::construct).collect())
}

fn first(e: &SearchEntry, attr: &str) -> Option<String> {
    e.attrs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(attr))
        .and_then(|(_, v)| v.first().cloned())
}

/// One search of the final state: `(base, scope, filter)`.
#[derive(Clone, Debug)]
pub struct ObjectType {
    pub base: String,
    pub one_level: bool,
    pub filter: String,
}

/// Every entry of `types` as an [`Object`] keyed by its entryUUID: the attributes named in
/// `keys` (those the entry has; binary values as [`BINARY_PREFIX`] + base64, values sorted)
/// and `dn`. Attribute names are matched case-insensitively and written as in `keys`.
pub async fn read(t: &Target, types: &[ObjectType], keys: &[&str]) -> Result<Vec<Object>> {
    let mut ldap = connect(t).await?;
    let mut out = Vec::new();
    for ot in types {
        let scope = if ot.one_level {
            Scope::OneLevel
        } else {
            Scope::Subtree
        };
        for e in search(
            &mut ldap,
            &ot.base,
            scope,
            &ot.filter,
            &["entryUUID", "entryCSN"],
        )
        .await?
        {
            let Some(anchor) = first(&e, "entryUUID") else {
                return Err(Error::Other(format!("{} has no entryUUID", e.dn)));
            };
            out.push(Object {
                id: anchor,
                attributes: key_attributes(&e, keys),
            });
        }
    }
    let _ = ldap.unbind().await;
    Ok(out)
}

fn key_attributes(e: &SearchEntry, keys: &[&str]) -> BTreeMap<String, Vec<String>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut attrs = BTreeMap::new();
    attrs.insert("dn".to_string(), vec![e.dn.clone()]);
    for key in keys {
        let mut values: Vec<String> = Vec::new();
        for (name, v) in &e.attrs {
            if name.eq_ignore_ascii_case(key) {
                values.extend(v.iter().cloned());
            }
        }
        for (name, v) in &e.bin_attrs {
            if name.eq_ignore_ascii_case(key) {
                values.extend(
                    v.iter()
                        .map(|b| format!("{BINARY_PREFIX}{}", b64.encode(b))),
                );
            }
        }
        if !values.is_empty() {
            values.sort();
            attrs.insert((*key).to_string(), values);
        }
    }
    attrs
}

/// A person the writer may change.
#[derive(Clone, Debug)]
struct Person {
    dn: String,
    /// The RDN's attribute (uid for most, cn for the generator's awkward names): a rename
    /// keeps it, since deleting the old value of cn would leave a person without its cn.
    naming: String,
}

/// How many changes of each kind succeeded and failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriterCounts {
    pub ok: BTreeMap<&'static str, usize>,
    pub failed: usize,
    /// Times the writer read the people again after a failure.
    pub resyncs: usize,
    /// Times that read failed (the directory was unreachable), so no change was tried.
    pub resync_failures: usize,
}

impl WriterCounts {
    pub fn total_ok(&self) -> usize {
        self.ok.values().sum()
    }
}

/// The background writer. Deterministic choices for a seed (the outcome of each request is
/// not: faults interleave).
pub struct Writer {
    target: Target,
    rec: Recorder,
    rng: StdRng,
    ldap: Option<Ldap>,
    /// anchor → person; empty and `stale` until the first read.
    people: BTreeMap<String, Person>,
    stale: bool,
    next: u64,
    /// People kept within these bounds (adds and deletes are chosen to stay inside).
    pub min_people: usize,
    pub max_people: usize,
    /// Pause between two changes.
    pub interval: Duration,
    counts: WriterCounts,
}

fn op_name(op: DirectoryOp) -> &'static str {
    match op {
        DirectoryOp::Add => "add",
        DirectoryOp::Modify => "modify",
        DirectoryOp::Rename => "rename",
        DirectoryOp::Delete => "delete",
    }
}

impl Writer {
    pub fn new(target: Target, rec: Recorder, seed: u64) -> Writer {
        Writer {
            target,
            rec,
            rng: StdRng::seed_from_u64(seed),
            ldap: None,
            people: BTreeMap::new(),
            stale: true,
            next: 0,
            min_people: 50,
            max_people: 400,
            interval: Duration::from_millis(150),
            counts: WriterCounts::default(),
        }
    }

    async fn conn(&mut self) -> Result<&mut Ldap> {
        if self.ldap.is_none() {
            self.ldap = Some(connect(&self.target).await?);
        }
        self.ldap
            .as_mut()
            .ok_or_else(|| Error::Other("no connection".into()))
    }

    /// Reads the people again (the model after an unknown outcome).
    async fn resync(&mut self) -> Result<()> {
        let base = self.target.people_base.clone();
        let ldap = self.conn().await?;
        let entries = search(
            ldap,
            &base,
            Scope::OneLevel,
            "(objectClass=inetOrgPerson)",
            &["entryUUID"],
        )
        .await?;
        self.people.clear();
        for e in entries {
            let Some(anchor) = first(&e, "entryUUID") else {
                continue;
            };
            let naming =
                e.dn.split_once('=')
                    .map(|(a, _)| a.to_string())
                    .unwrap_or_else(|| "uid".into());
            self.people.insert(anchor, Person { dn: e.dn, naming });
        }
        self.stale = false;
        Ok(())
    }

    fn pick(&mut self) -> Option<(String, Person)> {
        if self.people.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.people.len());
        self.people
            .iter()
            .nth(i)
            .map(|(a, p)| (a.clone(), p.clone()))
    }

    fn parent(&self, dn: &str) -> String {
        dn.split_once(',')
            .map(|(_, p)| p.to_string())
            .unwrap_or_else(|| self.target.people_base.clone())
    }

    fn record(
        &mut self,
        op: DirectoryOp,
        dn: String,
        new_dn: Option<String>,
        anchor: Option<String>,
        error: Option<String>,
    ) {
        match &error {
            None => *self.counts.ok.entry(op_name(op)).or_default() += 1,
            Some(_) => {
                self.counts.failed += 1;
                // The outcome is unknown: read the people again before the next change, on a
                // new connection.
                self.stale = true;
                self.ldap = None;
            }
        }
        self.rec.record(Event::DirectoryChange {
            op,
            dn,
            new_dn,
            anchor,
            error,
        });
    }

    /// One change, chosen at random within the bounds, recorded when slapd answered.
    pub async fn step(&mut self) {
        if self.stale {
            match self.resync().await {
                Ok(()) => self.counts.resyncs += 1,
                Err(_) => {
                    self.counts.resync_failures += 1;
                    self.ldap = None;
                    return;
                }
            }
        }
        // 30% adds (none at the maximum: those modify), 35% modifies, 17% renames, 18%
        // deletes (none at the minimum: those add).
        let n = self.people.len();
        let roll: u32 = self.rng.gen_range(0..100);
        let op = if n <= self.min_people || (roll < 30 && n < self.max_people) {
            DirectoryOp::Add
        } else if roll < 65 {
            DirectoryOp::Modify
        } else if roll < 82 {
            DirectoryOp::Rename
        } else {
            DirectoryOp::Delete
        };
        self.next += 1;
        let k = self.next;
        match op {
            DirectoryOp::Add => self.add(k).await,
            DirectoryOp::Modify => self.modify(k).await,
            DirectoryOp::Rename => self.rename(k).await,
            DirectoryOp::Delete => self.delete().await,
        }
    }

    async fn add(&mut self, k: u64) {
        let uid = format!("chaos{k:06}");
        let dn = format!("uid={uid},{}", self.target.people_base);
        // Some names are not ASCII, so renames and modifies meet UTF-8 too.
        let cn = if k.is_multiple_of(4) {
            format!("Zoë Ünal {k}")
        } else {
            format!("Chaos Person {k}")
        };
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<String>>();
        let attrs: Vec<(String, HashSet<String>)> = vec![
            (
                "objectClass".into(),
                set(&["top", "person", "organizationalPerson", "inetOrgPerson"]),
            ),
            ("uid".into(), set(&[&uid])),
            ("cn".into(), set(&[&cn])),
            ("sn".into(), set(&[&format!("Person {k}")])),
            ("mail".into(), set(&[&format!("{uid}@example.org")])),
            ("employeeNumber".into(), set(&[&format!("{}", 500_000 + k)])),
        ];
        let result = match self.conn().await {
            Ok(ldap) => ldap
                .with_timeout(TIMEOUT)
                .add(&dn, attrs)
                .await
                .and_then(|r| r.success())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            return self.record(DirectoryOp::Add, dn, None, None, Some(e));
        }
        // The anchor the directory gave it.
        let anchor = match self.conn().await {
            Ok(ldap) => search(ldap, &dn, Scope::Base, "(objectClass=*)", &["entryUUID"])
                .await
                .ok()
                .and_then(|es| es.first().and_then(|e| first(e, "entryUUID"))),
            Err(_) => None,
        };
        match &anchor {
            Some(a) => {
                self.people.insert(
                    a.clone(),
                    Person {
                        dn: dn.clone(),
                        naming: "uid".into(),
                    },
                );
            }
            // Added, but the model cannot name it: read again before the next change.
            None => self.stale = true,
        }
        self.record(DirectoryOp::Add, dn, None, anchor, None);
    }

    async fn modify(&mut self, k: u64) {
        let Some((anchor, p)) = self.pick() else {
            return;
        };
        let one = |a: &str, v: String| Mod::Replace(a.to_string(), HashSet::from([v]));
        let none = |a: &str| Mod::Replace(a.to_string(), HashSet::new());
        let mods: Vec<Mod<String>> = match self.rng.gen_range(0..6) {
            0 => vec![one("description", format!("revision {k} — «Größe»"))],
            1 => vec![none("description"), one("title", format!("Title {k}"))],
            2 => vec![Mod::Replace(
                "mail".into(),
                HashSet::from([
                    format!("m{k}@example.org"),
                    format!("m{k}.alias@example.org"),
                ]),
            )],
            3 => vec![one("sn", format!("Surname {k}"))],
            4 => vec![
                one("telephoneNumber", format!("+41 44 {k:07}")),
                none("title"),
            ],
            _ => vec![
                none("telephoneNumber"),
                one("employeeNumber", format!("{k}")),
            ],
        };
        let result = match self.conn().await {
            Ok(ldap) => ldap
                .with_timeout(TIMEOUT)
                .modify(&p.dn, mods)
                .await
                .and_then(|r| r.success())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        self.record(DirectoryOp::Modify, p.dn, None, Some(anchor), result.err());
    }

    async fn rename(&mut self, k: u64) {
        let Some((anchor, p)) = self.pick() else {
            return;
        };
        let rdn = if p.naming.eq_ignore_ascii_case("cn") {
            format!("cn=Renamed Person {k}")
        } else {
            format!("uid=chaosr{k:06}")
        };
        let new_dn = format!("{rdn},{}", self.parent(&p.dn));
        let result = match self.conn().await {
            Ok(ldap) => ldap
                .with_timeout(TIMEOUT)
                .modifydn(&p.dn, &rdn, true, None)
                .await
                .and_then(|r| r.success())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if result.is_ok() {
            self.people.insert(
                anchor.clone(),
                Person {
                    dn: new_dn.clone(),
                    naming: p.naming.clone(),
                },
            );
        }
        self.record(
            DirectoryOp::Rename,
            p.dn,
            Some(new_dn),
            Some(anchor),
            result.err(),
        );
    }

    async fn delete(&mut self) {
        let Some((anchor, p)) = self.pick() else {
            return;
        };
        let result = match self.conn().await {
            Ok(ldap) => ldap
                .with_timeout(TIMEOUT)
                .delete(&p.dn)
                .await
                .and_then(|r| r.success())
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if result.is_ok() {
            self.people.remove(&anchor);
        }
        self.record(DirectoryOp::Delete, p.dn, None, Some(anchor), result.err());
    }

    /// Changes the directory until `stop`, one change at a time; returns the counts.
    pub async fn run(mut self, stop: Arc<AtomicBool>) -> WriterCounts {
        while !stop.load(Ordering::SeqCst) {
            self.step().await;
            let pause = if self.stale {
                // slapd is down or answered oddly: do not spin.
                Duration::from_millis(500)
            } else {
                self.interval
            };
            tokio::time::sleep(pause).await;
        }
        if let Some(mut l) = self.ldap.take() {
            let _ = l.unbind().await;
        }
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use identitymesh_connectors::testing::{
        generate_people, Slapd, GROUPS_BASE, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD,
    };

    const KEYS: &[&str] = &["objectClass", "uid", "cn", "sn", "mail", "jpegPhoto"];

    fn target(slapd: &Slapd) -> Target {
        Target {
            url: slapd.ldap_url(),
            bind_dn: ROOT_DN.into(),
            password: ROOT_PASSWORD.into(),
            people_base: PEOPLE_BASE.into(),
        }
    }

    fn types() -> Vec<ObjectType> {
        vec![
            ObjectType {
                base: PEOPLE_BASE.into(),
                one_level: false,
                filter: "(objectClass=inetOrgPerson)".into(),
            },
            ObjectType {
                base: GROUPS_BASE.into(),
                one_level: true,
                filter: "(objectClass=groupOfNames)".into(),
            },
        ]
    }

    /// The writer's recorded changes explain the directory: every anchor it read at the end was
    /// there at the start or added, every anchor it deleted is gone, renames moved entries, and
    /// a slapd restart in the middle (kill -9, same ports) costs failed changes, not the run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writer_changes_are_recorded_and_match_the_directory() {
        let dir = crate::chaos::scratch_dir("directory").unwrap();
        let generated = generate_people(30, 7);
        let mut slapd = Slapd::launch(&dir.path().join("slapd"), Some(&generated.ldif))
            .await
            .unwrap();
        let t = target(&slapd);
        let before = read(&t, &types(), KEYS).await.unwrap();
        assert_eq!(before.len(), 30 + 4, "30 people and 4 groups");
        // Binary values are compared as text.
        assert!(before
            .iter()
            .any(|o| o.attributes["jpegPhoto"][0].starts_with(BINARY_PREFIX)));

        let rec = Recorder::new();
        let mut w = Writer::new(t.clone(), rec.clone(), 3);
        w.interval = Duration::from_millis(5);
        w.min_people = 20;
        w.max_people = 40;
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(w.run(stop.clone()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // A crash of slapd in the middle, started again on the same ports and data.
        let pid = slapd.pid().unwrap();
        assert!(crate::process::signal(pid, libc::SIGKILL));
        crate::process::wait_dead(pid, Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(700)).await;
        let port = slapd.ldap_port();
        slapd.restart().await.unwrap();
        assert_eq!(slapd.ldap_port(), port, "same port");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::SeqCst);
        let counts = task.await.unwrap();
        // The outage shows either as failed changes or, when the connection broke between a
        // change and its read-back, as failed re-reads with no change tried meanwhile.
        assert!(
            counts.failed + counts.resync_failures > 0,
            "the writer noticed the restart: {counts:?}"
        );
        assert!(counts.resyncs >= 2, "{counts:?}");
        for op in ["add", "modify", "rename", "delete"] {
            assert!(
                counts.ok.get(op).copied().unwrap_or(0) > 0,
                "{op}: {counts:?}"
            );
        }

        let after = read(&t, &types(), KEYS).await.unwrap();
        let start: HashSet<&str> = before.iter().map(|o| o.id.as_str()).collect();
        let end: HashSet<&str> = after.iter().map(|o| o.id.as_str()).collect();
        let h = rec.history();
        let mut added = HashSet::new();
        let mut deleted = HashSet::new();
        let mut renamed_to: BTreeMap<String, String> = BTreeMap::new();
        for e in &h.entries {
            if let Event::DirectoryChange {
                op,
                new_dn,
                anchor: Some(a),
                error: None,
                ..
            } = &e.event
            {
                match op {
                    DirectoryOp::Add => {
                        added.insert(a.clone());
                    }
                    DirectoryOp::Delete => {
                        deleted.insert(a.clone());
                    }
                    DirectoryOp::Rename => {
                        renamed_to.insert(a.clone(), new_dn.clone().unwrap_or_default());
                    }
                    DirectoryOp::Modify => {}
                }
            }
        }
        assert_eq!(
            counts.total_ok(),
            h.entries
                .iter()
                .filter(|e| matches!(e.event, Event::DirectoryChange { error: None, .. }))
                .count()
        );
        for a in &deleted {
            assert!(!end.contains(a.as_str()), "deleted {a} is still there");
        }
        // An entry neither there at the start nor recorded as added can only come from an
        // add whose answer was lost.
        let unknown_adds = h
            .entries
            .iter()
            .filter(|e| {
                matches!(
                    e.event,
                    Event::DirectoryChange {
                        op: DirectoryOp::Add,
                        anchor: None,
                        ..
                    }
                )
            })
            .count();
        let unexplained: Vec<&&str> = end
            .iter()
            .filter(|a| !start.contains(**a) && !added.contains(**a))
            .collect();
        assert!(unexplained.len() <= unknown_adds, "{unexplained:?}");
        // An entry whose last recorded change is an acknowledged rename has that DN now.
        let now: BTreeMap<&str, &str> = after
            .iter()
            .map(|o| (o.id.as_str(), o.attributes["dn"][0].as_str()))
            .collect();
        let mut last: BTreeMap<&str, &Event> = BTreeMap::new();
        for e in &h.entries {
            if let Event::DirectoryChange {
                anchor: Some(a), ..
            } = &e.event
            {
                last.insert(a, &e.event);
            }
        }
        let mut checked = 0;
        for (a, e) in last {
            if let Event::DirectoryChange {
                op: DirectoryOp::Rename,
                new_dn: Some(dn),
                error: None,
                ..
            } = e
            {
                assert_eq!(now.get(a), Some(&dn.as_str()), "{a}");
                checked += 1;
            }
        }
        assert!(checked > 0, "{renamed_to:?}");
        drop(slapd);
    }
}

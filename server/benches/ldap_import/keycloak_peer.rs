//! The Keycloak peer: Keycloak's LDAP user federation importing the same slapd and entries.
//!
//! Per size, after our variants: one Keycloak (`kc.sh start`, dev settings, H2 file database,
//! the slapd CA trusted through `--truststore-paths`), then per rep a fresh realm with an LDAP
//! provider configured as a customer would (LDAPS, the root bind, users DN = the people base,
//! `inetOrgPerson`, username and RDN `uid`, UUID `entryUUID`, READ_ONLY, import on, batch size =
//! the connector's page size) and a `group-ldap-mapper` for the `groupOfNames` groups. "Sync all
//! users" syncs the mappers first, so the one timed POST imports the groups and the people; it
//! answers when done. Keycloak's peak RSS is the java process's VmHWM, reset at the start of
//! each rep (so it is that rep's peak, its baseline included). The realm is deleted after the
//! rep (untimed) unless it is the last.

use std::path::Path;
use std::time::Instant;

use identitymesh_connectors::testing::{GROUPS_BASE, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD};
use identitymesh_test_support::keycloak::{
    Distribution, GroupMapper, Keycloak, LdapFederation, Options, VERSION,
};

use super::{loadavg, mib, stats, Directory, Result_, Settings, Variant, PAGE_SIZE};

/// `--peers keycloak` (the default) or `--peers none` / `--no-peer`; env `BENCH_PEERS`.
pub fn enabled() -> bool {
    if std::env::args().any(|a| a == "--no-peer") {
        return false;
    }
    match super::setting("--peers", "BENCH_PEERS")
        .as_deref()
        .map(str::trim)
    {
        None | Some("keycloak") => true,
        Some("none") | Some("") => false,
        Some(other) => panic!("--peers: unknown peer {other:?} (keycloak, none)"),
    }
}

/// `JAVA_OPTS_KC_HEAP` for the peer: kc.sh's own default unless `--keycloak-heap` /
/// `BENCH_KEYCLOAK_HEAP` says otherwise.
fn heap() -> String {
    super::setting("--keycloak-heap", "BENCH_KEYCLOAK_HEAP")
        .unwrap_or_else(|| Options::default().heap)
}

#[derive(Debug, Clone)]
pub struct KeycloakRep {
    objects: usize,
    sync_s: f64,
    peak_rss_kib: u64,
}

impl KeycloakRep {
    fn objects_per_s(&self) -> f64 {
        self.objects as f64 / self.sync_s
    }
}

pub struct PeerResult {
    people: usize,
    heap: String,
    start_s: f64,
    start_peak_rss_kib: u64,
    reps: Vec<KeycloakRep>,
}

/// Median objects/s of our `variant` at `people`, if it was measured.
fn ours(results: &[Result_], people: usize, variant: Variant) -> Option<f64> {
    let r = results
        .iter()
        .find(|r| r.people == people && r.variant == variant)?;
    Some(stats(r.reps.iter().map(super::Rep::objects_per_s).collect()).0)
}

fn fail(rep: usize, what: &str, e: &dyn std::fmt::Display, kc: &Keycloak) -> ! {
    panic!(
        "Keycloak peer, rep {rep}: {what}: {e}; log (tail):\n{}",
        kc.log_tail(40)
    )
}

/// One Keycloak for this size, `s.reps` full syncs into fresh realms.
pub async fn run(
    d: &Directory<'_>,
    size_dir: &Path,
    s: &Settings,
    results: &[Result_],
) -> PeerResult {
    let t0 = Instant::now();
    let dist = Distribution::ensure().unwrap_or_else(|e| panic!("Keycloak peer: {e}"));
    let fetch_s = t0.elapsed().as_secs_f64();
    let heap = heap();
    let t1 = Instant::now();
    let mut kc = Keycloak::start(
        &dist,
        &size_dir.join("keycloak"),
        Options {
            heap: heap.clone(),
            trusted_ca_files: vec![d.ca_file.to_path_buf()],
            ..Options::default()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("Keycloak peer: {e}"));
    let start_s = t1.elapsed().as_secs_f64();
    let start_peak_rss_kib = kc.peak_rss_kib().unwrap_or(0);
    println!(
        "   keycloak {VERSION}: distribution ready in {fetch_s:.1} s, started in {start_s:.1} s \
         (java pid {:?}, heap {heap:?}, {:.1} MiB peak RSS at start)",
        kc.java_pid(),
        mib(start_peak_rss_kib)
    );
    let admin = kc
        .admin()
        .unwrap_or_else(|e| panic!("Keycloak peer: {e}"))
        .with_sync_timeout(s.run_timeout);
    let compose = ours(results, d.people, Variant::Compose);

    let mut reps = Vec::new();
    for rep in 1..=s.reps {
        let load_before = loadavg();
        let realm = format!("bench{rep}");
        if let Err(e) = admin.create_realm(&realm).await {
            fail(rep, "creating the realm", &e, &kc);
        }
        let mut ldap =
            LdapFederation::openldap(d.slapd.ldaps_url(), ROOT_DN, ROOT_PASSWORD, PEOPLE_BASE);
        ldap.batch_size = PAGE_SIZE;
        let provider = match admin.add_ldap_federation(&realm, &ldap).await {
            Ok(p) => p,
            Err(e) => fail(rep, "adding the LDAP provider", &e, &kc),
        };
        if let Err(e) = admin
            .add_group_mapper(&realm, &provider, &GroupMapper::group_of_names(GROUPS_BASE))
            .await
        {
            fail(rep, "adding the group mapper", &e, &kc);
        }

        if let Err(e) = kc.reset_peak_rss() {
            eprintln!("   keycloak: {e}; its peak RSS covers the process's whole life");
        }
        let t = Instant::now();
        let synced = match admin.sync_users(&realm, &provider, true).await {
            Ok(r) => r,
            Err(e) => fail(rep, "sync all users", &e, &kc),
        };
        let sync_s = t.elapsed().as_secs_f64();
        let peak_rss_kib = kc.peak_rss_kib().unwrap_or(0);
        assert_eq!(
            (synced.added, synced.failed),
            (d.people as u64, 0),
            "Keycloak sync: {synced:?}; log (tail):\n{}",
            kc.log_tail(40)
        );
        let users = admin.user_count(&realm).await.unwrap_or(0);
        let groups = admin.group_count(&realm).await.unwrap_or(0);
        assert_eq!(
            (users, groups),
            (d.people as u64, d.groups as u64),
            "Keycloak holds every person and every group after the sync"
        );
        let r = KeycloakRep {
            objects: d.people + d.groups,
            sync_s,
            peak_rss_kib,
        };
        let ratio = compose
            .map(|c| format!("{:.2}×", c / r.objects_per_s()))
            .unwrap_or_else(|| "n/a (compose not measured)".into());
        // Untimed; the last realm goes with the instance.
        let deleted = if rep < s.reps {
            let t = Instant::now();
            match admin.delete_realm(&realm).await {
                Ok(()) => Ok(format!(
                    "realm deleted in {:.1} s",
                    t.elapsed().as_secs_f64()
                )),
                Err(e) => Err(format!("deleting the realm FAILED: {e}")),
            }
        } else {
            Ok("realm left to the instance".to_string())
        };
        println!(
            "{:>7} {:<15} rep {rep}: sync all users {} objects ({} people + {groups} groups) in {:.2} s \
             = {:.0} objects/s; import+compose/Keycloak objects/s {ratio}; peak RSS {:.1} MiB; \
             {}; load {load_before} → {}",
            d.people,
            "keycloak",
            r.objects,
            d.people,
            r.sync_s,
            r.objects_per_s(),
            mib(r.peak_rss_kib),
            match &deleted {
                Ok(m) | Err(m) => m,
            },
            loadavg(),
        );
        reps.push(r);
        if deleted.is_err() {
            // The next realm would compete with this one's users; stop here.
            break;
        }
    }
    if !kc.stop() {
        eprintln!("   keycloak did not stop on SIGTERM within 30 s; killed its process group");
    }
    if s.keep {
        println!("   kept: {}", size_dir.join("keycloak").display());
    }
    PeerResult {
        people: d.people,
        heap,
        start_s,
        start_peak_rss_kib,
        reps,
    }
}

pub fn report(peers: &[PeerResult], results: &[Result_], s: &Settings) {
    if peers.is_empty() {
        return;
    }
    println!();
    println!(
        "== Keycloak {VERSION} LDAP federation (sync all users: people + groups via group-ldap-mapper), \
         medians over {} rep(s), (min–max) ==",
        s.reps
    );
    println!(
        "{:>8} {:>8} {:>22} {:>16} {:>22} {:>18} {:>24} {:>20} {:>20}",
        "people",
        "objects",
        "Keycloak objects/s",
        "rep 1 (cold)",
        "Keycloak sync s",
        "peak RSS MiB",
        "import+compose obj/s",
        "compose/Keycloak",
        "import/Keycloak"
    );
    for p in peers {
        if p.reps.is_empty() {
            continue;
        }
        let col = |f: &dyn Fn(&KeycloakRep) -> f64| stats(p.reps.iter().map(f).collect());
        let kc_ops = col(&KeycloakRep::objects_per_s);
        let vs = |v: Variant| {
            ours(results, p.people, v)
                .map(|o| format!("{:.2}×", o / kc_ops.0))
                .unwrap_or_else(|| "n/a".into())
        };
        println!(
            "{:>8} {:>8} {:>22} {:>16.0} {:>22} {:>18} {:>24} {:>20} {:>20}",
            p.people,
            p.reps[0].objects,
            super::fmt_stat(kc_ops, 0),
            p.reps[0].objects_per_s(),
            super::fmt_stat(col(&|x| x.sync_s), 2),
            super::fmt_stat(col(&|x| mib(x.peak_rss_kib)), 1),
            ours(results, p.people, Variant::Compose)
                .map(|o| format!("{o:.0}"))
                .unwrap_or_else(|| "n/a".into()),
            vs(Variant::Compose),
            vs(Variant::Import),
        );
    }
    for p in peers {
        println!(
            "{:>8} people: Keycloak started in {:.1} s, {:.1} MiB peak RSS at start, heap {:?}",
            p.people,
            p.start_s,
            mib(p.start_peak_rss_kib),
            p.heap
        );
    }
    println!(
        "(ratios: our median objects/s ÷ Keycloak's median; rep 1 is Keycloak's first sync after \
         start, on a JVM that has not compiled the sync's code yet; its READ_ONLY group mapper \
         stores the groups, memberships are read from LDAP when needed)"
    );
}

//! The LDAP connector against a real slapd on loopback (feature `testing`).
#![cfg(feature = "testing")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use identitymesh_connectors::model::{ConnectorObject, ImportMode, ImportSummary, Page, Value};
use identitymesh_connectors::testing::{
    generate_people, unrelated_ca_pem, GeneratedEntry, Slapd, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD,
};
use identitymesh_connectors::{ConnectorError, LdapConfig, LdapConnector};
use ldap3::Mod;

/// Attributes the directory adds (and we request), not part of the generated content.
const OPERATIONAL: &[&str] = &["entryUUID", "entryCSN"];

async fn run_import(
    conn: &LdapConnector,
    object_type: &str,
    mode: ImportMode,
) -> Result<(Vec<Page>, ImportSummary), ConnectorError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let collector = tokio::spawn(async move {
        let mut pages = Vec::new();
        while let Some(p) = rx.recv().await {
            pages.push(p);
        }
        pages
    });
    let summary = conn.import(object_type, &mode, tx).await;
    let pages = collector.await.expect("collector task");
    summary.map(|s| (pages, s))
}

fn objects(pages: &[Page]) -> Vec<ConnectorObject> {
    pages.iter().flat_map(|p| p.objects.clone()).collect()
}

fn connector(cfg: LdapConfig) -> LdapConnector {
    LdapConnector::new(cfg, Some(ROOT_PASSWORD.into())).expect("valid connector config")
}

/// Imported objects must be exactly the generated entries: same DNs (escapes intact), same
/// values byte for byte (binary as Binary, everything else as Text), multi-valued complete.
fn assert_same(imported: &[ConnectorObject], expected: &[GeneratedEntry], binary: &[&str]) {
    assert_eq!(imported.len(), expected.len(), "object count");
    let by_dn: BTreeMap<&str, &ConnectorObject> = imported
        .iter()
        .map(|o| (o.dn.as_deref().expect("LDAP objects carry a DN"), o))
        .collect();
    assert_eq!(by_dn.len(), imported.len(), "duplicate DNs in the import");
    for e in expected {
        let o = by_dn.get(e.dn.as_str()).unwrap_or_else(|| {
            panic!(
                "missing {}; got e.g. {:?}",
                e.dn,
                by_dn.keys().take(10).collect::<Vec<_>>()
            )
        });
        assert!(!o.anchor.is_empty());
        let mut got = o.attributes.clone();
        let uuid = got
            .get("entryUUID")
            .and_then(|v| v.first())
            .and_then(Value::as_text);
        assert_eq!(uuid, Some(o.anchor.as_str()), "anchor is entryUUID");
        for op in OPERATIONAL {
            got.remove(*op);
        }
        let want: BTreeMap<String, Vec<Value>> = e
            .attributes
            .iter()
            .map(|(k, vs)| {
                let vals = vs
                    .iter()
                    .map(|v| {
                        if binary.contains(&k.as_str()) {
                            Value::Binary(v.clone())
                        } else {
                            Value::Text(String::from_utf8(v.clone()).expect("generated text"))
                        }
                    })
                    .collect();
                (k.clone(), vals)
            })
            .collect();
        // Multi-valued attributes are sets in LDAP: compare values sorted.
        let sorted = |m: &BTreeMap<String, Vec<Value>>| -> BTreeMap<String, Vec<Value>> {
            m.iter()
                .map(|(k, v)| {
                    let mut v = v.clone();
                    v.sort();
                    (k.clone(), v)
                })
                .collect()
        };
        assert_eq!(sorted(&got), sorted(&want), "attributes of {}", e.dn);
    }
}

async fn slapd_with(
    n: usize,
    seed: u64,
) -> (
    tempfile::TempDir,
    Slapd,
    identitymesh_connectors::testing::GeneratedDirectory,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = generate_people(n, seed);
    let slapd = Slapd::launch(dir.path(), Some(&data.ldif))
        .await
        .expect("slapd starts");
    (dir, slapd, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_import_over_ldaps_returns_exactly_the_generated_entries() {
    let (_dir, slapd, data) = slapd_with(60, 1).await;
    let conn = connector(slapd.ldap_config());
    let (pages, summary) = run_import(&conn, "people", ImportMode::Full)
        .await
        .expect("people import");
    let people = objects(&pages);
    assert!(pages.iter().all(|p| p.rejected.is_empty()));
    assert_same(&people, &data.people, &["jpegPhoto"]);
    assert_eq!(summary.objects, 60);
    assert_eq!(summary.rejected, 0);
    // The watermark is the greatest entryCSN seen.
    let max_csn = people
        .iter()
        .filter_map(|o| {
            o.attributes
                .get("entryCSN")?
                .first()?
                .as_text()
                .map(String::from)
        })
        .max();
    assert_eq!(summary.watermark, max_csn);

    // Awkward content made it through as written.
    let dns: BTreeSet<&str> = people.iter().filter_map(|o| o.dn.as_deref()).collect();
    for dn in [
        r"cn=Doe\2C John,ou=people,dc=example,dc=org",
        r"cn=A\2BB Consulting,ou=people,dc=example,dc=org",
        r"cn=\23hashtag,ou=people,dc=example,dc=org",
        r"cn=back\5Cslash,ou=people,dc=example,dc=org",
        "cn=山田太郎,ou=people,dc=example,dc=org",
    ] {
        assert!(
            dns.contains(dn),
            "{dn} in {:?}",
            dns.iter().take(8).collect::<Vec<_>>()
        );
    }
    assert!(people
        .iter()
        .any(|o| o.attributes.get("mail").is_some_and(|m| m.len() > 1)));
    assert!(people.iter().any(|o| matches!(
        o.attributes.get("jpegPhoto").and_then(|v| v.first()),
        Some(Value::Binary(_))
    )));

    let (gpages, _) = run_import(&conn, "groups", ImportMode::Full)
        .await
        .expect("groups import");
    assert_same(&objects(&gpages), &data.groups, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_import_over_starttls_matches_too() {
    let (_dir, slapd, data) = slapd_with(25, 2).await;
    let mut cfg = slapd.ldap_config();
    cfg.url = slapd.ldap_url();
    cfg.start_tls = true;
    let conn = connector(cfg);
    let (pages, _) = run_import(&conn, "people", ImportMode::Full)
        .await
        .expect("import over StartTLS");
    assert_same(&objects(&pages), &data.people, &["jpegPhoto"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_follow_page_size() {
    let (_dir, slapd, _data) = slapd_with(50, 3).await;
    let mut cfg = slapd.ldap_config();
    cfg.page_size = 7;
    let conn = connector(cfg);
    let (pages, summary) = run_import(&conn, "people", ImportMode::Full)
        .await
        .expect("paged import");
    let sizes: Vec<usize> = pages.iter().map(|p| p.objects.len()).collect();
    assert_eq!(sizes, vec![7, 7, 7, 7, 7, 7, 7, 1], "{sizes:?}");
    assert_eq!(summary.objects, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_returns_only_changes_and_moves_the_watermark() {
    let (_dir, slapd, data) = slapd_with(30, 4).await;
    let conn = connector(slapd.ldap_config());
    let (_, full) = run_import(&conn, "people", ImportMode::Full)
        .await
        .expect("full import");
    let w0 = full.watermark.clone().expect("full import has a watermark");

    let changed_dn = data.people[10].dn.clone();
    slapd
        .modify(
            &changed_dn,
            vec![Mod::Replace(
                b"description".to_vec(),
                [b"ge\xc3\xa4ndert".to_vec()].into_iter().collect(),
            )],
        )
        .await
        .expect("modify");
    let added_dn = format!("uid=newcomer,{PEOPLE_BASE}");
    slapd
        .add(
            &added_dn,
            &[
                ("objectClass", vec![b"inetOrgPerson".to_vec()]),
                ("uid", vec![b"newcomer".to_vec()]),
                ("cn", vec!["Nüwe Kömer".as_bytes().to_vec()]),
                ("sn", vec![b"Komer".to_vec()]),
            ],
        )
        .await
        .expect("add");

    let (pages, delta) = run_import(
        &conn,
        "people",
        ImportMode::Delta {
            watermark: w0.clone(),
        },
    )
    .await
    .expect("delta import");
    let got = objects(&pages);
    let csn = |o: &ConnectorObject| {
        o.attributes["entryCSN"][0]
            .as_text()
            .map(String::from)
            .unwrap_or_default()
    };
    let changed: BTreeSet<&str> = got
        .iter()
        .filter(|o| csn(o) > w0)
        .filter_map(|o| o.dn.as_deref())
        .collect();
    assert_eq!(
        changed,
        [changed_dn.as_str(), added_dn.as_str()]
            .into_iter()
            .collect(),
    );
    // `>=` re-reads only the entries carrying exactly the old watermark (at-least-once).
    assert!(got.iter().all(|o| csn(o) >= w0));
    assert!(got.len() <= 3, "delta read {} entries", got.len());
    let modified = got
        .iter()
        .find(|o| o.dn.as_deref() == Some(changed_dn.as_str()))
        .expect("modified");
    assert_eq!(
        modified.attributes["description"],
        vec![Value::Text("geändert".into())]
    );
    let w1 = delta.watermark.expect("delta watermark");
    assert!(w1 > w0, "{w1} > {w0}");

    // Nothing changed since: the watermark stays, and only the boundary entry comes back.
    let (pages, again) = run_import(
        &conn,
        "people",
        ImportMode::Delta {
            watermark: w1.clone(),
        },
    )
    .await
    .expect("empty delta");
    assert!(objects(&pages).len() <= 1);
    assert_eq!(again.watermark, Some(w1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_names_the_dn() {
    let (_dir, slapd, _data) = slapd_with(3, 5).await;
    let conn = LdapConnector::new(slapd.ldap_config(), Some("wrong".into())).expect("config");
    let e = run_import(&conn, "people", ImportMode::Full)
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Bind { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(ROOT_DN) && msg.contains("invalid credentials"),
        "{msg}"
    );
    assert!(
        !msg.contains("wrong"),
        "the password must not appear: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_ca_says_to_add_the_ca() {
    let (_dir, slapd, _data) = slapd_with(3, 6).await;
    for starttls in [false, true] {
        let mut cfg = slapd.ldap_config();
        cfg.ca_pem = Some(unrelated_ca_pem().expect("ca"));
        if starttls {
            cfg.url = slapd.ldap_url();
            cfg.start_tls = true;
        }
        let e = connector(cfg).test_connection().await.unwrap_err();
        assert!(matches!(e, ConnectorError::Tls { .. }), "{e:?}");
        assert!(
            e.to_string().contains("add the directory's CA as ca_pem"),
            "{e}"
        );
    }
    // The default trust store (public roots) does not know the test CA either.
    let mut cfg = slapd.ldap_config();
    cfg.ca_pem = None;
    let e = connector(cfg).test_connection().await.unwrap_err();
    assert!(e.to_string().contains("ca_pem"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_ldap_only_when_allowed() {
    let (_dir, slapd, data) = slapd_with(5, 7).await;
    let mut cfg = slapd.ldap_config();
    cfg.url = slapd.ldap_url();
    let e = LdapConnector::new(cfg.clone(), Some(ROOT_PASSWORD.into())).unwrap_err();
    assert!(matches!(e, ConnectorError::Config(_)));
    assert!(e.to_string().contains("allow_plain"), "{e}");
    cfg.allow_plain = true;
    let (pages, _) = run_import(&connector(cfg), "people", ImportMode::Full)
        .await
        .expect("plain import when allowed");
    assert_same(&objects(&pages), &data.people, &["jpegPhoto"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_base_dn_is_named() {
    let (_dir, slapd, _data) = slapd_with(3, 8).await;
    let mut cfg = slapd.ldap_config();
    let bad = "ou=nobody,dc=example,dc=org";
    cfg.object_types.get_mut("people").expect("people").base_dn = bad.into();
    let conn = connector(cfg);
    let e = run_import(&conn, "people", ImportMode::Full)
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Search { .. }), "{e:?}");
    assert!(
        e.to_string().contains(bad) && e.to_string().contains("base_dn"),
        "{e}"
    );
    let e = conn.test_connection().await.unwrap_err();
    assert!(e.to_string().contains(bad), "{e}");
    let e = run_import(&conn, "printers", ImportMode::Full)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ConnectorError::UnknownObjectType { .. }),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_does_not_read_stops_the_reader() {
    let (_dir, slapd, _data) = slapd_with(3000, 9).await;
    let mut cfg = slapd.ldap_config();
    cfg.page_size = 10;
    let conn = std::sync::Arc::new(connector(cfg));
    let (tx, rx) = tokio::sync::mpsc::channel::<Page>(1);
    let c = conn.clone();
    let task = tokio::spawn(async move { c.import("people", &ImportMode::Full, tx).await });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!task.is_finished(), "the import must wait for the consumer");
    let read = conn.entries_read();
    // One page in the channel, one blocked in send, at most one more being read.
    assert!((10..=30).contains(&read), "read {read} of 3000 entries");
    drop(rx);
    let r = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("import ends once the receiver is gone")
        .expect("task");
    assert!(matches!(r, Err(ConnectorError::Cancelled)), "{r:?}");
    assert!(conn.entries_read() <= 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_without_the_anchor_are_rejected_not_fatal() {
    let (_dir, slapd, data) = slapd_with(12, 10).await;
    let mut cfg = slapd.ldap_config();
    // Only every third generated person has a description.
    cfg.anchor_attribute = "description".into();
    let (pages, summary) = run_import(&connector(cfg), "people", ImportMode::Full)
        .await
        .expect("import");
    let with = data
        .people
        .iter()
        .filter(|p| p.attributes.contains_key("description"))
        .count();
    assert_eq!(summary.objects as usize, with);
    assert_eq!(summary.rejected as usize, 12 - with);
    let rejected: Vec<_> = pages.iter().flat_map(|p| p.rejected.clone()).collect();
    assert!(
        rejected
            .iter()
            .all(|r| r.location.ends_with(PEOPLE_BASE) && r.reason.contains("description")),
        "{rejected:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_reports_each_step() {
    let (_dir, slapd, _data) = slapd_with(3, 11).await;
    let report = connector(slapd.ldap_config())
        .test_connection()
        .await
        .expect("connection test");
    let names: Vec<&str> = report.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "connect",
            "bind",
            "root_dse",
            "object_type:groups",
            "object_type:people"
        ]
    );
    let text = serde_json::to_string(&report).expect("json");
    assert!(
        text.contains(ROOT_DN) && text.contains("paged results supported"),
        "{text}"
    );

    // Nothing listening: a connect error that says what to check.
    let mut cfg = slapd.ldap_config();
    cfg.url = format!("ldaps://127.0.0.1:{}", slapd.ldaps_port());
    drop(slapd);
    let e = connector(cfg).test_connection().await.unwrap_err();
    assert!(matches!(e, ConnectorError::Connect { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_by_modify_timestamp() {
    let (_dir, slapd, data) = slapd_with(10, 12).await;
    let mut cfg = slapd.ldap_config();
    cfg.watermark_attribute = identitymesh_connectors::WatermarkAttribute::ModifyTimestamp;
    let conn = connector(cfg);
    let (pages, full) = run_import(&conn, "people", ImportMode::Full)
        .await
        .expect("full");
    let w0 = full.watermark.expect("watermark");
    assert!(objects(&pages)
        .iter()
        .all(|o| o.attributes.contains_key("modifyTimestamp")));
    // modifyTimestamp has one-second resolution: change in a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dn = data.people[3].dn.clone();
    slapd
        .modify(
            &dn,
            vec![Mod::Replace(
                b"sn".to_vec(),
                [b"Changed".to_vec()].into_iter().collect(),
            )],
        )
        .await
        .expect("modify");
    let (pages, delta) = run_import(
        &conn,
        "people",
        ImportMode::Delta {
            watermark: w0.clone(),
        },
    )
    .await
    .expect("delta");
    let newer: Vec<_> = objects(&pages)
        .into_iter()
        .filter(|o| o.attributes["modifyTimestamp"][0].as_text() > Some(w0.as_str()))
        .collect();
    assert_eq!(newer.len(), 1);
    assert_eq!(newer[0].dn.as_deref(), Some(dn.as_str()));
    assert!(delta.watermark.expect("watermark") > w0);
    let e = conn
        .import(
            "people",
            &ImportMode::Delta {
                watermark: "yesterday".into(),
            },
            tokio::sync::mpsc::channel(1).0,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Watermark { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixture_stops_slapd_by_pid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut slapd = Slapd::launch(dir.path(), None)
        .await
        .expect("starts without data");
    let pid = slapd.pid().expect("running");
    let port = slapd.ldap_port();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    slapd.stop();
    slapd.stop();
    assert!(slapd.pid().is_none());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port closed"
    );
    // Reaped, not a zombie: /proc entry is gone.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

/// The size the benchmark uses: loads 100k people offline and pages through them.
/// `cargo test -p identitymesh-connectors --features testing --release -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: 100k entries"]
async fn hundred_thousand_people_page_through() {
    let started = std::time::Instant::now();
    let (_dir, slapd, data) = slapd_with(100_000, 13).await;
    let loaded = started.elapsed();
    let conn = connector(slapd.ldap_config());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Page>(4);
    let counter = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(p) = rx.recv().await {
            n += p.objects.len();
        }
        n
    });
    let t = std::time::Instant::now();
    let summary = conn
        .import("people", &ImportMode::Full, tx)
        .await
        .expect("import");
    let n = counter.await.expect("counter");
    eprintln!(
        "generate+slapadd+start {loaded:?}; import {:?}",
        t.elapsed()
    );
    assert_eq!(n, data.people.len());
    assert_eq!(summary.objects as usize, data.people.len());
}

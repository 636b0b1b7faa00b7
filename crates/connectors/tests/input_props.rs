//! Property tests on bad and round-trippable input, in the ordinary test run (a bounded number
//! of cases; the SignalR frame parser's cargo-fuzz target is for long runs): the CSV reader
//! and the LDAP filter validator never panic, and what they should accept they accept.

use identitymesh_connectors::ldap::LdapConfig;
use identitymesh_connectors::model::{ImportMode, Page, Value};
use identitymesh_connectors::{CsvConfig, CsvConnector};
use proptest::prelude::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Imports `body` as the only file of a drop folder: the pages, or the error's text.
fn import_csv(body: &[u8]) -> Result<Vec<Page>, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("drop.csv"), body).expect("write");
    let cfg: CsvConfig = serde_json::from_value(serde_json::json!({
        "folder": dir.path(), "object_type": "people", "anchor_column": "id",
    }))
    .expect("config");
    runtime().block_on(async {
        let conn = CsvConnector::new(cfg).map_err(|e| e.to_string())?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let pages = tokio::spawn(async move {
            let mut v = Vec::new();
            while let Some(p) = rx.recv().await {
                v.push(p);
            }
            v
        });
        let r = conn.import("people", &ImportMode::Full, tx).await;
        let pages = pages.await.expect("collector");
        r.map(|_| pages).map_err(|e| e.to_string())
    })
}

/// A CSV field as a writer quotes it.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn ldap_config(filter: &str) -> Result<LdapConfig, serde_json::Error> {
    serde_json::from_value(serde_json::json!({
        "url": "ldaps://dc1.example.org:636",
        "object_types": {"people": {"base_dn": "dc=example,dc=org", "filter": filter}},
    }))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn csv_reader_never_panics_on_arbitrary_bytes(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        // Ok (rows imported or rejected) or a file error; never a panic or a hang.
        let _ = import_csv(&body);
    }

    #[test]
    fn csv_rows_round_trip(rows in proptest::collection::vec(("[a-z0-9]{1,8}", "\\PC{0,12}"), 1..20)) {
        let mut body = String::from("id,name\n");
        let mut want = std::collections::BTreeMap::new();
        for (id, name) in &rows {
            if want.contains_key(id) {
                continue;
            }
            body.push_str(&format!("{},{}\n", quoted(id), quoted(name)));
            want.insert(id.clone(), name.clone());
        }
        let pages = import_csv(body.as_bytes()).map_err(TestCaseError::fail)?;
        let mut got = std::collections::BTreeMap::new();
        for o in pages.iter().flat_map(|p| &p.objects) {
            let name = o.attributes.get("name").and_then(|v| v.first()).and_then(Value::as_text).unwrap_or("").to_string();
            got.insert(o.anchor.clone(), name);
        }
        // An empty name is an absent value; compare what the file says.
        let want: std::collections::BTreeMap<_, _> = want.into_iter().map(|(k, v)| (k, v.trim().to_string())).collect();
        let got: std::collections::BTreeMap<_, _> = got.into_iter().map(|(k, v)| (k, v.trim().to_string())).collect();
        prop_assert_eq!(got, want);
    }

    #[test]
    fn ldap_filter_validator_never_panics(filter in "\\PC{0,64}") {
        if let Ok(cfg) = ldap_config(&filter) {
            let _ = cfg.validate();
        }
    }

    #[test]
    fn valid_equality_filters_are_accepted(attr in "[a-zA-Z][a-zA-Z0-9-]{0,15}", value in "[^()*\\\\\\x00]{1,20}") {
        for filter in [format!("({attr}={value})"), format!("{attr}={value}"), format!("(&(objectClass=person)({attr}={value}))")] {
            let cfg = ldap_config(&filter).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(cfg.validate().is_ok(), "{filter:?}: {:?}", cfg.validate());
        }
    }
}

//! The sync engine against a real OpenLDAP slapd: full import, delta import after changes,
//! deletions on the next full import, the composer's identities and audit, the connector space
//! as the Admin API pages, searches and shows it, secrets that never leave the server, and an
//! Admin API that refuses bad connectors with field paths.

mod common;

use base64::Engine as _;
use common::*;
use identitymesh_connectors::testing::{generate_people, Slapd, ROOT_PASSWORD};
use serde_json::{json, Value};

mod sync_common;
use sync_common::*;

fn rules() -> Value {
    json!({
        "precedence": 20,
        "object_types": {
            "people": {
                "join": [{"source": "lower(uid)", "identity_attribute": "uid"}],
                "flows": [
                    {"target": "uid", "expression": "lower(uid)"},
                    {"target": "mail", "expression": "mail"},
                    {"target": "displayName", "expression": "trim(cn)"},
                    {"target": "photo", "expression": "jpegPhoto"},
                    {"target": "employeeNumber", "expression": "employeeNumber"}
                ],
                "display_name": "cn"
            }
        }
    })
}

#[tokio::test]
async fn ldap_full_delta_and_deletions_through_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_people(60, 7);
    let slapd = Slapd::launch(&dir.path().join("slapd"), Some(&generated.ldif))
        .await
        .unwrap();
    let s = Standalone::start(dir.path()).await;

    // The bind password goes in as a secret; the connector only names it.
    let r = s
        .put("/api/secrets/ldap-bind", json!({"value": ROOT_PASSWORD}))
        .await;
    assert_eq!(r.0, 200, "{}", r.1);
    let mut config = serde_json::to_value(slapd.ldap_config()).unwrap();
    config["bind_password_ref"] = json!("ldap-bind");
    let (st, body) = s
        .post(
            "/api/connectors",
            json!({"name": "corp-ldap", "kind": "ldap", "config": config, "rules": rules()}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();

    let (st, test) = s
        .post(&format!("/api/connectors/{id}/test"), json!({}))
        .await;
    assert_eq!(st, 200);
    assert_eq!(test["ok"], true, "{test}");

    // Full import: every entry lands, byte for byte.
    let run = s.run(&id, "full").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let expected = generated.people.len() + generated.groups.len();
    assert_eq!(run["counts"]["added"], expected as i64, "{run}");
    let stored = s.connector_space(&id).await;
    assert_eq!(stored.len(), expected);
    for e in generated.people.iter().chain(&generated.groups) {
        let o = stored
            .values()
            .find(|o| o["dn"] == e.dn.as_str())
            .unwrap_or_else(|| panic!("{} not imported", e.dn));
        for (attr, values) in &e.attributes {
            let got: Vec<Vec<u8>> = o["attributes"][attr]
                .as_array()
                .unwrap_or_else(|| panic!("{}: {attr} missing", e.dn))
                .iter()
                .map(decode)
                .collect();
            let (mut a, mut b) = (got.clone(), values.clone());
            a.sort();
            b.sort();
            assert_eq!(a, b, "{}: {attr}", e.dn);
        }
    }
    let ids = s.get("/api/identities?limit=500").await;
    assert_eq!(
        ids["total"],
        generated.people.len() as i64,
        "people become identities, groups do not"
    );
    // Paging by id visits every identity exactly once.
    let mut seen = std::collections::BTreeSet::new();
    let mut after = String::new();
    loop {
        let page = s
            .get(&format!("/api/identities?limit=25&after={after}"))
            .await;
        for i in page["items"].as_array().unwrap() {
            assert!(
                seen.insert(i["id"].as_str().unwrap().to_string()),
                "{i} twice"
            );
        }
        match page["next"].as_str() {
            Some(n) => after = n.to_string(),
            None => break,
        }
    }
    assert_eq!(seen.len(), generated.people.len());
    let zoe = s.get("/api/identities?search=Zo%C3%AB").await;
    assert!(
        zoe["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["display_name"] == "Zoë Ünal"),
        "{zoe}"
    );

    // The connector space through the Admin API: every object once, paged by anchor, found by
    // its DN, and shown with the values stored, bytes as base64 and flagged binary.
    let mut listed = std::collections::BTreeMap::new();
    let mut after = String::new();
    loop {
        let page = s
            .get(&format!(
                "/api/connectors/{id}/objects?limit=20&after={}",
                encode(&after)
            ))
            .await;
        for i in page["items"].as_array().unwrap() {
            let anchor = i["anchor"].as_str().unwrap().to_string();
            assert!(listed.insert(anchor, i.clone()).is_none(), "{i} twice");
        }
        match page["next_after"].as_str() {
            Some(n) => after = n.to_string(),
            None => break,
        }
    }
    assert!(
        listed.keys().eq(stored.keys()),
        "the listing is the connector space"
    );
    let mut binary_values = 0;
    for (anchor, o) in &stored {
        let item = &listed[anchor];
        assert_eq!(item["dn"], o["dn"], "{item}");
        assert_eq!(item["deleted"], false, "{item}");
        assert_eq!(
            item["identity_id"].is_string(),
            item["object_type"] == "people",
            "people are joined, groups are not: {item}"
        );
        let detail = s
            .get(&format!("/api/connectors/{id}/objects/{}", encode(anchor)))
            .await;
        assert_eq!(detail["anchor"], anchor.as_str());
        assert_eq!(detail["identity_id"], item["identity_id"]);
        let attrs = detail["attributes"].as_array().unwrap();
        assert_eq!(
            attrs.len(),
            o["attributes"].as_object().unwrap().len(),
            "{detail}"
        );
        for a in attrs {
            let got: Vec<Vec<u8>> = a["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    let text = v["value"].as_str().unwrap();
                    if v["binary"] == true {
                        binary_values += 1;
                        base64::engine::general_purpose::STANDARD
                            .decode(text)
                            .unwrap()
                    } else {
                        text.as_bytes().to_vec()
                    }
                })
                .collect();
            let want: Vec<Vec<u8>> = o["attributes"][a["name"].as_str().unwrap()]
                .as_array()
                .unwrap()
                .iter()
                .map(decode)
                .collect();
            assert_eq!(got, want, "{anchor}: {}", a["name"]);
        }
        let dn = o["dn"].as_str().unwrap();
        let hits = s
            .get(&format!(
                "/api/connectors/{id}/objects?limit=500&search={}",
                encode(dn)
            ))
            .await;
        assert!(
            hits["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|i| i["anchor"] == anchor.as_str()),
            "search by the DN {dn:?} finds it: {hits}"
        );
    }
    assert!(binary_values > 0, "the photos are shown as base64");

    // A delta sees a modification and an addition, and nothing else changes.
    let victim = &generated.people[10];
    slapd
        .modify(
            &victim.dn,
            vec![ldap3::Mod::Replace(
                b"mail".to_vec(),
                [b"renamed@example.org".to_vec()].into(),
            )],
        )
        .await
        .unwrap();
    let new_dn = "uid=newcomer,ou=people,dc=example,dc=org";
    slapd
        .add(
            new_dn,
            &[
                ("objectClass", vec![b"inetOrgPerson".to_vec()]),
                ("uid", vec![b"newcomer".to_vec()]),
                ("cn", vec!["Ñew Cömer".as_bytes().to_vec()]),
                ("sn", vec![b"Comer".to_vec()]),
            ],
        )
        .await
        .unwrap();
    let gone = &generated.people[20];
    slapd.delete(&gone.dn).await.unwrap();
    let run = s.run(&id, "delta").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["counts"]["added"], 1, "{run}");
    assert_eq!(run["counts"]["updated"], 1, "{run}");
    assert_eq!(
        run["counts"]["deleted"], 0,
        "a delta cannot see deletions: {run}"
    );
    let audit = s.get("/api/audit?limit=200").await;
    let update = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action"] == "identity.update")
        .expect("an identity.update audit entry");
    let detail: Value = serde_json::from_str(update["detail"].as_str().unwrap()).unwrap();
    let change = &detail["changes"][0];
    assert_eq!(change["attribute"], "mail");
    assert_eq!(change["after"], json!(["renamed@example.org"]));
    assert!(change["before"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.as_str().unwrap().ends_with("@example.org")));

    // The next full import notices the deletion, and the identity goes with it.
    let run = s.run(&id, "full").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["counts"]["deleted"], 1, "{run}");
    assert_eq!(run["counts"]["added"], 0, "{run}");
    let ids = s.get("/api/identities?limit=500").await;
    assert_eq!(
        ids["total"],
        generated.people.len() as i64,
        "one added, one deleted"
    );
    assert_eq!(s.connector_space(&id).await.len(), expected);

    // The secret never leaves: not in the API, not in the logs.
    let secrets = s.get("/api/secrets").await;
    assert_eq!(secrets[0]["name"], "ldap-bind");
    assert!(!secrets.to_string().contains(ROOT_PASSWORD));
    assert!(!s
        .get(&format!("/api/connectors/{id}"))
        .await
        .to_string()
        .contains(ROOT_PASSWORD));
    assert!(!log_text(&s.data).contains(ROOT_PASSWORD));
    assert!(!s.proc.output().contains(ROOT_PASSWORD));
    s.stop().await;
}

#[tokio::test]
async fn bad_connectors_and_schedules_are_refused_with_field_paths() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path()).await;
    let cases = [
        (json!({"name": "x", "kind": "ftp", "config": {}}), "kind"),
        (
            json!({"name": "x", "kind": "ldap", "config": {"url": "http://dc1"}}),
            "config",
        ),
        (
            json!({"name": "x", "kind": "ldap", "config": {"url": "ldaps://dc1:636", "object_types": {"people": {"base_dn": "ou=p,dc=x"}}, "page_sise": 5}}),
            "page_sise",
        ),
        (
            json!({"name": "x", "kind": "csv", "config": {"folder": "/tmp", "object_type": "people", "anchor_column": "id"}, "rules": {"precedence": 1, "object_types": {"people": {"flows": [{"target": "mail", "expression": "lower(mail"}]}}}}),
            "rules.object_types.people.flows[0].expression: position",
        ),
        (
            json!({"name": "x", "kind": "csv", "config": {"folder": "/tmp", "object_type": "p", "anchor_column": "id"}, "rules": {"object_types": {}}}),
            "rules: missing field `precedence`",
        ),
        (
            json!({"name": "", "kind": "csv", "config": {"folder": "/tmp", "object_type": "p", "anchor_column": "id"}}),
            "name",
        ),
        (
            json!({"name": "x", "kind": "csv", "config": {"folder": "/tmp", "object_type": "p", "anchor_column": "id"}, "relay_id": "nope"}),
            "relay_id",
        ),
    ];
    for (body, want) in cases {
        let (st, problem) = s.post("/api/connectors", body.clone()).await;
        assert_eq!(st, 422, "{body} → {problem}");
        assert!(
            problem["detail"].as_str().unwrap().contains(want),
            "{body}: wanted {want:?} in {problem}"
        );
    }
    let (st, _) = s
        .post(
            "/api/schedules",
            json!({"connector_id": "nope", "kind": "cron", "spec": "* * *"}),
        )
        .await;
    assert_eq!(st, 422);
    let (st, p) = s
        .post("/api/connectors/nope/runs", json!({"mode": "full"}))
        .await;
    assert_eq!(st, 404, "{p}");
    let (st, p) = s
        .put("/api/secrets/bad%20name", json!({"value": "x"}))
        .await;
    assert_eq!(st, 422, "{p}");
    s.stop().await;
}

/// `s` as one path segment or query value, every byte but the unreserved ones percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn decode(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Object(o) => base64::engine::general_purpose::STANDARD
            .decode(o["base64"].as_str().unwrap())
            .unwrap(),
        other => panic!("unexpected value {other}"),
    }
}

//! The route table's promises: every route's permission, the abuse cases, the OpenAPI
//! document, and the admin routes' answers.

use super::openapi::openapi_document;
use super::*;
use std::sync::Arc;

use crate::auth::testing::TestIssuer;
use crate::auth::Authenticator;
use crate::store::Store;
use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

async fn app() -> (tempfile::TempDir, Router, TestIssuer) {
    let (dir, app, issuer, _) = app_with_store().await;
    (dir, app, issuer)
}

/// As [`app`], with the store behind it, for tests that put rows there first.
async fn app_with_store() -> (tempfile::TempDir, Router, TestIssuer, Arc<dyn Store>) {
    let p = crate::testing::parts("t").await;
    let issuer = TestIssuer::new();
    let jwks = p.dir.path().join("jwks.json");
    std::fs::write(&jwks, &issuer.jwks_json).unwrap();
    let auth = Authenticator::new(None, Some(issuer.config(jwks)))
        .await
        .unwrap();
    let st = p.state(auth, identitymesh_keyring::KeyRing::generate(), None);
    (p.dir, router(st), issuer, p.store)
}

async fn call(app: &Router, method: &str, path: &str, token: Option<&str>) -> StatusCode {
    call_detail(app, method, path, token).await.0
}

async fn call_detail(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    let body = (method == "post")
        .then(|| format!("{{\"name\":\"relay-{}\"}}", uuid::Uuid::new_v4().simple()));
    call_with(app, method, path, token, body).await
}

/// A request with `body` as JSON (none: no body).
async fn call_with(
    app: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, String) {
    let path = path
        .replace("{id}", "0123")
        .replace("{anchor}", "uid%3D0123%2Cou%3Dpeople");
    let mut req = Request::builder()
        .method(method.to_uppercase().as_str())
        .uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(b)
        }
        None => Body::empty(),
    };
    let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// Every route, with no token, with each single permission, and with its own permission.
#[tokio::test]
async fn every_endpoint_enforces_its_permission() {
    let (_d, app, issuer) = app().await;
    for r in routes() {
        assert_eq!(call(&app, r.method, r.path, None).await, 401, "{}", r.path);
        assert_eq!(
            call(&app, r.method, r.path, Some("garbage")).await,
            401,
            "{}",
            r.path
        );
        for p in Permission::ALL {
            let status = call(
                &app,
                r.method,
                r.path,
                Some(&issuer.token(&[p.as_str()], 300)),
            )
            .await;
            if p == r.permission {
                // Authorised: anything but 401/403 (DELETE of an unknown id is a 404).
                assert!(
                    !matches!(status.as_u16(), 401 | 403),
                    "{} {} with {}: {status}",
                    r.method,
                    r.path,
                    p.as_str()
                );
            } else {
                assert_eq!(status, 403, "{} with {}", r.path, p.as_str());
            }
        }
    }
}

/// Requests a permission admits by route but must not reach what they name: (method, path,
/// body, the caller's only permission, expected status, a phrase the refusal must say).
const ABUSE_CASES: &[(&str, &str, &str, &str, u16, &str)] = &[
    // Deleting a connector's objects is connectors.write's, not a run mode of
    // schedules.manage.
    (
        "post",
        "/api/connectors/{id}/runs",
        r#"{"mode":"clear"}"#,
        "schedules.manage",
        422,
        "/api/connectors/{id}/clear",
    ),
];

#[tokio::test]
async fn abuse_cases_are_refused() {
    let (_d, app, issuer) = app().await;
    for (method, path, body, permission, want, phrase) in ABUSE_CASES {
        let token = issuer.token(&[permission], 300);
        let (status, detail) =
            call_with(&app, method, path, Some(&token), Some(body.to_string())).await;
        assert_eq!(
            status.as_u16(),
            *want,
            "{method} {path} {body} with {permission}: {detail}"
        );
        let phrase = phrase.replace("{id}", "0123");
        assert!(
            detail.contains(&phrase),
            "{method} {path} {body}: the refusal should say {phrase:?}: {detail}"
        );
    }
}

/// A TCP listener that keeps every byte it is sent (an LDAP simple bind carries its
/// password in the clear over `ldap://`) and then hangs up.
async fn recorder() -> (u16, Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::AsyncReadExt as _;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok(n)) =
                tokio::time::timeout(std::time::Duration::from_secs(2), c.read(&mut buf)).await
            {
                keep.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        }
    });
    (port, seen)
}

fn ldap_connector(port: u16, filter: &str) -> String {
    serde_json::json!({
        "name": "corp", "kind": "ldap",
        "config": {"url": format!("ldap://127.0.0.1:{port}"), "allow_plain": true, "timeout_ms": 2000,
                   "bind_dn": "cn=sync,dc=x", "bind_password_ref": "bind",
                   "object_types": {"people": {"base_dn": "dc=x", "filter": filter}}}
    })
    .to_string()
}

/// `connectors.write` alone cannot send a stored secret anywhere new: not by pointing a
/// connector at another host, not with a new connector naming the secret; a test call only
/// ever binds to where the secret was entrusted.
#[tokio::test]
async fn a_stored_secret_goes_only_where_it_was_entrusted() {
    let (_d, app, issuer) = app().await;
    let admin = issuer.token(&Permission::ALL.map(|p| p.as_str()), 300);
    let editor = issuer.token(&["connectors.write"], 300);
    let password = "pw-entrusted-9f3k";
    let (st, body) = call_with(
        &app,
        "put",
        "/api/secrets/bind",
        Some(&admin),
        Some(format!(r#"{{"value":"{password}"}}"#)),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let (legit, legit_seen) = recorder().await;
    let (evil, evil_seen) = recorder().await;
    let (st, body) = call_with(
        &app,
        "post",
        "/api/connectors",
        Some(&admin),
        Some(ldap_connector(legit, "(objectClass=*)")),
    )
    .await;
    assert_eq!(st, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/connectors/{id}");

    // Pointed at another host by an editor: refused, and the stored config stays.
    let (st, body) = call_with(
        &app,
        "put",
        &path,
        Some(&editor),
        Some(ldap_connector(evil, "(objectClass=*)")),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("secrets.write"), "{body}");
    // A new connector naming the secret, by an editor: refused too.
    let (st, body) = call_with(
        &app,
        "post",
        "/api/connectors",
        Some(&editor),
        Some(ldap_connector(evil, "(objectClass=*)").replace("\"corp\"", "\"corp2\"")),
    )
    .await;
    assert_eq!(st, 403, "{body}");
    // An edit that leaves the destination alone is the editor's to make.
    let (st, body) = call_with(
        &app,
        "put",
        &path,
        Some(&editor),
        Some(ldap_connector(legit, "(objectClass=person)")),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // Testing binds to the entrusted endpoint only.
    let (st, body) = call_with(&app, "post", &format!("{path}/test"), Some(&editor), None).await;
    assert_eq!(st, 200, "{body}");
    let contains = |seen: &Arc<std::sync::Mutex<Vec<u8>>>| {
        let b = seen.lock().unwrap();
        b.windows(password.len()).any(|w| w == password.as_bytes())
    };
    assert!(
        contains(&legit_seen),
        "the entrusted endpoint got the bind (so this test can see one)"
    );
    assert!(
        evil_seen.lock().unwrap().is_empty(),
        "nothing may reach a host an editor chose"
    );
    // Someone who may write secrets may move it.
    let (st, body) = call_with(
        &app,
        "put",
        &path,
        Some(&admin),
        Some(ldap_connector(evil, "(objectClass=person)")),
    )
    .await;
    assert_eq!(st, 200, "{body}");
}

#[tokio::test]
async fn openapi_matches_the_routes() {
    let (_d, app, issuer) = app().await;
    let doc = openapi_document();
    let paths = doc["paths"].as_object().unwrap();
    for r in routes() {
        assert_eq!(
            paths[r.path][r.method]["x-permission"],
            r.permission.as_str(),
            "{}",
            r.path
        );
    }
    let all = Permission::ALL.map(|p| p.as_str());
    let token = issuer.token(&all, 300);
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let (s, detail) = call_detail(&app, method, path, Some(&token)).await;
            assert!(
                !detail.contains("no such endpoint") && s != 405,
                "{method} {path} documented but not routed ({s}: {detail})"
            );
        }
    }
    let (s, detail) = call_detail(&app, "get", "/api/nothing", Some(&token)).await;
    assert_eq!(s, 404);
    assert!(detail.contains("no such endpoint"));
}

#[tokio::test]
async fn bad_query_is_a_problem_not_a_crash() {
    let (_d, app, issuer) = app().await;
    let t = issuer.token(&["audit.read"], 300);
    assert_eq!(
        call(&app, "get", "/api/audit?limit=abc", Some(&t)).await,
        400
    );
    assert_eq!(call(&app, "get", "/api/audit?limit=0", Some(&t)).await, 400);
    assert_eq!(call(&app, "get", "/api/audit?limit=5", Some(&t)).await, 200);
}

/// `s` as one path segment or query value: everything but unreserved characters
/// percent-encoded, as a browser's encodeURIComponent does with `,` `=` `/` `\` and spaces.
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

async fn get_json(app: &Router, path: &str, token: &str) -> (StatusCode, serde_json::Value) {
    let (status, body) = call_with(app, "get", path, Some(token), None).await;
    let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body));
    (status, v)
}

const DOE: &str = r"cn=Doe\, John/Ops,ou=people,dc=example,dc=org";

/// A connector `c1` whose connector space holds `people` objects `uid=p00..` as the LDAP
/// connector stores them, Doe's DN with a binary objectGUID and a value that is not
/// UTF-8, and Doe joined to an identity.
async fn connector_space_fixture(store: &Arc<dyn Store>, people: usize) -> String {
    use crate::store::{
        ComposeWrite, ConnectorRow, CsObject, FenceToken, IdentityRow, ImportBatch, LinkRow,
    };
    use identitymesh_connectors::model::{Attributes, ConnectorObject, Value};
    store
        .put_connector(&ConnectorRow {
            id: "c1".into(),
            name: "corp".into(),
            kind: "ldap".into(),
            config_json: "{}".into(),
            rules_json: "{}".into(),
            relay_id: None,
            is_canary: false,
            created_at_ms: 1,
            updated_at_ms: 1,
        })
        .await
        .unwrap();
    let object = |anchor: &str, dn: Option<&str>, attributes: Attributes| {
        let o = ConnectorObject {
            anchor: anchor.into(),
            object_type: "people".into(),
            dn: dn.map(str::to_string),
            attributes,
            location: None,
        };
        CsObject {
            anchor: o.anchor.clone(),
            object_type: o.object_type.clone(),
            attributes_json: o.attributes_json(),
        }
    };
    let mut doe = Attributes::new();
    doe.insert("cn".into(), vec![Value::Text("John Doe".into())]);
    doe.insert(
        "objectGUID".into(),
        vec![Value::Binary(vec![0, 159, 255, 10])],
    );
    doe.insert(
        "description".into(),
        vec![Value::Text("plain".into()), Value::Binary(vec![0xff, 0xfe])],
    );
    let mut objects = vec![object(DOE, Some(DOE), doe)];
    for i in 0..people {
        let mut a = Attributes::new();
        a.insert("cn".into(), vec![Value::Text(format!("Person {i:02}"))]);
        let uid = format!("uid=p{i:02},ou=people,dc=example,dc=org");
        objects.push(object(&uid, Some(&uid), a));
    }
    let t = FenceToken {
        instance: "t".into(),
        incarnation: "space-test".into(),
        epoch: store.fence().await.unwrap().epoch + 1,
    };
    store.promote(&t).await.unwrap();
    let batch = ImportBatch {
        connector: "c1".into(),
        object_type: "people".into(),
        objects,
        watermark: None,
        seen_in_run: Some("run-1".into()),
        compose: false,
        composed: None,
    };
    store.commit_import_batch(&t, &batch, 1).await.unwrap();
    let identity = IdentityRow {
        id: "idn-doe".into(),
        display_name: "John Doe".into(),
        attributes_json: "{}".into(),
        created_at_ms: 1,
        updated_at_ms: 1,
    };
    store
        .commit_compose(
            &t,
            &[
                ComposeWrite::PutIdentity {
                    identity,
                    keys: Vec::new(),
                },
                ComposeWrite::PutLink(LinkRow {
                    connector_id: "c1".into(),
                    anchor: DOE.into(),
                    identity_id: "idn-doe".into(),
                    precedence: 1,
                    contribution_json: "{}".into(),
                }),
            ],
            2,
        )
        .await
        .unwrap();
    "c1".into()
}

#[tokio::test]
async fn connector_objects_page_by_anchor_and_search() {
    let (_d, app, issuer, store) = app_with_store().await;
    let c = connector_space_fixture(&store, 6).await;
    let t = issuer.token(&["dashboard.read"], 300);

    // Pages of 3 by anchor, each cursor from the page before, the last without one.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let cursor = after
            .as_deref()
            .map(|a| format!("&after={}", encode(a)))
            .unwrap_or_default();
        let (st, page) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects?limit=3{cursor}"),
            &t,
        )
        .await;
        assert_eq!(st, 200, "{page}");
        assert_eq!(page["total"], 7, "{page}");
        pages += 1;
        let items = page["items"].as_array().unwrap();
        seen.extend(
            items
                .iter()
                .map(|i| i["anchor"].as_str().unwrap().to_string()),
        );
        match page["next_after"].as_str() {
            Some(next) => {
                assert_eq!(items.len(), 3, "{page}");
                assert_eq!(Some(next), items.last().unwrap()["anchor"].as_str());
                after = Some(next.to_string());
            }
            None => {
                assert!(page["next_after"].is_null(), "{page}");
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    let mut want: Vec<String> = (0..6)
        .map(|i| format!("uid=p{i:02},ou=people,dc=example,dc=org"))
        .collect();
    want.push(DOE.into());
    want.sort();
    assert_eq!(seen, want, "every object once, in anchor order");

    // An item: anchor, type, dn, deleted, the joined identity.
    let (_, all) = get_json(&app, &format!("/api/connectors/{c}/objects"), &t).await;
    let doe = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["anchor"] == DOE)
        .unwrap()
        .clone();
    assert_eq!(
        doe,
        serde_json::json!({"anchor": DOE, "object_type": "people", "dn": DOE, "deleted": false, "identity_id": "idn-doe"})
    );
    assert!(all["items"][1]["identity_id"].is_null(), "{all}");

    // Search: a substring of the anchor or of the attributes, ignoring case.
    let search = |q: &str| {
        let (app, t, q) = (app.clone(), t.clone(), encode(q));
        async move {
            let (st, v) =
                get_json(&app, &format!("/api/connectors/c1/objects?search={q}"), &t).await;
            assert_eq!(st, 200, "{v}");
            v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["anchor"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        search("person 03").await,
        vec!["uid=p03,ou=people,dc=example,dc=org".to_string()]
    );
    assert_eq!(search(r"DOE\, JOHN").await, vec![DOE.to_string()]);
    assert_eq!(
        search("uid=P05").await,
        vec!["uid=p05,ou=people,dc=example,dc=org".to_string()]
    );
    assert_eq!(
        search("AJ//Cg==").await,
        vec![DOE.to_string()],
        "bytes by their base64"
    );
    assert!(search("nobody").await.is_empty());
    assert_eq!(search("dc=example").await.len(), 7);
    // Search and paging together.
    let (_, page) = get_json(
        &app,
        &format!("/api/connectors/{c}/objects?search=person&limit=4"),
        &t,
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 4);
    let next = encode(page["next_after"].as_str().unwrap());
    let (_, page) = get_json(
        &app,
        &format!("/api/connectors/{c}/objects?search=person&limit=4&after={next}"),
        &t,
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    assert!(page["next_after"].is_null());
}

#[tokio::test]
async fn connector_objects_refuse_bad_limits_and_unknown_connectors() {
    let (_d, app, issuer, store) = app_with_store().await;
    let c = connector_space_fixture(&store, 1).await;
    let t = issuer.token(&["dashboard.read"], 300);
    for limit in ["0", "501", "-1"] {
        let (st, v) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects?limit={limit}"),
            &t,
        )
        .await;
        assert_eq!(st, 422, "limit={limit}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("between 1 and 500"),
            "{v}"
        );
    }
    for limit in ["1", "500"] {
        let (st, v) = get_json(
            &app,
            &format!("/api/connectors/{c}/objects?limit={limit}"),
            &t,
        )
        .await;
        assert_eq!(st, 200, "limit={limit}: {v}");
    }
    let (st, v) = get_json(&app, &format!("/api/connectors/{c}/objects?limit=many"), &t).await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = get_json(&app, &format!("/api/connectors/{c}/objects?serch=x"), &t).await;
    assert_eq!(st, 400, "an unknown parameter is refused, not ignored: {v}");
    for path in [
        "/api/connectors/nope/objects".to_string(),
        format!("/api/connectors/nope/objects/{}", encode(DOE)),
    ] {
        let (st, v) = get_json(&app, &path, &t).await;
        assert_eq!(st, 404, "{path}: {v}");
        assert!(
            v["detail"].as_str().unwrap().contains("no connector"),
            "{v}"
        );
    }
    let (st, v) = get_json(
        &app,
        &format!("/api/connectors/{c}/objects/{}", encode("uid=nobody")),
        &t,
    )
    .await;
    assert_eq!(st, 404, "{v}");
    assert!(v["detail"].as_str().unwrap().contains("uid=nobody"), "{v}");
}

#[tokio::test]
async fn a_connector_object_shows_its_attributes_with_binary_values_as_base64() {
    let (_d, app, issuer, store) = app_with_store().await;
    let c = connector_space_fixture(&store, 1).await;
    let t = issuer.token(&["dashboard.read"], 300);
    // The DN's `,` `=` ` ` `/` and `\` round-trip through one percent-encoded segment.
    let (st, o) = get_json(
        &app,
        &format!("/api/connectors/{c}/objects/{}", encode(DOE)),
        &t,
    )
    .await;
    assert_eq!(st, 200, "{o}");
    assert_eq!(o["anchor"], DOE);
    assert_eq!(o["dn"], DOE);
    assert_eq!(o["connector_id"], "c1");
    assert_eq!(o["object_type"], "people");
    assert_eq!(o["deleted"], false);
    assert_eq!(o["seen_in_run"], "run-1");
    assert_eq!(o["identity_id"], "idn-doe");
    assert!(
        o["updated_at"]
            .as_str()
            .unwrap()
            .starts_with("1970-01-01T00:00:00.001"),
        "{o}"
    );
    assert_eq!(
        o["attributes"],
        serde_json::json!([
            {"name": "cn", "values": [{"value": "John Doe", "binary": false}]},
            {"name": "description", "values": [
                {"value": "plain", "binary": false},
                {"value": "//4=", "binary": true}
            ]},
            {"name": "objectGUID", "values": [{"value": "AJ//Cg==", "binary": true}]}
        ]),
        "{o}"
    );
    assert!(
        o.get("attributes_json").is_none(),
        "the stored form parsed: {o}"
    );
    // An unlinked object, by its encoded anchor too.
    let uid = "uid=p00,ou=people,dc=example,dc=org";
    let (st, o) = get_json(
        &app,
        &format!("/api/connectors/{c}/objects/{}", encode(uid)),
        &t,
    )
    .await;
    assert_eq!(st, 200, "{o}");
    assert_eq!(o["anchor"], uid);
    assert!(o["identity_id"].is_null(), "{o}");
}

#[tokio::test]
async fn audit_filters_narrow_the_log() {
    let (_d, app, issuer, store) = app_with_store().await;
    let t = issuer.token(&["audit.read"], 300);
    let at = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    };
    for (when, actor, action) in [
        ("2026-01-01T10:00:00Z", "alice", "connector.create"),
        ("2026-01-02T10:00:00Z", "bob", "connector.delete"),
        ("2026-01-03T10:00:00Z", "alice", "schedule.create"),
        ("2026-01-04T10:00:00Z", "bob", "connectors.other"),
    ] {
        store
            .append_audit(&crate::store::AuditEntry {
                at_ms: at(when),
                actor: actor.into(),
                action: action.into(),
                target: when.into(),
                detail: String::new(),
            })
            .await
            .unwrap();
    }
    let targets = |q: &'static str| {
        let (app, t) = (app.clone(), t.clone());
        async move {
            let (st, v) = get_json(&app, &format!("/api/audit{q}"), &t).await;
            assert_eq!(st, 200, "{q}: {v}");
            v.as_array()
                .unwrap()
                .iter()
                .map(|e| e["target"].as_str().unwrap()[8..10].to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        targets("").await,
        ["04", "03", "02", "01"],
        "all, newest first"
    );
    assert_eq!(targets("?actor=alice").await, ["03", "01"]);
    assert_eq!(targets("?action=connector.create").await, ["01"], "exact");
    assert_eq!(
        targets("?action=connector.").await,
        ["02", "01"],
        "a prefix ending with a dot"
    );
    assert!(
        targets("?action=connector").await.is_empty(),
        "no prefix without the dot"
    );
    assert_eq!(
        targets("?since=2026-01-03T10:00:00Z").await,
        ["04", "03"],
        "since is inclusive"
    );
    assert_eq!(
        targets("?until=2026-01-02T10:00:00Z").await,
        ["01"],
        "until is exclusive"
    );
    // An offset, its `+` encoded, and one sent bare (a query string makes it a space).
    assert_eq!(
        targets("?since=2026-01-02T11:00:00%2B01:00").await,
        ["04", "03", "02"]
    );
    assert_eq!(
        targets("?since=2026-01-02T11:00:00+01:00").await,
        ["04", "03", "02"]
    );
    assert_eq!(targets("?limit=1").await, ["04"]);
    assert_eq!(
        targets("?actor=bob&action=connector.&since=2026-01-02T00:00:00Z").await,
        ["02"]
    );

    for (q, name) in [
        ("?since=yesterday", "since"),
        ("?until=2026-13-01T00:00:00Z", "until"),
        ("?since=2026-01-01", "since"),
    ] {
        let (st, v) = get_json(&app, &format!("/api/audit{q}"), &t).await;
        assert_eq!(st, 422, "{q}: {v}");
        let detail = v["detail"].as_str().unwrap();
        assert!(
            detail.starts_with(&format!("{name} must be an RFC 3339 timestamp")),
            "{detail}"
        );
        assert!(detail.contains("2026-01-31T08:00:00Z"), "{detail}");
    }
    let (st, v) = get_json(&app, "/api/audit?actr=alice", &t).await;
    assert_eq!(st, 400, "an unknown filter is refused, not ignored: {v}");
}

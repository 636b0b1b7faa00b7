//! Two connectors feeding one set of identities: an HR CSV drop folder (precedence 10) and the
//! LDAP directory (precedence 20). HR wins where both supply an attribute, LDAP fills in what HR
//! lacks, removing HR's row falls back to LDAP, bad CSV rows are reported with their line, and
//! a connector is cleared before it can be deleted. Also: pause and resume.

mod common;

use identitymesh_connectors::testing::{generate_people, Slapd, ROOT_PASSWORD};
use serde_json::{json, Value};

mod sync_common;
use sync_common::*;

fn identity_by_uid<'a>(items: &'a [Value], uid: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i["attributes"]["uid"] == json!([uid]))
        .unwrap_or_else(|| panic!("no identity with uid {uid}"))
}

#[tokio::test]
async fn hr_csv_and_ldap_compose_by_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_people(10, 5);
    let slapd = Slapd::launch(&dir.path().join("slapd"), Some(&generated.ldif))
        .await
        .unwrap();
    let s = Standalone::start(dir.path()).await;
    assert_eq!(
        s.put("/api/secrets/ldap-bind", json!({"value": ROOT_PASSWORD}))
            .await
            .0,
        200
    );

    let mut config = serde_json::to_value(slapd.ldap_config()).unwrap();
    config["bind_password_ref"] = json!("ldap-bind");
    let ldap_rules = json!({"precedence": 20, "object_types": {"people": {
        "join": [{"source": "uid", "identity_attribute": "uid"}],
        "flows": [
            {"target": "uid", "expression": "lower(uid)"},
            {"target": "mail", "expression": "mail"},
            {"target": "title", "expression": "\"Staff\""}
        ],
        "display_name": "cn"}}});
    let (st, ldap) = s
        .post(
            "/api/connectors",
            json!({"name": "ldap", "kind": "ldap", "config": config, "rules": ldap_rules}),
        )
        .await;
    assert_eq!(st, 201, "{ldap}");
    let ldap = ldap["id"].as_str().unwrap().to_string();

    // HR's drop folder: semicolon-separated, one bad row (line 4: a missing column).
    let drop = dir.path().join("drop/hr");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(
        drop.join("hr.csv"),
        "employeeId;uid;name;department;title\n\
         E1;user000001;Anne Personnel;Finance;Controller\n\
         E2;user000002;Björn HR;Engineering;Architect\n\
         E3;user000003;broken row\n\
         E4;user000004;Chloé Dupont;Legal;Counsel\n",
    )
    .unwrap();
    let hr_rules = json!({"precedence": 10, "object_types": {"employee": {
        "join": [{"source": "lower(uid)", "identity_attribute": "uid"}],
        "project": false,
        "flows": [
            {"target": "department", "expression": "department"},
            {"target": "title", "expression": "trim(title)"}
        ],
        "display_name": "name"}}});
    let hr_config = json!({"folder": drop, "object_type": "employee", "anchor_column": "employeeId", "delimiter": ";"});
    let (st, hr) = s
        .post(
            "/api/connectors",
            json!({"name": "hr", "kind": "csv", "config": hr_config, "rules": hr_rules}),
        )
        .await;
    assert_eq!(st, 201, "{hr}");
    let hr = hr["id"].as_str().unwrap().to_string();

    let run = s.run(&ldap, "full").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    let run = s.run(&hr, "full").await;
    assert_eq!(run["status"], "completed_with_errors", "{run}");
    assert_eq!(run["counts"]["added"], 3, "{run}");
    assert_eq!(run["counts"]["failed"], 1, "{run}");
    assert!(
        run["errors"][0]["location"]
            .as_str()
            .unwrap()
            .ends_with("hr.csv:4"),
        "{run}"
    );

    let ids = s.get("/api/identities?limit=100").await;
    let items = ids["items"].as_array().unwrap();
    assert_eq!(items.len(), 10, "HR joins, it does not project: {ids}");
    let anne = identity_by_uid(items, "user000001");
    assert_eq!(
        anne["display_name"], "Anne Personnel",
        "HR wins the display name"
    );
    assert_eq!(
        anne["attributes"]["title"],
        json!(["Controller"]),
        "HR (10) beats LDAP (20)"
    );
    assert_eq!(anne["attributes"]["department"], json!(["Finance"]));
    assert!(
        anne["attributes"]["mail"][0]
            .as_str()
            .unwrap()
            .ends_with("@example.org"),
        "LDAP fills in mail"
    );
    assert_eq!(anne["sources"]["title"], hr);
    assert_eq!(anne["sources"]["mail"], ldap);
    let other = identity_by_uid(items, "user000005");
    assert_eq!(other["attributes"]["title"], json!(["Staff"]));

    let detail = s
        .get(&format!("/api/identities/{}", anne["id"].as_str().unwrap()))
        .await;
    assert_eq!(detail["links"].as_array().unwrap().len(), 2, "{detail}");

    // Anne leaves HR's file: her HR contribution goes, LDAP's values come back.
    std::fs::write(
        drop.join("hr.csv"),
        "employeeId;uid;name;department;title\nE2;user000002;Björn HR;Engineering;Architect\n",
    )
    .unwrap();
    let run = s.run(&hr, "full").await;
    assert_eq!(run["counts"]["deleted"], 2, "{run}");
    let ids = s.get("/api/identities?limit=100").await;
    let anne = identity_by_uid(ids["items"].as_array().unwrap(), "user000001");
    assert_eq!(anne["attributes"]["title"], json!(["Staff"]), "{anne}");
    assert!(anne["attributes"].get("department").is_none(), "{anne}");
    assert_ne!(anne["display_name"], "Anne Personnel");
    let audit = s.get("/api/audit?limit=500").await;
    let change = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| {
            a["action"] == "identity.update"
                && a["target"] == format!("identity/{}", anne["id"].as_str().unwrap())
        })
        .map(|a| serde_json::from_str::<Value>(a["detail"].as_str().unwrap()).unwrap())
        .find(|d| {
            d["connector"] == hr.as_str()
                && d["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["attribute"] == "department" && c["after"] == json!([]))
        })
        .expect("the audit log records the department's removal with before and after");
    assert!(
        change["changes"].to_string().contains("Finance"),
        "{change}"
    );

    // A connector with objects cannot be deleted; cleared, it can, and its contributions go.
    let r = s.delete(&format!("/api/connectors/{hr}")).await;
    assert_eq!(r.0, 409, "{}", r.1);
    // Clearing is not a run mode (runs need only schedules.manage): refused, nothing deleted.
    let staged = s.connector_space(&hr).await.len();
    let (st, refused) = s
        .post(
            &format!("/api/connectors/{hr}/runs"),
            json!({"mode": "clear"}),
        )
        .await;
    assert_eq!(st, 422, "{refused}");
    assert!(
        refused["detail"].as_str().unwrap_or("").contains("/clear"),
        "{refused}"
    );
    assert_eq!(s.connector_space(&hr).await.len(), staged);
    let (st, clear) = s
        .post(&format!("/api/connectors/{hr}/clear"), json!({}))
        .await;
    assert_eq!(st, 202, "{clear}");
    let done = s.wait_run(clear["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(s.delete(&format!("/api/connectors/{hr}")).await.0, 204);
    let ids = s.get("/api/identities?limit=100").await;
    let bjorn = identity_by_uid(ids["items"].as_array().unwrap(), "user000002");
    assert_eq!(bjorn["attributes"]["title"], json!(["Staff"]), "{bjorn}");

    // Paused: no run starts (the runbook's drain step); resumed: runs again.
    let (st, p) = s.post("/api/sync/pause", json!({})).await;
    assert_eq!((st, p["paused"].clone()), (200, json!(true)));
    let (st, p) = s
        .post(
            &format!("/api/connectors/{ldap}/runs"),
            json!({"mode": "delta"}),
        )
        .await;
    assert_eq!(st, 409, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("paused"), "{p}");
    assert_eq!(s.get("/api/sync").await["paused"], true);
    s.post("/api/sync/resume", json!({})).await;
    let run = s.run(&ldap, "delta").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    s.stop().await;
}

#[tokio::test]
async fn an_interval_schedule_runs_the_connector_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path()).await;
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(drop.join("a.csv"), "id,name\n1,One\n2,Two\n").unwrap();
    let (st, c) = s
        .post(
            "/api/connectors",
            json!({"name": "sched", "kind": "csv",
                   "config": {"folder": drop, "object_type": "row", "anchor_column": "id"}}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["id"].as_str().unwrap();
    let (st, sched) = s
        .post(
            "/api/schedules",
            json!({"connector_id": id, "kind": "interval", "spec": "10s", "mode": "full"}),
        )
        .await;
    assert_eq!(st, 201, "{sched}");
    assert!(sched["next_run"].is_string(), "{sched}");
    let listed = s.get("/api/schedules").await;
    assert_eq!(listed[0]["id"], sched["id"]);

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let run = loop {
        let runs = s.get(&format!("/api/runs?connector={id}")).await;
        if let Some(r) = runs
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["trigger"] == "schedule" && r["status"] != "running")
        {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled run: {runs}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["counts"]["added"], 2, "{run}");
    let (st, _) = s
        .delete(&format!("/api/schedules/{}", sched["id"].as_str().unwrap()))
        .await;
    assert_eq!(st, 204);
    s.stop().await;
}

#[tokio::test]
async fn changed_rules_compose_the_objects_already_imported() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path()).await;
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(
        drop.join("staff.csv"),
        "id,name,title\n1,Ann,clerk\n2,Bob,chef\n3,Cem,pilot\n",
    )
    .unwrap();
    let config = json!({"folder": drop, "object_type": "row", "anchor_column": "id"});
    let (st, c) = s
        .post(
            "/api/connectors",
            json!({"name": "staff", "kind": "csv", "config": config}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    let titles = || async {
        let ids = s.get("/api/identities?limit=100").await;
        let mut t: Vec<(String, Value)> = ids["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["display_name"].as_str().unwrap().to_string(),
                    i["attributes"]["title"].clone(),
                )
            })
            .collect();
        t.sort_by(|a, b| a.0.cmp(&b.0));
        t
    };
    let with_rules = |expression: &str| {
        json!({"name": "staff", "kind": "csv", "config": config, "rules": {"precedence": 10, "object_types": {"row": {
            "flows": [{"target": "title", "expression": expression}],
            "display_name": "name"}}}})
    };

    // Imported without rules: nothing to compose, no identities.
    let run = s.run(&id, "full").await;
    assert_eq!(run["counts"]["added"], 3, "{run}");
    assert!(titles().await.is_empty());

    // Rules added later: the unchanged objects are composed by the next run.
    let (st, b) = s
        .put(&format!("/api/connectors/{id}"), with_rules("title"))
        .await;
    assert_eq!(st, 200, "{b}");
    let run = s.run(&id, "full").await;
    assert_eq!(
        (run["status"].clone(), run["counts"]["unchanged"].clone()),
        (json!("succeeded"), json!(3)),
        "{run}"
    );
    assert_eq!(
        titles().await,
        vec![
            ("Ann".into(), json!(["clerk"])),
            ("Bob".into(), json!(["chef"])),
            ("Cem".into(), json!(["pilot"]))
        ]
    );

    // A changed flow rewrites every identity.
    s.put(&format!("/api/connectors/{id}"), with_rules("upper(title)"))
        .await;
    s.run(&id, "full").await;
    let upper: Vec<Value> = titles().await.into_iter().map(|(_, t)| t).collect();
    assert_eq!(
        upper,
        vec![json!(["CLERK"]), json!(["CHEF"]), json!(["PILOT"])]
    );

    // Same rules, same data: nothing is composed again (no new identity audit entries).
    let identity_audits = || async {
        s.get("/api/audit?limit=1000")
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["action"].as_str().unwrap().starts_with("identity."))
            .count()
    };
    let before = identity_audits().await;
    s.run(&id, "full").await;
    assert_eq!(identity_audits().await, before);

    // Rules taken away: the linked objects are composed again and their identities go.
    s.put(
        &format!("/api/connectors/{id}"),
        json!({"name": "staff", "kind": "csv", "config": config}),
    )
    .await;
    let run = s.run(&id, "full").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(titles().await.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn a_connector_added_later_joins_on_an_attribute_nobody_joined_on_before() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path()).await;
    let folder = |name: &str, file: &str, body: &str| {
        let d = dir.path().join("drop").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(file), body).unwrap();
        d
    };
    let staff = folder("staff", "staff.csv", "id,name,emp\n1,Ann,E-7\n2,Bob,E-9\n");
    let (st, a) = s
        .post(
            "/api/connectors",
            json!({"name": "staff", "kind": "csv",
                   "config": {"folder": staff, "object_type": "row", "anchor_column": "id"},
                   "rules": {"precedence": 10, "object_types": {"row": {
                       "flows": [{"target": "employeeId", "expression": "emp"}],
                       "display_name": "name"}}}}),
        )
        .await;
    assert_eq!(st, 201, "{a}");
    let run = s.run(a["id"].as_str().unwrap(), "full").await;
    assert_eq!(run["status"], "succeeded", "{run}");

    // Created after the identities exist, joining on employeeId (lower-cased, as joins are).
    let hr = folder("hr", "hr.csv", "emp,dept\ne-9,Kitchen\nE-404,Nowhere\n");
    let (st, b) = s
        .post(
            "/api/connectors",
            json!({"name": "hr", "kind": "csv",
                   "config": {"folder": hr, "object_type": "row", "anchor_column": "emp"},
                   "rules": {"precedence": 5, "object_types": {"row": {
                       "join": [{"source": "emp", "identity_attribute": "employeeId"}],
                       "project": false,
                       "flows": [{"target": "department", "expression": "dept"}]}}}}),
        )
        .await;
    assert_eq!(st, 201, "{b}");
    let run = s.run(b["id"].as_str().unwrap(), "full").await;
    assert_eq!(run["status"], "succeeded", "{run}");

    let ids = s.get("/api/identities?limit=100").await;
    let items = ids["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "HR does not project: {ids}");
    let dept = |name: &str| {
        items
            .iter()
            .find(|i| i["display_name"] == name)
            .map(|i| i["attributes"]["department"].clone())
            .unwrap()
    };
    assert_eq!(dept("Bob"), json!(["Kitchen"]), "{ids}");
    assert_eq!(dept("Ann"), Value::Null, "{ids}");
    s.stop().await;
}

/// An anchor a CSV file holds twice is imported once, the first row standing, and the second
/// reported with its line: the connector finds a duplicate within one page (naming the first
/// row), the store one an earlier page of the run committed. The next run does the same, and
/// nothing is swept as unseen.
#[tokio::test]
async fn a_duplicate_anchor_is_refused_however_far_apart_the_rows_are() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path()).await;
    let drop = dir.path().join("drop/staff");
    std::fs::create_dir_all(&drop).unwrap();
    let mut body = String::from("id,name\n");
    for i in 0..700 {
        body.push_str(&format!("p{i},Person {i}\n"));
    }
    // Line 702 repeats line 5, a page earlier; line 703 repeats line 652, in the same page.
    body.push_str("p3,Impostor\np650,Twice\n");
    std::fs::write(drop.join("a.csv"), body).unwrap();
    let (st, c) = s
        .post(
            "/api/connectors",
            json!({"name": "staff", "kind": "csv",
                   "config": {"folder": drop, "object_type": "row", "anchor_column": "id"},
                   "rules": {"precedence": 10, "object_types": {"row": {
                       "flows": [{"target": "name", "expression": "name"}],
                       "display_name": "name"}}}}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    // The second run is a delta: a CSV connector keeps no watermark, so a delta reads the
    // whole file as a full run does, and a duplicate pages apart is refused there too.
    for (run_no, mode, added, unchanged) in [(1, "full", 700, 0), (2, "delta", 0, 700)] {
        let run = s.run(&id, mode).await;
        assert_eq!(run["mode"], mode, "run {run_no}: {run}");
        assert_eq!(
            run["status"], "completed_with_errors",
            "run {run_no}: {run}"
        );
        assert_eq!(run["counts"]["added"], added, "run {run_no}: {run}");
        assert_eq!(run["counts"]["unchanged"], unchanged, "run {run_no}: {run}");
        assert_eq!(run["counts"]["failed"], 2, "run {run_no}: {run}");
        assert_eq!(run["counts"]["deleted"], 0, "run {run_no}: {run}");
        let errors = run["errors"].as_array().unwrap();
        let at = |location: &str| {
            errors
                .iter()
                .find(|e| e["location"] == location)
                .unwrap_or_else(|| panic!("no error at {location}: {run}"))["reason"]
                .as_str()
                .unwrap()
                .to_string()
        };
        let far = at("a.csv:702");
        assert!(
            far.contains("duplicate anchor \"p3\"") && far.contains("already imported in this run"),
            "{far}"
        );
        let near = at("a.csv:703");
        assert!(
            near.contains("duplicate anchor \"p650\"") && near.contains("first seen at a.csv:652"),
            "{near}"
        );
    }
    let space = s.connector_space(&id).await;
    assert_eq!(space.len(), 700);
    assert_eq!(
        space["p3"]["attributes"]["name"],
        json!(["Person 3"]),
        "the first row stands"
    );
    assert_eq!(space["p650"]["attributes"]["name"], json!(["Person 650"]));
    // Composed from the rows that stand: the refused ones made no identity and changed none.
    for (who, gone) in [("Person 3", "Impostor"), ("Person 650", "Twice")] {
        let q = |name: &str| {
            format!(
                "/api/identities?search={}&limit=500",
                name.replace(' ', "%20")
            )
        };
        let found = s.get(&q(who)).await;
        let names: Vec<&str> = found["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["display_name"].as_str())
            .collect();
        assert!(names.contains(&who), "{found}");
        let refused = s.get(&q(gone)).await;
        assert_eq!(refused["items"], json!([]), "{refused}");
    }
    let all = s.get("/api/identities?limit=1").await;
    assert_eq!(all["total"], 700, "{all}");
    s.stop().await;
}

/// A connector whose configuration no longer names an object type it has objects of can still
/// be cleared, and then deleted: the clear sweeps every type in its connector space.
#[tokio::test]
async fn clear_sweeps_object_types_the_configuration_no_longer_names() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path()).await;
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(drop.join("a.csv"), "id,name\n1,One\n2,Two\n").unwrap();
    let (st, c) = s
        .post(
            "/api/connectors",
            json!({"name": "retyped", "kind": "csv",
                   "config": {"folder": drop, "object_type": "row", "anchor_column": "id"}}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(s.run(&id, "full").await["status"], "succeeded");
    assert_eq!(s.connector_space(&id).await.len(), 2);
    let (st, c) = s
        .put(
            &format!("/api/connectors/{id}"),
            json!({"name": "retyped", "kind": "csv",
                   "config": {"folder": drop, "object_type": "item", "anchor_column": "id"}}),
        )
        .await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(s.delete(&format!("/api/connectors/{id}")).await.0, 409);
    let (st, clear) = s
        .post(&format!("/api/connectors/{id}/clear"), json!({}))
        .await;
    assert_eq!(st, 202, "{clear}");
    let done = s.wait_run(clear["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["counts"]["deleted"], 2, "{done}");
    let r = s.delete(&format!("/api/connectors/{id}")).await;
    assert_eq!(r.0, 204, "{}", r.1);
    s.stop().await;
}

/// A CSV connector may read only inside the drop roots (by default `DATA_DIR/drop`): the data
/// directory, `/proc/self`, `..` and symlinks out are refused at save (422 naming config.folder
/// and the roots) and again at run time, when a saved folder was swapped for a link; the
/// server's token never reaches a run's error.
#[tokio::test]
async fn csv_folders_are_confined_to_the_drop_roots() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start_plain(dir.path(), &[]).await;
    let drop = s.data.join("drop");
    assert!(
        drop.is_dir(),
        "the standalone default root is created on start"
    );
    let root = std::fs::canonicalize(&drop).unwrap();
    let body = |folder: &str, pattern: &str| {
        json!({"name": "leak", "kind": "csv",
               "config": {"folder": folder, "pattern": pattern, "object_type": "row", "anchor_column": "id"}})
    };
    let data = s.data.display().to_string();
    std::os::unix::fs::symlink(&s.data, drop.join("out")).unwrap();
    for folder in [
        data.clone(),
        "/proc/self".to_string(),
        format!("{}/../", drop.display()),
        "../".to_string(),
        drop.join("out").display().to_string(),
    ] {
        let (st, p) = s
            .post("/api/connectors", body(&folder, "admin.token"))
            .await;
        assert_eq!(st, 422, "{folder}: {p}");
        let errors = p["errors"].to_string();
        assert!(
            errors.contains("config.folder") && errors.contains(&root.display().to_string()),
            "{folder}: {p}"
        );
    }

    // Inside the root: accepted and it runs.
    let hr = drop.join("hr");
    std::fs::create_dir_all(&hr).unwrap();
    std::fs::write(hr.join("a.csv"), "id,name\n1,One\n").unwrap();
    let (st, c) = s.post("/api/connectors", body("hr", "*.csv")).await;
    assert_eq!(st, 201, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    assert_eq!(s.run(&id, "full").await["status"], "succeeded");

    // The folder is swapped for a link to the data directory after the save: the run refuses.
    std::fs::remove_dir_all(&hr).unwrap();
    std::os::unix::fs::symlink(&s.data, &hr).unwrap();
    let (st, c) = s
        .put(&format!("/api/connectors/{id}"), body("hr", "admin.token"))
        .await;
    assert_eq!(st, 422, "the save is checked too: {c}");
    let run = s.run(&id, "full").await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap_or("");
    assert!(error.contains("outside"), "{run}");
    assert!(!error.contains(&s.token), "{run}");
    let (_, test) = s
        .post(&format!("/api/connectors/{id}/test"), json!({}))
        .await;
    assert_eq!(test["ok"], false, "{test}");
    assert!(!test.to_string().contains(&s.token), "{test}");
    s.stop().await;
}

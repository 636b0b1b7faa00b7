//! kill -9 of the server in the middle of a large LDAP import: every batch is one transaction
//! with its objects, so after a restart the next run adds exactly what was missing, and the
//! connector space equals the directory's own contents: nothing lost, nothing twice.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use identitymesh_connectors::testing::{generate_people, Slapd, ROOT_PASSWORD};
use serde_json::json;

mod sync_common;
use sync_common::*;

fn count_objects(data: &std::path::Path) -> i64 {
    let out = Command::new("sqlite3")
        .arg(data.join("identitymesh.db"))
        .arg("SELECT COUNT(*) FROM cs_objects")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::test]
async fn kill_9_mid_import_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_people(12_000, 11);
    let total = (generated.people.len() + generated.groups.len()) as i64;
    let slapd = Slapd::launch(&dir.path().join("slapd"), Some(&generated.ldif))
        .await
        .unwrap();

    // The bind password through the CLI, before the server ever ran (it creates the key ring).
    let data = dir.path().join("data");
    let mut cli = Command::new(BIN)
        .args([
            "secrets",
            "set",
            "ldap-bind",
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    cli.stdin
        .take()
        .unwrap()
        .write_all(format!("{ROOT_PASSWORD}\n").as_bytes())
        .unwrap();
    let out = cli.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(ROOT_PASSWORD));

    let s = Standalone::start(dir.path()).await;
    let mut config = serde_json::to_value(slapd.ldap_config()).unwrap();
    config["bind_password_ref"] = json!("ldap-bind");
    config["page_size"] = json!(100);
    let rules = json!({"precedence": 5, "object_types": {"people": {
        "join": [{"source": "uid", "identity_attribute": "uid"}],
        "flows": [{"target": "uid", "expression": "uid"}, {"target": "mail", "expression": "mail"}]}}});
    let (st, c) = s
        .post(
            "/api/connectors",
            json!({"name": "big", "kind": "ldap", "config": config, "rules": rules}),
        )
        .await;
    assert_eq!(st, 201, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    let (st, first) = s
        .post(
            &format!("/api/connectors/{id}/runs"),
            json!({"mode": "full"}),
        )
        .await;
    assert_eq!(st, 202, "{first}");

    // Kill once a good part, but not all, of the directory is committed.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let mut committed = 0;
    while committed < total / 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "import made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        committed = count_objects(&data);
    }
    let mut s = s;
    s.proc.signal(libc::SIGKILL);
    s.proc.wait(Duration::from_secs(10));
    let committed = count_objects(&data);
    assert!(
        committed > 0 && committed < total,
        "the kill must land mid-import (committed {committed} of {total})"
    );
    // Only whole pages (one batch each) commit; groups are read first, then people.
    let groups = generated.groups.len() as i64;
    let whole = if committed <= groups {
        committed % 100 == 0 || committed == groups
    } else {
        (committed - groups) % 100 == 0
    };
    assert!(whole, "a partial page committed: {committed}");

    // Restart on the same data: the next full run adds exactly the rest.
    let s = Standalone::start(dir.path()).await;
    let run = s.run(&id, "full").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(run["counts"]["added"], total - committed, "{run}");
    assert_eq!(run["counts"]["unchanged"], committed, "{run}");
    assert_eq!(run["counts"]["deleted"], 0, "{run}");

    let space = s.connector_space(&id).await;
    assert_eq!(space.len() as i64, total);
    let mut dns: Vec<&str> = space.values().map(|o| o["dn"].as_str().unwrap()).collect();
    dns.sort();
    let mut want: Vec<&str> = generated
        .people
        .iter()
        .chain(&generated.groups)
        .map(|e| e.dn.as_str())
        .collect();
    want.sort();
    assert_eq!(dns, want, "the connector space is the directory");
    let ids = s.get("/api/identities?limit=1").await;
    assert_eq!(
        ids["total"],
        generated.people.len() as i64,
        "one identity per person, none twice"
    );

    // The killed run is recorded as abandoned, not left running forever.
    let killed = s
        .get(&format!("/api/runs/{}", first["id"].as_str().unwrap()))
        .await;
    assert_eq!(killed["status"], "abandoned", "{killed}");
    // The watermark now exists: a delta reads only what changed (nothing).
    let run = s.run(&id, "delta").await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(run["counts"]["unchanged"].as_i64().unwrap() < 5, "{run}");
    s.stop().await;
}

//! A relay-bound LDAP connector end to end: a real slapd, a standalone server and the real
//! `identitymesh-relay` binary enrolled against it. The connection test and a full import run
//! through the relay and land exactly what the directory holds; with the relay stopped, a run
//! fails saying the relay is not connected. The bind password never reaches the relay's log.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use identitymesh_connectors::testing::{generate_people, Slapd, ROOT_PASSWORD};
use serde_json::json;

mod sync_common;
use sync_common::*;

/// The relay binary, built next to the server's (`cargo build --workspace --bins`).
fn relay_bin() -> PathBuf {
    let server = Path::new(BIN);
    let path = server
        .parent()
        .expect("the server binary lives in <target>/<profile>")
        .join(format!(
            "identitymesh-relay{}",
            std::env::consts::EXE_SUFFIX
        ));
    assert!(
        path.is_file(),
        "{} not found: build the relay first with `cargo build -p identitymesh-relay` (or \
         `cargo build --workspace --bins`) using the same CARGO_TARGET_DIR and profile as the tests",
        path.display()
    );
    path
}

/// The relay process (`run --config`), stopped by pid.
struct Relay {
    proc: Proc,
}

impl Relay {
    fn start(bin: &Path, config: &Path, log_dir: PathBuf) -> Relay {
        let config = config.to_str().unwrap();
        let args = [
            "run",
            "--config",
            config,
            "--retry-base-ms",
            "100",
            "--retry-cap-ms",
            "1000",
        ];
        // Debug level: a password logged anywhere in the relay would show up here.
        let env = [
            ("RUST_LOG", "debug".to_string()),
            ("NO_COLOR", "1".to_string()),
        ];
        Relay {
            proc: Proc::spawn_bin(bin, &args, &env, &log_dir),
        }
    }

    fn log(&self) -> String {
        self.proc.output()
    }

    /// SIGTERM to our child's pid, and wait for a clean exit.
    fn stop(&mut self) {
        let status = self.proc.terminate(Duration::from_secs(15));
        assert!(
            status.success(),
            "relay exit {status}; log:\n{}",
            self.log()
        );
    }
}

fn rules() -> serde_json::Value {
    json!({
        "precedence": 20,
        "object_types": {
            "people": {
                "join": [{"source": "lower(uid)", "identity_attribute": "uid"}],
                "flows": [
                    {"target": "uid", "expression": "lower(uid)"},
                    {"target": "mail", "expression": "mail"}
                ],
                "display_name": "cn"
            }
        }
    })
}

async fn relay_state(s: &Standalone, id: &str) -> String {
    let relays = s.get("/api/relays").await;
    relays
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .map(|r| r["state"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

async fn wait_relay_state(s: &Standalone, id: &str, want: &str, relay: &Relay) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = relay_state(s, id).await;
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "relay {id} is {state:?}, never {want}; GET /api/relays: {}\nrelay log:\n{}\nserver:\n{}",
            s.get("/api/relays").await,
            relay.log(),
            s.proc.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ldap_import_through_a_real_relay() {
    let relay_bin = relay_bin();
    let dir = tempfile::tempdir().unwrap();
    let generated = generate_people(40, 3);
    let slapd = Slapd::launch(&dir.path().join("slapd"), Some(&generated.ldif))
        .await
        .unwrap();
    let s = Standalone::start(dir.path()).await;

    // A relay credential from the Admin API; the relay trusts the server's (development)
    // certificate and nothing else.
    let (st, created) = s
        .post("/api/relays", json!({"name": "branch-office"}))
        .await;
    assert_eq!(st, 201, "{created}");
    let relay_id = created["id"].as_str().unwrap().to_string();
    let relay_token = created["token"].as_str().unwrap().to_string();
    let server_cert = s.data.join("tls").join("dev-cert.pem");
    assert!(server_cert.is_file(), "{} missing", server_cert.display());
    let relay_dir = dir.path().join("relay");
    let relay_config = relay_dir.join("relay.toml");
    // The relay's own CSV drop root, on "its host".
    let relay_drop = relay_dir.join("drop");
    std::fs::create_dir_all(relay_drop.join("hr")).unwrap();
    let out = Command::new(&relay_bin)
        .args(["enroll", "--server", &s.base, "--ca-file"])
        .arg(&server_cert)
        .arg("--csv-root")
        .arg(&relay_drop)
        .arg("--config")
        .arg(&relay_config)
        .env("IDENTITYMESH_RELAY_TOKEN", &relay_token)
        .env("RUST_LOG", "info")
        .output()
        .expect("run identitymesh-relay enroll");
    assert!(
        out.status.success(),
        "enroll failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(relay_dir.join("ca.pem").is_file(), "enroll stores the CA");
    let mut relay = Relay::start(&relay_bin, &relay_config, relay_dir.join("relay-logs"));
    wait_relay_state(&s, &relay_id, "Connected", &relay).await;

    // A connector bound to the relay; the bind password is a server-side secret.
    let r = s
        .put("/api/secrets/ldap-bind", json!({"value": ROOT_PASSWORD}))
        .await;
    assert_eq!(r.0, 200, "{}", r.1);
    let mut config = serde_json::to_value(slapd.ldap_config()).unwrap();
    config["bind_password_ref"] = json!("ldap-bind");
    // Small pages: the 40 people come back as 6 pages, streamed one StreamItem each.
    config["page_size"] = json!(7);
    let (st, body) = s
        .post(
            "/api/connectors",
            json!({"name": "branch-ldap", "kind": "ldap", "config": config, "rules": rules(), "relay_id": relay_id}),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();

    let (st, test) = s
        .post(&format!("/api/connectors/{id}/test"), json!({}))
        .await;
    assert_eq!(st, 200, "{test}");
    assert_eq!(test["ok"], true, "{test}\nrelay log:\n{}", relay.log());
    let steps = test["steps"].to_string();
    assert!(steps.contains("bound as"), "{test}");

    // A full import through the relay lands exactly the generated directory.
    let run = s.run(&id, "full").await;
    assert_eq!(
        run["status"],
        "succeeded",
        "{run}\nrelay log:\n{}",
        relay.log()
    );
    let expected = generated.people.len() + generated.groups.len();
    assert_eq!(run["counts"]["added"], expected as i64, "{run}");
    let stored = s.connector_space(&id).await;
    assert_eq!(stored.len(), expected);
    assert_space_matches_directory(&stored, &generated);
    let log = relay.log();
    assert!(
        log.contains(
            "directory import finished kind=\"ldap\" object_type=people pages=6 items=6 objects=40"
        ),
        "the import ran in the relay, page by page: {log}"
    );

    // A directory error inside the relay comes back as the run's error.
    const WRONG: &str = "not-the-bind-password-93817";
    let r = s
        .put("/api/secrets/ldap-bind", json!({"value": WRONG}))
        .await;
    assert_eq!(r.0, 200, "{}", r.1);
    let run = s.run(&id, "full").await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].to_string();
    assert!(
        error.contains(&relay_id) && error.contains("bind as"),
        "the relay's bind failure reaches the run record: {run}"
    );
    assert!(!error.contains(WRONG), "{run}");
    assert_eq!(s.connector_space(&id).await.len(), expected);

    // A relay-bound CSV folder is checked by the relay at save time, against its own roots.
    let csv = |name: &str, folder: &str| {
        json!({"name": name, "kind": "csv", "relay_id": relay_id,
            "config": {"folder": folder, "object_type": "people", "anchor_column": "id"}})
    };
    let inside = relay_drop.join("hr");
    let (st, body) = s
        .post(
            "/api/connectors",
            csv("branch-hr", inside.to_str().unwrap()),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    assert_eq!(body["warnings"], json!([]), "{body}");
    for outside in ["/etc", &format!("{}/../..", relay_drop.display())] {
        let (st, body) = s.post("/api/connectors", csv("branch-etc", outside)).await;
        assert_eq!(st, 422, "{outside}: {body}");
        let errors = body["errors"].to_string();
        assert!(
            errors.contains("config.folder")
                && errors.contains("branch-office")
                && errors.contains("csv_roots"),
            "{outside}: the relay's refusal names the field, the relay and its roots: {body}"
        );
    }

    // The relay stops; a run now fails and says why.
    relay.stop();
    wait_relay_state(&s, &relay_id, "Disconnected", &relay).await;
    // A relay-bound CSV folder saved while the relay is away: saved, with a warning.
    let (st, body) = s
        .post(
            "/api/connectors",
            csv("branch-hr-2", inside.to_str().unwrap()),
        )
        .await;
    assert_eq!(st, 201, "{body}");
    let warnings = body["warnings"].to_string();
    assert!(
        warnings.contains("config.folder was not checked") && warnings.contains("not connected"),
        "{body}"
    );
    let run = s.run(&id, "full").await;
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].to_string();
    assert!(
        error.contains(&relay_id) && error.contains("not connected"),
        "the run record names the relay and says it is not connected: {run}"
    );
    let (st, test) = s
        .post(&format!("/api/connectors/{id}/test"), json!({}))
        .await;
    assert_eq!(st, 200, "{test}");
    assert_eq!(test["ok"], false, "{test}");
    assert!(
        test["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not connected"),
        "{test}"
    );
    assert_eq!(
        s.connector_space(&id).await.len(),
        expected,
        "a failed run changes nothing"
    );

    // Neither the bind password nor the relay credential reaches the relay's log.
    let log = relay.log();
    assert!(log.contains("relay stopped"), "{log}");
    assert!(
        !log.contains(ROOT_PASSWORD),
        "the bind password reached the relay's log"
    );
    assert!(
        !log.contains(WRONG),
        "a bind password reached the relay's log"
    );
    assert!(
        !log.contains(&relay_token),
        "the relay credential reached the relay's log"
    );
    assert!(!log_text(&s.data).contains(ROOT_PASSWORD));
    assert!(!s.proc.output().contains(ROOT_PASSWORD));

    s.stop().await;
    drop(slapd);
}

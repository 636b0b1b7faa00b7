//! A standalone server for sync tests, driven through its Admin API with the bootstrap token.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

pub struct Standalone {
    pub proc: Proc,
    pub data: PathBuf,
    pub base: String,
    pub token: String,
    pub client: reqwest::Client,
}

impl Standalone {
    pub async fn start(dir: &Path) -> Standalone {
        Self::start_with(dir, &[]).await
    }

    /// With `dir/drop` as the CSV drop root (the tests keep their files there).
    pub async fn start_with(dir: &Path, env: &[(&str, String)]) -> Standalone {
        let drop = dir.join("drop");
        std::fs::create_dir_all(&drop).unwrap();
        let mut env = env.to_vec();
        if !env.iter().any(|(k, _)| *k == "IM_CONNECTORS__CSV_ROOTS") {
            env.push(("IM_CONNECTORS__CSV_ROOTS", drop.display().to_string()));
        }
        Self::start_plain(dir, &env).await
    }

    /// With the server's own defaults (the drop root is `DATA_DIR/drop`).
    pub async fn start_plain(dir: &Path, env: &[(&str, String)]) -> Standalone {
        let data = dir.join("data");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let args = [
            "standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ];
        let proc = Proc::spawn(&args, env, dir);
        let client = insecure_client();
        let base = format!("https://127.0.0.1:{port}");
        wait_up(&client, &format!("{base}/health/live"), &proc).await;
        let token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        Standalone {
            proc,
            data,
            base,
            token,
            client,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req.bearer_auth(&self.token).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn get(&self, path: &str) -> Value {
        let (st, v) = self
            .send(self.client.get(format!("{}{path}", self.base)))
            .await;
        assert_eq!(st, 200, "GET {path}: {v}");
        v
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.client.put(format!("{}{path}", self.base)).json(&body))
            .await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.client.delete(format!("{}{path}", self.base)))
            .await
    }

    /// Starts a run and waits for its end.
    pub async fn run(&self, connector: &str, mode: &str) -> Value {
        let (st, run) = self
            .post(
                &format!("/api/connectors/{connector}/runs"),
                json!({"mode": mode}),
            )
            .await;
        assert_eq!(st, 202, "{run}");
        self.wait_run(run["id"].as_str().unwrap()).await
    }

    pub async fn wait_run(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let r = self.get(&format!("/api/runs/{id}")).await;
            if r["status"] != "running" {
                return r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run {id} still running: {r}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The connector space as stored (anchor → {dn, attributes}), read from the SQLite file.
    pub async fn connector_space(&self, connector: &str) -> BTreeMap<String, Value> {
        let out = std::process::Command::new("sqlite3")
            .arg("-json")
            .arg(self.data.join("identitymesh.db"))
            .arg(format!(
                "SELECT anchor, attributes_json FROM cs_objects WHERE connector_id = '{connector}' AND deleted = 0"
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = if out.stdout.is_empty() {
            Vec::new()
        } else {
            serde_json::from_slice(&out.stdout).unwrap()
        };
        rows.into_iter()
            .map(|r| {
                (
                    r["anchor"].as_str().unwrap().to_string(),
                    serde_json::from_str(r["attributes_json"].as_str().unwrap()).unwrap(),
                )
            })
            .collect()
    }

    pub async fn stop(mut self) {
        if std::env::var_os("IM_TEST_SHOW_LOG").is_some() {
            eprintln!("{}", log_text(&self.data));
        }
        let status = self.proc.terminate(Duration::from_secs(20));
        assert!(
            status.success(),
            "server exit: {status:?}\n{}",
            self.proc.output()
        );
    }
}

/// A stored attribute value as bytes: text as UTF-8, `{"base64": …}` decoded.
#[allow(dead_code)]
pub fn stored_value_bytes(v: &Value) -> Vec<u8> {
    use base64::Engine as _;
    match v {
        Value::String(s) => s.as_bytes().to_vec(),
        Value::Object(o) => base64::engine::general_purpose::STANDARD
            .decode(o["base64"].as_str().expect("a {\"base64\": ...} value"))
            .expect("valid base64"),
        other => panic!("unexpected stored value {other}"),
    }
}

/// The connector space holds exactly the generated directory: one object per generated entry
/// (people and groups, found by DN, no others), and every generated attribute with exactly
/// the generated values, byte for byte (order ignored).
#[allow(dead_code)]
pub fn assert_space_matches_directory(
    stored: &BTreeMap<String, Value>,
    generated: &identitymesh_connectors::testing::GeneratedDirectory,
) {
    let entries: Vec<_> = generated.people.iter().chain(&generated.groups).collect();
    let mut stored_dns: Vec<&str> = stored
        .values()
        .map(|o| o["dn"].as_str().expect("every stored LDAP object has a dn"))
        .collect();
    stored_dns.sort();
    let mut generated_dns: Vec<&str> = entries.iter().map(|e| e.dn.as_str()).collect();
    generated_dns.sort();
    assert_eq!(
        stored_dns, generated_dns,
        "the connector space holds exactly the generated entries"
    );
    for e in entries {
        let o = stored
            .values()
            .find(|o| o["dn"] == e.dn.as_str())
            .unwrap_or_else(|| panic!("{} not imported", e.dn));
        for (attr, values) in &e.attributes {
            let mut got: Vec<Vec<u8>> = o["attributes"][attr]
                .as_array()
                .unwrap_or_else(|| panic!("{}: {attr} missing", e.dn))
                .iter()
                .map(stored_value_bytes)
                .collect();
            let mut want = values.clone();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{}: {attr}", e.dn);
        }
    }
}

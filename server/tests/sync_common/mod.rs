//! A standalone server for sync tests, driven through its Admin API with the bootstrap token.

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

    pub async fn start_with(dir: &Path, env: &[(&str, String)]) -> Standalone {
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
        let status = self.proc.terminate(Duration::from_secs(20));
        assert!(
            status.success(),
            "server exit: {status:?}\n{}",
            self.proc.output()
        );
    }
}

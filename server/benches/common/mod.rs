//! A real standalone server for the benches: a fresh data folder, its own port, the bootstrap
//! token, JSON calls, its peak memory; killed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_identitymesh-server");

pub use identitymesh_test_support::net::free_port;

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `--name N` from the command line.
pub fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// `--name N` from the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    arg_value(name).unwrap_or_else(|| default.to_string())
}

pub struct Server {
    child: Child,
    pub base: String,
    pub data: PathBuf,
    pub client: reqwest::Client,
    pub token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts this build's server (or `BENCH_SERVER_BIN`, for A/B runs) with only defaults.
    pub async fn start(dir: &Path) -> Server {
        let data = dir.join("data");
        let port = free_port();
        let bin = std::env::var("BENCH_SERVER_BIN").unwrap_or_else(|_| BIN.to_string());
        let mut cmd = Command::new(bin);
        cmd.args(["standalone", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.txt")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr.txt")).unwrap());
        for (k, _) in std::env::vars() {
            if k.starts_with("IM_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().expect("starting identitymesh-server");
        let client = reqwest::Client::builder()
            // The standalone server's self-signed development certificate.
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(3600))
            .build()
            .unwrap();
        let base = format!("https://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        while client
            .get(format!("{base}/health/live"))
            .send()
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the server did not start; see {}",
                dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        Server {
            child,
            base,
            data,
            client,
            token,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// An Admin API call with the bootstrap token; panics on an error answer.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let r = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {v}");
        v
    }

    /// Starts a run of `connector` and waits for it to end; the finished run.
    pub async fn run(&self, connector: &str, mode: &str) -> Value {
        let run = self
            .api(
                reqwest::Method::POST,
                &format!("/api/connectors/{connector}/runs"),
                serde_json::json!({"mode": mode}),
            )
            .await;
        let id = run["id"].as_str().unwrap().to_string();
        loop {
            let r = self
                .api(
                    reqwest::Method::GET,
                    &format!("/api/runs/{id}"),
                    Value::Null,
                )
                .await;
            if r["status"] != "running" {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

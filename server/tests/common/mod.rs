//! Shared helpers for the server's process-level tests: spawn the real binary, wait for it,
//! stop it by pid, and talk to it over real TLS.

#![allow(dead_code)]

pub mod oidc;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_identitymesh-server");

pub use identitymesh_test_support::net::free_port;
// Not every test binary that includes this module waits.
#[allow(unused_imports)]
pub use identitymesh_test_support::wait::eventually;

/// A server process that is killed (by pid) if the test ends without stopping it.
pub struct Proc {
    pub child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], env: &[(&str, String)], log_dir: &Path) -> Proc {
        Self::spawn_bin(Path::new(BIN), args, env, log_dir)
    }

    /// Like [`Proc::spawn`], for another of the workspace's binaries (the relay).
    pub fn spawn_bin(bin: &Path, args: &[&str], env: &[(&str, String)], log_dir: &Path) -> Proc {
        std::fs::create_dir_all(log_dir).unwrap();
        let stdout = log_dir.join(format!("stdout-{}.txt", free_port()));
        let stderr = log_dir.join(format!("stderr-{}.txt", free_port()));
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        // Only what the test sets: a stray IM_* from the developer's shell must not leak in.
        for (k, _) in std::env::vars() {
            if k.starts_with("IM_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        Proc {
            child: Some(cmd.spawn().unwrap()),
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(within)
    }

    pub fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return st;
            }
            if Instant::now() > deadline {
                panic!(
                    "process {} did not exit within {within:?}; {}",
                    child.id(),
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn insecure_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Polls `url` until it answers at all (any status), or panics with the process output.
pub async fn wait_up(client: &reqwest::Client, url: &str, p: &Proc) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if client.get(url).send().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{url} never answered; {}", p.output());
}

/// A cluster CA with a serving certificate and an operator client certificate, as PEM files.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_pem: String,
    pub ca_pem: String,
    /// The key ring both instances share (what the operator's Secret mounts).
    pub keyring: PathBuf,
}

pub fn pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    let ca = identitymesh_test_support::pki::TestCa::new("test cluster CA").unwrap();
    let srv = ca.server("localhost", &["localhost", "127.0.0.1"]).unwrap();
    let cl = ca.client("identitymesh-operator", None).unwrap();
    let p = Pki {
        ca: dir.join("ca.crt"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        client_pem: cl.identity_pem(),
        ca_pem: ca.cert_pem().to_string(),
        keyring: dir.join("keyring.json"),
    };
    std::fs::write(
        &p.keyring,
        identitymesh_keyring::KeyRing::generate().to_json(),
    )
    .unwrap();
    std::fs::write(&p.ca, &p.ca_pem).unwrap();
    std::fs::write(&p.cert, &srv.cert_pem).unwrap();
    std::fs::write(&p.key, &srv.key_pem).unwrap();
    p
}

/// A client that presents the operator certificate and trusts only the cluster CA.
pub fn mtls_client(pki: &Pki) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .identity(reqwest::Identity::from_pem(pki.client_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

pub fn ca_only_client(pki: &Pki) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The last non-empty line of the day's log file under `data_dir/logs`.
pub fn log_text(data_dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(rd) = std::fs::read_dir(data_dir.join("logs")) {
        let mut files: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        files.sort();
        for f in files {
            out.push_str(&std::fs::read_to_string(f).unwrap_or_default());
        }
    }
    out
}

pub fn last_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

/// GET `url` (with a bearer token when given) and decode the JSON body.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    c: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> T {
    let mut req = c.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap().json().await.unwrap()
}

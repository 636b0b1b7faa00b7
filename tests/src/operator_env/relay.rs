//! A real relay agent (`identitymesh-relay`) enrolled and running through the client Service,
//! as a customer runs it: it resolves the Service's DNS name (to the harness's Service proxy)
//! and trusts only the cluster CA.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::*;

/// The relay process; killed by pid when dropped.
pub struct RelayProcess {
    child: Child,
    pub id: String,
    /// The credential it enrolled with (tests check it never reaches a log).
    pub token: String,
    pub log: PathBuf,
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Env {
    /// Seeds a relay credential the way `POST /api/relays` stores it (only its hash), enrolls a
    /// relay with it through the Service and starts it.
    pub async fn start_relay(&mut self, id: &str) -> RelayProcess {
        let token = format!("imr_{}", hex::encode(Sha256::digest(id.as_bytes())));
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        sqlite(
            &self.db,
            &format!(
                "INSERT INTO relays (id, name, token_hash, created_at) VALUES ('{id}', '{id}', '{hash}', 0)"
            ),
            false,
        )
        .expect("seed the relay credential");
        let ca = self.dir.join(format!("{id}-ca.pem"));
        std::fs::write(&ca, self.ca_pem().await).expect("write the cluster CA");
        let proxy = self.proxy_addr().await;
        let host = self.service_dns();
        let server = format!("https://{host}:{}", proxy.port());
        let resolve = format!("{host}:{}:{}", proxy.port(), proxy.ip());
        let config = self.dir.join(format!("{id}.toml"));
        let bin = workspace_bin("identitymesh-relay");
        let out = Command::new(&bin)
            .args(["enroll", "--server", &server, "--ca-file"])
            .arg(&ca)
            .arg("--config")
            .arg(&config)
            .args(["--resolve", &resolve])
            .env("IDENTITYMESH_RELAY_TOKEN", &token)
            .output()
            .expect("run identitymesh-relay enroll");
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = self.dir.join(format!("{id}.log"));
        let file = std::fs::File::create(&log).expect("relay log");
        let child = Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--resolve", &resolve])
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file)
            .spawn()
            .expect("start identitymesh-relay run");
        RelayProcess {
            child,
            id: id.to_string(),
            token,
            log,
        }
    }

    /// The instance the relay is connected to, as the database records it ("" when none).
    pub fn relay_instance(&self, relay: &RelayProcess) -> String {
        sqlite(
            &self.db,
            &format!(
                "SELECT COALESCE(connected_instance, '') FROM relays WHERE id = '{}'",
                relay.id
            ),
            true,
        )
        .unwrap_or_default()
        .trim()
        .to_string()
    }

    /// Waits until the relay is connected to `pod`; returns how long after `since` it was.
    pub async fn wait_relay_on(
        &self,
        relay: &RelayProcess,
        pod: &str,
        since: Instant,
        what: &str,
    ) -> Duration {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.relay_instance(relay) == pod {
                return since.elapsed();
            }
            if Instant::now() > deadline {
                self.fail(&format!(
                    "{what}: the relay never connected to {pod} (last: {:?})",
                    self.relay_instance(relay)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

//! A real relay agent (`identitymesh-relay`) enrolled and running through the client Service,
//! as a customer runs it: it resolves the Service's DNS name (to the harness's Service proxy)
//! and trusts only the cluster CA.
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::*;
use crate::chaos::relay::RelayProcess;

/// An enrolled relay and its process (killed by pid when dropped).
pub struct Relay {
    pub process: RelayProcess,
    pub id: String,
    /// The credential it enrolled with (tests check it never reaches a log).
    pub token: String,
    pub log: PathBuf,
}

impl Env {
    /// A relay credential seeded the way `POST /api/relays` stores it (only its hash); returns
    /// the token.
    pub fn seed_relay_credential(&self, id: &str) -> String {
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
        token
    }

    /// Enrolls relay `id` with `token` through the Service and starts it (`env` added to its
    /// environment; output in `<test dir>/<id>.log`).
    pub async fn enroll_relay(&mut self, id: &str, token: &str, env: &[(String, String)]) -> Relay {
        let ca = self.dir.join(format!("{id}-ca.pem"));
        std::fs::write(&ca, self.ca_pem().await).expect("write the cluster CA");
        let proxy = self.proxy_addr().await;
        let host = self.service_dns();
        let server = format!("https://{host}:{}", proxy.port());
        let resolve = format!("{host}:{}:{}", proxy.port(), proxy.ip());
        let config = self.dir.join(format!("{id}.toml"));
        let bin = workspace_bin("identitymesh-relay");
        let out = std::process::Command::new(&bin)
            .args(["enroll", "--server", &server, "--ca-file"])
            .arg(&ca)
            .arg("--config")
            .arg(&config)
            .args(["--resolve", &resolve])
            .env("IDENTITYMESH_RELAY_TOKEN", token)
            .output()
            .expect("run identitymesh-relay enroll");
        assert!(
            out.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = self.dir.join(format!("{id}.log"));
        let args: Vec<String> = vec![
            "run".into(),
            "--config".into(),
            config.display().to_string(),
            "--resolve".into(),
            resolve,
        ];
        let process =
            RelayProcess::start(&bin, &args, env, &log).expect("start identitymesh-relay run");
        Relay {
            process,
            id: id.to_string(),
            token: token.to_string(),
            log,
        }
    }

    /// A seeded credential, enrolled and started.
    pub async fn start_relay(&mut self, id: &str) -> Relay {
        let token = self.seed_relay_credential(id);
        self.enroll_relay(id, &token, &[]).await
    }

    /// The instance the relay is connected to, as the database records it ("" when none).
    pub fn relay_instance(&self, relay: &Relay) -> String {
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
        relay: &Relay,
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

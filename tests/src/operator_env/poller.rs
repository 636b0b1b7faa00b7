//! A client polling the client Service, as users and scripts do, recording every answer.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

/// How often the poller asks.
pub const POLL: Duration = Duration::from_millis(50);

/// One request: when it was sent, whether an *active* server answered 200, with which epoch.
#[derive(Clone, Debug)]
pub struct Probe {
    pub at: Instant,
    pub ok: bool,
    pub epoch: i64,
    /// What went wrong, for a failed request.
    pub error: Option<String>,
}

/// Polls `GET /api/instances` through the Service every [`POLL`] until dropped, as an Admin API
/// client with a bearer token, recording each answer. A request fails unless it got 200 (from
/// whichever pod, forwarded or not): connection refused or reset, a TLS or HTTP error, a
/// timeout, or an error answer. The epoch recorded is the active row's.
pub struct Poller {
    probes: Arc<Mutex<Vec<Probe>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Poller {
    pub fn start(addr: std::net::SocketAddr, sni: String, ca: String, token: String) -> Poller {
        let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
        let p = probes.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(POLL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let at = Instant::now();
                // Longer than a request the demoted pod holds between demote and promote: a
                // held request is a slow answer, not a failure.
                let r = https_request(
                    addr,
                    &sni,
                    &ca,
                    "GET",
                    "/api/instances",
                    Some(&token),
                    None,
                    Duration::from_secs(20),
                )
                .await;
                let (ok, epoch, error) = match r {
                    Ok((200, body)) => (true, active_epoch(&body), None),
                    Ok((code, body)) => (false, -1, Some(format!("{code}: {body}"))),
                    Err(e) => (false, -1, Some(e)),
                };
                p.lock().unwrap_or_else(|e| e.into_inner()).push(Probe {
                    at,
                    ok,
                    epoch,
                    error,
                });
            }
        });
        Poller { probes, task }
    }

    /// The requests sent at or after `from`.
    pub fn since(&self, from: Instant) -> Vec<Probe> {
        let g = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        g.iter().filter(|p| p.at >= from).cloned().collect()
    }

    /// The failing window after `fault`: from the first failed request to the first answer
    /// after the last failed one; zero when none failed. None until an answer showed the new
    /// active's `epoch` (and, after failures, until one came after them). An answer with the new
    /// epoch can come before failures (a fenced pod reads the new fence from the database while
    /// the Service still sends it traffic), so the window spans every failure, not only those
    /// before that first answer.
    pub fn outage(&self, fault: Instant, epoch: i64) -> Option<Duration> {
        let after = self.since(fault);
        after.iter().find(|p| p.ok && p.epoch == epoch)?;
        let Some(first) = after.iter().find(|p| !p.ok) else {
            return Some(Duration::ZERO);
        };
        let last = after.iter().rev().find(|p| !p.ok).unwrap_or(first);
        let back = after.iter().find(|p| p.ok && p.at > last.at)?;
        Some(back.at - first.at)
    }

    /// Failed requests sent at or after `from`.
    pub fn failures_since(&self, from: Instant) -> Vec<Probe> {
        self.since(from).into_iter().filter(|p| !p.ok).collect()
    }
}

/// The epoch of the active row of a `GET /api/instances` answer (-1 when none).
fn active_epoch(body: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    let rows = v
        .as_array()
        .or_else(|| v["instances"].as_array())
        .cloned()
        .unwrap_or_default();
    rows.iter()
        .filter(|r| r["role"] == "active")
        .filter_map(|r| r["epoch"].as_i64())
        .max()
        .unwrap_or(-1)
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Env {
    /// A [`Poller`] of this cluster's client Service, through the Service proxy, with `token`.
    pub async fn poll_service(&mut self, token: &str) -> Poller {
        let addr = self.proxy_addr().await;
        let ca = self.ca_pem().await;
        Poller::start(addr, self.service_dns(), ca, token.to_string())
    }
}

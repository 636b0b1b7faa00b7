//! The reconnect loop: connect forever, with full-jitter backoff, until told to stop.

use crate::config::RelaySettings;
use crate::connect::{ConnectError, Connector};
use crate::handlers::HandlerRegistry;
use crate::session::{Session, SessionEnd};
use rand::SeedableRng as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A session shorter than this does not reset the backoff, so a server that accepts and then
/// drops us at once is not hammered.
const STABLE_SESSION: Duration = Duration::from_secs(5);

/// Counters for diagnostics and benchmarks.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub attempts: AtomicU64,
    pub connects: AtomicU64,
}

/// A lost session usually means every relay of that server lost it at the same instant (crash,
/// node loss). The first retry is therefore spread over [0, quick_max] rather than the much
/// denser [0, base], and the backoff continues from the matching step, so the storm of
/// attempts stays flat.
fn after_loss(
    retry: &crate::backoff::RetryPolicy,
    failures: &mut u32,
    rng: &mut rand::rngs::StdRng,
) -> Duration {
    let step = (0..20)
        .find(|&a| crate::backoff::ceiling(a, retry.base, retry.cap) >= retry.quick_max)
        .unwrap_or(0);
    *failures = (*failures).max(step) + 1;
    retry.after_close_with_reconnect(rng)
}

pub struct Agent {
    connector: Connector,
    handlers: HandlerRegistry,
    stats: Arc<AgentStats>,
}

impl Agent {
    pub fn new(
        settings: RelaySettings,
        handlers: HandlerRegistry,
    ) -> Result<Self, crate::tls::TlsSetupError> {
        Ok(Self {
            connector: Connector::new(Arc::new(settings))?,
            handlers,
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<AgentStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` becomes true (or its sender is dropped).
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let s = self.connector.settings();
        let retry = s.retry.clone();
        let ep = &s.endpoint;
        // Seeded from the OS so every relay draws different delays.
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut failures: u32 = 0;
        let mut auth_failures: u32 = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            self.stats.attempts.fetch_add(1, Ordering::Relaxed);
            let delay = tokio::select! {
                biased;
                _ = shutdown.changed() => return,
                r = self.connector.connect() => match r {
                    Ok(conn) => {
                        self.stats.connects.fetch_add(1, Ordering::Relaxed);
                        auth_failures = 0;
                        tracing::info!(host = %ep.host, addr = %conn.addr, connection = %conn.connection_id, "connected to hub");
                        let started = Instant::now();
                        let session = Session {
                            handlers: &self.handlers,
                            keep_alive: s.keep_alive,
                            server_timeout: s.server_timeout,
                        };
                        let end = session.run(conn, &mut shutdown).await;
                        if started.elapsed() >= STABLE_SESSION {
                            failures = 0;
                        }
                        match end {
                            SessionEnd::Shutdown => return,
                            SessionEnd::ServerClosed { error, allow_reconnect: true } => {
                                tracing::info!(error = ?error, "hub closed the connection with allowReconnect; reconnecting");
                                retry.after_close_with_reconnect(&mut rng)
                            }
                            SessionEnd::ServerClosed { error, allow_reconnect: false } => {
                                tracing::warn!(error = ?error, "hub closed the connection (no reconnect allowed, e.g. credential revoked); retrying slowly");
                                auth_failures += 1;
                                retry.after_auth_failure(auth_failures - 1, &mut rng)
                            }
                            SessionEnd::ServerTimeout => {
                                tracing::warn!(timeout = ?s.server_timeout, "no message from the hub within the timeout; reconnecting");
                                after_loss(&retry, &mut failures, &mut rng)
                            }
                            SessionEnd::Lost(reason) => {
                                tracing::warn!(%reason, "hub connection lost; reconnecting");
                                after_loss(&retry, &mut failures, &mut rng)
                            }
                        }
                    }
                    Err(e) => self.failure_delay(&e, &mut failures, &mut auth_failures, &mut rng),
                }
            };
            tracing::debug!(?delay, "waiting before the next connection attempt");
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn failure_delay(
        &self,
        e: &ConnectError,
        failures: &mut u32,
        auth_failures: &mut u32,
        rng: &mut rand::rngs::StdRng,
    ) -> Duration {
        let retry = &self.connector.settings().retry;
        if e.is_auth() {
            *auth_failures += 1;
            let d = retry.after_auth_failure(*auth_failures - 1, rng);
            tracing::error!(error = %e, retry_in = ?d, "relay credential rejected");
            d
        } else {
            *failures += 1;
            let d = retry.after_failure(*failures - 1, rng);
            match e {
                ConnectError::UntrustedCertificate { .. } => {
                    tracing::error!(error = %e, retry_in = ?d, "cannot connect to hub")
                }
                _ => {
                    tracing::warn!(error = %e, attempt = *failures, retry_in = ?d, "cannot connect to hub")
                }
            }
            d
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_retry_after_a_lost_session_is_spread_over_quick_max() {
        let retry = crate::backoff::RetryPolicy::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut max_seen = Duration::ZERO;
        for _ in 0..1000 {
            let mut failures = 0;
            let d = after_loss(&retry, &mut failures, &mut rng);
            assert!(d <= retry.quick_max);
            max_seen = max_seen.max(d);
            // The next failure continues at the step whose ceiling is >= quick_max.
            assert!(
                crate::backoff::ceiling(failures - 1, retry.base, retry.cap) >= retry.quick_max
            );
        }
        assert!(
            max_seen > retry.quick_max / 2,
            "spread over the whole window"
        );
    }
}

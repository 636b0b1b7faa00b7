//! Reconnect delays. Full jitter (AWS "Exponential Backoff And Jitter"): the delay is uniform
//! in [0, min(cap, base * 2^attempt)], so relays that lost the server at the same instant do
//! not come back in lock-step.

use rand::Rng;
use std::time::Duration;

/// Upper bound of the delay before retry number `attempt` (0-based).
pub fn ceiling(attempt: u32, base: Duration, cap: Duration) -> Duration {
    // 2^20 × any sane base is far past any cap; clamping the shift avoids overflow.
    let factor = 1u32 << attempt.min(20);
    base.saturating_mul(factor).min(cap)
}

/// Full-jitter delay before retry number `attempt`.
pub fn full_jitter<R: Rng + ?Sized>(
    attempt: u32,
    base: Duration,
    cap: Duration,
    rng: &mut R,
) -> Duration {
    let max = ceiling(attempt, base, cap).as_millis() as u64;
    Duration::from_millis(rng.gen_range(0..=max))
}

/// Retry timing of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
    /// After the server closed with allowReconnect (shutdown, demotion): uniform in [0, this].
    pub quick_max: Duration,
    /// After 401/403: at least this long, so a revoked relay does not hammer the server.
    pub auth_failure_min: Duration,
    pub auth_failure_cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            // Bounds how long a relay can lag behind a server that is back: 8 s keeps 1,000
            // relays within 10 s of readiness while spreading them over several seconds.
            cap: Duration::from_secs(8),
            quick_max: Duration::from_secs(2),
            auth_failure_min: Duration::from_secs(30),
            auth_failure_cap: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    pub fn after_failure<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        full_jitter(attempt, self.base, self.cap, rng)
    }

    pub fn after_close_with_reconnect<R: Rng + ?Sized>(&self, rng: &mut R) -> Duration {
        Duration::from_millis(rng.gen_range(0..=self.quick_max.as_millis() as u64))
    }

    pub fn after_auth_failure<R: Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        self.auth_failure_min
            + full_jitter(
                attempt,
                self.auth_failure_min,
                self.auth_failure_cap.saturating_sub(self.auth_failure_min),
                rng,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    const BASE: Duration = Duration::from_millis(500);
    const CAP: Duration = Duration::from_secs(8);

    #[test]
    fn ceiling_doubles_then_caps_without_overflow() {
        assert_eq!(ceiling(0, BASE, CAP), Duration::from_millis(500));
        assert_eq!(ceiling(1, BASE, CAP), Duration::from_secs(1));
        assert_eq!(ceiling(3, BASE, CAP), Duration::from_secs(4));
        assert_eq!(ceiling(4, BASE, CAP), CAP);
        assert_eq!(ceiling(u32::MAX, BASE, CAP), CAP);
        assert_eq!(ceiling(63, Duration::MAX, CAP), CAP);
    }

    #[test]
    fn delays_stay_within_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempt in 0..40 {
            for _ in 0..200 {
                let d = full_jitter(attempt, BASE, CAP, &mut rng);
                assert!(d <= ceiling(attempt, BASE, CAP), "attempt {attempt}: {d:?}");
            }
        }
        let p = RetryPolicy::default();
        for a in 0..20 {
            let d = p.after_auth_failure(a, &mut rng);
            assert!(d >= p.auth_failure_min && d <= p.auth_failure_cap, "{d:?}");
            assert!(p.after_close_with_reconnect(&mut rng) <= p.quick_max);
        }
    }

    #[test]
    fn capped_delays_spread_over_the_whole_range() {
        // 10,000 relays at the cap: the delays must cover [0, cap] roughly uniformly, which is
        // what keeps a reconnect storm flat instead of a spike.
        let mut rng = StdRng::seed_from_u64(42);
        let n = 10_000;
        let buckets = 8;
        let mut hist = vec![0usize; buckets];
        let mut sum = 0u128;
        for _ in 0..n {
            let d = full_jitter(10, BASE, CAP, &mut rng);
            sum += d.as_millis();
            let b = ((d.as_millis() * buckets as u128) / (CAP.as_millis() + 1)) as usize;
            hist[b] += 1;
        }
        let expected = n / buckets;
        for (i, &c) in hist.iter().enumerate() {
            assert!(
                c > expected * 8 / 10 && c < expected * 12 / 10,
                "bucket {i} has {c}, expected about {expected}: {hist:?}"
            );
        }
        let mean = sum / n as u128;
        assert!((3600..=4400).contains(&mean), "mean {mean} ms");
        // No single millisecond is shared by a large group (no lock-step).
        let mut same = std::collections::HashMap::new();
        for _ in 0..n {
            *same
                .entry(full_jitter(10, BASE, CAP, &mut rng))
                .or_insert(0) += 1;
        }
        assert!(same.values().all(|&c| c < 20));
    }
}

//! Failed relay authentications, counted per source address: past the limit in a window, that
//! address is answered 429 before its credential is checked, so guessing costs the server no
//! database lookups. The table is bounded; when full, the oldest window goes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

pub struct AuthFailures {
    limit: u32,
    window: Duration,
    capacity: usize,
    /// Address → (start of its window, failures in it).
    seen: HashMap<IpAddr, (Instant, u32)>,
}

impl AuthFailures {
    pub fn new(limit: u32, window: Duration, capacity: usize) -> Self {
        Self {
            limit,
            window,
            capacity: capacity.max(1),
            seen: HashMap::new(),
        }
    }

    /// How long until `ip` may try again, when it is over the limit.
    pub fn blocked(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let (start, n) = self.seen.get(&ip)?;
        let ends = *start + self.window;
        (n >= &self.limit && now < ends).then(|| ends - now)
    }

    pub fn failed(&mut self, ip: IpAddr, now: Instant) {
        if !self.seen.contains_key(&ip) && self.seen.len() >= self.capacity {
            self.seen.retain(|_, (start, _)| now < *start + self.window);
            if self.seen.len() >= self.capacity {
                if let Some(oldest) = self
                    .seen
                    .iter()
                    .min_by_key(|(_, (s, _))| *s)
                    .map(|(k, _)| *k)
                {
                    self.seen.remove(&oldest);
                }
            }
        }
        let e = self.seen.entry(ip).or_insert((now, 0));
        if now >= e.0 + self.window {
            *e = (now, 0);
        }
        e.1 += 1;
    }

    /// A success clears the address's count (a relay that mistyped once is not held back).
    pub fn succeeded(&mut self, ip: IpAddr) {
        self.seen.remove(&ip);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[test]
    fn an_address_over_the_limit_waits_for_its_window() {
        let t0 = Instant::now();
        let mut f = AuthFailures::new(3, Duration::from_secs(10), 100);
        for _ in 0..2 {
            f.failed(ip(1), t0);
        }
        assert_eq!(f.blocked(ip(1), t0), None);
        f.failed(ip(1), t0);
        assert_eq!(f.blocked(ip(1), t0), Some(Duration::from_secs(10)));
        assert_eq!(
            f.blocked(ip(1), t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(
            f.blocked(ip(2), t0),
            None,
            "other addresses are not affected"
        );
        assert_eq!(f.blocked(ip(1), t0 + Duration::from_secs(10)), None);
        // A new window starts from zero.
        f.failed(ip(1), t0 + Duration::from_secs(11));
        assert_eq!(f.blocked(ip(1), t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn a_success_clears_the_count() {
        let t0 = Instant::now();
        let mut f = AuthFailures::new(2, Duration::from_secs(10), 100);
        f.failed(ip(1), t0);
        f.succeeded(ip(1));
        f.failed(ip(1), t0);
        assert_eq!(f.blocked(ip(1), t0), None);
    }

    #[test]
    fn the_table_stays_bounded() {
        let t0 = Instant::now();
        let mut f = AuthFailures::new(2, Duration::from_secs(10), 8);
        for n in 0..200u8 {
            f.failed(ip(n), t0 + Duration::from_millis(n as u64));
        }
        assert!(f.len() <= 8, "{}", f.len());
        // The newest addresses are kept.
        f.failed(ip(199), t0 + Duration::from_millis(300));
        assert!(f
            .blocked(ip(199), t0 + Duration::from_millis(300))
            .is_some());
    }
}

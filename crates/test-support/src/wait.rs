//! Waiting for a condition in tests: poll until it holds or a deadline passes, then fail with
//! what was awaited.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every `every` until it returns true; panics naming `what` after `within`.
pub async fn eventually_every<F, Fut>(within: Duration, every: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// [`eventually_every`] at 100 ms.
pub async fn eventually<F, Fut>(within: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_every(within, Duration::from_millis(100), what, check).await
}

/// For a condition read without awaiting (a counter, a flag): polls `f` every 20 ms until it
/// holds; panics naming `what` after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    eventually_every(timeout, Duration::from_millis(20), what, || {
        let held = f();
        async move { held }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_check_holds() {
        let n = AtomicU32::new(0);
        eventually_every(
            Duration::from_secs(5),
            Duration::from_millis(1),
            "three polls",
            || {
                let v = n.fetch_add(1, Ordering::SeqCst);
                async move { v >= 2 }
            },
        )
        .await;
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for: never")]
    async fn fails_naming_what_it_waited_for() {
        eventually_every(
            Duration::from_millis(20),
            Duration::from_millis(5),
            "never",
            || async { false },
        )
        .await;
    }
}

//! Loopback ports for fixtures that start a server of their own.

use std::net::TcpListener;

/// A loopback port that was free a moment ago (bound, then released). Another process can take
/// it before the caller binds it; fixtures that care retry their bind.
pub fn try_free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// [`try_free_port`] for tests, where no free port means the machine is unusable.
pub fn free_port() -> u16 {
    try_free_port().unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Binds `127.0.0.1:port` (non-blocking, for tokio), retrying for up to 5 s: a server the test
/// killed may hold the port for a moment. Port 0 picks a free one.
pub fn bind_retry(port: u16) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => {
                l.set_nonblocking(true)
                    .unwrap_or_else(|e| panic!("non-blocking 127.0.0.1:{port}: {e}"));
                return l;
            }
            Err(_) if tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_free_port_can_be_bound() {
        let p = super::free_port();
        assert_ne!(p, 0);
        std::net::TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
    }

    #[test]
    fn bind_retry_waits_for_a_port_to_be_released() {
        let held = super::bind_retry(0);
        let port = held.local_addr().unwrap().port();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        let again = super::bind_retry(port);
        assert_eq!(again.local_addr().unwrap().port(), port);
        release.join().unwrap();
    }
}

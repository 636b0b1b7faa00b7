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

#[cfg(test)]
mod tests {
    #[test]
    fn a_free_port_can_be_bound() {
        let p = super::free_port();
        assert_ne!(p, 0);
        std::net::TcpListener::bind(("127.0.0.1", p)).expect("the port is free");
    }
}

//! Fixtures for tests and benches that need real third-party systems on loopback.
//!
//! - [`keycloak`]: a Keycloak server fetched from Maven Central, started per test with its own
//!   data, and a small admin REST client (realms, LDAP user federation, sync, counts).
//! - [`browser`]: Debian's headless chromium driven by playwright-core (tests/browser/driver.mjs),
//!   step by step, with screenshots in a run directory.
//! - [`procfs`]: memory and CPU figures of a process, for benches.
//! - [`net`], [`pki`], [`wait`]: a free loopback port, test certificates (a CA with serving and
//!   client certificates, self-signed leaves), and polling until a condition holds.

pub mod browser;
pub mod keycloak;
pub mod net;
pub mod pki;
pub mod procfs;
pub mod wait;

//! A real Keycloak for tests and benches.
//!
//! - [`Distribution::ensure`] fetches `org.keycloak:keycloak-quarkus-dist` from Maven Central
//!   with `mvn`, unzips it and pre-builds it (`kc.sh build`) once under
//!   `~/.cache/identitymesh/keycloak/<version>/`; a stamp makes later calls instant.
//! - [`Keycloak::start`] runs `kc.sh start --optimized` with development settings: HTTP on
//!   127.0.0.1 and a free port, a local (non-clustered) cache, an H2 file database and a data
//!   folder of its own, the bootstrap admin from the environment, extra CAs trusted through
//!   `--truststore-paths`, and optionally HTTPS beside HTTP with a given certificate
//!   ([`Options::https`]). Stopped by its process group on [`Keycloak::stop`] and on drop.
//! - [`Admin`] is the admin REST client: realms, LDAP user federation and its group mapper,
//!   synchronisation, user and group counts.
//!
//! Keycloak makes no outbound connection in this setup other than to the LDAP URLs it is given.

mod admin;
mod dist;
mod ldap;
pub mod realm;
mod server;

pub use admin::{Admin, SyncResult};
pub use dist::Distribution;
pub use ldap::{EditMode, GroupMapper, LdapFederation};
pub use server::{Https, Keycloak, Options};

/// The Keycloak release the fixture fetches.
pub const VERSION: &str = "26.5.6";
/// The JDK Keycloak runs on (Keycloak 26 needs Java 21 or later).
pub const DEFAULT_JAVA_HOME: &str = "/usr/lib/jvm/temurin-25-jdk-amd64";

#[derive(Debug, thiserror::Error)]
pub enum KeycloakError {
    #[error("keycloak fixture: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("keycloak fixture: {0}")]
    Fetch(String),
    #[error("keycloak fixture: {0}")]
    Start(String),
    #[error("keycloak admin API: {what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("keycloak admin API: {what}: HTTP {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("keycloak admin API: {what}: unexpected answer: {body}")]
    Answer { what: String, body: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KeycloakError {
    let what = what.into();
    move |source| KeycloakError::Io { what, source }
}

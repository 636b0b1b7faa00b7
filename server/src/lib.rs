//! IdentityMesh server: Admin API, Sync Engine roles and fencing, stores, TLS.
//! The contract with pods and the operator is in `server/README.md`.

pub mod api;
pub mod app;
pub mod auth;
pub mod config;
pub mod engine;
pub mod forward;
pub mod fsutil;
pub mod hub;
pub mod licence;
pub mod logging;
pub mod problem;
pub mod secrets;
pub mod serve;
pub mod session;
pub mod state;
pub mod store;
pub mod sync;
#[cfg(test)]
pub(crate) mod testing;
pub mod tls;
pub mod ui;
#[cfg(windows)]
pub mod winsvc;

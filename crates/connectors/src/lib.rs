//! Directory connectors shared by the server (direct runs) and the relay (relay-bound runs).
//! A connector reads objects of one object type and hands them over in pages; it never writes
//! to the store, so the same code runs in either process.

pub mod csv;
pub mod error;
pub mod ldap;
pub mod model;
pub mod roots;
#[cfg(feature = "testing")]
pub mod testing;

pub use crate::csv::{CsvConfig, CsvConnector};
pub use crate::error::{ConfigProblem, ConnectorError, TestReport, TestStep};
pub use crate::ldap::{
    LdapConfig, LdapConnector, ObjectTypeConfig, SearchScope, WatermarkAttribute,
};

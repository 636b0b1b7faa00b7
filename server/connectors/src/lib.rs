//! Directory connectors shared by the server (direct runs) and the relay (relay-bound runs).
//! A connector reads objects of one object type and hands them over in pages; it never writes
//! to the store, so the same code runs in either process.

pub mod model;

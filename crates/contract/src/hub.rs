//! The hub methods the server invokes on a relay (SignalR invocation targets).

/// Stream one import of a directory: `(connector, mode, watermark)`; items are pages.
pub const DIRECTORY_IMPORT: &str = "DirectoryImport";
/// Test a connector's connection from the relay: `(connector)`.
pub const DIRECTORY_TEST: &str = "DirectoryTest";
/// Check that a CSV drop folder exists and is readable on the relay's host: `(folder)`.
pub const DIRECTORY_CHECK_FOLDER: &str = "DirectoryCheckFolder";

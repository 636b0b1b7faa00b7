//! Errors of the harness. Each says what went wrong and, where it helps, what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{tool} not found at {path}: run `cargo xtask tools` to build the control-plane tools"
    )]
    ToolMissing { tool: String, path: PathBuf },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate generation: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("timed out after {seconds:.1}s waiting for {what}")]
    Timeout { what: String, seconds: f64 },
    /// A control-plane process exited while starting (see its log in the run dir).
    #[error("{0}")]
    StartupExit(String),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds a human context to io errors.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

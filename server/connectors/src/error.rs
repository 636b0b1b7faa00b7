//! Errors and reports shared by every connector. Each error says what went wrong and what the
//! operator can do about it; none of them ever carries a password.

use serde::{Deserialize, Serialize};

/// One configuration problem, with the JSON path of the offending field
/// (`object_types.people.base_dn`), so the Admin API can point at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigProblem {
    pub path: String,
    pub message: String,
}

impl ConfigProblem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

fn join_problems(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The configuration is invalid; every problem is listed.
    #[error("invalid connector configuration: {}", join_problems(.0))]
    Config(Vec<ConfigProblem>),

    /// No TCP connection (refused, unreachable, name not resolved).
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },

    /// The TLS handshake (LDAPS or StartTLS) failed.
    #[error("TLS with {url} failed: {reason}")]
    Tls { url: String, reason: String },

    /// The directory refused the bind.
    #[error("bind as \"{dn}\" failed: {reason}")]
    Bind { dn: String, reason: String },

    /// A search failed (bad base DN, filter refused, limits, lost connection).
    #[error("search for object type \"{object_type}\" failed: {reason}")]
    Search { object_type: String, reason: String },

    /// The directory did not answer in time.
    #[error("timed out after {timeout_ms} ms while {during}; check that the directory is reachable and responsive, or raise timeout_ms")]
    Timeout { during: String, timeout_ms: u64 },

    /// The caller asked for an object type the connector is not configured for.
    #[error("unknown object type \"{requested}\"; this connector is configured for: {}", .configured.join(", "))]
    UnknownObjectType {
        requested: String,
        configured: Vec<String>,
    },

    /// A file source (CSV drop folder, file) cannot be read or is unusable as a whole.
    #[error("{path}: {reason}")]
    Source { path: String, reason: String },

    /// The watermark handed in for a delta import cannot be used.
    #[error(
        "invalid watermark \"{watermark}\": {reason}; run a full import to get a fresh watermark"
    )]
    Watermark { watermark: String, reason: String },

    /// The page receiver went away (the run was cancelled or failed elsewhere).
    #[error("import cancelled: the page receiver was closed")]
    Cancelled,
}

impl ConnectorError {
    /// A short stable name for the error class, for run records and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectorError::Config(_) => "config",
            ConnectorError::Connect { .. } => "connect",
            ConnectorError::Tls { .. } => "tls",
            ConnectorError::Bind { .. } => "bind",
            ConnectorError::Search { .. } => "search",
            ConnectorError::Timeout { .. } => "timeout",
            ConnectorError::UnknownObjectType { .. } => "unknown_object_type",
            ConnectorError::Source { .. } => "source",
            ConnectorError::Watermark { .. } => "watermark",
            ConnectorError::Cancelled => "cancelled",
        }
    }
}

/// What a connection test found, step by step, for the Admin API to show.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestReport {
    pub steps: Vec<TestStep>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestStep {
    /// `connect`, `bind`, `root_dse`, `object_type:people`, `folder`, …
    pub name: String,
    /// What worked, in words (`bound as cn=sync,dc=example,dc=org`).
    pub detail: String,
}

impl TestReport {
    pub(crate) fn push(&mut self, name: impl Into<String>, detail: impl Into<String>) {
        self.steps.push(TestStep {
            name: name.into(),
            detail: detail.into(),
        });
    }
}

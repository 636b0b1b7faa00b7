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

/// Characters of source data one error message may quote: enough to recognise a column
/// name, too few to carry a token or key that a misconfigured source happened to read.
pub const EXCERPT_CHARS: usize = 12;

/// A short, escaped excerpt of source data for an error message: at most [`EXCERPT_CHARS`]
/// characters, control and quote characters escaped, `…` where it was cut. Error messages end
/// up in run records, per-object errors and Events, which more people can read than the
/// source.
pub fn excerpt(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(EXCERPT_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(EXCERPT_CHARS).is_some() {
        out.push('…');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_short_and_escaped() {
        assert_eq!(excerpt("mail"), "mail");
        assert_eq!(excerpt(""), "");
        let token = "imt_4f9c2b7e1d8a6f3c0b5e9d2a7c4f1b8e";
        let e = excerpt(token);
        assert_eq!(e, "imt_4f9c2b7e…");
        assert!(!e.contains(&token[EXCERPT_CHARS..]));
        assert_eq!(excerpt("a\"b\nc"), "a\\\"b\\nc");
        // Counted in characters, not bytes: never cut inside one.
        assert_eq!(excerpt("Größe日本語のカラム名です"), "Größe日本語のカラム…");
    }
}

//! CSV drop-folder connector. Every file in the folder matching `pattern` (in name order) is
//! read as one full snapshot of the object type; the header row names the attributes.
//!
//! CSV has no change marker, so a delta import reads the same full snapshot as a full import
//! and the summary carries no watermark.
//!
//! A bad row is reported as a [`Rejected`] (`file.csv:LINE`, the 1-based physical line the row
//! starts on) and the rest is imported. A problem with a whole file (no header, no anchor
//! column, duplicate column names) fails the import instead: skipping a file would make every
//! object in it look deleted.
//!
//! Each file is read into memory whole (drop files are snapshots, typically tens of MB at
//! most); pages still go out through the bounded channel one at a time.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use encoding_rs::Encoding;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Sender;

use crate::error::{excerpt, ConfigProblem, ConnectorError, TestReport};
use crate::model::{Attributes, ConnectorObject, ImportMode, ImportSummary, Page, Rejected, Value};
use crate::roots::DropRoots;

/// Objects per page.
const PAGE_OBJECTS: usize = 500;

fn default_pattern() -> String {
    "*.csv".into()
}
fn default_delimiter() -> char {
    ','
}
fn default_encoding() -> String {
    "utf-8".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CsvConfig {
    /// The drop folder.
    pub folder: PathBuf,
    /// File-name glob: `*` any run of characters, `?` one character.
    #[serde(default = "default_pattern")]
    pub pattern: String,
    /// The object type the files hold.
    pub object_type: String,
    /// The column whose value is the anchor.
    pub anchor_column: String,
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// An encoding label: utf-8, windows-1252, iso-8859-1 (read as windows-1252, as browsers
    /// do), utf-16le, utf-16be, or any other WHATWG label.
    #[serde(default = "default_encoding")]
    pub encoding: String,
    /// Splits a cell into several values (e.g. `;` for `a@x;b@x`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_value_separator: Option<char>,
}

impl CsvConfig {
    /// Every problem in the configuration, each with its field path.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        if self.folder.as_os_str().is_empty() {
            p.push(ConfigProblem::new(
                "folder",
                "is empty; give the drop folder's path",
            ));
        }
        if self.pattern.is_empty() || self.pattern.contains(['/', '\\']) {
            p.push(ConfigProblem::new(
                "pattern",
                "must be a file-name pattern such as *.csv (no folder separators)",
            ));
        }
        if self.object_type.trim().is_empty() {
            p.push(ConfigProblem::new(
                "object_type",
                "is empty; name the object type the files hold (e.g. people)",
            ));
        }
        if self.anchor_column.trim().is_empty() {
            p.push(ConfigProblem::new(
                "anchor_column",
                "is empty; name the column that identifies a row (e.g. employeeId)",
            ));
        }
        if !self.delimiter.is_ascii() || matches!(self.delimiter, '"' | '\n' | '\r') {
            p.push(ConfigProblem::new(
                "delimiter",
                format!(
                    "{:?} cannot be used; use one ASCII character other than a quote or line break, e.g. , or ; or a tab",
                    self.delimiter
                ),
            ));
        }
        if Encoding::for_label(self.encoding.as_bytes()).is_none() {
            p.push(ConfigProblem::new(
                "encoding",
                format!(
                    "\"{}\" is not a known encoding; use utf-8, windows-1252, iso-8859-1 or utf-16le",
                    self.encoding
                ),
            ));
        }
        if let Some(sep) = self.multi_value_separator {
            if sep == self.delimiter || matches!(sep, '"' | '\n' | '\r') {
                p.push(ConfigProblem::new(
                    "multi_value_separator",
                    format!("{sep:?} cannot be used; pick a character other than the delimiter, a quote or a line break"),
                ));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }
}

/// Reads a CSV drop folder.
#[derive(Debug, Clone)]
pub struct CsvConnector {
    cfg: CsvConfig,
    encoding: &'static Encoding,
    /// When set, the folder and every file read must resolve inside these (the server's
    /// drop roots); checked on every read, since a folder can change under a saved connector.
    roots: Option<DropRoots>,
}

impl CsvConnector {
    pub fn new(cfg: CsvConfig) -> Result<Self, ConnectorError> {
        cfg.validate().map_err(ConnectorError::Config)?;
        let encoding = Encoding::for_label(cfg.encoding.as_bytes()).ok_or_else(|| {
            ConnectorError::Config(vec![ConfigProblem::new("encoding", "unknown encoding")])
        })?;
        Ok(Self {
            cfg,
            encoding,
            roots: None,
        })
    }

    /// Confines every read to `roots`.
    pub fn with_roots(mut self, roots: DropRoots) -> Self {
        self.roots = Some(roots);
        self
    }

    pub fn config(&self) -> &CsvConfig {
        &self.cfg
    }

    fn folder_display(&self) -> String {
        self.cfg.folder.display().to_string()
    }

    /// The matching files, sorted by name.
    async fn files(&self) -> Result<Vec<PathBuf>, ConnectorError> {
        let folder = match &self.roots {
            Some(roots) => {
                roots
                    .resolve(&self.cfg.folder)
                    .map_err(|reason| ConnectorError::Source {
                        path: "folder".into(),
                        reason,
                    })?
            }
            None => self.cfg.folder.clone(),
        };
        let pattern = self.cfg.pattern.clone();
        let listed = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<PathBuf>> {
            let mut out = Vec::new();
            for entry in std::fs::read_dir(&folder)? {
                let entry = entry?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                // Regular files only: a symlink is not followed out of the folder.
                if glob_match(&pattern, name) && entry.file_type()?.is_file() {
                    out.push(entry.path());
                }
            }
            out.sort();
            Ok(out)
        })
        .await
        .map_err(|e| ConnectorError::Source {
            path: self.folder_display(),
            reason: format!("listing the folder failed: {e}"),
        })?;
        listed
            .map_err(|e| ConnectorError::Source {
                path: self.folder_display(),
                reason: match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        "the CSV drop folder does not exist; create it or fix folder".into()
                    }
                    std::io::ErrorKind::PermissionDenied => {
                        "the CSV drop folder is not readable; grant the service read access".into()
                    }
                    _ => format!("cannot read the CSV drop folder: {e}"),
                },
            })
            .and_then(|files| self.confined(files))
    }

    /// The files, if each is inside the roots (when confined): a file swapped for a link
    /// after the listing still cannot be read from outside them.
    fn confined(&self, files: Vec<PathBuf>) -> Result<Vec<PathBuf>, ConnectorError> {
        let Some(roots) = &self.roots else {
            return Ok(files);
        };
        match files.iter().find(|f| !roots.contains(f)) {
            Some(f) => Err(ConnectorError::Source {
                path: f.display().to_string(),
                reason: format!(
                    "resolves outside the allowed CSV drop roots ({}); refused",
                    roots.describe()
                ),
            }),
            None => Ok(files),
        }
    }

    /// Folder readable, and how many files match.
    pub async fn test_connection(&self) -> Result<TestReport, ConnectorError> {
        let files = self.files().await?;
        let mut r = TestReport::default();
        r.push(
            "folder",
            format!(
                "{} is readable; {} file(s) match {}",
                self.folder_display(),
                files.len(),
                self.cfg.pattern
            ),
        );
        Ok(r)
    }

    /// Reads every matching file as one snapshot; see the module docs. `mode` is accepted for
    /// symmetry with the LDAP connector: a delta is a full read.
    pub async fn import(
        &self,
        object_type: &str,
        _mode: &ImportMode,
        tx: Sender<Page>,
    ) -> Result<ImportSummary, ConnectorError> {
        if object_type != self.cfg.object_type {
            return Err(ConnectorError::UnknownObjectType {
                requested: object_type.to_string(),
                configured: vec![self.cfg.object_type.clone()],
            });
        }
        let mut state = ImportState {
            seen: HashMap::new(),
            page: Page {
                objects: Vec::new(),
                rejected: Vec::new(),
            },
            summary: ImportSummary::default(),
            tx,
        };
        for path in self.files().await? {
            let bytes = tokio::fs::read(&path)
                .await
                .map_err(|e| ConnectorError::Source {
                    path: path.display().to_string(),
                    reason: format!("cannot read the file: {e}"),
                })?;
            self.import_file(&path, &bytes, &mut state).await?;
        }
        state.flush().await?;
        Ok(state.summary)
    }

    async fn import_file(
        &self,
        path: &Path,
        bytes: &[u8],
        st: &mut ImportState,
    ) -> Result<(), ConnectorError> {
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let file_err = |reason: String| ConnectorError::Source {
            path: path.display().to_string(),
            reason,
        };
        let decoded = Decoded::new(self.encoding, bytes);
        let mut reader = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(self.cfg.delimiter as u8)
            .from_reader(decoded.bytes());
        let mut records = reader.byte_records();

        let header = match records.next() {
            None => {
                return Err(file_err(
                    "the file is empty; a CSV file needs a header row naming the columns".into(),
                ))
            }
            Some(Err(e)) => return Err(file_err(format!("cannot parse the header row: {e}"))),
            Some(Ok(h)) => h,
        };
        let mut columns = Vec::with_capacity(header.len());
        for (i, raw) in header.iter().enumerate() {
            let name = decoded
                .field(raw)
                .map(|s| s.trim().to_string())
                .ok_or_else(|| {
                    file_err(format!(
                        "header column {} is not valid {}; set encoding to the file's encoding",
                        i + 1,
                        self.encoding.name()
                    ))
                })?;
            if name.is_empty() {
                return Err(file_err(format!(
                    "header column {} has no name; every column needs a name",
                    i + 1
                )));
            }
            columns.push(name);
        }
        let mut unique = HashSet::new();
        if let Some(dup) = columns.iter().find(|c| !unique.insert(c.as_str())) {
            return Err(file_err(format!(
                "the header names column \"{}\" twice; column names must be unique",
                excerpt(dup)
            )));
        }
        let anchor_idx = columns
            .iter()
            .position(|c| c == &self.cfg.anchor_column)
            .ok_or_else(|| {
                // Never the header row itself: a folder pointed at the wrong files would carry
                // their first line into the run record.
                file_err(format!(
                    "there is no anchor column \"{}\"; the header has {} column(s), the first \"{}\"; fix anchor_column or the file",
                    self.cfg.anchor_column,
                    columns.len(),
                    excerpt(&columns[0])
                ))
            })?;

        for rec in records {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    // The parser cannot resync after a hard error; report it and stop this file.
                    let line = e.position().map(|p| p.line()).unwrap_or(0);
                    st.reject(
                        format!("{file_name}:{line}"),
                        format!("unparsable CSV: {e}"),
                    );
                    break;
                }
            };
            let line = rec.position().map(|p| p.line()).unwrap_or(0);
            let location = format!("{file_name}:{line}");
            if rec.len() != columns.len() {
                st.reject(
                    location,
                    format!(
                        "the row has {} field(s) but the header has {} column(s)",
                        rec.len(),
                        columns.len()
                    ),
                );
                continue;
            }
            let mut cells = Vec::with_capacity(rec.len());
            let mut bad = None;
            for (i, raw) in rec.iter().enumerate() {
                match decoded.field(raw) {
                    Some(s) => cells.push(s),
                    None => {
                        bad = Some(i);
                        break;
                    }
                }
            }
            if let Some(i) = bad {
                st.reject(
                    location,
                    format!(
                        "column \"{}\" holds bytes that are not valid {}; fix the file or set encoding",
                        excerpt(&columns[i]),
                        self.encoding.name()
                    ),
                );
                continue;
            }
            let anchor = cells[anchor_idx].clone();
            if anchor.trim().is_empty() {
                st.reject(
                    location,
                    format!("the anchor column \"{}\" is empty", self.cfg.anchor_column),
                );
                continue;
            }
            if let Some(first) = st.seen.get(&anchor) {
                st.reject(
                    location,
                    format!(
                        "duplicate anchor \"{}\" (first seen at {first}); the row was skipped",
                        excerpt(&anchor)
                    ),
                );
                continue;
            }
            st.seen.insert(anchor.clone(), location);
            let mut attributes = Attributes::new();
            for (name, cell) in columns.iter().zip(cells) {
                let values: Vec<Value> = match self.cfg.multi_value_separator {
                    Some(sep) => cell
                        .split(sep)
                        .filter(|v| !v.is_empty())
                        .map(|v| Value::Text(v.to_string()))
                        .collect(),
                    None if cell.is_empty() => Vec::new(),
                    None => vec![Value::Text(cell)],
                };
                // An empty cell means "no value", as an absent attribute does in LDAP.
                if !values.is_empty() {
                    attributes.insert(name.clone(), values);
                }
            }
            st.page.objects.push(ConnectorObject {
                anchor,
                object_type: self.cfg.object_type.clone(),
                dn: None,
                attributes,
            });
            if st.page.objects.len() >= PAGE_OBJECTS {
                st.flush().await?;
            }
        }
        Ok(())
    }
}

struct ImportState {
    /// Anchor → where it was first seen.
    seen: HashMap<String, String>,
    page: Page,
    summary: ImportSummary,
    tx: Sender<Page>,
}

impl ImportState {
    fn reject(&mut self, location: String, reason: String) {
        self.page.rejected.push(Rejected { location, reason });
    }

    async fn flush(&mut self) -> Result<(), ConnectorError> {
        if self.page.objects.is_empty() && self.page.rejected.is_empty() {
            return Ok(());
        }
        let page = std::mem::replace(
            &mut self.page,
            Page {
                objects: Vec::new(),
                rejected: Vec::new(),
            },
        );
        self.summary.objects += page.objects.len() as u64;
        self.summary.rejected += page.rejected.len() as u64;
        self.tx
            .send(page)
            .await
            .map_err(|_| ConnectorError::Cancelled)
    }
}

/// File content ready for the CSV parser, which needs ASCII-compatible bytes.
enum Decoded<'a> {
    /// ASCII-compatible encodings: parse the raw bytes, decode each field, so an undecodable
    /// field rejects only its row.
    Raw {
        bytes: &'a [u8],
        encoding: &'static Encoding,
    },
    /// UTF-16: decoded up front. Malformed sequences become U+FFFD, and a row containing
    /// U+FFFD is rejected.
    Utf8(String),
}

impl<'a> Decoded<'a> {
    fn new(encoding: &'static Encoding, bytes: &'a [u8]) -> Self {
        // A BOM names the real encoding; a UTF-8 BOM is skipped either way.
        let (encoding, bytes) = match Encoding::for_bom(bytes) {
            Some((enc, len)) => (enc, &bytes[len..]),
            None => (encoding, bytes),
        };
        if encoding.is_ascii_compatible() {
            Decoded::Raw { bytes, encoding }
        } else {
            let (text, _) = encoding.decode_without_bom_handling(bytes);
            Decoded::Utf8(text.into_owned())
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Decoded::Raw { bytes, .. } => bytes,
            Decoded::Utf8(s) => s.as_bytes(),
        }
    }

    /// One field as text; None when it cannot be decoded.
    fn field(&self, raw: &[u8]) -> Option<String> {
        match self {
            Decoded::Raw { encoding, .. } => encoding
                .decode_without_bom_handling_and_without_replacement(raw)
                .map(|c| c.into_owned()),
            Decoded::Utf8(_) => {
                let s = std::str::from_utf8(raw).ok()?;
                (!s.contains('\u{FFFD}')).then(|| s.to_string())
            }
        }
    }
}

/// `*` matches any run of characters, `?` exactly one; everything else literally.
fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    // Backtrack point: the last `*` and the name position it currently covers up to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob() {
        assert!(glob_match("*.csv", "people.csv"));
        assert!(glob_match("*.csv", ".csv"));
        assert!(!glob_match("*.csv", "people.csv.tmp"));
        assert!(glob_match("hr_??.csv", "hr_01.csv"));
        assert!(!glob_match("hr_??.csv", "hr_1.csv"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("*", "anything"));
    }

    #[test]
    fn config_validation_lists_every_problem() {
        let c: CsvConfig = serde_json::from_value(serde_json::json!({
            "folder": "", "pattern": "a/*.csv", "object_type": " ", "anchor_column": "",
            "delimiter": "\"", "encoding": "klingon", "multi_value_separator": "\""
        }))
        .expect("parses");
        let mut paths: Vec<String> = c
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.path)
            .collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "anchor_column",
                "delimiter",
                "encoding",
                "folder",
                "multi_value_separator",
                "object_type",
                "pattern"
            ]
        );
        let e = serde_json::from_value::<CsvConfig>(serde_json::json!({
            "folder": "/x", "object_type": "p", "anchor_column": "id", "delimiter": ";;"
        }))
        .unwrap_err();
        assert!(
            e.to_string().contains("char") || e.to_string().contains("character"),
            "{e}"
        );
        let e = serde_json::from_value::<CsvConfig>(serde_json::json!({
            "folder": "/x", "object_type": "p", "anchor_column": "id", "colour": "red"
        }))
        .unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }
}

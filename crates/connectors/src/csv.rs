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
//! Files are streamed: read a buffer at a time on a blocking thread (UTF-16 decoded to UTF-8 as
//! it is read), parsed a row at a time, and sent a page at a time through the bounded channel,
//! so a slow consumer slows the reader and memory does not grow with the file. A row may be at
//! most [`MAX_ROW_BYTES`] long. A duplicate anchor within a page is rejected here; one of an
//! earlier page is left to whoever commits the pages (see [`ConnectorObject::location`]).

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use ::csv::ByteRecord;
use encoding_rs::Encoding;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Sender;

use crate::error::{excerpt, ConfigProblem, ConnectorError, TestReport};
use crate::model::{Attributes, ConnectorObject, ImportMode, ImportSummary, Page, Rejected, Value};
use crate::roots::DropRoots;

/// Objects per page.
const PAGE_OBJECTS: usize = 500;
/// Bytes the CSV parser reads at a time.
const PARSE_BUFFER: usize = 64 * 1024;
/// Bytes of a non-ASCII-compatible file (UTF-16) read and decoded at a time.
const DECODE_BUFFER: usize = 32 * 1024;
/// The longest row read. The parser holds a row in memory, and a longer one is most likely an
/// unclosed quote that turned the rest of the file into one field: the import fails, naming the
/// line it starts on, rather than holding the file in memory (or skipping a row that holds
/// the rest of the file, which would make every object in it look deleted).
pub const MAX_ROW_BYTES: u64 = 16 << 20;

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
            Some(f) => Err(self.outside(f)),
            None => Ok(files),
        }
    }

    fn outside(&self, file: &Path) -> ConnectorError {
        let roots = self.roots.as_ref().map(DropRoots::describe);
        ConnectorError::Source {
            path: file.display().to_string(),
            reason: format!(
                "resolves outside the allowed CSV drop roots ({}); refused",
                roots.unwrap_or_default()
            ),
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
        let files = self.files().await?;
        // The files are read and parsed on a blocking thread that hands each page over with a
        // blocking send: a slow consumer stops the reading, and memory holds a buffer, a row
        // and the pages in the channel, however large the files are.
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut st = ImportState::new(tx);
            for path in &files {
                let file = this.open(path)?;
                this.read_file(path, file, &mut st)?;
            }
            st.flush()?;
            Ok(st.summary)
        })
        .await
        .map_err(|e| ConnectorError::Source {
            path: self.folder_display(),
            reason: format!("reading the files failed: {e}"),
        })?
    }

    /// Opens a listed file, checked against the roots (when confined) again just before it is
    /// read: reading an earlier file can take long enough for a later one to be swapped for a
    /// link. The resolved path is the one opened, and it must still be a regular file.
    fn open(&self, path: &Path) -> Result<std::fs::File, ConnectorError> {
        let real = match &self.roots {
            Some(roots) => roots.confine(path).ok_or_else(|| self.outside(path))?,
            None => path.to_path_buf(),
        };
        let read_err = |e: std::io::Error| ConnectorError::Source {
            path: path.display().to_string(),
            reason: format!("cannot read the file: {e}"),
        };
        if !std::fs::metadata(&real).map_err(read_err)?.is_file() {
            return Err(ConnectorError::Source {
                path: path.display().to_string(),
                reason: "is no longer a regular file; refused".into(),
            });
        }
        std::fs::File::open(&real).map_err(read_err)
    }

    /// Parses one file from `src` (read a buffer at a time), sending a page whenever one is
    /// full. Blocking: run it off the async threads.
    fn read_file(
        &self,
        path: &Path,
        src: impl Read,
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
        let (text, input) = Text::open(self.encoding, src)
            .map_err(|e| file_err(format!("cannot read the file: {e}")))?;
        let row_start = Rc::new(Cell::new(0));
        let mut reader = ::csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .delimiter(self.cfg.delimiter as u8)
            .buffer_capacity(PARSE_BUFFER)
            .from_reader(RowLimit {
                inner: input,
                delivered: 0,
                row_start: row_start.clone(),
            });
        // The next record into `rec`: Ok(false) at the end, Err(csv error) for a row the
        // parser cannot read (reported as that row's problem); a read failure or an overlong
        // row fails the file.
        let next = |reader: &mut ::csv::Reader<_>,
                    rec: &mut ByteRecord|
         -> Result<Result<bool, ::csv::Error>, ConnectorError> {
            let line = reader.position().line();
            match reader.read_byte_record(rec) {
                Ok(more) => {
                    row_start.set(reader.position().byte());
                    Ok(Ok(more))
                }
                Err(e) => match e.kind() {
                    ::csv::ErrorKind::Io(io) => Err(file_err(read_failure(io, line))),
                    _ => Ok(Err(e)),
                },
            }
        };

        let mut header = ByteRecord::new();
        match next(&mut reader, &mut header)? {
            Ok(false) => {
                return Err(file_err(
                    "the file is empty; a CSV file needs a header row naming the columns".into(),
                ))
            }
            Err(e) => return Err(file_err(format!("cannot parse the header row: {e}"))),
            Ok(true) => {}
        }
        let mut columns = Vec::with_capacity(header.len());
        for (i, raw) in header.iter().enumerate() {
            let name = text
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

        let mut rec = ByteRecord::new();
        loop {
            match next(&mut reader, &mut rec)? {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    // The parser cannot resync after a hard error; report it and stop this file.
                    let line = e.position().map(|p| p.line()).unwrap_or(0);
                    st.reject(
                        format!("{file_name}:{line}"),
                        format!("unparsable CSV: {e}"),
                    );
                    break;
                }
            }
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
                match text.field(raw) {
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
            st.seen.insert(anchor.clone(), location.clone());
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
                location: Some(location),
            });
            if st.page.objects.len() >= PAGE_OBJECTS {
                st.flush()?;
            }
        }
        Ok(())
    }
}

struct ImportState {
    /// The current page's anchors → where each was first seen. A duplicate within the page is
    /// rejected here, naming that row; a duplicate of an anchor an earlier page held is
    /// rejected by whoever commits the pages (the server's store knows which anchors the run
    /// has imported), so this holds one page's anchors however large the files are.
    seen: HashMap<String, String>,
    page: Page,
    summary: ImportSummary,
    tx: Sender<Page>,
}

impl ImportState {
    fn new(tx: Sender<Page>) -> Self {
        Self {
            seen: HashMap::new(),
            page: Page {
                objects: Vec::new(),
                rejected: Vec::new(),
            },
            summary: ImportSummary::default(),
            tx,
        }
    }

    fn reject(&mut self, location: String, reason: String) {
        self.page.rejected.push(Rejected { location, reason });
    }

    /// Sends the page, waiting while the channel is full (blocking: called on the reading
    /// thread).
    fn flush(&mut self) -> Result<(), ConnectorError> {
        self.seen.clear();
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
            .blocking_send(page)
            .map_err(|_| ConnectorError::Cancelled)
    }
}

/// How a file's bytes become text for the CSV parser, which needs ASCII-compatible bytes.
#[derive(Debug, Clone, Copy)]
enum Text {
    /// ASCII-compatible encodings: parse the raw bytes, decode each field, so an undecodable
    /// field rejects only its row.
    Raw(&'static Encoding),
    /// UTF-16 (any encoding that is not ASCII-compatible): decoded to UTF-8 as it is read
    /// ([`Utf8Reader`]). Malformed sequences become U+FFFD, and a row containing U+FFFD is
    /// rejected.
    Utf8,
}

impl Text {
    /// Reads the file's first bytes for a BOM, which names the real encoding (a UTF-8 BOM is
    /// skipped either way): how to decode fields, and the parser's input (the rest of the
    /// file, decoded to UTF-8 when the encoding is not ASCII-compatible).
    fn open<'a>(
        configured: &'static Encoding,
        mut src: impl Read + 'a,
    ) -> std::io::Result<(Text, Box<dyn Read + 'a>)> {
        let mut head = [0u8; 3];
        let mut n = 0;
        while n < head.len() {
            match src.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let (encoding, bom) = match Encoding::for_bom(&head[..n]) {
            Some((enc, len)) => (enc, len),
            None => (configured, 0),
        };
        let rest = std::io::Cursor::new(head[bom..n].to_vec()).chain(src);
        Ok(if encoding.is_ascii_compatible() {
            (Text::Raw(encoding), Box::new(rest))
        } else {
            (Text::Utf8, Box::new(Utf8Reader::new(encoding, rest)))
        })
    }

    /// One field as text; None when it cannot be decoded.
    fn field(self, raw: &[u8]) -> Option<String> {
        match self {
            Text::Raw(encoding) => encoding
                .decode_without_bom_handling_and_without_replacement(raw)
                .map(|c| c.into_owned()),
            Text::Utf8 => {
                let s = std::str::from_utf8(raw).ok()?;
                (!s.contains('\u{FFFD}')).then(|| s.to_string())
            }
        }
    }
}

/// Decodes an encoding to UTF-8 as it is read, a buffer at a time. encoding_rs's streaming
/// decoder keeps a character split between two reads (half a UTF-16 code unit, or half a
/// surrogate pair) and finishes it with the next; at the end of the input a dangling part
/// becomes U+FFFD, as a whole-file decode would have it.
struct Utf8Reader<R> {
    inner: R,
    decoder: encoding_rs::Decoder,
    src: Vec<u8>,
    /// Decoded bytes; `out[pos..end]` not handed out yet.
    out: Vec<u8>,
    pos: usize,
    end: usize,
    done: bool,
}

impl<R: Read> Utf8Reader<R> {
    fn new(encoding: &'static Encoding, inner: R) -> Self {
        Self {
            inner,
            decoder: encoding.new_decoder_without_bom_handling(),
            src: vec![0; DECODE_BUFFER],
            out: Vec::new(),
            pos: 0,
            end: 0,
            done: false,
        }
    }

    /// Reads and decodes the next buffer; false at the end.
    fn fill(&mut self) -> std::io::Result<bool> {
        if self.done {
            return Ok(false);
        }
        let n = loop {
            match self.inner.read(&mut self.src) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        let last = n == 0;
        // Room for the worst case, so the decoder always takes the whole buffer.
        let need = self
            .decoder
            .max_utf8_buffer_length(n)
            .ok_or_else(|| std::io::Error::other("decode buffer size overflows"))?;
        if self.out.len() < need {
            self.out.resize(need, 0);
        }
        let (result, read, written, _) =
            self.decoder
                .decode_to_utf8(&self.src[..n], &mut self.out, last);
        debug_assert_eq!((result, read), (encoding_rs::CoderResult::InputEmpty, n));
        self.pos = 0;
        self.end = written;
        self.done = last;
        Ok(true)
    }
}

impl<R: Read> Read for Utf8Reader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.end {
            if !self.fill()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.end - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Why reading a file failed part way, the row starting at `line` being read.
fn read_failure(io: &std::io::Error, line: u64) -> String {
    if io.get_ref().is_some_and(|i| i.is::<RowTooLong>()) {
        format!(
            "the row starting at line {line} is longer than {} MiB; an unclosed quote may have \
             turned the rest of the file into one field; fix the file",
            MAX_ROW_BYTES >> 20
        )
    } else {
        format!("cannot read the file: {io}")
    }
}

/// A row longer than [`MAX_ROW_BYTES`] (the error a [`RowLimit`] read fails with).
#[derive(Debug)]
struct RowTooLong;

impl std::fmt::Display for RowTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a row is longer than {} bytes", MAX_ROW_BYTES)
    }
}

impl std::error::Error for RowTooLong {}

/// The parser's input, refused once it runs more than [`MAX_ROW_BYTES`] (plus the parser's
/// buffer) past the start of the row being read: the parser holds a whole row in memory.
struct RowLimit<R> {
    inner: R,
    /// Bytes handed to the parser.
    delivered: u64,
    /// Where the row being read starts, in the parser's input (its position after a row).
    row_start: Rc<Cell<u64>>,
}

impl<R: Read> Read for RowLimit<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.delivered.saturating_sub(self.row_start.get()) > MAX_ROW_BYTES + PARSE_BUFFER as u64
        {
            return Err(std::io::Error::other(RowTooLong));
        }
        let n = self.inner.read(buf)?;
        self.delivered += n as u64;
        Ok(n)
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

    fn connector(encoding: &str) -> CsvConnector {
        CsvConnector::new(
            serde_json::from_value(serde_json::json!({
                "folder": "/unused", "object_type": "people", "anchor_column": "id",
                "encoding": encoding, "multi_value_separator": ";",
            }))
            .unwrap(),
        )
        .unwrap()
    }

    /// Reads `src` as the one file of an import, on a blocking thread as `import` does: the
    /// pages, or the error.
    async fn read_all(
        conn: CsvConnector,
        src: impl Read + Send + 'static,
    ) -> Result<Vec<Page>, ConnectorError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let reader = tokio::task::spawn_blocking(move || {
            let mut st = ImportState::new(tx);
            conn.read_file(Path::new("drop.csv"), src, &mut st)?;
            st.flush()
        });
        let mut pages = Vec::new();
        while let Some(p) = rx.recv().await {
            pages.push(p);
        }
        reader.await.unwrap().map(|_| pages)
    }

    /// Hands `data` out in pieces of `sizes` bytes, in turn, so reads split it everywhere a
    /// buffer boundary could.
    struct Pieces {
        data: Vec<u8>,
        pos: usize,
        sizes: Vec<usize>,
        turn: usize,
    }

    impl Pieces {
        fn new(data: &[u8], sizes: &[usize]) -> Self {
            Self {
                data: data.to_vec(),
                pos: 0,
                sizes: sizes.to_vec(),
                turn: 0,
            }
        }
    }

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let size = self.sizes[self.turn % self.sizes.len()];
            self.turn += 1;
            let n = size.min(buf.len()).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn utf16(text: &str, big_endian: bool) -> Vec<u8> {
        let mut out = if big_endian {
            vec![0xFE, 0xFF]
        } else {
            vec![0xFF, 0xFE]
        };
        for u in text.encode_utf16() {
            out.extend(if big_endian {
                u.to_be_bytes()
            } else {
                u.to_le_bytes()
            });
        }
        out
    }

    fn texts(pages: &[Page], attr: &str) -> Vec<Vec<String>> {
        pages
            .iter()
            .flat_map(|p| &p.objects)
            .map(|o| {
                o.attributes
                    .get(attr)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_text)
                    .map(String::from)
                    .collect()
            })
            .collect()
    }

    /// A UTF-16LE file with half a surrogate pair in its second row: that row alone is
    /// rejected.
    fn cases_broken() -> (&'static str, Vec<u8>) {
        let mut broken = utf16("id,cn\n1,a\n2,", false);
        broken.extend(0xD83Cu16.to_le_bytes());
        broken.extend(utf16("x\n3,🎉\n", false).split_off(2));
        ("utf-16le", broken)
    }

    /// Every way the reads can split a file (a row, a quoted field holding a line break, a
    /// multi-byte UTF-8 or windows-1252 character, a UTF-16 code unit or surrogate pair, the
    /// BOM itself) gives the pages reading it whole gives.
    #[tokio::test]
    async fn rows_and_characters_split_between_reads_import_as_read_whole() {
        let text = "id,cn,mail\n1,Zoë Ünal,zoe@x.org;z@x.org\n2,\"Doe, \"\"J\"\"\nsecond line\",\n3,山田太郎 🎉,c@x.org\r\n4,Łukasz,\n";
        let mut utf8 = vec![0xEF, 0xBB, 0xBF];
        utf8.extend(text.as_bytes());
        let (_, broken) = cases_broken();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("utf-8", utf8),
            (
                "windows-1252",
                b"id,cn\r\n1,Zo\xEB \x80\r\n2,\"a\r\nb\"\r\n".to_vec(),
            ),
            ("utf-8", utf16(text, false)),
            ("utf-16le", utf16(text, false)[2..].to_vec()),
            ("utf-16be", utf16(text, true)),
            ("utf-16le", broken),
        ];
        for (encoding, bytes) in cases {
            let whole = read_all(connector(encoding), Pieces::new(&bytes, &[usize::MAX]))
                .await
                .unwrap();
            assert!(!whole.is_empty(), "{encoding}");
            for sizes in [&[1][..], &[2], &[3], &[1, 2, 5], &[7, 1, 4096]] {
                let split = read_all(connector(encoding), Pieces::new(&bytes, sizes))
                    .await
                    .unwrap();
                assert_eq!(split, whole, "{encoding} read {sizes:?} bytes at a time");
            }
        }
        let (_, broken) = &cases_broken();
        let pages = read_all(connector("utf-16le"), Pieces::new(broken, &[1]))
            .await
            .unwrap();
        let rejected: Vec<&str> = pages
            .iter()
            .flat_map(|p| &p.rejected)
            .map(|r| r.location.as_str())
            .collect();
        assert_eq!(rejected, ["drop.csv:3"]);
        assert_eq!(texts(&pages, "cn"), [vec!["a"], vec!["🎉"]]);
        let whole = read_all(connector("utf-16le"), Pieces::new(&utf16(text, true), &[1]))
            .await
            .unwrap();
        assert_eq!(
            texts(&whole, "cn"),
            [
                vec!["Zoë Ünal"],
                vec!["Doe, \"J\"\nsecond line"],
                vec!["山田太郎 🎉"],
                vec!["Łukasz"]
            ],
            "the BOM names the encoding"
        );
        assert_eq!(texts(&whole, "mail")[0], ["zoe@x.org", "z@x.org"]);
    }

    /// The streaming decoder gives what decoding the whole file gives, a character split
    /// between reads included, and a dangling byte at the end becomes U+FFFD.
    #[test]
    fn utf16_decodes_the_same_read_in_any_pieces() {
        let text = "ab山🎉\u{FFFF}z\n".repeat(3000);
        for (encoding, big_endian) in [
            (encoding_rs::UTF_16LE, false),
            (encoding_rs::UTF_16BE, true),
        ] {
            let mut bytes = utf16(&text, big_endian).split_off(2);
            bytes.push(0x41);
            let (want, _) = encoding.decode_without_bom_handling(&bytes);
            assert!(want.ends_with('\u{FFFD}'));
            for sizes in [
                &[1][..],
                &[3],
                &[DECODE_BUFFER - 1],
                &[5, DECODE_BUFFER + 1],
            ] {
                let mut got = String::new();
                Utf8Reader::new(encoding, Pieces::new(&bytes, sizes))
                    .read_to_string(&mut got)
                    .unwrap();
                assert!(got == want, "{} in pieces of {sizes:?}", encoding.name());
            }
        }
    }

    /// A generated CSV of `rows` rows, counting the bytes read from it.
    struct Generated {
        rows: u64,
        next: u64,
        line: Vec<u8>,
        pos: usize,
        read: Arc<AtomicU64>,
    }

    impl Read for Generated {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.pos == self.line.len() {
                if self.next > self.rows {
                    return Ok(0);
                }
                self.line = if self.next == 0 {
                    b"id,cn\n".to_vec()
                } else {
                    format!("e{:08},Person {}\n", self.next, self.next).into_bytes()
                };
                self.pos = 0;
                self.next += 1;
            }
            let n = buf.len().min(self.line.len() - self.pos);
            buf[..n].copy_from_slice(&self.line[self.pos..self.pos + n]);
            self.pos += n;
            self.read.fetch_add(n as u64, AtomicOrdering::SeqCst);
            Ok(n)
        }
    }

    use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
    use std::sync::Arc;

    /// The file is read as pages are taken: with the receiver not reading, the reader stops
    /// once the channel is full, the first page out long before the file is read.
    #[tokio::test]
    async fn the_first_page_goes_out_before_the_file_is_read() {
        let read = Arc::new(AtomicU64::new(0));
        let rows = 200_000;
        let src = Generated {
            rows,
            next: 0,
            line: Vec::new(),
            pos: 0,
            read: read.clone(),
        };
        let conn = connector("utf-8");
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let reader = tokio::task::spawn_blocking(move || {
            let mut st = ImportState::new(tx);
            conn.read_file(Path::new("big.csv"), src, &mut st)
        });
        let first = rx.recv().await.expect("a first page");
        assert_eq!(first.objects.len(), PAGE_OBJECTS);
        assert_eq!(first.objects[0].anchor, "e00000001");
        assert_eq!(first.objects[0].location.as_deref(), Some("big.csv:2"));
        // Time for a reader that reads ahead to show it (not a timed assertion: a streaming
        // reader blocks on the full channel whatever the wait).
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let total = rows * 25;
        let so_far = read.load(AtomicOrdering::SeqCst);
        // Two more pages (one in the channel, one waiting to go in) and the parser's buffer.
        assert!(
            so_far < 3 * PAGE_OBJECTS as u64 * 30 + 2 * PARSE_BUFFER as u64,
            "{so_far} of about {total} bytes read with one page taken"
        );
        drop(rx);
        assert!(matches!(
            reader.await.unwrap(),
            Err(ConnectorError::Cancelled)
        ));
    }

    /// An endless row (an unclosed quote) fails the file at the limit instead of filling
    /// memory, naming the line it starts on.
    #[tokio::test]
    async fn a_row_longer_than_the_limit_fails_the_file() {
        let endless = std::io::Cursor::new(b"id,cn\n1,ok\n2,\"never closed ".to_vec())
            .chain(std::io::repeat(b'x'));
        let e = read_all(connector("utf-8"), endless)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("drop.csv") && e.contains("line 3") && e.contains("longer than 16 MiB"),
            "{e}"
        );
    }
}

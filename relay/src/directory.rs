//! Directory reads for relay-bound connectors: the server invokes `DirectoryImport` and
//! `DirectoryTest` (see server/src/sync/source.rs) and the relay runs the same LDAP / CSV
//! connector the server would run itself, next to the directory.
//!
//! Arguments, as the server sends them:
//! - `DirectoryImport(connector, objectType, mode)`: streams one [`Page`] per StreamItem and
//!   completes with the [`ImportSummary`].
//! - `DirectoryTest(connector)`: completes with the [`TestReport`].
//! - `DirectoryCheckFolder(folder)`: completes with `{"folder": <resolved>}` when a CSV folder
//!   resolves inside this relay's drop roots, or fails saying why (the server's save-time check
//!   of a relay-bound CSV connector).
//!
//! `connector` is `{"kind": "ldap" | "csv", "config": <connector config>, "password": <string |
//! null>}`. Pages go through a channel of [`PAGE_CHANNEL`] pages and each StreamItem send waits
//! for the connection's outbound queue, so a slow hub slows the directory read instead of
//! buffering it. The password and the raw arguments never reach a log or an error message.
//!
//! CSV connectors read files on the relay's host, so they are confined to the relay's drop
//! roots (`csv_roots` in relay.toml): the folder and every file read must resolve inside one
//! of them, checked on every read. No roots configured means no CSV connectors.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use identitymesh_connectors::csv::{CsvConfig, CsvConnector};
use identitymesh_connectors::error::{ConfigProblem, ConnectorError, TestReport};
use identitymesh_connectors::ldap::{LdapConfig, LdapConnector};
use identitymesh_connectors::model::{ImportMode, ImportSummary, Page};
use identitymesh_connectors::roots::DropRoots;
use identitymesh_signalr::protocol::DEFAULT_MAX_FRAME_SIZE;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::handlers::{HandlerRegistry, ItemSink};

use identitymesh_contract::hub::{DIRECTORY_CHECK_FOLDER, DIRECTORY_IMPORT, DIRECTORY_TEST};

/// Pages buffered between the connector and the hub connection.
pub const PAGE_CHANNEL: usize = 2;

/// How refusals name the relay's drop roots.
pub const CSV_ROOTS_SETTING: &str = "the relay setting csv_roots in relay.toml";

/// The relay's CSV drop roots, as its messages name them.
pub fn csv_roots(paths: &[PathBuf]) -> DropRoots {
    DropRoots::new(paths).configured_by(CSV_ROOTS_SETTING, "this relay")
}

/// Registers `DirectoryImport` and `DirectoryTest`; CSV connectors may read inside `csv_roots`
/// only (none: CSV connectors are refused).
pub fn register(registry: &mut HandlerRegistry, csv_roots: DropRoots) {
    let roots = Arc::new(csv_roots);
    let r = roots.clone();
    registry.register(DIRECTORY_IMPORT, move |args, sink| {
        directory_import(args, sink, r.clone())
    });
    let r = roots.clone();
    registry.register(DIRECTORY_TEST, move |args, sink| {
        directory_test(args, sink, r.clone())
    });
    registry.register(
        DIRECTORY_CHECK_FOLDER,
        move |args: Vec<Value>, _sink: ItemSink| {
            let roots = roots.clone();
            async move { check_folder(&args, &roots) }
        },
    );
}

/// `DirectoryCheckFolder(folder)`: where `folder` resolves inside the drop roots, or why not.
pub fn check_folder(args: &[Value], csv_roots: &DropRoots) -> Result<Value, String> {
    check_arity(DIRECTORY_CHECK_FOLDER, args, 1, "folder")?;
    let Some(folder) = args[0].as_str() else {
        return Err(format!(
            "{DIRECTORY_CHECK_FOLDER}: folder must be a string, got {}",
            type_name(&args[0])
        ));
    };
    let resolved = csv_roots.resolve(std::path::Path::new(folder))?;
    Ok(serde_json::json!({"folder": resolved.display().to_string()}))
}

/// A connector described by the server, not yet built.
pub enum ConnectorSpec {
    Ldap {
        config: Box<LdapConfig>,
        password: Option<String>,
    },
    Csv(Box<CsvConfig>),
}

/// Never shows the password.
impl std::fmt::Debug for ConnectorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectorSpec::Ldap { config, password } => f
                .debug_struct("Ldap")
                .field("url", &config.url)
                .field("bind_dn", &config.bind_dn)
                .field("password", &password.as_ref().map(|_| "<redacted>"))
                .finish_non_exhaustive(),
            ConnectorSpec::Csv(c) => f.debug_tuple("Csv").field(c).finish(),
        }
    }
}

impl ConnectorSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectorSpec::Ldap { .. } => "ldap",
            ConnectorSpec::Csv(_) => "csv",
        }
    }

    /// Validates the configuration and prepares the connector (TLS included). A CSV connector
    /// is confined to `csv_roots`: refused at once when its folder is outside them (or there
    /// are none), and every later read is checked again.
    pub fn build(self, csv_roots: &DropRoots) -> Result<Directory, ConnectorError> {
        Ok(match self {
            ConnectorSpec::Ldap { config, password } => {
                Directory::Ldap(LdapConnector::new(*config, password)?)
            }
            ConnectorSpec::Csv(config) => {
                csv_roots.resolve(&config.folder).map_err(|reason| {
                    ConnectorError::Config(vec![ConfigProblem::new("folder", reason)])
                })?;
                Directory::Csv(CsvConnector::new(*config)?.with_roots(csv_roots.clone()))
            }
        })
    }
}

/// A built connector.
pub enum Directory {
    Ldap(LdapConnector),
    Csv(CsvConnector),
}

impl Directory {
    pub async fn import(
        &self,
        object_type: &str,
        mode: &ImportMode,
        tx: mpsc::Sender<Page>,
    ) -> Result<ImportSummary, ConnectorError> {
        match self {
            Directory::Ldap(c) => c.import(object_type, mode, tx).await,
            Directory::Csv(c) => c.import(object_type, mode, tx).await,
        }
    }

    pub async fn test_connection(&self) -> Result<TestReport, ConnectorError> {
        match self {
            Directory::Ldap(c) => c.test_connection().await,
            Directory::Csv(c) => c.test_connection().await,
        }
    }
}

/// `DirectoryImport`'s arguments, parsed.
#[derive(Debug)]
pub struct ImportRequest {
    pub connector: ConnectorSpec,
    pub object_type: String,
    pub mode: ImportMode,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn check_arity(method: &str, args: &[Value], want: usize, shape: &str) -> Result<(), String> {
    if args.len() == want {
        Ok(())
    } else {
        Err(format!(
            "{method} expects {want} argument(s) ({shape}), got {}; the server and relay \
             versions may not match",
            args.len()
        ))
    }
}

/// Deserializes `v` with the failing field's path in the message (`config.object_types…`).
fn from_value_at<T: serde::de::DeserializeOwned>(v: &Value, prefix: &str) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("{prefix}: {inner}")
        } else {
            format!("{prefix}.{path}: {inner}")
        }
    })
}

/// Parses the `{"kind", "config", "password"}` argument. A missing `password` means none.
/// Messages never contain the password, whatever its type.
pub fn parse_connector(v: &Value) -> Result<ConnectorSpec, String> {
    let Value::Object(map) = v else {
        return Err(format!(
            "connector: expected an object {{\"kind\", \"config\", \"password\"}}, got {}",
            type_name(v)
        ));
    };
    if let Some(unknown) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "kind" | "config" | "password"))
    {
        return Err(format!(
            "connector: unknown field \"{unknown}\"; expected kind, config and password"
        ));
    }
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.as_str(),
        Some(other) => {
            return Err(format!(
                "connector.kind: expected \"ldap\" or \"csv\", got {}",
                type_name(other)
            ))
        }
        None => return Err("connector.kind: missing; expected \"ldap\" or \"csv\"".into()),
    };
    let config = match map.get("config") {
        Some(c @ Value::Object(_)) => c,
        Some(other) => {
            return Err(format!(
                "connector.config: expected an object, got {}",
                type_name(other)
            ))
        }
        None => return Err("connector.config: missing".into()),
    };
    let password = match map.get("password") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) => Some(p.clone()),
        // The value is not echoed: it may be a mangled secret.
        Some(other) => {
            return Err(format!(
                "connector.password: expected a string or null, got {}",
                type_name(other)
            ))
        }
    };
    match kind {
        "ldap" => Ok(ConnectorSpec::Ldap {
            config: Box::new(from_value_at(config, "connector.config")?),
            password,
        }),
        "csv" => {
            if password.is_some() {
                return Err(
                    "connector.password: a csv connector takes no password; send null".into(),
                );
            }
            Ok(ConnectorSpec::Csv(Box::new(from_value_at(
                config,
                "connector.config",
            )?)))
        }
        other => Err(format!(
            "connector.kind: unknown connector kind \"{other}\"; this relay serves \"ldap\" and \"csv\""
        )),
    }
}

/// `DirectoryImport(connector, objectType, mode)`.
pub fn parse_import_args(args: &[Value]) -> Result<ImportRequest, String> {
    check_arity(
        DIRECTORY_IMPORT,
        args,
        3,
        "connector, object type, import mode",
    )?;
    let connector = parse_connector(&args[0])?;
    let object_type = match &args[1] {
        Value::String(s) if !s.trim().is_empty() => s.clone(),
        Value::String(_) => return Err("objectType: is empty; name the object type to read".into()),
        other => {
            return Err(format!(
                "objectType: expected a string, got {}",
                type_name(other)
            ))
        }
    };
    let mode = from_value_at::<ImportMode>(&args[2], "mode").map_err(|e| {
        format!("{e} (expected {{\"mode\": \"full\"}} or {{\"mode\": \"delta\", \"watermark\": \"...\"}})")
    })?;
    Ok(ImportRequest {
        connector,
        object_type,
        mode,
    })
}

/// `DirectoryTest(connector)`.
pub fn parse_test_args(args: &[Value]) -> Result<ConnectorSpec, String> {
    check_arity(DIRECTORY_TEST, args, 1, "connector")?;
    parse_connector(&args[0])
}

fn mode_name(mode: &ImportMode) -> &'static str {
    match mode {
        ImportMode::Full => "full",
        ImportMode::Delta { .. } => "delta",
    }
}

/// Largest StreamItem payload sent: the hub refuses frames over
/// [`DEFAULT_MAX_FRAME_SIZE`]; the rest is room for the message envelope.
pub const MAX_ITEM_BYTES: usize = DEFAULT_MAX_FRAME_SIZE - 16 * 1024;

/// Encodes `page` as one or more StreamItems of at most `max` bytes each, splitting it in
/// order (a smaller page is still a page to the server). One object bigger than `max` on its
/// own cannot be sent and fails the import with a message naming it.
pub fn encode_page(page: Page, max: usize) -> Result<Vec<Value>, String> {
    let text = serde_json::to_string(&page).map_err(|e| format!("cannot encode a page: {e}"))?;
    if text.len() <= max {
        let v = serde_json::from_str(&text).map_err(|e| format!("cannot encode a page: {e}"))?;
        return Ok(vec![v]);
    }
    let Page {
        mut objects,
        mut rejected,
    } = page;
    let (first, second) = if objects.len() >= 2 {
        let tail = objects.split_off(objects.len() / 2);
        (
            Page {
                objects,
                rejected: Vec::new(),
            },
            Page {
                objects: tail,
                rejected,
            },
        )
    } else if rejected.len() >= 2 {
        let tail = rejected.split_off(rejected.len() / 2);
        (
            Page { objects, rejected },
            Page {
                objects: Vec::new(),
                rejected: tail,
            },
        )
    } else {
        let what = match objects.first() {
            Some(o) => format!("object \"{}\"", o.dn.as_deref().unwrap_or(&o.anchor)),
            None => "a rejected-row report".to_string(),
        };
        return Err(format!(
            "{what} is {} bytes encoded, more than the {max} bytes one hub message can carry; \
             leave large attributes (e.g. jpegPhoto, thumbnailPhoto) out of the object type's \
             attributes list",
            text.len()
        ));
    };
    let mut items = encode_page(first, max)?;
    items.extend(encode_page(second, max)?);
    Ok(items)
}

#[derive(Default)]
struct Forwarded {
    pages: u64,
    items: u64,
    objects: u64,
    rejected: u64,
}

enum ForwardError {
    SinkClosed,
    Encode(String),
}

/// Moves pages from the connector to the hub, one StreamItem each (more when a page is too
/// big for one message), waiting on every send. Returning (early or not) drops `rx`, which
/// makes the connector stop with `Cancelled`.
async fn forward(
    mut rx: mpsc::Receiver<Page>,
    sink: &mut ItemSink,
    counts: &mut Forwarded,
) -> Result<(), ForwardError> {
    while let Some(page) = rx.recv().await {
        let objects = page.objects.len() as u64;
        let rejected = page.rejected.len() as u64;
        for item in encode_page(page, MAX_ITEM_BYTES).map_err(ForwardError::Encode)? {
            sink.send(item)
                .await
                .map_err(|_| ForwardError::SinkClosed)?;
            counts.items += 1;
        }
        counts.pages += 1;
        counts.objects += objects;
        counts.rejected += rejected;
    }
    Ok(())
}

async fn directory_import(
    args: Vec<Value>,
    mut sink: ItemSink,
    csv_roots: Arc<DropRoots>,
) -> Result<Value, String> {
    let parsed = parse_import_args(&args);
    // The raw arguments hold the password; keep them no longer than needed.
    drop(args);
    let req = parsed.inspect_err(|e| {
        tracing::warn!(error = %e, "DirectoryImport refused: bad arguments");
    })?;
    let kind = req.connector.kind();
    let object_type = req.object_type;
    let mode = req.mode;
    tracing::info!(
        kind,
        object_type = %object_type,
        mode = mode_name(&mode),
        "directory import started"
    );
    let started = Instant::now();
    let directory = req.connector.build(&csv_roots).map_err(|e| {
        tracing::warn!(kind, object_type = %object_type, error = %e, "directory import failed");
        e.to_string()
    })?;

    let (tx, rx) = mpsc::channel::<Page>(PAGE_CHANNEL);
    let mut counts = Forwarded::default();
    let (imported, forwarded) = tokio::join!(
        directory.import(&object_type, &mode, tx),
        // `rx` moves in and is dropped as soon as forwarding stops.
        forward(rx, &mut sink, &mut counts),
    );
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let result = match (imported, forwarded) {
        (_, Err(ForwardError::SinkClosed)) => Err(format!(
            "the hub connection closed after {} page(s); the import was stopped",
            counts.pages
        )),
        (_, Err(ForwardError::Encode(e))) => Err(e),
        (Err(e), Ok(())) => Err(e.to_string()),
        (Ok(summary), Ok(())) => serde_json::to_value(&summary)
            .map_err(|e| format!("cannot encode the import summary: {e}")),
    };
    match &result {
        Ok(_) => tracing::info!(
            kind,
            object_type = %object_type,
            pages = counts.pages,
            items = counts.items,
            objects = counts.objects,
            rejected = counts.rejected,
            elapsed_ms,
            "directory import finished"
        ),
        Err(e) => tracing::warn!(
            kind,
            object_type = %object_type,
            pages = counts.pages,
            objects = counts.objects,
            elapsed_ms,
            error = %e,
            "directory import failed"
        ),
    }
    result
}

async fn directory_test(
    args: Vec<Value>,
    _sink: ItemSink,
    csv_roots: Arc<DropRoots>,
) -> Result<Value, String> {
    let parsed = parse_test_args(&args);
    drop(args);
    let spec = parsed.inspect_err(|e| {
        tracing::warn!(error = %e, "DirectoryTest refused: bad arguments");
    })?;
    let kind = spec.kind();
    let result = async {
        let directory = spec.build(&csv_roots)?;
        directory.test_connection().await
    }
    .await;
    match result {
        Ok(report) => {
            tracing::info!(kind, steps = report.steps.len(), "directory test passed");
            serde_json::to_value(&report).map_err(|e| format!("cannot encode the test report: {e}"))
        }
        Err(e) => {
            tracing::warn!(kind, error = %e, "directory test failed");
            Err(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_checked_against_the_relays_roots() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("hr")).unwrap();
        let roots = csv_roots(&[root.path().to_path_buf()]);
        let inside = root.path().join("hr");
        let ok = check_folder(&[json!(inside.to_str().unwrap())], &roots).unwrap();
        assert_eq!(
            ok["folder"],
            json!(inside.canonicalize().unwrap().display().to_string())
        );
        let e = check_folder(&[json!("/etc")], &roots).unwrap_err();
        assert!(e.contains(CSV_ROOTS_SETTING), "{e}");
        let e = check_folder(&[json!(1)], &roots).unwrap_err();
        assert!(e.contains("folder must be a string"), "{e}");
        assert!(check_folder(&[], &roots)
            .unwrap_err()
            .contains("expects 1 argument"));
        // No roots: every folder is refused.
        let none = csv_roots(&[]);
        assert!(check_folder(&[json!(inside.to_str().unwrap())], &none).is_err());
    }
    use identitymesh_signalr::protocol::HubMessage;
    use serde_json::json;
    use std::time::Duration;

    const SECRET: &str = "s3cr3t-Passw0rd";

    fn ldap_config() -> Value {
        json!({
            "url": "ldap://127.0.0.1:1",
            "allow_plain": true,
            "bind_dn": "cn=sync,dc=example,dc=org",
            "bind_password_ref": "ldap-bind",
            "object_types": {"people": {"base_dn": "ou=people,dc=example,dc=org"}}
        })
    }

    fn ldap_connector() -> Value {
        json!({"kind": "ldap", "config": ldap_config(), "password": SECRET})
    }

    fn err_import(args: Vec<Value>) -> String {
        let e = parse_import_args(&args).unwrap_err();
        assert!(!e.contains(SECRET), "{e}");
        e
    }

    #[test]
    fn parses_what_the_server_sends() {
        let req = parse_import_args(&[
            ldap_connector(),
            json!("people"),
            json!({"mode": "delta", "watermark": "20261126014500.000000Z#000000#000#000000"}),
        ])
        .unwrap();
        assert_eq!(req.object_type, "people");
        assert!(matches!(req.mode, ImportMode::Delta { .. }));
        match &req.connector {
            ConnectorSpec::Ldap { config, password } => {
                assert_eq!(config.url, "ldap://127.0.0.1:1");
                assert_eq!(config.page_size, 500, "defaults apply");
                assert_eq!(password.as_deref(), Some(SECRET));
            }
            other => panic!("{other:?}"),
        }
        let dbg = format!("{req:?}");
        assert!(!dbg.contains(SECRET), "Debug hides the password: {dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");

        let req = parse_import_args(&[
            json!({"kind": "csv", "config": {"folder": "/drop", "object_type": "people", "anchor_column": "id"}, "password": null}),
            json!("people"),
            json!({"mode": "full"}),
        ])
        .unwrap();
        assert_eq!(req.connector.kind(), "csv");
        assert_eq!(req.mode, ImportMode::Full);

        // A missing password is "none".
        let spec = parse_test_args(&[json!({"kind": "ldap", "config": ldap_config()})]).unwrap();
        assert!(matches!(spec, ConnectorSpec::Ldap { password: None, .. }));
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let full = json!({"mode": "full"});
        let cases: Vec<(Vec<Value>, &str)> = vec![
            (vec![], "DirectoryImport expects 3 argument(s)"),
            (
                vec![ldap_connector(), json!("people")],
                "expects 3 argument(s) (connector, object type, import mode), got 2",
            ),
            (
                vec![json!("ldap"), json!("people"), full.clone()],
                "connector: expected an object",
            ),
            (
                vec![
                    json!({"kind": "ftp", "config": {}, "password": null}),
                    json!("people"),
                    full.clone(),
                ],
                "connector.kind: unknown connector kind \"ftp\"",
            ),
            (
                vec![json!({"config": {}}), json!("people"), full.clone()],
                "connector.kind: missing",
            ),
            (
                vec![json!({"kind": "ldap"}), json!("people"), full.clone()],
                "connector.config: missing",
            ),
            (
                vec![
                    json!({"kind": "ldap", "config": [], "password": null}),
                    json!("people"),
                    full.clone(),
                ],
                "connector.config: expected an object, got an array",
            ),
            (
                vec![
                    json!({"kind": "ldap", "config": ldap_config(), "password": SECRET, "extra": 1}),
                    json!("people"),
                    full.clone(),
                ],
                "connector: unknown field \"extra\"",
            ),
            (
                vec![
                    json!({"kind": "ldap", "config": {"url": "ldaps://x:636", "object_types": {"people": {"base_dn": "o=x", "fliter": "(a=b)"}}}}),
                    json!("people"),
                    full.clone(),
                ],
                "connector.config.object_types.people.fliter: unknown field `fliter`",
            ),
            (
                vec![
                    json!({"kind": "ldap", "config": {"object_types": {}}}),
                    json!("people"),
                    full.clone(),
                ],
                "connector.config: missing field `url`",
            ),
            (
                vec![
                    json!({"kind": "csv", "config": {"folder": "/d", "object_type": "p", "anchor_column": "id"}, "password": SECRET}),
                    json!("p"),
                    full.clone(),
                ],
                "connector.password: a csv connector takes no password",
            ),
            (
                vec![ldap_connector(), json!(""), full.clone()],
                "objectType: is empty",
            ),
            (
                vec![ldap_connector(), json!(7), full.clone()],
                "objectType: expected a string, got a number",
            ),
            (
                vec![ldap_connector(), json!("people"), json!("full")],
                "mode: ",
            ),
            (
                vec![
                    ldap_connector(),
                    json!("people"),
                    json!({"mode": "sideways"}),
                ],
                "unknown variant `sideways`",
            ),
            (
                vec![ldap_connector(), json!("people"), json!({"mode": "delta"})],
                "missing field `watermark`",
            ),
        ];
        for (args, want) in cases {
            let e = err_import(args.clone());
            assert!(e.contains(want), "{args:?}: wanted {want:?} in {e:?}");
        }
        let e = parse_test_args(&[]).unwrap_err();
        assert!(
            e.contains("DirectoryTest expects 1 argument(s) (connector), got 0"),
            "{e}"
        );
    }

    #[test]
    fn a_mistyped_password_is_not_echoed() {
        for (pw, what) in [
            (json!(918273645), "a number"),
            (json!(true), "a boolean"),
            (json!([SECRET]), "an array"),
            (json!({"value": SECRET}), "an object"),
        ] {
            let args = vec![
                json!({"kind": "ldap", "config": ldap_config(), "password": pw}),
                json!("people"),
                json!({"mode": "full"}),
            ];
            let e = err_import(args);
            assert!(
                e.contains(&format!(
                    "connector.password: expected a string or null, got {what}"
                )),
                "{e}"
            );
            assert!(!e.contains("918273645"), "{e}");
        }
    }

    #[test]
    fn connector_errors_become_their_display_string() {
        // bind_dn without a password: the connector refuses, naming the field.
        let spec = parse_test_args(&[json!({"kind": "ldap", "config": ldap_config()})]).unwrap();
        let e = spec.build(&csv_roots(&[])).err().unwrap().to_string();
        assert!(e.contains("bind_password_ref"), "{e}");
    }

    fn write_csv(dir: &std::path::Path, rows: usize) {
        let mut text = String::from("id,mail\n");
        for i in 0..rows {
            text.push_str(&format!("{i},user{i}@example.org\n"));
        }
        std::fs::write(dir.join("people.csv"), text).unwrap();
    }

    fn csv_args(dir: &std::path::Path) -> Vec<Value> {
        vec![
            json!({"kind": "csv", "config": {"folder": dir, "object_type": "people", "anchor_column": "id"}, "password": null}),
            json!("people"),
            json!({"mode": "full"}),
        ]
    }

    fn roots_of(dir: &std::path::Path) -> Arc<DropRoots> {
        Arc::new(csv_roots(&[dir.to_path_buf()]))
    }

    /// A relay host: a drop root with a readable folder, and beside it the relay's own files
    /// (its credential) and a CSV folder nobody listed.
    struct Host {
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        outside: std::path::PathBuf,
    }

    fn host() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("drop");
        let outside = dir.path().join("relay-state");
        std::fs::create_dir_all(root.join("hr")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        write_csv(&root.join("hr"), 3);
        write_csv(&outside, 3);
        std::fs::write(
            outside.join("relay.toml"),
            "token = \"imr_relay_credential\"\n",
        )
        .unwrap();
        Host {
            _dir: dir,
            root,
            outside,
        }
    }

    async fn import_at(
        folder: &std::path::Path,
        pattern: &str,
        roots: Arc<DropRoots>,
    ) -> Result<Value, String> {
        let (out, _frames) = mpsc::channel(64);
        let args = vec![
            json!({"kind": "csv", "config": {"folder": folder, "pattern": pattern, "object_type": "people", "anchor_column": "id"}, "password": null}),
            json!("people"),
            json!({"mode": "full"}),
        ];
        directory_import(args, ItemSink::new(Some("7".into()), out), roots).await
    }

    #[tokio::test]
    async fn csv_imports_read_inside_the_relays_roots_only() {
        let h = host();
        let roots = roots_of(&h.root);
        let root = std::fs::canonicalize(&h.root).unwrap();
        let ok = import_at(&h.root.join("hr"), "*.csv", roots.clone())
            .await
            .unwrap();
        assert_eq!(ok["objects"], 3);

        for folder in [
            h.outside.clone(),
            h.root.join("../relay-state"),
            std::path::PathBuf::from("/proc/self"),
        ] {
            let e = import_at(&folder, "*", roots.clone()).await.unwrap_err();
            assert!(
                e.contains(CSV_ROOTS_SETTING) && e.contains(&root.display().to_string()),
                "{folder:?}: {e}"
            );
            assert!(
                !e.contains("imr_relay_credential") && !e.contains("id,mail"),
                "{e}"
            );
        }
        // The connection test is confined the same way.
        let (out, _frames) = mpsc::channel(4);
        let e = directory_test(
            vec![json!({"kind": "csv", "config": {"folder": h.outside, "object_type": "people", "anchor_column": "id"}, "password": null})],
            ItemSink::new(Some("8".into()), out),
            roots,
        )
        .await
        .unwrap_err();
        assert!(e.contains(CSV_ROOTS_SETTING), "{e}");
    }

    #[tokio::test]
    async fn a_relay_without_roots_refuses_csv_connectors() {
        let h = host();
        let e = import_at(&h.root.join("hr"), "*.csv", Arc::new(csv_roots(&[])))
            .await
            .unwrap_err();
        assert!(
            e.contains("CSV connectors are disabled on this relay")
                && e.contains(CSV_ROOTS_SETTING),
            "{e}"
        );
    }

    /// A folder inside the roots that is a link out is refused; a file linking out is not
    /// read (only regular files are listed), so nothing of it reaches the server.
    #[cfg(unix)]
    #[tokio::test]
    async fn links_out_of_the_roots_are_refused_on_every_read() {
        let h = host();
        let roots = roots_of(&h.root);
        std::os::unix::fs::symlink(&h.outside, h.root.join("swapped")).unwrap();
        let e = import_at(&h.root.join("swapped"), "*", roots.clone())
            .await
            .unwrap_err();
        assert!(e.contains(CSV_ROOTS_SETTING), "{e}");
        std::os::unix::fs::symlink(h.outside.join("relay.toml"), h.root.join("hr/z.csv")).unwrap();
        let ok = import_at(&h.root.join("hr"), "*.csv", roots).await.unwrap();
        assert_eq!(ok["objects"], 3, "{ok}");
        assert!(!ok.to_string().contains("imr_relay_credential"), "{ok}");
    }

    fn page_of(frame: &str) -> Page {
        let frame = frame.trim_end_matches('\u{1e}');
        match HubMessage::parse(frame.as_bytes()).unwrap() {
            HubMessage::StreamItem {
                invocation_id,
                item,
            } => {
                assert_eq!(invocation_id, "7");
                serde_json::from_value(item).unwrap()
            }
            other => panic!("expected a StreamItem, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn csv_import_streams_pages_and_completes_with_the_summary() {
        let dir = tempfile::tempdir().unwrap();
        write_csv(dir.path(), 1200);
        let (out, mut frames) = mpsc::channel(64);
        let sink = ItemSink::new(Some("7".into()), out);
        let summary = directory_import(csv_args(dir.path()), sink, roots_of(dir.path()))
            .await
            .unwrap();
        let summary: ImportSummary = serde_json::from_value(summary).unwrap();
        assert_eq!(summary.objects, 1200);
        let mut anchors = Vec::new();
        while let Ok(f) = frames.try_recv() {
            anchors.extend(page_of(&f).objects.into_iter().map(|o| o.anchor));
        }
        assert_eq!(anchors.len(), 1200);
        assert_eq!(anchors[1199], "1199");
    }

    #[tokio::test]
    async fn a_slow_hub_holds_the_reader_back() {
        let dir = tempfile::tempdir().unwrap();
        write_csv(dir.path(), 5000); // 10 pages of 500
        let (out, mut frames) = mpsc::channel(1);
        let sink = ItemSink::new(Some("7".into()), out);
        let task = tokio::spawn(directory_import(
            csv_args(dir.path()),
            sink,
            roots_of(dir.path()),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "the import waits for the hub");
        assert_eq!(frames.len(), 1, "one frame queued, the rest held back");
        let mut pages = 0;
        while let Some(f) = frames.recv().await {
            pages += 1;
            assert!(!page_of(&f).objects.is_empty());
        }
        assert_eq!(pages, 10);
        let summary = task.await.unwrap().unwrap();
        assert_eq!(summary["objects"], 5000);
    }

    #[tokio::test]
    async fn a_closed_connection_stops_the_import() {
        let dir = tempfile::tempdir().unwrap();
        write_csv(dir.path(), 5000);
        let (out, frames) = mpsc::channel(1);
        drop(frames);
        let sink = ItemSink::new(Some("7".into()), out);
        let e = tokio::time::timeout(
            Duration::from_secs(10),
            directory_import(csv_args(dir.path()), sink, roots_of(dir.path())),
        )
        .await
        .expect("the import stops")
        .unwrap_err();
        assert!(
            e.contains("the hub connection closed after 0 page(s)"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn import_and_test_failures_come_back_as_messages() {
        let dir = tempfile::tempdir().unwrap();
        write_csv(dir.path(), 3);
        let (out, _frames) = mpsc::channel(4);
        let mut args = csv_args(dir.path());
        args[1] = json!("groups");
        let e = directory_import(
            args,
            ItemSink::new(Some("7".into()), out.clone()),
            roots_of(dir.path()),
        )
        .await
        .unwrap_err();
        assert!(e.contains("unknown object type \"groups\""), "{e}");

        let report = directory_test(
            vec![csv_args(dir.path()).swap_remove(0)],
            ItemSink::new(Some("8".into()), out.clone()),
            roots_of(dir.path()),
        )
        .await
        .unwrap();
        let report: TestReport = serde_json::from_value(report).unwrap();
        assert!(
            report.steps[0].detail.contains("1 file(s) match"),
            "{report:?}"
        );

        // Nothing listens on port 1: a connect error, password nowhere in it.
        let e = directory_test(
            vec![ldap_connector()],
            ItemSink::new(Some("9".into()), out),
            Arc::new(csv_roots(&[])),
        )
        .await
        .unwrap_err();
        assert!(e.contains("cannot connect to ldap://127.0.0.1:1"), "{e}");
        assert!(!e.contains(SECRET), "{e}");
    }

    fn big_object(i: usize, bytes: usize) -> identitymesh_connectors::model::ConnectorObject {
        use identitymesh_connectors::model::Value as AttrValue;
        let mut attributes = identitymesh_connectors::model::Attributes::new();
        attributes.insert(
            "jpegPhoto".into(),
            vec![AttrValue::Binary(vec![i as u8; bytes])],
        );
        identitymesh_connectors::model::ConnectorObject {
            anchor: format!("a{i}"),
            object_type: "people".into(),
            dn: Some(format!("uid=u{i},ou=people,dc=example,dc=org")),
            attributes,
            location: None,
        }
    }

    #[test]
    fn pages_too_big_for_one_message_are_split_in_order() {
        let page = Page {
            objects: (0..10).map(|i| big_object(i, 3000)).collect(),
            rejected: vec![identitymesh_connectors::model::Rejected {
                location: "uid=bad".into(),
                reason: "no anchor".into(),
            }],
        };
        let small = encode_page(page.clone(), MAX_ITEM_BYTES).unwrap();
        assert_eq!(small.len(), 1, "a page that fits goes as it is");
        assert_eq!(
            serde_json::from_value::<Page>(small[0].clone()).unwrap(),
            page
        );

        let items = encode_page(page.clone(), 10_000).unwrap();
        assert!(items.len() > 2, "{}", items.len());
        let mut objects = Vec::new();
        let mut rejected = Vec::new();
        for item in &items {
            assert!(item.to_string().len() <= 10_000);
            let p: Page = serde_json::from_value(item.clone()).unwrap();
            objects.extend(p.objects);
            rejected.extend(p.rejected);
        }
        assert_eq!(objects, page.objects);
        assert_eq!(rejected, page.rejected);

        let e = encode_page(
            Page {
                objects: vec![big_object(1, 20_000)],
                rejected: Vec::new(),
            },
            10_000,
        )
        .unwrap_err();
        assert!(
            e.contains("object \"uid=u1,ou=people,dc=example,dc=org\" is")
                && e.contains("more than the 10000 bytes"),
            "{e}"
        );
    }
}

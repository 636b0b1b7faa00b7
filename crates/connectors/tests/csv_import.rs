//! The CSV drop-folder connector on temp files.

use std::path::Path;

use identitymesh_connectors::model::{
    ConnectorObject, ImportMode, ImportSummary, Page, Rejected, Value,
};
use identitymesh_connectors::{ConnectorError, CsvConfig, CsvConnector};

fn config(folder: &Path) -> CsvConfig {
    serde_json::from_value(serde_json::json!({
        "folder": folder,
        "object_type": "people",
        "anchor_column": "id",
    }))
    .expect("config parses")
}

async fn run(cfg: CsvConfig) -> Result<(Vec<Page>, ImportSummary), ConnectorError> {
    let conn = CsvConnector::new(cfg)?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let collector = tokio::spawn(async move {
        let mut pages = Vec::new();
        while let Some(p) = rx.recv().await {
            pages.push(p);
        }
        pages
    });
    let summary = conn.import("people", &ImportMode::Full, tx).await;
    let pages = collector.await.expect("collector");
    summary.map(|s| (pages, s))
}

fn objects(pages: &[Page]) -> Vec<ConnectorObject> {
    pages.iter().flat_map(|p| p.objects.clone()).collect()
}

fn rejected(pages: &[Page]) -> Vec<Rejected> {
    pages.iter().flat_map(|p| p.rejected.clone()).collect()
}

fn text(o: &ConnectorObject, attr: &str) -> Vec<String> {
    o.attributes
        .get(attr)
        .map(|v| {
            v.iter()
                .filter_map(Value::as_text)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn utf8_with_bom_multi_values_and_quoted_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = "\u{feff}id,cn,mail\n1,Zoë Ünal,zoe@x.org;z.u@x.org\n2,\"Doe, John\",\n3,\"two\nlines\",a@x.org\n";
    std::fs::write(dir.path().join("people.csv"), body).expect("write");
    std::fs::write(dir.path().join("ignored.txt"), "id\n9\n").expect("write");
    let mut cfg = config(dir.path());
    cfg.multi_value_separator = Some(';');
    let (pages, summary) = run(cfg).await.expect("import");
    let objs = objects(&pages);
    assert_eq!(summary.objects, 3);
    assert_eq!(summary.watermark, None, "CSV has no watermark");
    assert_eq!(
        objs[0].anchor, "1",
        "the BOM is not part of the first column name"
    );
    assert_eq!(text(&objs[0], "cn"), ["Zoë Ünal"]);
    assert_eq!(text(&objs[0], "mail"), ["zoe@x.org", "z.u@x.org"]);
    assert_eq!(text(&objs[1], "cn"), ["Doe, John"]);
    assert!(
        !objs[1].attributes.contains_key("mail"),
        "an empty cell is no value"
    );
    assert_eq!(text(&objs[2], "cn"), ["two\nlines"]);
    assert_eq!(objs[2].object_type, "people");
    assert_eq!(objs[2].dn, None);
}

#[tokio::test]
async fn legacy_encodings_and_delimiters() {
    let dir = tempfile::tempdir().expect("tempdir");
    // windows-1252: ë = 0xEB, € = 0x80; semicolon-delimited.
    std::fs::write(dir.path().join("a.csv"), b"id;cn\r\n1;Zo\xEB \x80\r\n").expect("write");
    let mut cfg = config(dir.path());
    cfg.delimiter = ';';
    cfg.encoding = "windows-1252".into();
    let (pages, _) = run(cfg.clone()).await.expect("windows-1252");
    assert_eq!(text(&objects(&pages)[0], "cn"), ["Zoë €"]);

    cfg.encoding = "iso-8859-1".into();
    let (pages, _) = run(cfg).await.expect("iso-8859-1");
    assert_eq!(text(&objects(&pages)[0], "cn"), ["Zoë €"]);

    // UTF-16LE with BOM, tab-delimited.
    let dir16 = tempfile::tempdir().expect("tempdir");
    let mut bytes = vec![0xFF, 0xFE];
    for u in "id\tcn\n1\t山田太郎\n2\tŁukasz\n".encode_utf16() {
        bytes.extend(u.to_le_bytes());
    }
    std::fs::write(dir16.path().join("w.csv"), &bytes).expect("write");
    let mut cfg = config(dir16.path());
    cfg.delimiter = '\t';
    cfg.encoding = "utf-16le".into();
    let (pages, _) = run(cfg.clone()).await.expect("utf-16le");
    let objs = objects(&pages);
    assert_eq!(text(&objs[0], "cn"), ["山田太郎"]);
    assert_eq!(text(&objs[1], "cn"), ["Łukasz"]);

    // UTF-16LE without a BOM, read because the config says so.
    std::fs::write(dir16.path().join("w.csv"), &bytes[2..]).expect("write");
    let (pages, _) = run(cfg).await.expect("utf-16le without BOM");
    assert_eq!(objects(&pages).len(), 2);
}

#[tokio::test]
async fn bad_rows_are_rejected_with_their_line_and_the_rest_imported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body: &[u8] = b"id,cn,sn\n\
        1,Ann,A\n\
        2,Bob\n\
        ,Nobody,N\n\
        3,\"multi\nline\",C\n\
        4,Bad \xff byte,D\n\
        1,Ann again,A\n\
        5,Eve,E,extra\n\
        6,Fay,F\n";
    std::fs::write(dir.path().join("a.csv"), body).expect("write");
    // A second file: anchors are unique across the whole import.
    std::fs::write(
        dir.path().join("b.csv"),
        "id,cn,sn\n6,Fay twice,F\n7,Gus,G\n",
    )
    .expect("write");
    let (pages, summary) = run(config(dir.path())).await.expect("import");
    let anchors: Vec<String> = objects(&pages).into_iter().map(|o| o.anchor).collect();
    assert_eq!(anchors, ["1", "3", "6", "7"]);
    let rej: Vec<(String, String)> = rejected(&pages)
        .into_iter()
        .map(|r| (r.location, r.reason))
        .collect();
    let locations: Vec<&str> = rej.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(
        locations,
        ["a.csv:3", "a.csv:4", "a.csv:7", "a.csv:8", "a.csv:9", "b.csv:2"],
        "{rej:?}"
    );
    assert!(
        rej[0].1.contains("2 field(s)") && rej[0].1.contains("3 column(s)"),
        "{rej:?}"
    );
    assert!(
        rej[1].1.contains("anchor column \"id\" is empty"),
        "{rej:?}"
    );
    assert!(
        rej[2].1.contains("not valid UTF-8") && rej[2].1.contains("\"cn\""),
        "{rej:?}"
    );
    assert!(
        rej[3].1.contains("duplicate anchor \"1\"") && rej[3].1.contains("a.csv:2"),
        "{rej:?}"
    );
    assert!(
        rej[5].1.contains("duplicate anchor \"6\"") && rej[5].1.contains("a.csv:10"),
        "{rej:?}"
    );
    assert_eq!(summary.objects, 4);
    assert_eq!(summary.rejected, 6);
}

#[tokio::test]
async fn files_are_read_in_name_order_and_paged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut big = String::from("id,cn\n");
    for i in 0..1200 {
        big.push_str(&format!("b{i},Person {i}\n"));
    }
    std::fs::write(dir.path().join("2-big.csv"), big).expect("write");
    std::fs::write(dir.path().join("1-first.csv"), "id,cn\na0,First\n").expect("write");
    let (pages, summary) = run(config(dir.path())).await.expect("import");
    let sizes: Vec<usize> = pages.iter().map(|p| p.objects.len()).collect();
    assert_eq!(sizes, [500, 500, 201]);
    assert_eq!(pages[0].objects[0].anchor, "a0");
    assert_eq!(summary.objects, 1201);
}

#[tokio::test]
async fn whole_file_problems_and_a_missing_folder_are_errors() {
    let missing = tempfile::tempdir().expect("tempdir").path().join("nope");
    let e = run(config(&missing)).await.unwrap_err();
    assert!(matches!(e, ConnectorError::Source { .. }), "{e:?}");
    assert!(e.to_string().contains("does not exist"), "{e}");
    let e = CsvConnector::new(config(&missing))
        .expect("config")
        .test_connection()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a.csv"), "key,cn\n1,A\n").expect("write");
    let e = run(config(dir.path())).await.unwrap_err();
    assert!(
        e.to_string().contains("no anchor column \"id\"")
            && e.to_string().contains("2 column(s), the first \"key\""),
        "{e}"
    );

    // A folder pointed at files that are not CSV drops (a token file, a key ring): their first
    // line never reaches the error, which run records and Events carry.
    let secret = "imt_0d9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f";
    std::fs::write(dir.path().join("a.csv"), format!("{secret}\n")).expect("write");
    let e = run(config(dir.path())).await.unwrap_err().to_string();
    assert!(!e.contains(secret), "{e}");
    assert!(!e.contains(&secret[12..]), "more than an excerpt: {e}");
    assert!(e.contains("imt_0d9f8a7b…"), "{e}");
    std::fs::write(dir.path().join("a.csv"), format!("id,{secret},{secret}\n")).expect("write");
    let e = run(config(dir.path())).await.unwrap_err().to_string();
    assert!(e.contains("twice") && !e.contains(&secret[12..]), "{e}");

    std::fs::write(dir.path().join("a.csv"), "").expect("write");
    let e = run(config(dir.path())).await.unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");

    std::fs::write(dir.path().join("a.csv"), "id,cn,cn\n1,A,B\n").expect("write");
    let e = run(config(dir.path())).await.unwrap_err();
    assert!(e.to_string().contains("\"cn\" twice"), "{e}");

    std::fs::write(dir.path().join("a.csv"), "id,cn\n1,A\n").expect("write");
    std::fs::write(dir.path().join("b.csv"), "id,cn\n2,B\n").expect("write");
    let conn = CsvConnector::new(config(dir.path())).expect("config");
    let report = conn.test_connection().await.expect("test");
    assert!(
        report.steps[0].detail.contains("2 file(s) match *.csv"),
        "{report:?}"
    );
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let e = conn
        .import("groups", &ImportMode::Full, tx)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ConnectorError::UnknownObjectType { .. }),
        "{e:?}"
    );

    // A delta is a full read.
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let s = conn
        .import(
            "people",
            &ImportMode::Delta {
                watermark: "x".into(),
            },
            tx,
        )
        .await
        .expect("delta");
    assert_eq!(s.objects, 2);
    assert_eq!(rx.recv().await.map(|p| p.objects.len()), Some(2));
}

#[tokio::test]
async fn a_closed_receiver_cancels() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a.csv"), "id\n1\n").expect("write");
    let conn = CsvConnector::new(config(dir.path())).expect("config");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    drop(rx);
    let e = conn
        .import("people", &ImportMode::Full, tx)
        .await
        .unwrap_err();
    assert!(matches!(e, ConnectorError::Cancelled), "{e:?}");
}

#[tokio::test]
async fn malformed_utf16_rejects_only_its_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = Vec::new();
    for u in "id,cn\n1,ok\n2,".encode_utf16() {
        bytes.extend(u.to_le_bytes());
    }
    bytes.extend(0xD800u16.to_le_bytes()); // an unpaired surrogate
    for u in "x\n3,fine\n".encode_utf16() {
        bytes.extend(u.to_le_bytes());
    }
    std::fs::write(dir.path().join("a.csv"), &bytes).expect("write");
    let mut cfg = config(dir.path());
    cfg.encoding = "utf-16le".into();
    let (pages, _) = run(cfg).await.expect("import");
    let anchors: Vec<String> = objects(&pages).into_iter().map(|o| o.anchor).collect();
    assert_eq!(anchors, ["1", "3"]);
    let rej = rejected(&pages);
    assert_eq!(rej.len(), 1);
    assert_eq!(rej[0].location, "a.csv:3");
    assert!(rej[0].reason.contains("UTF-16LE"), "{rej:?}");
}

/// Rows longer than the parser's buffer, and a UTF-16 file larger than the decoder's buffer
/// with surrogate pairs at every offset, read from files as they are.
#[tokio::test]
async fn long_rows_and_large_utf16_files_read_across_buffers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let long = "Zoë ".repeat(50_000); // 250 KB, several parser buffers
    std::fs::write(
        dir.path().join("a.csv"),
        format!("id,cn\n1,\"{long}\nand more\"\n2,short\n"),
    )
    .expect("write");
    let (pages, _) = run(config(dir.path())).await.expect("import");
    let objs = objects(&pages);
    assert_eq!(text(&objs[0], "cn"), [format!("{long}\nand more")]);
    assert_eq!(objs[1].location.as_deref(), Some("a.csv:4"));

    let dir16 = tempfile::tempdir().expect("tempdir");
    let mut body = String::from("id,cn\n");
    // Rows of odd lengths, so the four-byte pairs land across every buffer boundary.
    for i in 0..20_000 {
        body.push_str(&format!("{i},🎉{}山\n", "x".repeat(i % 7)));
    }
    let mut bytes = vec![0xFF, 0xFE];
    for u in body.encode_utf16() {
        bytes.extend(u.to_le_bytes());
    }
    assert!(bytes.len() > 256 * 1024, "larger than many decode buffers");
    std::fs::write(dir16.path().join("w.csv"), &bytes).expect("write");
    let (pages, summary) = run(config(dir16.path())).await.expect("utf-16 import");
    assert_eq!((summary.objects, summary.rejected), (20_000, 0));
    for (i, o) in objects(&pages).iter().enumerate() {
        assert_eq!(text(o, "cn"), [format!("🎉{}山", "x".repeat(i % 7))]);
    }
}

/// A duplicate of an anchor an earlier page held goes out with where it is: the connector
/// keeps one page's anchors, and whoever commits the pages refuses it (the server's store
/// knows every anchor the run imported).
#[tokio::test]
async fn a_duplicate_of_an_earlier_page_goes_out_with_its_location() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut body = String::from("id,cn\n");
    for i in 0..600 {
        body.push_str(&format!("p{i},Person {i}\n"));
    }
    body.push_str("p3,Person 3 again\n");
    std::fs::write(dir.path().join("a.csv"), body).expect("write");
    let (pages, summary) = run(config(dir.path())).await.expect("import");
    assert_eq!((summary.objects, summary.rejected), (601, 0));
    let again = &pages[1].objects.last().expect("object");
    assert_eq!(again.anchor, "p3");
    assert_eq!(again.location.as_deref(), Some("a.csv:602"));
}

/// The file is streamed: with the consumer not taking pages, the reader stops once the
/// channel is full, long before the end of the file (its read position in /proc says so).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_file_is_read_as_its_pages_are_taken() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.csv");
    let mut body = String::from("id,cn\n");
    for i in 0..400_000 {
        body.push_str(&format!("e{i:08},Person {i}\n"));
    }
    std::fs::write(&path, &body).expect("write");
    let real = std::fs::canonicalize(&path).expect("canonical");
    let conn = CsvConnector::new(config(dir.path())).expect("config");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let import = tokio::spawn(async move { conn.import("people", &ImportMode::Full, tx).await });
    let first = rx.recv().await.expect("first page");
    assert_eq!(first.objects[0].anchor, "e00000000");
    // Time for a reader that reads ahead to show it; a streaming one waits on the channel.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let pos = open_position(&real).expect("the file is still open, being read");
    assert!(
        pos < body.len() as u64 / 10,
        "read {pos} of {} bytes with one page taken",
        body.len()
    );
    drop(rx);
    let e = import.await.expect("join").unwrap_err();
    assert!(matches!(e, ConnectorError::Cancelled), "{e:?}");
}

/// The read position of this process's open descriptor of `path`, if one is open.
#[cfg(target_os = "linux")]
fn open_position(path: &Path) -> Option<u64> {
    for fd in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        if std::fs::read_link(fd.path()).ok().as_deref() == Some(path) {
            let info = std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(fd.file_name()))
                .ok()?;
            return info
                .lines()
                .find_map(|l| l.strip_prefix("pos:"))
                .and_then(|p| p.trim().parse().ok());
        }
    }
    None
}

//! kill -9 in the middle of write transactions leaves no partial state: every committed batch is
//! whole, and the watermark names exactly the batches whose objects are there.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use identitymesh_server::store::sqlite::SqliteStore;
use identitymesh_server::store::Store;

const LOAD: &str = env!("CARGO_BIN_EXE_im-store-load");
const BATCH: i64 = 3000;

fn run_and_kill(db: &std::path::Path, after: Duration) {
    let mut child = Command::new(LOAD)
        .args([
            "--db",
            db.to_str().unwrap(),
            "--connector",
            "ldap",
            "--batch",
            &BATCH.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    std::thread::sleep(after);
    // SAFETY: SIGKILL to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let st = child.wait().unwrap();
    assert!(
        !st.success(),
        "the load finished before it was killed; make the test longer"
    );
}

#[tokio::test]
async fn kill_9_mid_batch_leaves_whole_batches_only() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("im.db");
    for (i, ms) in [400u64, 750, 1100, 1500].into_iter().enumerate() {
        run_and_kill(&db, Duration::from_millis(ms));
        let s = SqliteStore::open(&db).await.unwrap();
        let batches = s.count_batches("ldap").await.unwrap();
        let objects = s.count_objects("ldap").await.unwrap();
        let wm: i64 = s
            .watermark("ldap", "person")
            .await
            .unwrap()
            .map(|w| w.parse().unwrap())
            .unwrap_or(0);
        println!(
            "round {i}: killed after {ms} ms: {batches} batches, {objects} objects, watermark {wm}"
        );
        assert_eq!(objects, batches * BATCH, "a partial batch is visible");
        assert_eq!(
            wm, batches,
            "the watermark and the committed batches disagree"
        );
    }
}

//! Commits fenced import batches in a loop, as fast as the store allows: a load generator for
//! diagnostics, and the victim of the crash tests (kill -9 mid-transaction).
//!
//! usage: im-store-load --db PATH --connector NAME --batch N [--batches M]
//! Batch k holds objects k*N .. (k+1)*N and advances the watermark to k+1.

use std::path::PathBuf;

use identitymesh_server::store::sqlite::SqliteStore;
use identitymesh_server::store::{now_ms, CsObject, FenceToken, ImportBatch, Store};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: im-store-load --db PATH --connector NAME --batch N [--batches M]";
    let db = PathBuf::from(arg(&args, "--db").ok_or_else(|| anyhow::anyhow!(usage))?);
    let connector = arg(&args, "--connector").ok_or_else(|| anyhow::anyhow!(usage))?;
    let n: usize = arg(&args, "--batch")
        .ok_or_else(|| anyhow::anyhow!(usage))?
        .parse()?;
    let batches: usize = arg(&args, "--batches")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(usize::MAX);
    let store = SqliteStore::open(&db).await?;
    store.migrate().await?;
    let instance = format!("load-{}", std::process::id());
    let epoch = store.fence().await?.epoch + 1;
    let token = FenceToken {
        incarnation: instance.clone(),
        instance,
        epoch,
    };
    store.promote(&token).await?;
    let start: usize = store
        .watermark(&connector, "person")
        .await?
        .map(|w| w.parse())
        .transpose()?
        .unwrap_or(0);
    println!("ready");
    for k in start..start.saturating_add(batches) {
        let batch = ImportBatch {
            connector: connector.clone(),
            object_type: "person".into(),
            objects: (k * n..(k + 1) * n)
                .map(|i| CsObject {
                    anchor: format!("uid=u{i},ou=people,dc=example"),
                    object_type: "person".into(),
                    attributes_json: format!("{{\"uid\":[\"u{i}\"],\"cn\":[\"User {i}\"]}}"),
                })
                .collect(),
            watermark: Some((k + 1).to_string()),
            seen_in_run: None,
            compose: true,
            composed: None,
        };
        store.commit_import_batch(&token, &batch, now_ms()).await?;
    }
    Ok(())
}

//! A CSV drop file imported by a real standalone server: the server's peak memory must not grow
//! with the file (issue 11: the reader streams it; a 1 GiB file keeps memory flat).
//!
//! `cargo bench -p identitymesh-server --bench csv_import [-- --sizes 10M,1G]`;
//! `BENCH_SERVER_BIN` measures another server binary (A/B).
//!
//! Per size: a file of people rows (id, name, two mail values, department, phone) of about that
//! many bytes in the drop folder, a fresh server, one CSV connector without rules (the run only
//! imports, so the figure is the reader's and the store's, not the composer's), one full run.
//! Printed: rows, run time, objects/s and the server's peak resident memory (VmHWM) at the end,
//! and the largest size's peak as a ratio of the smallest's, measured in the same run.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use common::{arg, loadavg, Server};
use serde_json::{json, Value};

/// Growth of the peak from the smallest to the largest file still called flat.
const FLAT_MAX: f64 = 1.5;

fn size(s: &str) -> u64 {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("--sizes: {s:?} is not a size like 10M"));
    n * match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        other => panic!("--sizes: unknown unit {other:?} (K, M, G)"),
    }
}

/// People rows until the file holds about `bytes`; the row count.
fn generate(path: &Path, bytes: u64) -> u64 {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut written = 0u64;
    let header = "id,name,mail,department,phone\n";
    w.write_all(header.as_bytes()).unwrap();
    written += header.len() as u64;
    let mut rows = 0u64;
    while written < bytes {
        let line = format!(
            "e{rows:09},\"Person {rows}\",p{rows}@example.org;p.{rows}@example.org,Dept {},+1 555 {:07}\n",
            rows % 97,
            rows % 10_000_000
        );
        w.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
        rows += 1;
    }
    w.flush().unwrap();
    rows
}

#[tokio::main]
async fn main() {
    let sizes: Vec<(String, u64)> = arg("--sizes", "10M,1G")
        .split(',')
        .map(|s| (s.trim().to_string(), size(s)))
        .collect();
    println!("csv_import: load {}", loadavg());
    println!(
        "{:>6} {:>11} {:>9} {:>10} {:>14}",
        "size", "rows", "run s", "objects/s", "peak RSS MiB"
    );
    let mut peaks = Vec::new();
    for (name, bytes) in &sizes {
        let dir = tempfile::tempdir().unwrap();
        let s = Server::start(dir.path()).await;
        let folder = s.data.join("drop").join("hr");
        std::fs::create_dir_all(&folder).unwrap();
        let rows = generate(&folder.join("people.csv"), *bytes);
        let c = s
            .api(
                reqwest::Method::POST,
                "/api/connectors",
                json!({"name": "hr", "kind": "csv",
                    "config": {"folder": "hr", "object_type": "people", "anchor_column": "id",
                               "multi_value_separator": ";"}}),
            )
            .await;
        let id = c["id"].as_str().unwrap().to_string();
        let t = Instant::now();
        let run: Value = s.run(&id, "full").await;
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(run["status"], "succeeded", "{run}");
        assert_eq!(run["counts"]["added"], rows, "every row imported: {run}");
        let peak = s.peak_rss_kib() as f64 / 1024.0;
        peaks.push(peak);
        println!(
            "{name:>6} {rows:>11} {secs:>9.1} {:>10.0} {peak:>14.1}",
            rows as f64 / secs
        );
    }
    if let (Some(first), Some(last)) = (peaks.first(), peaks.last()) {
        let ratio = last / first;
        println!(
            "peak RSS, largest / smallest file: {ratio:.2}x (flat means at most {FLAT_MAX}x): {}",
            if ratio <= FLAT_MAX { "flat" } else { "GROWS" }
        );
    }
}

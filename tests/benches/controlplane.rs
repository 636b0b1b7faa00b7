//! Harness figures: tools build time (recorded by `cargo xtask tools`), warm start time of the
//! whole harness (median of 3) and control-plane memory (VmRSS).
//!
//! Run with `cargo xtask bench-harness` (or `cargo bench -p identitymesh-tests --bench
//! controlplane`). Under `cargo test` it only checks that it links.

use std::time::Duration;

use identitymesh_tests::{tools, Cluster, ClusterOptions};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("controlplane bench: run with `cargo xtask bench-harness`");
        return;
    }
    let record = tools::cache_dir().join("build-time.json");
    match std::fs::read_to_string(&record) {
        Ok(t) => println!("tools build time (from {}): {}", record.display(), t.trim()),
        Err(_) => println!(
            "tools build time: not recorded ({} missing)",
            record.display()
        ),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut starts = Vec::new();
    let mut rss = Vec::new();
    for i in 0..3 {
        rt.block_on(async {
            let cluster = Cluster::start(ClusterOptions::windows(2))
                .await
                .expect("start harness");
            let t = cluster.started_in();
            // Let controllers settle before measuring memory.
            tokio::time::sleep(Duration::from_secs(5)).await;
            let kib = cluster.control_plane_rss_kib();
            let pids = cluster.control_plane_pids();
            println!(
                "run {}: warm start {:.2}s, control-plane RSS {:.0} MiB (etcd {} / apiserver {} / kcm {} / scheduler {} MiB)",
                i + 1,
                t.as_secs_f64(),
                kib as f64 / 1024.0,
                identitymesh_tests::process::rss_kib(pids.etcd).unwrap_or(0) / 1024,
                identitymesh_tests::process::rss_kib(pids.kube_apiserver).unwrap_or(0) / 1024,
                identitymesh_tests::process::rss_kib(pids.kube_controller_manager).unwrap_or(0) / 1024,
                identitymesh_tests::process::rss_kib(pids.kube_scheduler).unwrap_or(0) / 1024,
            );
            starts.push(t);
            rss.push(kib);
        });
    }
    starts.sort();
    rss.sort();
    let median = starts[1];
    println!(
        "warm start of the whole harness (2 windows nodes): median {:.2}s of 3 (target < 15 s: {})",
        median.as_secs_f64(),
        if median < Duration::from_secs(15) {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "control-plane RSS: median {:.0} MiB",
        rss[1] as f64 / 1024.0
    );
}

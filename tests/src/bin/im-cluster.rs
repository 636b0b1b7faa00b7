//! Starts a harness cluster for manual use and keeps it up until Ctrl-C.
//!
//! `im-cluster [--windows N] [--linux N] [--proxy-delay-ms MS] [--image REPO=BINARY]...`

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use identitymesh_tests::{Cluster, ClusterOptions};

fn parse() -> anyhow::Result<ClusterOptions> {
    let mut opts = ClusterOptions {
        windows_nodes: 2,
        linux_nodes: 0,
        images: HashMap::new(),
        proxy_delay: Duration::ZERO,
        tmpfs_volumes: HashMap::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--windows" => opts.windows_nodes = value()?.parse()?,
            "--linux" => opts.linux_nodes = value()?.parse()?,
            "--proxy-delay-ms" => opts.proxy_delay = Duration::from_millis(value()?.parse()?),
            "--image" => {
                let v = value()?;
                let (repo, bin) = v
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--image wants REPO=BINARY, got {v}"))?;
                opts.images.insert(repo.into(), PathBuf::from(bin));
            }
            other => anyhow::bail!("unknown argument {other}; see the doc comment of im-cluster"),
        }
    }
    Ok(opts)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "identitymesh_tests=info".into()),
        )
        .init();
    let opts = parse()?;
    let cluster = Cluster::start(opts).await?;
    println!("cluster up in {:.1}s", cluster.started_in().as_secs_f64());
    println!("kubeconfig: {}", cluster.kubeconfig_path().display());
    println!("kubectl:    {}", cluster.tools().kubectl.display());
    println!("run dir:    {}", cluster.run_dir().display());
    for n in cluster.node_names() {
        if let Some(ip) = cluster.node_ip(n) {
            println!("node {n}: {ip}");
        }
    }
    println!("Ctrl-C (or SIGINT to pid {}) to stop", std::process::id());
    tokio::signal::ctrl_c().await?;
    drop(cluster);
    Ok(())
}

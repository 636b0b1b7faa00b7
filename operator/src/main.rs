use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use identitymesh_operator::{controller, crd, leader, metrics, podclient};
use kube::runtime::events::Reporter;

#[derive(Parser)]
#[command(
    name = "identitymesh-operator",
    version,
    about = "IdentityMesh for Kubernetes operator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the IdentityMeshCluster CustomResourceDefinition as YAML.
    Crd,
    /// Run the controller.
    Run(RunArgs),
    /// Print the resources the apiserver must reject and those it must admit (JSON lines: name,
    /// expect (null: admitted), manifest, and the pod and Service built from it), for the
    /// end-to-end tests to apply against a real apiserver.
    #[command(hide = true)]
    AdmissionCases,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Listen address for /metrics and /healthz.
    #[arg(long, env = "IM_OPERATOR_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "IM_OPERATOR_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Elect a leader among replicas with a Lease (disable only for a single replica).
    #[arg(long, env = "IM_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "identitymesh-operator")]
    lease_name: String,
    /// Identity of this replica in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let yaml = crd::crd_yaml().context("rendering the CRD as YAML")?;
            print!("{yaml}");
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::AdmissionCases => {
            use identitymesh_operator::admission_cases::{
                admission_cases, built_objects, valid_cases, Objects,
            };
            // "objects": the server pod and client Service built from the spec (for the cases
            // the pod or Service API refuses too, and for the valid ones), in namespace default.
            for c in admission_cases() {
                let objects = match c.objects {
                    Objects::Refused => Some(
                        built_objects(&c.manifest, "default")
                            .map_err(|e| anyhow::anyhow!("case {}: {e}", c.name))?,
                    ),
                    Objects::NotChecked => None,
                };
                let line = serde_json::json!({
                    "name": c.name, "expect": c.expect, "cel": c.cel, "manifest": c.manifest,
                    "objects": objects,
                });
                println!("{line}");
            }
            for (name, manifest) in valid_cases() {
                let objects = built_objects(&manifest, "default")
                    .map_err(|e| anyhow::anyhow!("case {name}: {e}"))?;
                println!(
                    "{}",
                    serde_json::json!({"name": name, "expect": null, "cel": false,
                        "manifest": manifest, "objects": objects})
                );
            }
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .json()
        .init();
    // One process-wide rustls provider for kube's and reqwest's TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("identitymesh-operator-{}", std::process::id()));

    let m = metrics::Metrics::new();
    let metrics_addr = args.metrics_addr;
    let serve_metrics = m.clone();
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(serve_metrics, metrics_addr).await {
            tracing::error!(error = %e, %metrics_addr, "metrics server stopped");
        }
    });

    let elector = args.leader_election.then(|| {
        leader::LeaderElector::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
        )
    });
    if let Some(e) = &elector {
        tracing::info!(identity, lease = %args.lease_name, "waiting for leadership");
        e.acquire().await;
        tracing::info!(identity, "leading");
    }

    let reporter = Reporter {
        controller: "identitymesh-operator".into(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(controller::Context::new(
        client.clone(),
        m,
        Arc::new(podclient::MtlsFactory::default()),
        reporter,
    ));
    let controller = controller::run(client, args.namespace.clone(), ctx);
    match elector {
        Some(e) => {
            tokio::select! {
                _ = controller => Ok(()),
                _ = e.hold() => anyhow::bail!("lost leadership of Lease {}; exiting so a fresh replica can campaign", args.lease_name),
            }
        }
        None => {
            controller.await;
            Ok(())
        }
    }
}

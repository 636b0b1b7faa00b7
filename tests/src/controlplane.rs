//! etcd, kube-apiserver, kube-controller-manager and kube-scheduler as local processes on
//! 127.0.0.1 with free ports, plus an admin kubeconfig.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Child;

use crate::error::{Error, IoContext, Result};
use crate::pki::Pki;
use crate::process::{self, ProcessTable, Spec};
use crate::tools::Tools;

/// How quickly the node-lifecycle controller reacts; tests rely on these being short.
pub const NODE_MONITOR_GRACE_PERIOD: &str = "4s";
pub const NODE_MONITOR_PERIOD: &str = "1s";

/// Pids of the control-plane processes.
#[derive(Debug, Clone, Copy)]
pub struct ControlPlanePids {
    pub etcd: u32,
    pub kube_apiserver: u32,
    pub kube_controller_manager: u32,
    pub kube_scheduler: u32,
}

impl ControlPlanePids {
    pub fn all(&self) -> [u32; 4] {
        [
            self.etcd,
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
        ]
    }
}

pub struct ControlPlane {
    pub pki: Pki,
    pub apiserver_port: u16,
    pub kubeconfig: PathBuf,
    pub pids: ControlPlanePids,
    /// Held so tokio reaps them; they are killed by pid through the process table.
    _children: Vec<Child>,
}

/// A port that was free a moment ago (bound then released).
pub fn free_port() -> Result<u16> {
    identitymesh_test_support::net::try_free_port().ctx(|| "bind a free port".into())
}

fn encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Writes a kubeconfig for `server` authenticating with the admin client certificate.
pub fn write_kubeconfig(path: &Path, server: &str, pki: &Pki) -> Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "harness", "cluster": {
            "server": server,
            "certificate-authority-data": encode(pki.ca_pem.as_bytes()),
        }}],
        "users": [{"name": "admin", "user": {
            "client-certificate-data": encode(pki.admin_cert_pem.as_bytes()),
            "client-key-data": encode(pki.admin_key_pem.as_bytes()),
        }}],
        "contexts": [{"name": "harness", "context": {"cluster": "harness", "user": "admin"}}],
        "current-context": "harness",
    });
    let text = serde_json::to_string_pretty(&doc).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(path, text).ctx(|| format!("write {}", path.display()))
}

fn check_pids(pids: &[(&str, u32)]) -> Result<()> {
    for (name, pid) in pids {
        if !process::pid_alive(*pid) {
            return Err(Error::StartupExit(format!(
                "{name} (pid {pid}) exited during start-up; see its log in the run dir"
            )));
        }
    }
    Ok(())
}

/// Waits for the apiserver's /readyz while checking that `pids` stay alive.
async fn wait_apiserver(kubeconfig: &Path, pids: &[(&str, u32)], timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let client = client_from_kubeconfig(kubeconfig).await?;
    let mut last: String;
    loop {
        check_pids(pids)?;
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| Error::Other(e.to_string()))?;
        match client.request_text(req).await {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => last = body,
            Err(e) => last = e.to_string(),
        }
        if started.elapsed() > timeout {
            return Err(Error::Timeout {
                what: format!("kube-apiserver /readyz (last: {last})"),
                seconds: timeout.as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Builds a client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<kube::Client> {
    client_with_retries(path, true).await
}

/// A client for the kubeconfig at `path`; `retry: false` turns off kube's default retry of 429,
/// 503 and 504 answers (up to 15 times, with backoff), for a test that wants the apiserver's
/// answer itself, such as an eviction a PodDisruptionBudget refuses.
pub async fn client_with_retries(path: &Path, retry: bool) -> Result<kube::Client> {
    // In a workspace build rustls may have both ring and aws-lc-rs enabled, and then has no
    // implicit process default; pick ring (a no-op when something already installed one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| Error::Other(format!("read kubeconfig {}: {e}", path.display())))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| Error::Other(format!("load kubeconfig {}: {e}", path.display())))?;
    config.default_retry = retry;
    Ok(kube::Client::try_from(config)?)
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

impl ControlPlane {
    /// Starts all four processes and waits until the apiserver is ready and the controller
    /// manager has created the `default` ServiceAccount (pods can be admitted from then on).
    ///
    /// `advertise` is the address put in the `kubernetes` Service's endpoints (it must not be
    /// loopback); `extra_ips` are added to the serving certificate.
    pub async fn start(
        tools: &Tools,
        run_dir: &Path,
        advertise: Option<Ipv4Addr>,
        extra_ips: &[IpAddr],
        table: &ProcessTable,
    ) -> Result<ControlPlane> {
        let logs = run_dir.join("logs");
        std::fs::create_dir_all(&logs).ctx(|| format!("create {}", logs.display()))?;
        let pki = Pki::generate(&run_dir.join("pki"), extra_ips)?;
        let (etcd_port, peer_port, api_port, kcm_port, sched_port) = (
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
            free_port()?,
        );
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = run_dir.join("admin.kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &pki)?;
        let p = |path: &Path| path.display().to_string();

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_args = vec![
            s("--name=harness"),
            format!("--data-dir={}", p(&run_dir.join("etcd"))),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=harness={peer_url}"),
            // Test data is disposable: skipping fsync makes etcd much faster on a busy disk.
            s("--unsafe-no-fsync"),
            s("--log-level=warn"),
        ];
        let mut children = Vec::new();
        let mut start = |name: &str, program: &Path, args: &[String]| -> Result<u32> {
            let (pid, child) = process::spawn(
                table,
                Spec {
                    program,
                    args,
                    env: None,
                    cwd: Some(run_dir),
                    log: &logs.join(format!("{name}.log")),
                    netns: None,
                    sandbox: None,
                },
            )?;
            children.push(child);
            Ok(pid)
        };
        let etcd = start("etcd", &tools.etcd, &etcd_args)?;

        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            s("--bind-address=127.0.0.1"),
            format!("--secure-port={api_port}"),
            format!("--tls-cert-file={}", p(&pki.apiserver_cert)),
            format!("--tls-private-key-file={}", p(&pki.apiserver_key)),
            format!("--client-ca-file={}", p(&pki.ca_cert)),
            format!("--service-account-key-file={}", p(&pki.sa_pub)),
            format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
            s("--service-account-issuer=https://kubernetes.default.svc.cluster.local"),
            format!("--service-cluster-ip-range={}", crate::netns::SERVICE_CIDR),
            s("--authorization-mode=RBAC"),
            s("--allow-privileged=true"),
            s("--profiling=false"),
            // Fewer moving parts and less memory; tests do not exercise request fairness.
            s("--enable-priority-and-fairness=false"),
            format!("--cert-dir={}", p(&run_dir.join("apiserver-certs"))),
        ];
        match advertise {
            Some(ip) => api_args.push(format!("--advertise-address={ip}")),
            None => {
                api_args.push(s("--advertise-address=127.0.0.1"));
                // Loopback is not a valid endpoint address, so do not publish one.
                api_args.push(s("--endpoint-reconciler-type=none"));
            }
        }
        let kube_apiserver = start("kube-apiserver", &tools.kube_apiserver, &api_args)?;

        // kube-controller-manager and kube-scheduler read the apiserver's authentication
        // config map once at start-up and exit if it is unreachable: start them after it.
        wait_apiserver(
            &kubeconfig,
            &[("etcd", etcd), ("kube-apiserver", kube_apiserver)],
            Duration::from_secs(90),
        )
        .await?;
        let kc = p(&kubeconfig);
        let kcm_args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            s("--bind-address=127.0.0.1"),
            format!("--secure-port={kcm_port}"),
            format!("--cert-dir={}", p(&run_dir.join("kcm-certs"))),
            s("--leader-elect=false"),
            // All default controllers: node-lifecycle, endpointslice, serviceaccount, namespace,
            // garbage-collector, root-ca publisher, deployments, ... as on a real cluster.
            s("--controllers=*"),
            format!("--node-monitor-grace-period={NODE_MONITOR_GRACE_PERIOD}"),
            format!("--node-monitor-period={NODE_MONITOR_PERIOD}"),
            format!("--service-account-private-key-file={}", p(&pki.sa_key)),
            format!("--root-ca-file={}", p(&pki.ca_cert)),
            format!("--cluster-signing-cert-file={}", p(&pki.ca_cert)),
            format!("--cluster-signing-key-file={}", p(&pki.ca_key)),
            s("--use-service-account-credentials=false"),
            s("--profiling=false"),
        ];
        let kube_controller_manager = start(
            "kube-controller-manager",
            &tools.kube_controller_manager,
            &kcm_args,
        )?;
        let sched_args = vec![
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            s("--bind-address=127.0.0.1"),
            format!("--secure-port={sched_port}"),
            s("--leader-elect=false"),
            s("--profiling=false"),
        ];
        let kube_scheduler = start("kube-scheduler", &tools.kube_scheduler, &sched_args)?;

        let cp = ControlPlane {
            pki,
            apiserver_port: api_port,
            kubeconfig,
            pids: ControlPlanePids {
                etcd,
                kube_apiserver,
                kube_controller_manager,
                kube_scheduler,
            },
            _children: children,
        };
        cp.wait_controllers(Duration::from_secs(90)).await?;
        Ok(cp)
    }

    fn check_alive(&self) -> Result<()> {
        let p = self.pids;
        check_pids(&[
            ("etcd", p.etcd),
            ("kube-apiserver", p.kube_apiserver),
            ("kube-controller-manager", p.kube_controller_manager),
            ("kube-scheduler", p.kube_scheduler),
        ])
    }

    async fn wait_controllers(&self, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let client = client_from_kubeconfig(&self.kubeconfig).await?;
        // The serviceaccount controller creates `default`; ServiceAccount admission needs it.
        let sas: kube::Api<k8s_openapi::api::core::v1::ServiceAccount> =
            kube::Api::namespaced(client.clone(), "default");
        loop {
            self.check_alive()?;
            if let Ok(Some(_)) = sas.get_opt("default").await {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(Error::Timeout {
                    what: "the default ServiceAccount (kube-controller-manager)".into(),
                    seconds: timeout.as_secs_f64(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sum of VmRSS over the four control-plane processes, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids
            .all()
            .iter()
            .filter_map(|pid| process::rss_kib(*pid))
            .sum()
    }
}

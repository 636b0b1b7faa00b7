//! [`Cluster`]: the whole harness behind one handle.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::task::JoinHandle;

use crate::controlplane::{client_from_kubeconfig, ControlPlane, ControlPlanePids};
use crate::error::{Error, IoContext, Result};
use crate::netns::Network;
use crate::node_agent::{NodeAgent, NodeOs};
use crate::pod_runtime::{PodRegistry, RuntimeCtx};
use crate::process::ProcessTable;
use crate::service_proxy::{forward_all, ServiceProxy};
use crate::tools::Tools;

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Nodes labelled kubernetes.io/os=windows, named `win-1`, `win-2`, ...
    pub windows_nodes: usize,
    /// Nodes labelled kubernetes.io/os=linux, named `linux-1`, ...
    pub linux_nodes: usize,
    /// Image repository (tag stripped, e.g. `test/http`) → local binary run for it.
    pub images: HashMap<String, PathBuf>,
    /// How long after an EndpointSlice or Service change the Service proxy applies it (kube-proxy's
    /// sync lag on a real cluster, about 1 s); zero by default so tests settle quickly.
    pub proxy_delay: Duration,
    /// emptyDir volumes of this name are a tmpfs of this many bytes, mounted before the pod's
    /// containers start, so a test can fill it ([`Cluster::fill_pod_volume`]): the disk-full
    /// fault on a pod's own directory.
    pub tmpfs_volumes: HashMap<String, u64>,
}

impl ClusterOptions {
    pub fn windows(nodes: usize) -> ClusterOptions {
        ClusterOptions {
            windows_nodes: nodes,
            ..Default::default()
        }
    }

    pub fn proxy_delay(mut self, delay: Duration) -> ClusterOptions {
        self.proxy_delay = delay;
        self
    }

    pub fn tmpfs_volume(mut self, volume: &str, bytes: u64) -> ClusterOptions {
        self.tmpfs_volumes.insert(volume.to_string(), bytes);
        self
    }

    pub fn image(mut self, repository: &str, binary: impl Into<PathBuf>) -> ClusterOptions {
        self.images.insert(repository.to_string(), binary.into());
        self
    }
}

/// Stops every process by pid and removes namespaces; keeps the run dir when a test failed.
struct Teardown {
    table: ProcessTable,
    network: Option<Network>,
    run_dir: PathBuf,
    keep: bool,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.table.kill_all();
        drop(self.network.take());
        let keep = self.keep
            || std::thread::panicking()
            || std::env::var_os("IDENTITYMESH_KEEP_RUN_DIR").is_some();
        if keep {
            eprintln!(
                "harness: logs and state of this run are kept in {}",
                self.run_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

/// A running harness. Dropping it stops everything it started.
pub struct Cluster {
    // Field order is drop order: background tasks go before the processes and namespaces.
    proxy: ServiceProxy,
    agent: NodeAgent,
    forwarders: Vec<JoinHandle<()>>,
    /// Host ports exposed in the node namespaces, and front doors ([`Cluster::expose_host_port`],
    /// [`Cluster::front_door`]).
    extra_forwarders: std::sync::Mutex<Vec<JoinHandle<()>>>,
    runtime: Arc<RuntimeCtx>,
    client: kube::Client,
    control_plane: ControlPlane,
    tools: Tools,
    node_names: Vec<String>,
    started_in: Duration,
    teardown: Teardown,
}

static RUN_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Cluster {
    /// Starts the control plane, the nodes and the Service proxy. Needs root and the tools from
    /// `cargo xtask tools` (an error says so when they are missing).
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        let started = Instant::now();
        let tools = Tools::locate()?;
        let run_dir = std::env::temp_dir()
            .join("identitymesh-harness")
            .join(format!(
                "run-{}-{}-{}",
                std::process::id(),
                RUN_COUNTER.fetch_add(1, Ordering::SeqCst),
                started.elapsed().as_nanos() % 1000
            ));
        std::fs::create_dir_all(&run_dir).ctx(|| format!("create {}", run_dir.display()))?;
        let mut teardown = Teardown {
            table: ProcessTable::default(),
            network: None,
            run_dir: run_dir.clone(),
            // Until start succeeds, keep the evidence.
            keep: true,
        };

        let mut nodes: Vec<(String, NodeOs)> = Vec::new();
        nodes.extend((1..=opts.windows_nodes).map(|i| (format!("win-{i}"), NodeOs::Windows)));
        nodes.extend((1..=opts.linux_nodes).map(|i| (format!("linux-{i}"), NodeOs::Linux)));
        let node_names: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
        let network = Network::create(&node_names)?;
        let host_ips: Vec<IpAddr> = network
            .nodes
            .iter()
            .map(|n| IpAddr::V4(n.host_ip))
            .collect();
        let advertise = network.nodes.first().map(|n| n.host_ip);
        let node_nets = network.nodes.clone();
        teardown.network = Some(network);

        // Ports are picked free and then bound by the Go processes, so another process can
        // take one in between; a start-up exit is retried with fresh ports.
        let mut attempt = 0;
        let control_plane = loop {
            attempt += 1;
            match ControlPlane::start(&tools, &run_dir, advertise, &host_ips, &teardown.table).await
            {
                Ok(cp) => break cp,
                Err(Error::StartupExit(msg)) if attempt < 3 => {
                    eprintln!("harness: {msg}; retrying with fresh ports");
                    teardown.table.kill_all();
                    let _ = std::fs::remove_dir_all(run_dir.join("etcd"));
                }
                Err(e) => return Err(e),
            }
        };
        let client = client_from_kubeconfig(&control_plane.kubeconfig).await?;

        // Pods reach the apiserver at their node's host-side address, same port.
        let mut forwarders = Vec::new();
        let api_target = SocketAddr::from(([127, 0, 0, 1], control_plane.apiserver_port));
        for ip in &host_ips {
            let addr = SocketAddr::new(*ip, control_plane.apiserver_port);
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .ctx(|| format!("bind apiserver forwarder on {addr}"))?;
            forwarders.push(forward_all(listener, api_target));
        }

        // Services first, so their names resolve and their ClusterIPs answer in the node
        // namespaces by the time pods start.
        let dns = crate::cluster_dns::ClusterDns::default();
        let proxy = ServiceProxy::start(
            client.clone(),
            opts.proxy_delay,
            node_nets.clone(),
            dns.clone(),
        );
        let runtime = Arc::new(RuntimeCtx {
            client: client.clone(),
            dns,
            tmpfs_volumes: opts.tmpfs_volumes.clone(),
            run_dir: run_dir.clone(),
            images: opts.images.clone(),
            table: teardown.table.clone(),
            registry: PodRegistry::default(),
            apiserver_port: control_plane.apiserver_port,
            shutdown: Arc::default(),
        });
        let agent = NodeAgent::start(
            runtime.clone(),
            node_nets
                .into_iter()
                .zip(nodes.iter().map(|(_, os)| *os))
                .collect(),
        )
        .await?;
        teardown.keep = false;
        Ok(Cluster {
            proxy,
            agent,
            forwarders,
            extra_forwarders: Default::default(),
            runtime,
            client,
            control_plane,
            tools,
            node_names,
            started_in: started.elapsed(),
            teardown,
        })
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// Admin kubeconfig (client certificate in system:masters).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.control_plane.kubeconfig
    }

    /// Directory with logs (`logs/*.log`, `pods/<ns>_<pod>_<uid>/<container>.log`), PKI and
    /// etcd data of this run. Kept after a failed test.
    pub fn run_dir(&self) -> &Path {
        &self.teardown.run_dir
    }

    pub fn tools(&self) -> &Tools {
        &self.tools
    }

    pub fn node_names(&self) -> &[String] {
        &self.node_names
    }

    /// The node's (and so its pods') IP address.
    pub fn node_ip(&self, node: &str) -> Option<IpAddr> {
        self.agent.node(node).map(|n| IpAddr::V4(n.net.node_ip))
    }

    /// How long [`Cluster::start`] took.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    pub fn control_plane_pids(&self) -> ControlPlanePids {
        self.control_plane.pids
    }

    /// Sum of VmRSS of etcd, kube-apiserver, kube-controller-manager and kube-scheduler (KiB).
    pub fn control_plane_rss_kib(&self) -> u64 {
        self.control_plane.rss_kib()
    }

    /// Runs `kubectl` (v1.35, built by `cargo xtask tools`) against this cluster.
    /// Errors when it exits non-zero; Ok gives stdout.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_stdin(args, None).await
    }

    /// Like [`Cluster::kubectl`], feeding `stdin` (e.g. for `apply -f -`).
    pub async fn kubectl_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = self.run_tool(&self.tools.kubectl, args, stdin).await?;
        checked("kubectl", args, out)
    }

    /// Runs `helm` against this cluster, with helm's cache/config/data inside the run dir.
    pub async fn helm(&self, args: &[&str]) -> Result<String> {
        let out = self.run_tool(&self.tools.helm, args, None).await?;
        checked("helm", args, out)
    }

    async fn run_tool(&self, program: &Path, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let home = self.run_dir().join("tool-home");
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env("KUBECONFIG", self.kubeconfig_path())
            .env("HOME", &home)
            .env("HELM_CACHE_HOME", home.join("helm-cache"))
            .env("HELM_CONFIG_HOME", home.join("helm-config"))
            .env("HELM_DATA_HOME", home.join("helm-data"))
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().ctx(|| format!("start {}", program.display()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .await
                .ctx(|| "write tool stdin".into())?;
        }
        child
            .wait_with_output()
            .await
            .ctx(|| format!("run {}", program.display()))
    }

    /// Local address of the Service proxy's listener for `port` of Service `ns/name`; waits up
    /// to 30 s for the proxy to see the Service.
    pub async fn service_addr(&self, ns: &str, name: &str, port: u16) -> Result<SocketAddr> {
        let started = Instant::now();
        loop {
            if let Some(a) = self.proxy.addr(ns, name, port) {
                return Ok(a);
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err(Error::Timeout {
                    what: format!("the Service proxy to listen for {ns}/{name}:{port}"),
                    seconds: 30.0,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes the host's loopback port `port` reachable from every node's network namespace, so
    /// from every pod, at the same address `127.0.0.1:<port>`: a listener created inside each
    /// namespace forwards each connection to `127.0.0.1:<port>` on the host. For fixtures on host
    /// loopback (an identity provider, a directory) that pods and the test (or its browser) must
    /// reach at one URL; the traffic stays on loopback and the veths. Stopped with the cluster.
    pub async fn expose_host_port(&self, port: u16) -> Result<()> {
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let nets = self.network().map(|n| n.nodes.clone()).unwrap_or_default();
        for net in nets {
            let listener = crate::netns::bind_in_netns(&net.netns_path(), target).await?;
            let task = forward_all(listener, target);
            lock(&self.extra_forwarders).push(task);
        }
        Ok(())
    }

    /// A load balancer in front of port `port` of Service `ns/name`: each connection accepted on
    /// `listener` (a loopback port the test chose, e.g. to give a browser one origin for the
    /// whole run) goes to the Service proxy's listener for that port as it is at that moment;
    /// none yet, and the connection is closed. Stopped with the cluster.
    pub fn front_door(
        &self,
        listener: std::net::TcpListener,
        ns: &str,
        name: &str,
        port: u16,
    ) -> Result<SocketAddr> {
        let addr = listener.local_addr().ctx(|| "front door address".into())?;
        listener
            .set_nonblocking(true)
            .ctx(|| format!("front door on {addr}"))?;
        let listener =
            tokio::net::TcpListener::from_std(listener).ctx(|| format!("front door on {addr}"))?;
        let lookup = self.proxy.lookup();
        let (ns, name) = (ns.to_string(), name.to_string());
        let task =
            crate::service_proxy::forward_each(listener, move || lookup.addr(&ns, &name, port));
        lock(&self.extra_forwarders).push(task);
        Ok(addr)
    }

    /// Pids of the running containers of a pod (empty when none runs).
    pub fn pod_pids(&self, ns: &str, pod: &str) -> Vec<u32> {
        self.runtime
            .registry
            .get(ns, pod)
            .map(|p| p.pids())
            .unwrap_or_default()
    }

    /// The pod's directory (volumes under `volumes/<name>`, container logs), while it runs.
    pub fn pod_dir(&self, ns: &str, pod: &str) -> Option<PathBuf> {
        self.runtime.registry.get(ns, pod).map(|p| p.dir.clone())
    }

    /// The log (stdout+stderr, all restarts) of a pod's container.
    pub fn pod_log(&self, ns: &str, pod: &str, container: &str) -> Option<String> {
        let shared = self.runtime.registry.get(ns, pod)?;
        std::fs::read_to_string(shared.dir.join(format!("{container}.log"))).ok()
    }

    /// Fills the tmpfs behind a pod's emptyDir `volume` ([`ClusterOptions::tmpfs_volume`]) until
    /// writes fail with ENOSPC; returns the bytes the filler took.
    pub fn fill_pod_volume(&self, ns: &str, pod: &str, volume: &str) -> Result<u64> {
        self.with_pod_tmpfs(ns, pod, volume, |d| d.fill())
    }

    /// Frees what [`Cluster::fill_pod_volume`] took.
    pub fn free_pod_volume(&self, ns: &str, pod: &str, volume: &str) -> Result<()> {
        self.with_pod_tmpfs(ns, pod, volume, |d| d.free())
    }

    fn with_pod_tmpfs<T>(
        &self,
        ns: &str,
        pod: &str,
        volume: &str,
        f: impl FnOnce(&crate::disk_full::FullDisk) -> Result<T>,
    ) -> Result<T> {
        let shared = self.runtime.registry.get(ns, pod).ok_or_else(|| {
            Error::Other(format!("pod {ns}/{pod} is not running on a harness node"))
        })?;
        let disks = lock(&shared.tmpfs);
        let disk = disks.get(volume).ok_or_else(|| {
            Error::Other(format!(
                "pod {ns}/{pod} has no tmpfs volume {volume:?} (ClusterOptions::tmpfs_volume)"
            ))
        })?;
        f(disk)
    }

    /// (pod, log of `container`) for every pod of namespace `ns` that runs now.
    pub fn pod_logs(&self, ns: &str, container: &str) -> Vec<(String, String)> {
        self.runtime
            .registry
            .in_namespace(ns)
            .into_iter()
            .map(|(pod, shared)| {
                let log = std::fs::read_to_string(shared.dir.join(format!("{container}.log")))
                    .unwrap_or_default();
                (pod, log)
            })
            .collect()
    }

    /// Polls `check` every 100 ms until it returns true or `timeout` passes.
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, what: &str, check: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        wait_until(timeout, what, check).await
    }

    pub(crate) fn agent(&self) -> &NodeAgent {
        &self.agent
    }

    pub(crate) fn network(&self) -> Option<&Network> {
        self.teardown.network.as_ref()
    }

    pub(crate) fn registry(&self) -> &PodRegistry {
        &self.runtime.registry
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.runtime.shutdown.store(true, Ordering::SeqCst);
        for f in &self.forwarders {
            f.abort();
        }
        for f in lock(&self.extra_forwarders).iter() {
            f.abort();
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `check` every 100 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(Error::Timeout {
                what: what.to_string(),
                seconds: timeout.as_secs_f64(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn checked(tool: &str, args: &[&str], out: Output) -> Result<String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: format!("{tool} {}", args.join(" ")),
            detail: format!(
                "{}; stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

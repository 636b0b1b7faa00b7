//! The setup: a harness cluster, the CRD, the operator, an IdentityMeshCluster and its pods.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::Api;
use serde_json::{json, Value};

use super::*;

static RUN: AtomicUsize = AtomicUsize::new(0);

/// Options for [`Env::start`].
pub struct EnvOptions {
    pub windows_nodes: usize,
    pub unhealthy_after_seconds: u32,
    /// Install the operator with `helm install` of charts/identitymesh-operator (CRD, RBAC,
    /// Deployment): the chart's Deployment runs the operator binary as pods on Linux nodes, with
    /// in-cluster credentials (the chart's ServiceAccount), instead of `kubectl apply -f crds/`
    /// and a local operator process with admin credentials.
    pub helm: bool,
    /// The chart's replicaCount (helm only); each replica gets a Linux node of its own (required
    /// anti-affinity: the harness's pods on one node share its network namespace), and there is
    /// one Linux node more for a rolling update's surge pod.
    pub operator_replicas: usize,
    /// Extra environment for the server processes (e.g. a bootstrap admin token file, which
    /// the operator's pods do not get): the harness runs a wrapper script that sets it and
    /// execs the server, so the pod's own spec stays what the operator built.
    pub server_env: Vec<(String, String)>,
    /// The Service proxy's propagation lag ([`ClusterOptions::proxy_delay`]).
    pub proxy_delay: Duration,
    /// Back the server pods' data directory (the emptyDir `data`) with a tmpfs of this many
    /// bytes, for the disk-full fault ([`crate::Cluster::fill_pod_volume`]).
    pub data_tmpfs: Option<u64>,
    /// An Admin API bearer token the servers accept (their bootstrap token file), for clients
    /// of the Admin API through the Service.
    pub admin_token: Option<String>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            windows_nodes: 3,
            unhealthy_after_seconds: UNHEALTHY_AFTER_SECONDS,
            helm: false,
            operator_replicas: 1,
            server_env: Vec::new(),
            proxy_delay: Duration::ZERO,
            data_tmpfs: None,
            admin_token: None,
        }
    }
}

/// Namespace and release of the helm install.
pub const OPERATOR_NS: &str = "identitymesh-system";
pub const RELEASE: &str = "identitymesh-operator";
/// The chart's default image repository; the harness runs the operator binary for it.
pub const OPERATOR_IMAGE: &str = "identitymesh/operator";
/// The server pods' data directory volume (an emptyDir the operator's pod builder names).
pub const DATA_VOLUME: &str = "data";
/// The operator Deployment's container.
pub const OPERATOR_CONTAINER: &str = "operator";

/// Chart values for the e2e install: `replicas` replicas, each on a node of its own.
fn helm_values(replicas: usize) -> Value {
    json!({
        "replicaCount": replicas,
        "logLevel": std::env::var("IM_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": RELEASE}}
        }]}}
    })
}

/// A `/bin/sh` script in `dir` that exports `env` and execs `server` with its arguments (exec,
/// so the pod's process is the server itself and a kill by pid hits it).
fn server_wrapper(dir: &Path, server: &Path, env: &[(String, String)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    // Single quotes around every value; a quote inside one is closed, escaped and reopened.
    let quote = |v: &str| format!("'{}'", v.replace('\'', "'\\''"));
    let mut text = String::from("#!/bin/sh\n");
    for (k, v) in env {
        assert!(
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "environment variable name {k:?}"
        );
        text.push_str(&format!("export {k}={}\n", quote(v)));
    }
    text.push_str(&format!(
        "exec {} \"$@\"\n",
        quote(server.to_str().expect("utf-8 path"))
    ));
    let path = dir.join("identitymesh-server.sh");
    std::fs::write(&path, text).expect("write the server wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the server wrapper executable");
    path
}

/// A harness with the operator running and one IdentityMeshCluster created.
pub struct Env {
    // Drop order: monitor and operator before the harness.
    pub slices: SliceMonitor,
    /// The local operator process; None when the chart's Deployment runs the operator.
    pub operator: Option<Operator>,
    pub cluster: Cluster,
    pub ns: String,
    pub dir: PathBuf,
    pub db: PathBuf,
    pub imc_api: Api<DynamicObject>,
    pub pods: Api<Pod>,
    ca_pem: Option<String>,
    proxy: Option<SocketAddr>,
    unhealthy_after_seconds: u32,
}

impl Drop for Env {
    /// Removes the test dir (database, operator log) unless the test failed or
    /// IDENTITYMESH_KEEP_RUN_DIR is set, like the harness's run dir.
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("IDENTITYMESH_KEEP_RUN_DIR").is_some() {
            eprintln!(
                "operator e2e: database and operator log kept in {}",
                self.dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The cluster resource's status, as the tests read it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub phase: String,
    pub active: Option<String>,
    pub standby: Option<String>,
    pub epoch: i64,
    pub cutover: Option<Value>,
    pub last_transition: Option<Value>,
    pub instances: Vec<Value>,
    pub conditions: Vec<Value>,
    pub raw: Value,
}

impl Status {
    fn of(v: &Value) -> Status {
        let s = &v["status"];
        let str_of = |k: &str| s[k].as_str().map(str::to_string);
        Status {
            phase: str_of("phase").unwrap_or_default(),
            active: str_of("activePod"),
            standby: str_of("standbyPod"),
            epoch: s["epoch"].as_i64().unwrap_or(0),
            cutover: s.get("cutover").filter(|c| !c.is_null()).cloned(),
            last_transition: s.get("lastTransition").filter(|c| !c.is_null()).cloned(),
            instances: s["instances"].as_array().cloned().unwrap_or_default(),
            conditions: s["conditions"].as_array().cloned().unwrap_or_default(),
            raw: v.clone(),
        }
    }

    pub fn condition(&self, kind: &str) -> Option<String> {
        self.conditions
            .iter()
            .find(|c| c["type"] == kind)
            .and_then(|c| c["status"].as_str().map(str::to_string))
    }

    pub fn instance(&self, pod: &str) -> Option<&Value> {
        self.instances.iter().find(|i| i["name"] == pod)
    }

    /// Running, both roles assigned, no cutover, both instances Ready with their roles, and the
    /// verification checklist green.
    pub fn settled(&self) -> bool {
        let (Some(a), Some(s)) = (&self.active, &self.standby) else {
            return false;
        };
        let inst_ok = |pod: &str, role: &str| {
            self.instance(pod)
                .is_some_and(|i| i["ready"] == true && i["role"] == role)
        };
        self.phase == "Running"
            && self.cutover.is_none()
            && inst_ok(a, "active")
            && inst_ok(s, "standby")
            && self.condition("SingleActive").as_deref() == Some("True")
            && self.condition("Ready").as_deref() == Some("True")
    }
}

pub fn licence_json() -> String {
    json!({
        "format": 1, "customer": "Contoso", "licence_id": "L-E2E", "edition": "enterprise",
        "issued": "2026-01-01T00:00:00Z", "expires": "2099-01-01T00:00:00Z"
    })
    .to_string()
}

impl Env {
    /// Starts the harness (Windows nodes, the server binary behind the operator's image),
    /// installs the CRD with kubectl, creates the namespace and Secrets, starts the operator
    /// and creates the IdentityMeshCluster.
    pub async fn start(opts: EnvOptions) -> Env {
        let env = Env::boot(&opts).await;
        env.create_cluster(json!({})).await;
        env
    }

    /// [`Env::start`] without the IdentityMeshCluster: the harness, the CRD, the namespace with
    /// its Secrets and the operator; [`Env::create_cluster`] creates the cluster resource.
    pub async fn boot(opts: &EnvOptions) -> Env {
        let dir = std::env::temp_dir()
            .join("identitymesh-operator-e2e")
            .join(format!(
                "run-{}-{}",
                std::process::id(),
                RUN.fetch_add(1, Ordering::SeqCst)
            ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let mut server = workspace_bin("identitymesh-server");
        let mut server_env = opts.server_env.clone();
        if let Some(token) = &opts.admin_token {
            let file = dir.join("admin.token");
            std::fs::write(&file, token).expect("write the bootstrap token");
            server_env.push((
                "IM_AUTH__BOOTSTRAP_TOKEN_FILE".into(),
                file.display().to_string(),
            ));
        }
        if !server_env.is_empty() {
            server = server_wrapper(&dir, &server, &server_env);
        }
        let mut cluster_opts = ClusterOptions::windows(opts.windows_nodes)
            .proxy_delay(opts.proxy_delay)
            .image(SERVER_IMAGE, &server);
        if let Some(bytes) = opts.data_tmpfs {
            cluster_opts = cluster_opts.tmpfs_volume(DATA_VOLUME, bytes);
        }
        if opts.helm {
            // One node more than replicas: a rolling update's surge pod needs a free node.
            cluster_opts.linux_nodes = opts.operator_replicas.max(1) + 1;
            cluster_opts =
                cluster_opts.image(OPERATOR_IMAGE, workspace_bin("identitymesh-operator"));
        }
        let cluster = Cluster::start(cluster_opts).await.unwrap_or_else(|e| {
            panic!("start harness (run `cargo xtask tools` if tools are missing): {e}")
        });
        let db = dir.join("im.db");
        let ns = "identitymesh".to_string();
        let client = cluster.client();

        if opts.helm {
            let chart = workspace_root().join("charts/identitymesh-operator");
            let values = dir.join("operator-values.json");
            std::fs::write(&values, helm_values(opts.operator_replicas).to_string())
                .expect("write the chart values");
            let out = cluster
                .helm(&[
                    "install",
                    RELEASE,
                    chart.to_str().expect("utf-8 path"),
                    "--namespace",
                    OPERATOR_NS,
                    "--create-namespace",
                    "--values",
                    values.to_str().expect("utf-8 path"),
                ])
                .await
                .expect("helm install charts/identitymesh-operator");
            assert!(out.contains("STATUS: deployed"), "{out}");
        } else {
            install_crd(&cluster).await;
        }
        wait_crd_established(&cluster).await;

        let nss: Api<Namespace> = Api::all(client.clone());
        let n: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
        nss.create(&PostParams::default(), &n)
            .await
            .expect("create namespace");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
        let db_secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "im-db"},
            "stringData": {"connectionString": format!("sqlite://{}", db.display())}
        }))
        .expect("db secret");
        secrets
            .create(&PostParams::default(), &db_secret)
            .await
            .expect("create database Secret");
        let lic: Secret = serde_json::from_value(json!({
            "metadata": {"name": "im-licence"},
            "stringData": {"licence.json": licence_json()}
        }))
        .expect("licence secret");
        secrets
            .create(&PostParams::default(), &lic)
            .await
            .expect("create licence Secret");

        // Watch from before the Service exists, so no moment is missed.
        let slices = SliceMonitor::start(client.clone(), &ns, CLUSTER);
        let log = dir.join("operator.log");
        let operator = if opts.helm {
            None
        } else {
            Some(Operator::start(
                cluster.kubeconfig_path(),
                Some(&ns),
                &ns,
                &log,
            ))
        };

        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("identitymesh.io", "v1alpha1", "IdentityMeshCluster"),
            "identitymeshclusters",
        );
        let imc_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        Env {
            slices,
            operator,
            cluster,
            ns,
            dir,
            db,
            imc_api,
            pods,
            ca_pem: None,
            proxy: None,
            unhealthy_after_seconds: opts.unhealthy_after_seconds,
        }
    }

    /// Creates the IdentityMeshCluster (kubectl apply): the e2e spec, with the fields of
    /// `extra_spec` (an object, e.g. `{"oidc": ...}`) added or replacing top-level ones.
    pub async fn create_cluster(&self, extra_spec: Value) {
        let mut spec = json!({
            "version": "0.1.0",
            "database": {"name": "im-db", "key": "connectionString"},
            "licence": {"name": "im-licence", "key": "licence.json"},
            "failover": {"policy": "Automatic", "unhealthyAfterSeconds": self.unhealthy_after_seconds},
            "drainTimeoutSeconds": 5
        });
        if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
            s.extend(extra.clone());
        }
        let imc = json!({
            "apiVersion": "identitymesh.io/v1alpha1",
            "kind": "IdentityMeshCluster",
            "metadata": {"name": CLUSTER, "namespace": self.ns},
            "spec": spec
        });
        self.cluster
            .kubectl_with_stdin(&["apply", "-f", "-"], Some(&imc.to_string()))
            .await
            .unwrap_or_else(|e| self.fail(&format!("kubectl apply the IdentityMeshCluster: {e}")));
    }

    pub async fn status(&self) -> Option<Status> {
        let o = self.imc_api.get_opt(CLUSTER).await.ok().flatten()?;
        let v = serde_json::to_value(&o).ok()?;
        Some(Status::of(&v))
    }

    /// Polls status until `pred` holds; panics with the last status and the operator log tail.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> Status {
        let started = Instant::now();
        let mut last = None;
        loop {
            if let Some(s) = self.status().await {
                if pred(&s) {
                    return s;
                }
                last = Some(s);
            }
            if started.elapsed() > timeout {
                self.fail(&format!(
                    "timed out after {timeout:?} waiting for {what}; last status: {}",
                    last.map(|s| serde_json::to_string_pretty(&s.raw["status"]).unwrap_or_default())
                        .unwrap_or_else(|| "none".into())
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Panics with context: the last lines of the operator's log and where the run dirs are.
    pub fn fail(&self, msg: &str) -> ! {
        let log = self.operator_log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        // Which server pods the harness actually runs: a bound pod without a process points at
        // the harness's node agent rather than at the operator.
        let pods: Vec<String> = [format!("{CLUSTER}-a"), format!("{CLUSTER}-b")]
            .iter()
            .map(|p| format!("{p}: harness pids {:?}", self.pids(p)))
            .collect();
        panic!(
            "{msg}\n--- server pods: {}\n--- operator log (last 40 lines, full log {}):\n{}\n--- harness run dir: {}",
            pods.join("; "),
            self.operator_log_where(),
            tail.join("\n"),
            self.cluster.run_dir().display()
        );
    }

    pub async fn pod(&self, name: &str) -> Option<Pod> {
        self.pods.get_opt(name).await.ok().flatten()
    }

    pub async fn pod_node(&self, name: &str) -> Option<String> {
        self.pod(name)
            .await
            .and_then(|p| p.spec.and_then(|s| s.node_name))
    }

    pub async fn pod_uid(&self, name: &str) -> Option<String> {
        self.pod(name).await.and_then(|p| p.metadata.uid)
    }

    pub async fn node_labels(&self, name: &str) -> BTreeMap<String, String> {
        let nodes: Api<Node> = Api::all(self.cluster.client());
        nodes
            .get(name)
            .await
            .ok()
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default()
    }

    /// The public CA certificate from the `<c>-ca` ConfigMap.
    pub async fn ca_pem(&mut self) -> String {
        if let Some(c) = &self.ca_pem {
            return c.clone();
        }
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.cluster.client(), &self.ns);
        let cm = cms
            .get(&format!("{CLUSTER}-ca"))
            .await
            .expect("ConfigMap <cluster>-ca");
        let pem = cm
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .expect("ca.crt in the CA ConfigMap");
        self.ca_pem = Some(pem.clone());
        pem
    }

    pub async fn proxy_addr(&mut self) -> SocketAddr {
        if let Some(a) = self.proxy {
            return a;
        }
        let a = self
            .cluster
            .service_addr(&self.ns, CLUSTER, SERVICE_PORT)
            .await
            .expect("Service proxy listener for the client Service");
        self.proxy = Some(a);
        a
    }

    /// The DNS name clients use for the client Service (a SAN of the serving certificate).
    pub fn service_dns(&self) -> String {
        format!("{CLUSTER}.{}.svc", self.ns)
    }

    /// GET /health/ready through the Service proxy, verified against the cluster CA.
    pub async fn ready_via_service(&mut self) -> Result<Ready, String> {
        let addr = self.proxy_addr().await;
        let ca = self.ca_pem().await;
        let (code, body) = https_get(
            addr,
            &self.service_dns(),
            &ca,
            "/health/ready",
            Duration::from_secs(3),
        )
        .await?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("body {body:?}: {e}"))?;
        Ok(Ready {
            code,
            role: v["role"].as_str().unwrap_or_default().to_string(),
            epoch: v["epoch"].as_i64().unwrap_or(-1),
        })
    }

    /// Waits until the Service reaches an active server holding `epoch`; returns when.
    pub async fn wait_service_active(&mut self, epoch: i64, timeout: Duration) -> Instant {
        let started = Instant::now();
        let mut last: String;
        loop {
            match self.ready_via_service().await {
                Ok(r) if r.code == 200 && r.role == "active" && r.epoch == epoch => {
                    return Instant::now()
                }
                Ok(r) => last = format!("{r:?}"),
                Err(e) => last = e,
            }
            if started.elapsed() > timeout {
                self.fail(&format!(
                    "the Service did not reach an active server with epoch {epoch} within {timeout:?}; last answer: {last}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pids(&self, pod: &str) -> Vec<u32> {
        self.cluster.pod_pids(&self.ns, pod)
    }

    /// The container log of one pod incarnation (by uid), also after the pod is gone and a
    /// namesake replaced it (the harness keeps `pods/<ns>_<pod>_<uid prefix>/<container>.log`).
    pub fn pod_log_of(&self, pod: &str, uid: &str) -> String {
        let prefix = format!("{}_{pod}_", self.ns);
        let Ok(entries) = std::fs::read_dir(self.cluster.run_dir().join("pods")) else {
            return String::new();
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(short) = name.strip_prefix(&prefix) {
                if !short.is_empty() && uid.starts_with(short) {
                    return std::fs::read_to_string(e.path().join(format!("{CONTAINER}.log")))
                        .unwrap_or_default();
                }
            }
        }
        String::new()
    }

    pub fn pod_log(&self, pod: &str) -> String {
        self.cluster
            .pod_log(&self.ns, pod, CONTAINER)
            .unwrap_or_default()
    }

    /// Kills the operator (SIGKILL, as a crashed pod) and starts a fresh one, as its Deployment
    /// would (admin credentials, watching the test namespace; not for helm installs).
    pub fn restart_operator(&mut self) {
        let Some(operator) = self.operator.as_mut() else {
            panic!("restart_operator is for the local operator; kill the chart's pods instead");
        };
        operator.stop();
        let log = operator.log.clone();
        self.operator = Some(Operator::start(
            self.cluster.kubeconfig_path(),
            Some(&self.ns),
            &self.ns,
            &log,
        ));
    }

    /// The operator's log: the local process's file, or the logs of the chart's operator pods
    /// that run now (each headed by its pod's name).
    pub fn operator_log(&self) -> String {
        match &self.operator {
            Some(op) => std::fs::read_to_string(&op.log).unwrap_or_default(),
            None => self
                .cluster
                .pod_logs(OPERATOR_NS, OPERATOR_CONTAINER)
                .into_iter()
                .map(|(pod, log)| format!("=== pod {pod}\n{log}"))
                .collect(),
        }
    }

    fn operator_log_where(&self) -> String {
        match &self.operator {
            Some(op) => op.log.display().to_string(),
            None => format!(
                "the {OPERATOR_NS} pods under {}/pods",
                self.cluster.run_dir().display()
            ),
        }
    }

    /// The local operator's pid (None when the chart's Deployment runs it).
    pub fn operator_pid(&self) -> Option<u32> {
        self.operator.as_ref().map(|o| o.pid())
    }

    /// `kubectl drain` of `node`, as an administrator before patching it; returns its output.
    /// Completes once every pod it evicts is gone (the old active only after its switchover).
    pub async fn drain_node(&self, node: &str) -> String {
        self.cluster
            .kubectl(&[
                "drain",
                node,
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--timeout=120s",
            ])
            .await
            .unwrap_or_else(|e| self.fail(&format!("kubectl drain {node}: {e}")))
    }

    /// Requests a planned switchover to the standby, as a user would: by annotating the cluster.
    pub async fn request_switchover(&self) {
        let ns = self.ns.clone();
        self.kubectl(&[
            "annotate",
            "imc",
            CLUSTER,
            "-n",
            &ns,
            &format!("{SWITCHOVER_ANNOTATION}=standby"),
        ])
        .await;
    }

    pub async fn kubectl(&self, args: &[&str]) -> String {
        self.cluster
            .kubectl(args)
            .await
            .unwrap_or_else(|e| self.fail(&format!("kubectl {args:?}: {e}")))
    }

    /// Waits for the first settled state; checks nodes and the Service.
    pub async fn wait_settled(&self, what: &str) -> Status {
        self.wait_status(what, WAIT, Status::settled).await
    }

    /// Names of objects of `resource` (e.g. "pods") with the cluster label.
    pub async fn owned(&self, resource: &str) -> Vec<String> {
        let out = self
            .kubectl(&[
                "get",
                resource,
                "-n",
                &self.ns,
                "-l",
                &format!("identitymesh.io/cluster={CLUSTER}"),
                "-o",
                "name",
            ])
            .await;
        out.lines().map(str::to_string).collect()
    }

    pub async fn list_pods(&self) -> Vec<Pod> {
        self.pods
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }
}

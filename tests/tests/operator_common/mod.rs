//! Shared by the operator end-to-end tests and the cutover bench: a harness with the real
//! `identitymesh-server` behind the operator's image, the operator as a local process, an
//! IdentityMeshCluster whose two pods share one SQLite file, and probes of what clients see.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use identitymesh_tests::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::watcher;
use kube::Api;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// The operator's default image repository (spec.image.repository); the harness runs the
/// server binary for it.
pub const SERVER_IMAGE: &str = "identitymesh/server";
pub const CLUSTER: &str = "im";
/// Service port of the client Service (spec.service.port default).
pub const SERVICE_PORT: u16 = 443;
pub const CONTAINER: &str = "server";
/// Short on purpose: the bench measures against the targets with it.
pub const UNHEALTHY_AFTER_SECONDS: u32 = 2;

pub const SWITCHOVER_ANNOTATION: &str = "identitymesh.io/switchover";

/// Generous bound for anything the operator does by itself (timings are the bench's job).
pub const WAIT: Duration = Duration::from_secs(90);

/// One e2e run at a time: each starts a control plane and three node namespaces, and the host
/// has two cores shared with other work.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "identitymesh_tests=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn crd_path() -> PathBuf {
    workspace_root().join("crds/identitymeshclusters.identitymesh.io.yaml")
}

/// A workspace binary next to this test executable (`<target>/<profile>/deps/x` →
/// `<target>/<profile>/<name>`): Cargo gives integration tests CARGO_BIN_EXE_* of their own
/// package only.
/// `IDENTITYMESH_BIN_DIR` overrides the directory (e.g. release tests against debug binaries).
pub fn workspace_bin(name: &str) -> PathBuf {
    let profile_dir = match std::env::var_os("IDENTITYMESH_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            exe.parent()
                .and_then(Path::parent)
                .expect("test executable lives in <target>/<profile>/deps")
                .to_path_buf()
        }
    };
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first (with the same CARGO_TARGET_DIR and profile as the tests)",
        path.display()
    );
    path
}

fn need_tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: install it (apt-get install -y {name}); `cargo xtask test` should list it among its Debian packages")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

// ------------------------------------------------------------------------------- operator

/// `identitymesh-operator run` as a local process, stopped by pid.
pub struct Operator {
    child: Child,
    pub log: PathBuf,
}

impl Operator {
    /// `watch`: `--namespace` (None watches all, as the chart's default); the leader Lease
    /// lives in `lease_ns`.
    pub fn start(kubeconfig: &Path, watch: Option<&str>, lease_ns: &str, log: &Path) -> Operator {
        use std::os::unix::process::CommandExt;
        let bin = workspace_bin("identitymesh-operator");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("operator log file");
        let err = out.try_clone().expect("clone log handle");
        let mut cmd = Command::new(bin);
        cmd.args([
            "run",
            "--leader-election",
            "true",
            "--lease-namespace",
            lease_ns,
        ]);
        if let Some(ns) = watch {
            cmd.args(["--namespace", ns]);
        }
        cmd.arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", free_port()))
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("IM_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: prctl is async-signal-safe. The operator dies with the test process even when
        // the test is killed before its Drop runs.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start identitymesh-operator");
        Operator {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL by pid and reap.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------------------- endpoint watch

#[derive(Default, Debug)]
struct SliceState {
    /// slice name → ready addresses
    slices: HashMap<String, Vec<String>>,
    max_ready: usize,
    violations: Vec<String>,
    /// (when, ready addresses) at every change of the union.
    history: Vec<(Instant, Vec<String>)>,
}

/// Watches the client Service's EndpointSlices from before the cluster exists and records every
/// moment more than one endpoint was ready.
pub struct SliceMonitor {
    state: Arc<Mutex<SliceState>>,
    task: JoinHandle<()>,
}

fn ready_addresses(s: &EndpointSlice) -> Vec<String> {
    s.endpoints
        .iter()
        // nil means ready, as kube-proxy reads it.
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.clone())
        .collect()
}

impl SliceMonitor {
    pub fn start(client: kube::Client, ns: &str, service: &str) -> SliceMonitor {
        let api: Api<EndpointSlice> = Api::namespaced(client, ns);
        let cfg =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let state: Arc<Mutex<SliceState>> = Arc::default();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let stream = watcher(api, cfg);
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                        let name = s.metadata.name.clone().unwrap_or_default();
                        g.slices.insert(name, ready_addresses(&s));
                    }
                    watcher::Event::Delete(s) => {
                        let name = s.metadata.name.clone().unwrap_or_default();
                        g.slices.remove(&name);
                    }
                    watcher::Event::Init | watcher::Event::InitDone => {}
                }
                let mut all: Vec<String> = g.slices.values().flatten().cloned().collect();
                all.sort();
                if g.history.last().map(|(_, a)| a) != Some(&all) {
                    g.history.push((Instant::now(), all.clone()));
                }
                g.max_ready = g.max_ready.max(all.len());
                if all.len() > 1 {
                    let msg = format!("ready endpoints {all:?} in slices {:?}", g.slices);
                    g.violations.push(msg);
                }
            }
        });
        SliceMonitor { state, task }
    }

    /// Panics if the Service ever had more than one ready endpoint.
    pub fn assert_never_two(&self, when: &str) {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            g.violations.is_empty(),
            "{when}: the client Service routed to more than one pod: {:?}",
            g.violations
        );
    }

    pub fn max_ready(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .max_ready
    }

    /// Number of changes of the ready set seen so far (proves the watch saw the swings).
    pub fn changes(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .history
            .len()
    }

    pub fn current(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .history
            .last()
            .map(|(_, a)| a.clone())
            .unwrap_or_default()
    }
}

impl Drop for SliceMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------------------- HTTPS probe

/// What one GET /health/ready through the Service returned.
#[derive(Debug, Clone)]
pub struct Ready {
    pub code: u16,
    pub role: String,
    pub epoch: i64,
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()).flatten() {
        roots.add(c).expect("CA certificate");
    }
    roots
}

/// HTTPS GET verified against the cluster CA for `sni` (a DNS name of the client Service).
pub async fn https_get(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    https_request(addr, sni, ca_pem, "GET", path, None, None, timeout).await
}

/// Joins the chunks of a `Transfer-Encoding: chunked` body.
fn dechunk(body: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| format!("truncated chunked body {body:?}"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| format!("truncated chunk in {body:?}"))?;
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// One HTTPS request (HTTP/1.1, `Connection: close`) verified against the cluster CA for
/// `sni`, with an optional bearer token and JSON body; returns the status and the body.
#[allow(clippy::too_many_arguments)]
pub async fn https_request(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json_body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots(ca_pem))
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = json_body.unwrap_or("");
    if json_body.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body);
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        tls.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        // A peer that closes without close_notify still gave us the whole response.
        if let Err(e) = tls.read_to_end(&mut buf).await {
            if buf.is_empty() {
                return Err(format!("read: {e}"));
            }
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad response {text:?}"))?;
        let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = headers.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(body)?
        } else {
            body.to_string()
        };
        Ok((code, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timeout".to_string())?
}

// ------------------------------------------------------------------------------- the setup

static RUN: AtomicUsize = AtomicUsize::new(0);

/// Options for [`Env::start`].
pub struct EnvOptions {
    pub windows_nodes: usize,
    pub unhealthy_after_seconds: u32,
    /// Install the operator with `helm install` of charts/identitymesh-operator (CRD, RBAC,
    /// Deployment) and run the local operator process with the chart's ServiceAccount token,
    /// instead of `kubectl apply -f crds/` and admin credentials.
    pub helm: bool,
    /// Extra environment for the server processes (e.g. a bootstrap admin token file, which
    /// the operator's pods do not get): the harness runs a wrapper script that sets it and
    /// execs the server, so the pod's own spec stays what the operator built.
    pub server_env: Vec<(String, String)>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            windows_nodes: 3,
            unhealthy_after_seconds: UNHEALTHY_AFTER_SECONDS,
            helm: false,
            server_env: Vec::new(),
        }
    }
}

/// Namespace and release of the helm install.
pub const OPERATOR_NS: &str = "identitymesh-system";
pub const RELEASE: &str = "identitymesh-operator";

/// A kubeconfig for the harness's apiserver that authenticates with `token` (same server and
/// CA as the admin kubeconfig).
fn token_kubeconfig(admin: &Path, token: &str, out: &Path) {
    let text = std::fs::read_to_string(admin).expect("read the admin kubeconfig");
    let admin: Value = serde_yaml::from_str(&text).expect("parse the admin kubeconfig");
    let cluster = admin["clusters"][0]["cluster"].clone();
    assert!(
        cluster["server"].is_string(),
        "admin kubeconfig has a server: {admin}"
    );
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "harness", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token.trim()}}],
        "contexts": [{"name": "harness", "context": {"cluster": "harness", "user": "operator"}}],
        "current-context": "harness",
    });
    std::fs::write(out, doc.to_string()).expect("write the operator kubeconfig");
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
    pub operator: Operator,
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
        if !opts.server_env.is_empty() {
            server = server_wrapper(&dir, &server, &opts.server_env);
        }
        let cluster = Cluster::start(
            ClusterOptions::windows(opts.windows_nodes).image(SERVER_IMAGE, &server),
        )
        .await
        .unwrap_or_else(|e| {
            panic!("start harness (run `cargo xtask tools` if tools are missing): {e}")
        });
        let db = dir.join("im.db");
        let ns = "identitymesh".to_string();
        let client = cluster.client();

        let operator_kubeconfig = if opts.helm {
            let chart = workspace_root().join("charts/identitymesh-operator");
            let out = cluster
                .helm(&[
                    "install",
                    RELEASE,
                    chart.to_str().expect("utf-8 path"),
                    "--namespace",
                    OPERATOR_NS,
                    "--create-namespace",
                ])
                .await
                .expect("helm install charts/identitymesh-operator");
            assert!(out.contains("STATUS: deployed"), "{out}");
            // The harness cannot give a pod in-cluster credentials at the fixed path kube-rs
            // reads (/var/run/secrets/kubernetes.io/serviceaccount), so the chart's Deployment
            // is not what runs the controller here: the local process does, with the chart's
            // ServiceAccount token, which proves the chart's RBAC is enough.
            let token = cluster
                .kubectl(&[
                    "create",
                    "token",
                    RELEASE,
                    "-n",
                    OPERATOR_NS,
                    "--duration=2h",
                ])
                .await
                .expect("a token for the chart's ServiceAccount");
            let kc = dir.join("operator.kubeconfig");
            token_kubeconfig(cluster.kubeconfig_path(), &token, &kc);
            kc
        } else {
            install_crd(&cluster).await;
            cluster.kubeconfig_path().to_path_buf()
        };
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
            // As the chart configures it: all namespaces, Lease in the release namespace.
            Operator::start(&operator_kubeconfig, None, OPERATOR_NS, &log)
        } else {
            Operator::start(&operator_kubeconfig, Some(&ns), &ns, &log)
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
        let log = std::fs::read_to_string(&self.operator.log).unwrap_or_default();
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
            self.operator.log.display(),
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
        self.operator.stop();
        let log = self.operator.log.clone();
        self.operator = Operator::start(
            self.cluster.kubeconfig_path(),
            Some(&self.ns),
            &self.ns,
            &log,
        );
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

// ------------------------------------------------------------------------------- SQLite

/// Runs `sql` on the shared database with the sqlite3 CLI (waits up to 5 s for the servers'
/// write lock); `|`-separated rows.
pub fn sqlite(db: &Path, sql: &str, read_only: bool) -> Result<String, String> {
    let bin = need_tool("sqlite3");
    let mut cmd = Command::new(bin);
    if read_only {
        cmd.arg("-readonly");
    }
    let out = cmd
        .args(["-cmd", ".timeout 5000", "-batch", "-noheader"])
        .arg(db)
        .arg(sql)
        .output()
        .map_err(|e| format!("run sqlite3: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "sqlite3 {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Test-only instrumentation of the shared database: triggers log every committed fence change,
/// engine tick and registry heartbeat into one table, in commit order (a trigger runs inside the
/// writing transaction, so a write that is refused or rolled back logs nothing). The server's own
/// fence_journal only records promotions and import batches, and no import runs in these tests.
pub fn install_commit_log(db: &Path) {
    let sql = "
        CREATE TABLE IF NOT EXISTS e2e_commit_log (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, what TEXT NOT NULL, instance TEXT,
            role TEXT, epoch INTEGER);
        CREATE TRIGGER IF NOT EXISTS e2e_fence AFTER UPDATE ON fence BEGIN
            INSERT INTO e2e_commit_log (what, instance, epoch) VALUES ('promote', NEW.holder, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_tick_i AFTER INSERT ON engine_state BEGIN
            INSERT INTO e2e_commit_log (what, instance, epoch) VALUES ('tick', NEW.holder, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_tick_u AFTER UPDATE ON engine_state BEGIN
            INSERT INTO e2e_commit_log (what, instance, epoch) VALUES ('tick', NEW.holder, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_hb_i AFTER INSERT ON engine_instances BEGIN
            INSERT INTO e2e_commit_log (what, instance, role, epoch) VALUES ('heartbeat', NEW.instance, NEW.role, NEW.epoch); END;
        CREATE TRIGGER IF NOT EXISTS e2e_hb_u AFTER UPDATE ON engine_instances BEGIN
            INSERT INTO e2e_commit_log (what, instance, role, epoch) VALUES ('heartbeat', NEW.instance, NEW.role, NEW.epoch); END;
    ";
    sqlite(db, sql, false).expect("install the commit-log triggers");
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub seq: i64,
    pub what: String,
    pub instance: String,
    pub role: String,
    pub epoch: i64,
}

pub fn commit_log(db: &Path) -> Vec<Commit> {
    let out = sqlite(
        db,
        "SELECT seq, what, ifnull(instance,''), ifnull(role,''), ifnull(epoch,-1) FROM e2e_commit_log ORDER BY seq",
        true,
    )
    .expect("read the commit log");
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            Some(Commit {
                seq: f.first()?.parse().ok()?,
                what: f.get(1)?.to_string(),
                instance: f.get(2)?.to_string(),
                role: f.get(3)?.to_string(),
                epoch: f.get(4)?.parse().ok()?,
            })
        })
        .collect()
}

/// The server's fence_journal (kind, epoch), in commit order.
pub fn fence_journal(db: &Path) -> Vec<(String, i64)> {
    sqlite(
        db,
        "SELECT kind, epoch FROM fence_journal ORDER BY seq",
        true,
    )
    .expect("read fence_journal")
    .lines()
    .filter_map(|l| {
        let (k, e) = l.split_once('|')?;
        Some((k.to_string(), e.parse().ok()?))
    })
    .collect()
}

/// Fencing, from the database's point of view: once epoch `new` is committed, no engine write
/// (tick, import batch) with an older epoch commits, and `old_instance` never again registers
/// as active with an older epoch. Returns how many writes the old holder committed before.
pub fn assert_fenced_after(db: &Path, new: i64, old_instance: &str) -> usize {
    // The new active ticks once per heartbeat interval: give it a few to show up.
    let started = Instant::now();
    let log = loop {
        let log = commit_log(db);
        let promoted = log
            .iter()
            .find(|c| c.what == "promote" && c.epoch == new)
            .map(|c| c.seq);
        let ticked = promoted.is_some_and(|p| {
            log.iter()
                .any(|c| c.seq > p && c.what == "tick" && c.epoch == new)
        });
        if ticked || started.elapsed() > Duration::from_secs(15) {
            break log;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let promote = log
        .iter()
        .find(|c| c.what == "promote" && c.epoch == new)
        .unwrap_or_else(|| panic!("no promotion to epoch {new} in the commit log: {log:?}"));
    let before = log
        .iter()
        .filter(|c| c.seq < promote.seq && c.what == "tick" && c.instance == old_instance)
        .count();
    let stale: Vec<&Commit> = log
        .iter()
        .filter(|c| c.seq > promote.seq)
        .filter(|c| {
            (c.what == "tick" && c.epoch < new)
                || (c.what == "heartbeat" && c.role == "active" && c.epoch < new)
        })
        .collect();
    assert!(
        stale.is_empty(),
        "writes with an epoch below {new} committed after the promotion (seq {}): {stale:?}",
        promote.seq
    );
    let after_new = log
        .iter()
        .filter(|c| c.seq > promote.seq && c.what == "tick" && c.epoch == new)
        .count();
    assert!(
        after_new > 0,
        "the new active committed no engine tick with epoch {new} after its promotion"
    );
    // The server's journal agrees: promotions strictly increase, and no batch of an older
    // epoch follows a promotion.
    let journal = fence_journal(db);
    let mut highest = 0;
    for (kind, epoch) in &journal {
        match kind.as_str() {
            "promote" => {
                assert!(*epoch > highest, "fence_journal promotions not increasing: {journal:?}");
                highest = *epoch;
            }
            _ => assert!(
                *epoch >= highest,
                "fence_journal: {kind} with epoch {epoch} committed after promotion to {highest}: {journal:?}"
            ),
        }
    }
    before
}

/// `kubectl apply` of the CRD from crds/.
pub async fn install_crd(cluster: &Cluster) {
    cluster
        .kubectl(&["apply", "-f", crd_path().to_str().expect("utf-8 path")])
        .await
        .expect("kubectl apply the CRD from crds/");
}

/// Waits until the apiserver serves the IdentityMeshCluster CRD.
pub async fn wait_crd_established(cluster: &Cluster) {
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/identitymeshclusters.identitymesh.io",
            "--timeout=60s",
        ])
        .await
        .expect("CRD established");
}

//! Fakes for the controller tests: a tower service over an in-memory object store that speaks
//! enough of the Kubernetes REST API (get, list, create, apply/merge/json patch, delete, status)
//! for the controller and counts every write; fake server pods behind the internal API; and
//! the harness that wires both into a Context.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action as ReconcileAction;
use kube::runtime::events::Reporter;
use kube::Client;
use serde_json::{json, Value};

use super::{reconcile, Context};
use crate::builders::test_support::cluster;
use crate::certs::CertAndKey;
use identitymesh_contract::internal::Role as WireRole;

use crate::crd::{IdentityMeshCluster, IdentityMeshClusterStatus, Phase, Role};
use crate::metrics::Metrics;
use crate::podclient::{
    CanaryReport, DemoteResponse, InstanceApi, InstanceApiFactory, InstanceRow, InternalStatus,
    PodClientError, PodTarget, RelayReport, UiReport,
};

// ------------------------------------------------------------------------------- fake apiserver

#[derive(Default)]
pub(super) struct Store {
    /// (resource, namespace, name) -> object
    pub(super) objects: BTreeMap<(String, String, String), Value>,
    pub(super) writes: Vec<String>,
    pub(super) next_uid: u64,
    /// Every selector the client Service was written with, in order.
    pub(super) selectors: Vec<String>,
    /// Every status written to the cluster, in order.
    pub(super) statuses: Vec<Value>,
    /// Writes (create or patch, not status) the apiserver refuses: (resource, name) → Status.
    pub(super) refuse: BTreeMap<(String, String), Value>,
}

pub(super) type Shared = Arc<Mutex<Store>>;

fn status_json(code: u16, reason: &str) -> Value {
    json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":reason,"reason":reason,"code":code})
}

/// Split a request path into (resource, namespace, name, subresource).
fn route(path: &str) -> (String, String, Option<String>, Option<String>) {
    let seg: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let rest: &[&str] = match seg.first() {
        Some(&"api") => &seg[2..],
        _ => &seg[3..],
    };
    let (ns, rest) = if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        (rest[1].to_string(), &rest[2..])
    } else {
        (String::new(), rest)
    };
    (
        rest[0].to_string(),
        ns,
        rest.get(1).map(|s| s.to_string()),
        rest.get(2).map(|s| s.to_string()),
    )
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn label_match(obj: &Value, selector: &str) -> bool {
    selector.split(',').filter(|s| !s.is_empty()).all(|req| {
        let labels = &obj["metadata"]["labels"];
        match req.split_once('=') {
            Some((k, v)) => labels[k].as_str() == Some(v),
            None => !labels[req].is_null(),
        }
    })
}

/// A write carrying a resourceVersion that is no longer the stored one (the apiserver's
/// optimistic-concurrency precondition).
fn stale_write(s: &Store, key: &(String, String, String), body: &Value) -> bool {
    let Some(want) = body["metadata"]["resourceVersion"].as_str() else {
        return false;
    };
    s.objects
        .get(key)
        .is_some_and(|o| o["metadata"]["resourceVersion"].as_str() != Some(want))
}

/// History the stale-read tests check: client Service selectors and cluster statuses.
fn record(s: &mut Store, res: &str, name: &str, sub: Option<&str>, o: &Value) {
    if res == "services" && name == "im" {
        s.selectors.push(selector_of(o));
    }
    if res == "identitymeshclusters" && sub == Some("status") {
        s.statuses.push(o["status"].clone());
    }
}

fn handle(
    store: &Shared,
    method: &str,
    path: &str,
    query: &str,
    ctype: &str,
    body: Value,
) -> (u16, Value) {
    let mut s = store.lock().expect("store");
    let (res, ns, name, sub) = route(path);
    if method != "GET" {
        s.writes.push(format!("{method} {path}"));
    }
    let key = |n: &str| (res.clone(), ns.clone(), n.to_string());
    if matches!(method, "POST" | "PATCH" | "PUT") && sub.is_none() {
        let n = name
            .clone()
            .or_else(|| body["metadata"]["name"].as_str().map(str::to_string))
            .unwrap_or_default();
        if let Some(st) = s.refuse.get(&(res.clone(), n)) {
            return (st["code"].as_u64().unwrap_or(422) as u16, st.clone());
        }
    }
    match (method, name) {
        ("GET", None) => {
            let sel = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("labelSelector="))
                .map(|v| {
                    v.replace("%3D", "=")
                        .replace("%2F", "/")
                        .replace("%2C", ",")
                })
                .unwrap_or_default();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, n, _), o)| {
                    *r == res && (ns.is_empty() || *n == ns) && label_match(o, &sel)
                })
                .map(|(_, o)| o.clone())
                .collect();
            (
                200,
                json!({"apiVersion":"v1","kind":"List","metadata":{"resourceVersion":"1"},"items":items}),
            )
        }
        ("GET", Some(n)) => match s.objects.get(&key(&n)) {
            Some(o) => (200, o.clone()),
            None => (404, status_json(404, "NotFound")),
        },
        ("POST", _) => {
            let n = body["metadata"]["name"]
                .as_str()
                .unwrap_or("generated")
                .to_string();
            if res != "events" && s.objects.contains_key(&key(&n)) {
                return (409, status_json(409, "AlreadyExists"));
            }
            s.next_uid += 1;
            let mut o = body.clone();
            o["metadata"]["uid"] = json!(format!("uid-{}", s.next_uid));
            o["metadata"]["creationTimestamp"] = json!(Timestamp::now().to_string());
            o["metadata"]["resourceVersion"] = json!(s.next_uid.to_string());
            if !ns.is_empty() {
                o["metadata"]["namespace"] = json!(ns);
            }
            s.objects.insert(key(&n), o.clone());
            (201, o)
        }
        ("PATCH" | "PUT", Some(n)) if stale_write(&s, &key(&n), &body) => {
            (409, status_json(409, "Conflict"))
        }
        ("PUT", Some(n)) => {
            let Some(mut o) = s.objects.get(&key(&n)).cloned() else {
                return (404, status_json(404, "NotFound"));
            };
            if sub.as_deref() == Some("status") {
                o["status"] = body["status"].clone();
            } else {
                let status = o["status"].clone();
                o = body.clone();
                o["status"] = status;
            }
            s.next_uid += 1;
            o["metadata"]["resourceVersion"] = json!(s.next_uid.to_string());
            record(&mut s, &res, &n, sub.as_deref(), &o);
            s.objects.insert(key(&n), o.clone());
            (200, o)
        }
        ("PATCH", Some(n)) => {
            let existing = s.objects.get(&key(&n)).cloned();
            let mut o = match (existing, ctype) {
                (Some(o), _) => o,
                (None, c) if c.contains("apply-patch") => json!({}),
                (None, _) => return (404, status_json(404, "NotFound")),
            };
            if ctype.contains("json-patch") {
                for op in body.as_array().cloned().unwrap_or_default() {
                    let p = op["path"].as_str().unwrap_or("");
                    let parts: Vec<&str> = p.trim_start_matches('/').split('/').collect();
                    match op["op"].as_str() {
                        Some("add") | Some("replace") => {
                            let mut cur = &mut o;
                            for (i, part) in parts.iter().enumerate() {
                                if i + 1 == parts.len() {
                                    if let Ok(idx) = part.parse::<usize>() {
                                        if let Some(a) = cur.as_array_mut() {
                                            a.insert(idx.min(a.len()), op["value"].clone());
                                        }
                                    } else if *part == "-" {
                                        if let Some(a) = cur.as_array_mut() {
                                            a.push(op["value"].clone());
                                        }
                                    } else {
                                        cur[*part] = op["value"].clone();
                                    }
                                } else {
                                    cur = &mut cur[*part];
                                }
                            }
                        }
                        Some("remove") => {
                            if let [a, b, idx] = parts.as_slice() {
                                if let (Some(arr), Ok(i)) =
                                    (o[*a][*b].as_array_mut(), idx.parse::<usize>())
                                {
                                    if i < arr.len() {
                                        arr.remove(i);
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                }
            } else if sub.as_deref() == Some("status") {
                o["status"] = body["status"].clone();
            } else if ctype.contains("apply-patch") {
                // Server-side apply, simplified: the applied fields replace ours wholesale.
                let meta = o["metadata"].clone();
                let mut new = body.clone();
                for k in ["uid", "creationTimestamp", "resourceVersion", "finalizers"] {
                    if !meta[k].is_null() {
                        new["metadata"][k] = meta[k].clone();
                    }
                }
                if !o["status"].is_null() {
                    new["status"] = o["status"].clone();
                }
                o = new;
            } else {
                merge(&mut o, &body);
            }
            s.next_uid += 1;
            o["metadata"]["resourceVersion"] = json!(s.next_uid.to_string());
            record(&mut s, &res, &n, sub.as_deref(), &o);
            // A deleting object whose last finalizer is gone disappears.
            let gone = !o["metadata"]["deletionTimestamp"].is_null()
                && o["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|a| a.is_empty());
            if gone {
                s.objects.remove(&key(&n));
            } else {
                s.objects.insert(key(&n), o.clone());
            }
            (200, o)
        }
        ("DELETE", Some(n)) => match s.objects.remove(&key(&n)) {
            Some(o) => (200, o),
            None => (404, status_json(404, "NotFound")),
        },
        _ => (405, status_json(405, "MethodNotAllowed")),
    }
}

fn fake_client(store: Shared) -> Client {
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let store = store.clone();
        async move {
            let method = req.method().to_string();
            let path = req.uri().path().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let ctype = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let bytes = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (code, out) = handle(&store, &method, &path, &query, &ctype, body);
            Response::builder()
                .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
                .header("content-type", "application/json")
                .body(kube::client::Body::from(
                    serde_json::to_vec(&out).unwrap_or_default(),
                ))
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        }
    });
    Client::new(svc, "prod")
}

// ------------------------------------------------------------------------------- fake pods

#[derive(Default)]
pub(super) struct Servers {
    pub(super) sql_epoch: i64,
    pub(super) holder: Option<String>,
    pub(super) roles: BTreeMap<String, (Role, i64)>,
    pub(super) calls: Vec<String>,
    /// Rows the SQL registry shows besides the pods' own (e.g. a cut-off old active).
    pub(super) extra_rows: Vec<InstanceRow>,
    /// The API store, to record what status.cutover said at each promote.
    pub(super) api: Option<Shared>,
    /// (epoch promoted with, status.cutover.epoch at that moment)
    pub(super) intent_at_promote: Vec<(i64, Option<i64>)>,
    /// Per pod: what /internal/v1/relays answers (default: no relays expected).
    pub(super) relays: BTreeMap<String, Fake<RelayReport>>,
    /// Per pod: what /internal/v1/canary answers (default: no canary connector).
    pub(super) canary: BTreeMap<String, Fake<CanaryReport>>,
    pub(super) relay_calls: Vec<String>,
    /// Per pod: what /internal/v1/ui answers (default: served, OIDC sign-in, issuer read).
    pub(super) ui: BTreeMap<String, Fake<UiReport>>,
    /// Pods whose promote fails with a transport error (e.g. SQL unreachable from that pod).
    pub(super) promote_fails: Vec<String>,
    /// Runs once, inside the first promote, on the API store (a concurrent writer).
    #[allow(clippy::type_complexity)]
    pub(super) on_first_promote: Option<Box<dyn FnOnce(&mut Store) + Send>>,
    /// (pod, wait)
    pub(super) canary_calls: Vec<(String, Duration)>,
    /// Hanging canary requests given up by the operator (their futures dropped unanswered).
    pub(super) canary_abandoned: usize,
}

/// Counts a hanging request abandoned by its caller.
struct Abandoned(Arc<Mutex<Servers>>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.canary_abandoned += 1;
        }
    }
}

/// A configured answer of a fake pod.
#[derive(Clone)]
pub(super) enum Fake<T> {
    Ok(T),
    Http(u16),
    Unreachable,
    /// Never answers (a canary whose runs take their whole wait, a hung pod).
    Hang,
}

impl<T: Clone + Default> Fake<T> {
    fn answer(pod: &str, f: Option<&Fake<T>>) -> Result<T, PodClientError> {
        match f {
            None => Ok(T::default()),
            Some(Fake::Ok(v)) => Ok(v.clone()),
            Some(Fake::Http(status)) => Err(PodClientError::Http {
                pod: pod.into(),
                status: *status,
                detail: r#"{"title":"fake"}"#.into(),
            }),
            Some(Fake::Unreachable) | Some(Fake::Hang) => Err(PodClientError::Transport {
                pod: pod.into(),
                detail: "connection refused".into(),
            }),
        }
    }
}

#[derive(Clone, Default)]
pub(super) struct FakePods(pub(super) Arc<Mutex<Servers>>);

impl InstanceApi for FakePods {
    fn status<'a>(
        &'a self,
        t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<InternalStatus, PodClientError>> {
        let s = self.0.lock().expect("servers");
        let (role, epoch) = s.roles.get(&t.pod).copied().unwrap_or((Role::Standby, 0));
        Box::pin(futures::future::ready(Ok(InternalStatus {
            instance: t.pod.clone(),
            incarnation: format!("{}-1", t.pod),
            role: if role == Role::Active {
                WireRole::Active
            } else {
                WireRole::Standby
            },
            epoch,
            version: Some("1.2.3".into()),
        })))
    }
    fn promote<'a>(
        &'a self,
        t: &'a PodTarget,
        epoch: i64,
    ) -> BoxFuture<'a, Result<(), PodClientError>> {
        let mut s = self.0.lock().expect("servers");
        s.calls.push(format!("promote {} {epoch}", t.pod));
        let intent = s.api.as_ref().and_then(|api| {
            api.lock()
                .expect("store")
                .objects
                .get(&("identitymeshclusters".into(), "prod".into(), "im".into()))
                .and_then(|o| o["status"]["cutover"]["epoch"].as_i64())
        });
        s.intent_at_promote.push((epoch, intent));
        if let (Some(f), Some(api)) = (s.on_first_promote.take(), s.api.clone()) {
            f(&mut api.lock().expect("store"));
        }
        let holds = s.holder.as_deref() == Some(t.pod.as_str()) && s.sql_epoch == epoch;
        let r = if s.promote_fails.contains(&t.pod) {
            Err(PodClientError::Transport {
                pod: t.pod.clone(),
                detail: "promote timed out".into(),
            })
        } else if epoch > s.sql_epoch || holds {
            s.sql_epoch = epoch;
            s.holder = Some(t.pod.clone());
            s.roles.insert(t.pod.clone(), (Role::Active, epoch));
            Ok(())
        } else {
            Err(PodClientError::Refused {
                stored: Some(s.sql_epoch),
                detail: "stale epoch".into(),
            })
        };
        Box::pin(futures::future::ready(r))
    }
    fn demote<'a>(
        &'a self,
        t: &'a PodTarget,
        _timeout: Duration,
    ) -> BoxFuture<'a, Result<DemoteResponse, PodClientError>> {
        let mut s = self.0.lock().expect("servers");
        s.calls.push(format!("demote {}", t.pod));
        let epoch = s.roles.get(&t.pod).map(|r| r.1).unwrap_or(0);
        s.roles.insert(t.pod.clone(), (Role::Standby, epoch));
        Box::pin(futures::future::ready(Ok(DemoteResponse {
            role: WireRole::Standby,
            epoch,
            drained: true,
        })))
    }
    fn instances<'a>(
        &'a self,
        _t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<Vec<InstanceRow>, PodClientError>> {
        Box::pin(futures::future::ready(Ok(self.rows())))
    }
    fn relays<'a>(
        &'a self,
        t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<RelayReport, PodClientError>> {
        let mut s = self.0.lock().expect("servers");
        s.relay_calls.push(t.pod.clone());
        let r = Fake::answer(&t.pod, s.relays.get(&t.pod));
        Box::pin(futures::future::ready(r))
    }
    fn ui<'a>(&'a self, t: &'a PodTarget) -> BoxFuture<'a, Result<UiReport, PodClientError>> {
        let s = self.0.lock().expect("servers");
        let served = Fake::Ok(UiReport {
            page_status: 200,
            sign_in: "oidc".into(),
            discovery_error: None,
        });
        let r = Fake::answer(&t.pod, Some(s.ui.get(&t.pod).unwrap_or(&served)));
        Box::pin(futures::future::ready(r))
    }

    fn canary<'a>(
        &'a self,
        t: &'a PodTarget,
        wait: Duration,
    ) -> BoxFuture<'a, Result<CanaryReport, PodClientError>> {
        let mut s = self.0.lock().expect("servers");
        s.canary_calls.push((t.pod.clone(), wait));
        // Like the server: only the active runs the canary.
        let active = s.roles.get(&t.pod).is_some_and(|r| r.0 == Role::Active);
        if active && matches!(s.canary.get(&t.pod), Some(Fake::Hang)) {
            let guard = Abandoned(self.0.clone());
            return Box::pin(async move {
                futures::future::pending::<()>().await;
                drop(guard);
                unreachable!()
            });
        }
        let r = if active {
            Fake::answer(&t.pod, s.canary.get(&t.pod))
        } else {
            Fake::<CanaryReport>::answer(&t.pod, Some(&Fake::Http(409)))
        };
        Box::pin(futures::future::ready(r))
    }
}

impl FakePods {
    /// The registry as SQL would show it: one row per known pod with its role and epoch.
    pub(super) fn rows(&self) -> Vec<InstanceRow> {
        let s = self.0.lock().expect("servers");
        let mut rows: Vec<InstanceRow> = s
            .roles
            .iter()
            .map(|(pod, (role, epoch))| InstanceRow {
                instance: pod.clone(),
                role: if *role == Role::Active {
                    WireRole::Active
                } else {
                    WireRole::Standby
                },
                epoch: *epoch,
                host: None,
                version: Some("1.2.3".into()),
            })
            .collect();
        rows.extend(s.extra_rows.iter().cloned());
        rows.sort_by(|a, b| a.instance.cmp(&b.instance));
        rows
    }
}

impl InstanceApiFactory for FakePods {
    fn for_cluster(
        &self,
        _key: &str,
        _ca: &CertAndKey,
    ) -> Result<Arc<dyn InstanceApi>, PodClientError> {
        Ok(Arc::new(self.clone()))
    }
}

// ------------------------------------------------------------------------------- harness

pub(super) struct Harness {
    pub(super) store: Shared,
    pub(super) pods: FakePods,
    pub(super) ctx: Arc<Context>,
}

pub(super) fn put(store: &Shared, res: &str, ns: &str, obj: Value) {
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    store
        .lock()
        .expect("store")
        .objects
        .insert((res.into(), ns.into(), name), obj);
}

impl Harness {
    pub(super) fn new(with_licence: bool) -> Self {
        let store: Shared = Arc::default();
        let mut imc = cluster("im", "prod");
        imc.spec.failover.unhealthy_after_seconds = 1;
        put(
            &store,
            "identitymeshclusters",
            "prod",
            serde_json::to_value(&imc).expect("imc"),
        );
        put(
            &store,
            "secrets",
            "prod",
            json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"im-db","namespace":"prod"},
                   "data":{"connectionString": "U2VydmVyPXRjcDpzcWw="}}),
        );
        if with_licence {
            put(
                &store,
                "secrets",
                "prod",
                json!({"apiVersion":"v1","kind":"Secret","metadata":{"name":"im-licence","namespace":"prod"},
                       "data":{"licence.json": "eyJmb3JtYXQiOjF9"}}),
            );
        }
        for n in ["node-1", "node-2", "node-3"] {
            put(
                &store,
                "nodes",
                "",
                json!({"apiVersion":"v1","kind":"Node","metadata":{"name":n},
                       "status":{"conditions":[{"type":"Ready","status":"True"}]}}),
            );
        }
        let client = fake_client(store.clone());
        let pods = FakePods::default();
        pods.0.lock().expect("servers").api = Some(store.clone());
        let ctx = Arc::new(Context::new(
            client,
            Metrics::new(),
            Arc::new(pods.clone()),
            Reporter {
                controller: "test".into(),
                instance: None,
            },
        ));
        Self { store, pods, ctx }
    }

    pub(super) fn get(&self, res: &str, name: &str) -> Option<Value> {
        let ns = if res == "nodes" { "" } else { "prod" };
        self.store
            .lock()
            .expect("store")
            .objects
            .get(&(res.to_string(), ns.to_string(), name.to_string()))
            .cloned()
    }

    pub(super) fn cluster(&self) -> IdentityMeshCluster {
        serde_json::from_value(self.get("identitymeshclusters", "im").expect("cluster"))
            .expect("typed")
    }

    pub(super) fn status(&self) -> IdentityMeshClusterStatus {
        self.cluster().status.unwrap_or_default()
    }

    pub(super) async fn reconcile(&self) -> ReconcileAction {
        let a = reconcile(Arc::new(self.cluster()), self.ctx.clone())
            .await
            .expect("reconcile");
        self.let_canaries_answer().await;
        a
    }

    /// Give canary tasks started by the last reconcile the chance to answer before the next
    /// one (the fakes answer at once unless told to hang).
    pub(super) async fn let_canaries_answer(&self) {
        for _ in 0..50 {
            if self.ctx.canaries.all_answered() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// The kubelet's part: pods run, get an IP, a node, and are Ready.
    pub(super) fn kubelet(&self) {
        let mut s = self.store.lock().expect("store");
        for (i, ((res, _, _), o)) in s.objects.iter_mut().enumerate() {
            if res == "pods" && o["status"].is_null() {
                let node = if o["metadata"]["name"] == "im-a" {
                    "node-1"
                } else {
                    "node-2"
                };
                o["spec"]["nodeName"] = json!(node);
                o["status"] = json!({"phase":"Running","podIP": format!("10.1.0.{}", i + 2),
                    "conditions":[{"type":"Ready","status":"True","lastTransitionTime":"2026-01-01T00:00:00Z"}]});
            }
        }
    }

    /// `kubectl cordon`: spec.unschedulable (`by_taint`: the unschedulable taint only, as a
    /// node whose field is not set yet shows it).
    pub(super) fn cordon(&self, node: &str, by_taint: bool) {
        let mut s = self.store.lock().expect("store");
        let n = s
            .objects
            .get_mut(&("nodes".into(), String::new(), node.into()))
            .expect("node");
        if by_taint {
            n["spec"]["taints"] =
                json!([{"key":"node.kubernetes.io/unschedulable","effect":"NoSchedule"}]);
        } else {
            n["spec"]["unschedulable"] = json!(true);
        }
    }

    /// `kubectl uncordon`.
    pub(super) fn uncordon(&self, node: &str) {
        let mut s = self.store.lock().expect("store");
        let n = s
            .objects
            .get_mut(&("nodes".into(), String::new(), node.into()))
            .expect("node");
        n["spec"] = json!({});
    }

    /// The PodDisruptionBudget's matchLabels (None: no budget).
    pub(super) fn budget_selector(&self) -> Option<Value> {
        self.get("poddisruptionbudgets", "im")
            .map(|b| b["spec"]["selector"]["matchLabels"].clone())
    }

    pub(super) fn take_writes(&self) -> Vec<String> {
        std::mem::take(&mut self.store.lock().expect("store").writes)
    }

    /// Reconcile until Running with no cutover and a reconcile that wrote nothing.
    pub(super) async fn converge(&self) {
        for _ in 0..15 {
            let before = self.store.lock().expect("store").writes.len();
            self.reconcile().await;
            self.kubelet();
            let wrote = self.store.lock().expect("store").writes.len() > before;
            if !wrote
                && self.status().phase == Some(Phase::Running)
                && self.status().cutover.is_none()
            {
                return;
            }
        }
        panic!("did not converge: {:?}", self.status());
    }
}

/// The pod the client Service selects.
pub(super) fn selector_of(svc: &Value) -> String {
    svc["spec"]["selector"]["identitymesh.io/instance"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

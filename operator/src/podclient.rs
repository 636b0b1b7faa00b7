//! Client for the pods' internal API (`/internal/v1/*` on port 9443, mTLS).
//!
//! The operator connects to `podIP:9443` but verifies the server certificate against the pod's
//! headless DNS name (a SAN of the serving certificate), trusting only the cluster CA, and
//! presents a client certificate issued by that CA.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use identitymesh_contract::internal::{paths, CanaryRequest, DemoteRequest, PromoteRequest};

use crate::builders::INTERNAL_PORT;
use crate::certs::{self, CertAndKey};

/// Where to reach one pod's internal API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    pub pod: String,
    /// podIP:9443
    pub addr: SocketAddr,
    /// Name checked against the serving certificate (the pod's headless DNS name).
    pub tls_name: String,
}

impl PodTarget {
    pub fn new(pod: &str, ip: IpAddr, tls_name: String) -> Self {
        Self {
            pod: pod.to_string(),
            addr: SocketAddr::new(ip, INTERNAL_PORT as u16),
            tls_name,
        }
    }
}

pub use identitymesh_contract::internal::{
    CanaryReport, CanaryRun, DemoteResponse, InstanceRow, InternalStatus, RelayReport, UiReport,
};

#[derive(Debug, thiserror::Error)]
pub enum PodClientError {
    /// 409 from promote: the epoch is not above the one in SQL.
    #[error("promote refused: {detail}")]
    Refused { stored: Option<i64>, detail: String },
    #[error("internal API of {pod} answered HTTP {status}: {detail}")]
    Http {
        pod: String,
        status: u16,
        detail: String,
    },
    #[error("internal API of {pod} unreachable: {detail}")]
    Transport { pod: String, detail: String },
    #[error("building the mTLS client failed: {0}")]
    Setup(String),
}

/// The internal API, as a trait so reconcile tests can fake the pods.
pub trait InstanceApi: Send + Sync {
    fn status<'a>(
        &'a self,
        t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<InternalStatus, PodClientError>>;
    fn promote<'a>(
        &'a self,
        t: &'a PodTarget,
        epoch: i64,
    ) -> BoxFuture<'a, Result<(), PodClientError>>;
    fn demote<'a>(
        &'a self,
        t: &'a PodTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<DemoteResponse, PodClientError>>;
    /// The registry rows from SQL as seen through this pod: the post-cutover check that exactly
    /// one instance holds the active role (it covers pods the operator cannot reach).
    fn instances<'a>(
        &'a self,
        t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<Vec<InstanceRow>, PodClientError>>;
    /// Which recently seen relays are (not yet) connected to this instance.
    fn relays<'a>(&'a self, t: &'a PodTarget)
        -> BoxFuture<'a, Result<RelayReport, PodClientError>>;
    /// Run every canary connector on this (active) instance and wait up to `wait` for them.
    fn canary<'a>(
        &'a self,
        t: &'a PodTarget,
        wait: Duration,
    ) -> BoxFuture<'a, Result<CanaryReport, PodClientError>>;
    /// Whether this instance serves the Admin UI and reaches the identity provider.
    fn ui<'a>(&'a self, t: &'a PodTarget) -> BoxFuture<'a, Result<UiReport, PodClientError>>;
}

/// Makes an [`InstanceApi`] for a cluster from its CA.
pub trait InstanceApiFactory: Send + Sync {
    fn for_cluster(
        &self,
        cluster_key: &str,
        ca: &CertAndKey,
    ) -> Result<Arc<dyn InstanceApi>, PodClientError>;
}

/// The epoch stored in SQL, from a 409 promote problem body (`stored_epoch`, per the server's
/// contract); the operator retries with one above it.
pub fn stored_epoch_from_problem(body: &str) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("stored_epoch").and_then(serde_json::Value::as_i64)
}

/// Time allowed beyond a canary's own wait for starting the runs and answering.
const CANARY_MARGIN: Duration = Duration::from_secs(10);

/// reqwest + rustls client with the operator's client certificate.
pub struct MtlsInstanceClient {
    ca_pem: String,
    identity_pem: String,
    status_timeout: Duration,
}

impl MtlsInstanceClient {
    pub fn new(ca_cert_pem: &str, client: &CertAndKey) -> Self {
        Self {
            ca_pem: ca_cert_pem.to_string(),
            identity_pem: format!("{}\n{}", client.cert_pem, client.key_pem),
            status_timeout: Duration::from_secs(2),
        }
    }

    fn http(&self, t: &PodTarget, timeout: Duration) -> Result<reqwest::Client, PodClientError> {
        let ca = reqwest::Certificate::from_pem(self.ca_pem.as_bytes())
            .map_err(|e| PodClientError::Setup(e.to_string()))?;
        let id = reqwest::Identity::from_pem(self.identity_pem.as_bytes())
            .map_err(|e| PodClientError::Setup(e.to_string()))?;
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(id)
            // Connect to the pod IP, verify the pod's DNS name.
            .resolve(&t.tls_name, t.addr)
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| PodClientError::Setup(e.to_string()))
    }

    fn url(t: &PodTarget, path: &str) -> String {
        format!("https://{}:{}{}", t.tls_name, t.addr.port(), path)
    }
}

fn transport(t: &PodTarget, e: reqwest::Error) -> PodClientError {
    PodClientError::Transport {
        pod: t.pod.clone(),
        detail: e.to_string(),
    }
}

async fn body_of(resp: reqwest::Response) -> String {
    let mut s = resp.text().await.unwrap_or_default();
    s.truncate(512);
    s
}

impl MtlsInstanceClient {
    /// GET a JSON document from a pod's internal API; a non-2xx answer is an Http error
    /// carrying the pod's problem detail.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        t: &PodTarget,
        path: &str,
    ) -> Result<T, PodClientError> {
        let http = self.http(t, self.status_timeout)?;
        let resp = http
            .get(Self::url(t, path))
            .send()
            .await
            .map_err(|e| transport(t, e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(PodClientError::Http {
                pod: t.pod.clone(),
                status: status.as_u16(),
                detail: body_of(resp).await,
            });
        }
        resp.json::<T>().await.map_err(|e| transport(t, e))
    }
}

impl InstanceApi for MtlsInstanceClient {
    fn status<'a>(
        &'a self,
        t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<InternalStatus, PodClientError>> {
        Box::pin(self.get_json(t, paths::STATUS))
    }

    fn instances<'a>(
        &'a self,
        t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<Vec<InstanceRow>, PodClientError>> {
        Box::pin(self.get_json(t, paths::INSTANCES))
    }

    fn relays<'a>(
        &'a self,
        t: &'a PodTarget,
    ) -> BoxFuture<'a, Result<RelayReport, PodClientError>> {
        Box::pin(self.get_json(t, paths::RELAYS))
    }

    fn ui<'a>(&'a self, t: &'a PodTarget) -> BoxFuture<'a, Result<UiReport, PodClientError>> {
        Box::pin(self.get_json(t, paths::UI))
    }

    fn canary<'a>(
        &'a self,
        t: &'a PodTarget,
        wait: Duration,
    ) -> BoxFuture<'a, Result<CanaryReport, PodClientError>> {
        Box::pin(async move {
            // The server waits up to `wait` itself; allow for the runs' start and the answer.
            let http = self.http(t, wait + CANARY_MARGIN)?;
            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            let resp = http
                .post(Self::url(t, paths::CANARY))
                .json(&CanaryRequest {
                    wait_ms: Some(wait_ms),
                })
                .send()
                .await
                .map_err(|e| transport(t, e))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(PodClientError::Http {
                    pod: t.pod.clone(),
                    status: status.as_u16(),
                    detail: body_of(resp).await,
                });
            }
            resp.json::<CanaryReport>()
                .await
                .map_err(|e| transport(t, e))
        })
    }

    fn promote<'a>(
        &'a self,
        t: &'a PodTarget,
        epoch: i64,
    ) -> BoxFuture<'a, Result<(), PodClientError>> {
        Box::pin(async move {
            let http = self.http(t, Duration::from_secs(10))?;
            let resp = http
                .post(Self::url(t, paths::PROMOTE))
                .json(&PromoteRequest { epoch })
                .send()
                .await
                .map_err(|e| transport(t, e))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let detail = body_of(resp).await;
            if status.as_u16() == 409 {
                return Err(PodClientError::Refused {
                    stored: stored_epoch_from_problem(&detail),
                    detail,
                });
            }
            Err(PodClientError::Http {
                pod: t.pod.clone(),
                status: status.as_u16(),
                detail,
            })
        })
    }

    fn demote<'a>(
        &'a self,
        t: &'a PodTarget,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<DemoteResponse, PodClientError>> {
        Box::pin(async move {
            let http = self.http(t, timeout)?;
            let resp = http
                .post(Self::url(t, paths::DEMOTE))
                .json(&DemoteRequest::default())
                .send()
                .await
                .map_err(|e| transport(t, e))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(PodClientError::Http {
                    pod: t.pod.clone(),
                    status: status.as_u16(),
                    detail: body_of(resp).await,
                });
            }
            resp.json::<DemoteResponse>()
                .await
                .map_err(|e| transport(t, e))
        })
    }
}

/// (CA certificate it was made for, when, client)
type CachedClient = (String, Instant, Arc<MtlsInstanceClient>);

/// Issues (and caches) the operator's client certificate per cluster CA; in memory only.
#[derive(Default)]
pub struct MtlsFactory {
    cache: Mutex<std::collections::HashMap<String, CachedClient>>,
}

/// Re-issue well before the 24h client certificate expires.
const CLIENT_CERT_REFRESH: Duration = Duration::from_secs(6 * 3600);

impl InstanceApiFactory for MtlsFactory {
    fn for_cluster(
        &self,
        cluster_key: &str,
        ca: &CertAndKey,
    ) -> Result<Arc<dyn InstanceApi>, PodClientError> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| PodClientError::Setup("client cache poisoned".into()))?;
        if let Some((ca_pem, at, c)) = cache.get(cluster_key) {
            if *ca_pem == ca.cert_pem && at.elapsed() < CLIENT_CERT_REFRESH {
                return Ok(c.clone());
            }
        }
        let now = time::OffsetDateTime::now_utc();
        let client_cert = certs::issue_client_cert(ca, "identitymesh-operator", now)
            .map_err(|e| PodClientError::Setup(e.to_string()))?;
        let c = Arc::new(MtlsInstanceClient::new(&ca.cert_pem, &client_cert));
        cache.insert(
            cluster_key.to_string(),
            (ca.cert_pem.clone(), Instant::now(), c.clone()),
        );
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Role;

    #[test]
    fn parses_status_and_roles() {
        let s: InternalStatus = serde_json::from_str(
            r#"{"instance":"im-a","role":"active","epoch":3,"version":"0.1.0"}"#,
        )
        .expect("status");
        assert_eq!(Role::from(s.role), Role::Active);
        let s: InternalStatus =
            serde_json::from_str(r#"{"instance":"im-a","role":"standby","epoch":0}"#)
                .expect("status");
        assert_eq!(Role::from(s.role), Role::Standby);
        let d: DemoteResponse =
            serde_json::from_str(r#"{"role":"standby","epoch":3,"drained":false}"#)
                .expect("demote");
        assert!(!d.drained);
        let rows: Vec<InstanceRow> = serde_json::from_str(
            r#"[{"instance":"im-a","host":"h","role":"active","epoch":3,"version":"0.1.0","started_at":"2026-11-25T00:00:00Z","last_heartbeat":"2026-11-25T00:00:01Z","alive":true},
                {"instance":"im-b","host":"h2","role":"fenced","epoch":2,"version":"0.1.0","started_at":"2026-11-25T00:00:00Z","last_heartbeat":"2026-11-25T00:00:01Z","alive":true}]"#,
        )
        .expect("rows");
        assert!(rows[0].is_active() && !rows[1].is_active());
        assert_eq!(rows[1].epoch, 2);
    }

    #[test]
    fn parses_relay_and_canary_reports() {
        let r: RelayReport = serde_json::from_str(
            r#"{"expected":["dc1","dc2"],"connected_here":["dc1"],"missing":["dc2"]}"#,
        )
        .expect("relays");
        assert_eq!(r.missing, ["dc2"]);
        let c: CanaryReport = serde_json::from_str(
            r#"{"ok":false,"runs":[{"connector_id":"c1","connector":"hr","run_id":"r1","status":"failed","error":"LDAP bind failed"},
                               {"connector_id":"c2","connector":"ad","run_id":null,"status":"busy","error":"already running"}]}"#,
        )
        .expect("canary");
        assert_eq!(c.ok, Some(false));
        assert_eq!(c.runs[0].error.as_deref(), Some("LDAP bind failed"));
        assert_eq!(c.runs[1].run_id, None);
        let none: CanaryReport = serde_json::from_str(r#"{"ok":null,"runs":[]}"#).expect("none");
        assert_eq!(none.ok, None);
    }

    #[test]
    fn stored_epoch_in_problem_bodies() {
        assert_eq!(
            stored_epoch_from_problem(r#"{"title":"conflict","stored_epoch":9}"#),
            Some(9)
        );
        assert_eq!(stored_epoch_from_problem(r#"{"title":"conflict"}"#), None);
        // Only the contract's member: a requested `epoch` is not the stored one.
        assert_eq!(stored_epoch_from_problem(r#"{"epoch":4}"#), None);
        assert_eq!(stored_epoch_from_problem("not json"), None);
    }

    /// A one-thread HTTPS server on loopback with a CA-issued certificate for the pod's DNS
    /// name that requires a client certificate from the same CA; answers each connection in
    /// turn with the next body and returns the requests it read.
    fn loopback_server(
        ca: &CertAndKey,
        bodies: Vec<&'static str>,
    ) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{Read as _, Write as _};
        let now = time::OffsetDateTime::now_utc();
        let serving = certs::issue_serving_cert(
            ca,
            &["im-a.im-pods.ns.svc".to_string()],
            now,
            Duration::from_secs(3600),
        )
        .expect("leaf");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs_der: Vec<_> = rustls_pemfile_certs(&serving.cert_pem);
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(pem_der(&serving.key_pem)).expect("key");
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile_certs(&ca.cert_pem) {
            roots.add(c).expect("root");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .expect("verifier");
        let cfg = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs_der, key)
            .expect("server cfg");
        let acceptor = Arc::new(cfg);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for body in bodies {
                let Ok((mut sock, _)) = listener.accept() else {
                    break;
                };
                let mut conn = rustls::ServerConnection::new(acceptor.clone()).expect("conn");
                let mut tls = rustls::Stream::new(&mut conn, &mut sock);
                // Read the head, then as much body as content-length says.
                let mut req = Vec::new();
                let mut buf = [0u8; 2048];
                loop {
                    let n = tls.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("content-length")
                                    .then(|| v.trim().parse::<usize>().ok())
                                    .flatten()
                            })
                            .unwrap_or(0);
                        if req.len() >= head_end + 4 + len {
                            break;
                        }
                    }
                }
                requests.push(String::from_utf8_lossy(&req).to_string());
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
                    body.len(),
                    body
                );
                let _ = tls.flush();
            }
            requests
        });
        (port, server)
    }

    fn loopback_target(port: u16) -> PodTarget {
        PodTarget {
            pod: "im-a".into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            tls_name: "im-a.im-pods.ns.svc".into(),
        }
    }

    /// A real mTLS round trip against a loopback server with a CA-issued serving certificate:
    /// proves the client trusts only the cluster CA, checks the pod DNS name, and presents
    /// its client certificate.
    #[tokio::test]
    async fn mtls_round_trip_on_loopback() {
        let now = time::OffsetDateTime::now_utc();
        let ca = certs::generate_ca("im", "ns", now).expect("ca");
        let (port, server) = loopback_server(
            &ca,
            vec![r#"{"instance":"im-a","role":"standby","epoch":4}"#],
        );
        let client_cert =
            certs::issue_client_cert(&ca, "identitymesh-operator", now).expect("client");
        let mut c = MtlsInstanceClient::new(&ca.cert_pem, &client_cert);
        c.status_timeout = Duration::from_secs(5);
        let s = c
            .status(&loopback_target(port))
            .await
            .expect("status over mTLS");
        assert_eq!((Role::from(s.role), s.epoch), (Role::Standby, 4));
        server.join().expect("server thread");
    }

    /// The relay check is a GET, the canary a POST carrying the wait in milliseconds.
    #[tokio::test]
    async fn relays_and_canary_requests_on_loopback() {
        let now = time::OffsetDateTime::now_utc();
        let ca = certs::generate_ca("im", "ns", now).expect("ca");
        let (port, server) = loopback_server(
            &ca,
            vec![
                r#"{"expected":["dc1"],"connected_here":[],"missing":["dc1"]}"#,
                r#"{"ok":true,"runs":[{"connector_id":"c1","connector":"hr-canary","run_id":"r1","status":"succeeded","error":null}]}"#,
            ],
        );
        let client_cert =
            certs::issue_client_cert(&ca, "identitymesh-operator", now).expect("client");
        let mut c = MtlsInstanceClient::new(&ca.cert_pem, &client_cert);
        c.status_timeout = Duration::from_secs(5);
        let t = loopback_target(port);
        let r = c.relays(&t).await.expect("relays over mTLS");
        assert_eq!(r.missing, ["dc1"]);
        let k = c
            .canary(&t, Duration::from_secs(20))
            .await
            .expect("canary over mTLS");
        assert_eq!(k.ok, Some(true));
        assert_eq!(k.runs[0].connector, "hr-canary");
        let reqs = server.join().expect("server thread");
        assert!(
            reqs[0].starts_with("GET /internal/v1/relays "),
            "{}",
            reqs[0]
        );
        assert!(
            reqs[1].starts_with("POST /internal/v1/canary "),
            "{}",
            reqs[1]
        );
        assert!(reqs[1].ends_with(r#"{"wait_ms":20000}"#), "{}", reqs[1]);
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let p = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map(|(_, p)| p.contents);
        p.unwrap_or_default()
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        vec![rustls::pki_types::CertificateDer::from(pem_der(pem))]
    }
}

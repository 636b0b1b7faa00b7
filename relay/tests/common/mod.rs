//! Test hub over real TLS (rcgen CA + server certificate for `hub.test`), on its own runtime so
//! a test can kill it like a crashed process and start it again on the same port.
#![allow(dead_code)]

use identitymesh_relay::backoff::RetryPolicy;
use identitymesh_relay::config::RelaySettings;
use identitymesh_relay::endpoint::{Endpoint, ResolveOverride};
use identitymesh_relay::tls::Trust;
use identitymesh_signalr::hub::{
    router, AuthError, ConnectionInfo, HubBackend, HubConfig, HubHandle, InvocationContext,
    RelayIdentity,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const HOST: &str = "hub.test";

pub struct Pki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub cert_der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Pki {
        let ca = identitymesh_test_support::pki::TestCa::new("IdentityMesh test CA").unwrap();
        let leaf = ca.server(HOST, &[HOST, "localhost"]).unwrap();
        Pki {
            ca_pem: ca.cert_pem().to_string(),
            ca_der: CertificateDer::from(ca.cert().cert_der.clone()),
            cert_der: CertificateDer::from(leaf.cert_der),
            key_der: leaf.key_der,
        }
    }

    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

#[derive(Default)]
pub struct TestBackend {
    pub revoked: Mutex<HashSet<String>>,
    pub auth_ok: AtomicUsize,
    pub auth_rejected: AtomicUsize,
    pub connected: AtomicUsize,
    pub disconnected: AtomicUsize,
}

impl HubBackend for TestBackend {
    async fn authenticate(&self, bearer: &str) -> Result<RelayIdentity, AuthError> {
        let Some(relay) = bearer.strip_prefix("token-") else {
            self.auth_rejected.fetch_add(1, Ordering::SeqCst);
            return Err(AuthError::Invalid("unknown token".into()));
        };
        if self.revoked.lock().unwrap().contains(relay) {
            self.auth_rejected.fetch_add(1, Ordering::SeqCst);
            return Err(AuthError::Revoked(relay.into()));
        }
        self.auth_ok.fetch_add(1, Ordering::SeqCst);
        Ok(RelayIdentity {
            relay_id: relay.into(),
            name: relay.into(),
        })
    }

    async fn on_connected(&self, _conn: &ConnectionInfo) {
        self.connected.fetch_add(1, Ordering::SeqCst);
    }

    async fn on_disconnected(&self, _conn: &ConnectionInfo, _reason: &str) {
        self.disconnected.fetch_add(1, Ordering::SeqCst);
    }

    async fn handle_invocation(
        &self,
        _ctx: InvocationContext,
        target: String,
        _args: Vec<Value>,
    ) -> Result<Value, String> {
        Ok(json!({ "called": target }))
    }
}

pub struct TlsServer {
    pub addr: SocketAddr,
    pub handle: HubHandle,
    /// TLS connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsServer {
    pub fn start(port: u16, pki: &Pki, backend: Arc<TestBackend>, config: HubConfig) -> TlsServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (app, handle) = router::<_, ()>(backend, config);
        let listener = bind_retry(port);
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config());
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counter.fetch_add(1, Ordering::SeqCst);
                    let svc = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        TlsServer {
            addr,
            handle,
            accepted,
            runtime: Some(rt),
        }
    }

    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    pub fn url(&self) -> String {
        format!("https://{HOST}:{}", self.addr.port())
    }

    pub fn resolve(&self) -> String {
        format!("{HOST}:{}:127.0.0.1", self.addr.port())
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub use identitymesh_test_support::net::bind_retry;

/// Settings for an in-process agent with fast retries.
pub fn settings(server: &TlsServer, pki: &Pki, token: &str) -> RelaySettings {
    RelaySettings {
        endpoint: Endpoint::parse(&server.url(), false).unwrap(),
        token: token.into(),
        trust: Trust::Ca(vec![pki.ca_der.clone()]),
        resolve: vec![ResolveOverride::parse(&server.resolve()).unwrap()],
        retry: RetryPolicy {
            base: Duration::from_millis(50),
            cap: Duration::from_millis(500),
            quick_max: Duration::from_millis(100),
            auth_failure_min: Duration::from_millis(200),
            auth_failure_cap: Duration::from_millis(400),
        },
        keep_alive: Duration::from_secs(15),
        server_timeout: Duration::from_secs(30),
        connect_timeout: Duration::from_secs(5),
    }
}

#[allow(unused_imports)]
pub use identitymesh_test_support::wait::wait_until;

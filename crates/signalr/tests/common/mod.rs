//! Test hub: a plain-HTTP axum server on 127.0.0.1 with a scripted backend, running on its own
//! runtime so a test can kill it (all sockets drop at once) and start it again on the same port.
#![allow(dead_code)]

use identitymesh_signalr::hub::{
    router, AuthError, ConnectionInfo, HubBackend, HubConfig, HubHandle, InvocationContext,
    RelayIdentity,
};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct TestBackend {
    pub revoked: Mutex<HashSet<String>>,
    pub connected: AtomicUsize,
    pub disconnected: AtomicUsize,
    pub auth_calls: AtomicUsize,
    pub events: Mutex<Vec<String>>,
}

impl HubBackend for TestBackend {
    async fn authenticate(&self, bearer: &str) -> Result<RelayIdentity, AuthError> {
        self.auth_calls.fetch_add(1, Ordering::SeqCst);
        let Some(relay) = bearer.strip_prefix("token-") else {
            return Err(AuthError::Invalid("unknown token".into()));
        };
        if self.revoked.lock().unwrap().contains(relay) {
            return Err(AuthError::Revoked(relay.into()));
        }
        Ok(RelayIdentity {
            relay_id: relay.into(),
            name: format!("relay {relay}"),
        })
    }

    async fn on_connected(&self, conn: &ConnectionInfo) {
        self.connected.fetch_add(1, Ordering::SeqCst);
        self.events
            .lock()
            .unwrap()
            .push(format!("connected {}", conn.relay.relay_id));
    }

    async fn on_disconnected(&self, conn: &ConnectionInfo, reason: &str) {
        self.disconnected.fetch_add(1, Ordering::SeqCst);
        self.events
            .lock()
            .unwrap()
            .push(format!("disconnected {} {reason}", conn.relay.relay_id));
    }

    async fn handle_invocation(
        &self,
        ctx: InvocationContext,
        target: String,
        args: Vec<Value>,
    ) -> Result<Value, String> {
        match target.as_str() {
            "Add" => {
                let a = args.first().and_then(Value::as_i64).ok_or("Add(a, b): a")?;
                let b = args.get(1).and_then(Value::as_i64).ok_or("Add(a, b): b")?;
                Ok(json!(a + b))
            }
            "WhoAmI" => Ok(json!(ctx.relay.relay_id)),
            "Slow" => {
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                Ok(json!("slow done"))
            }
            "Fail" => Err("it failed".into()),
            other => Err(format!("unknown method {other}")),
        }
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: HubHandle,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    /// Starts on `port` (0 = any free port).
    pub fn start(port: u16, backend: Arc<TestBackend>, config: HubConfig) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (app, handle) = router::<_, ()>(backend, config);
        let listener = bind_retry(port);
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            // With the peer address, as the server's listener provides it (auth rate limit).
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            let _ = axum::serve(listener, app).await;
        });
        TestServer {
            addr,
            handle,
            runtime: Some(rt),
        }
    }

    /// Like a crash: every task and socket of the server goes away, nothing is closed cleanly.
    pub fn kill(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hubs/relay", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[allow(unused_imports)]
pub use identitymesh_test_support::wait::wait_until;

pub use identitymesh_test_support::net::bind_retry;

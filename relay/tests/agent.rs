//! The Rust relay against a test hub over real TLS.

mod common;

use common::{settings, wait_until, Pki, TestBackend, TlsServer};
use identitymesh_relay::agent::Agent;
use identitymesh_relay::connect::{ConnectError, Connector};
use identitymesh_relay::handlers::HandlerRegistry;
use identitymesh_relay::tls::Trust;
use identitymesh_signalr::hub::{HubConfig, InvokeError, StreamEvent};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);

struct RunningAgent {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<identitymesh_relay::agent::AgentStats>,
}

impl RunningAgent {
    fn start(settings: identitymesh_relay::config::RelaySettings) -> Self {
        Self::start_with(settings, HandlerRegistry::with_diagnostics())
    }

    fn start_with(
        settings: identitymesh_relay::config::RelaySettings,
        handlers: HandlerRegistry,
    ) -> Self {
        let agent = Agent::new(settings, handlers).unwrap();
        let stats = agent.stats();
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(async move { agent.run(rx).await });
        RunningAgent { stop, task, stats }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(T, self.task)
            .await
            .expect("agent stops promptly")
            .unwrap();
    }
}

fn only_connection(server: &TlsServer) -> String {
    let c = server.handle.connections();
    assert_eq!(c.len(), 1, "{c:?}");
    c[0].connection_id.clone()
}

#[tokio::test]
async fn relay_connects_is_invoked_and_streams_chunks() {
    let pki = Pki::new();
    let backend = Arc::new(TestBackend::default());
    let server = TlsServer::start(0, &pki, backend.clone(), HubConfig::default());
    let agent = RunningAgent::start(settings(&server, &pki, "token-r1"));
    wait_until("relay connected", T, || {
        server.handle.connection_count() == 1
    })
    .await;
    let info = &server.handle.connections()[0];
    assert_eq!(info.relay.relay_id, "r1");
    assert!(info
        .user_agent
        .as_deref()
        .unwrap()
        .starts_with("identitymesh-relay/"));
    let cid = only_connection(&server);

    let pong = server.handle.invoke(&cid, "Ping", vec![]).await.unwrap();
    assert_eq!(pong["pong"], json!(true));
    let echo = server
        .handle
        .invoke(&cid, "Echo", vec![json!({"a": [1, 2]})])
        .await
        .unwrap();
    assert_eq!(echo, json!({"a": [1, 2]}));
    let err = server
        .handle
        .invoke(&cid, "NoSuchMethod", vec![])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, InvokeError::Remote(m) if m.contains("not implemented")),
        "{err:?}"
    );

    // Chunked results: 200 chunks of 4 KiB, consumer with a buffer of 1 that starts late and
    // reads slowly — the relay must wait (bounded queues), not fail or reorder.
    let mut stream = server
        .handle
        .invoke_stream(&cid, "StreamTest", vec![json!(200), json!(4096)], 1)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seq = 0u64;
    loop {
        match stream.next().await.unwrap() {
            Some(StreamEvent::Item(item)) => {
                assert_eq!(item["seq"], json!(seq));
                assert_eq!(item["data"].as_str().unwrap().len(), 4096);
                seq += 1;
                if seq.is_multiple_of(50) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            Some(StreamEvent::Completed(v)) => {
                assert_eq!(v, json!({"items": 200}));
                break;
            }
            None => panic!("stream ended without completion"),
        }
    }
    assert_eq!(seq, 200);
    // Handler errors arrive as errors.
    let mut s = server
        .handle
        .invoke_stream(&cid, "StreamTest", vec![json!(10_000_000)], 4)
        .await
        .unwrap();
    assert!(matches!(s.next().await, Err(InvokeError::Remote(m)) if m.contains("limits")));

    agent.stop().await;
    wait_until("relay disconnected", T, || {
        server.handle.connection_count() == 0
    })
    .await;
    assert_eq!(backend.disconnected.load(Ordering::SeqCst), 1);
}

/// Sets its flag when dropped: the handler's future was aborted or finished.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_stream_the_server_stops_reading_is_cancelled_on_the_relay() {
    let pki = Pki::new();
    let backend = Arc::new(TestBackend::default());
    let server = TlsServer::start(0, &pki, backend.clone(), HubConfig::default());
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut handlers = HandlerRegistry::new();
    let (flag, count) = (stopped.clone(), sent.clone());
    handlers.register(
        "Endless",
        move |_args: Vec<serde_json::Value>, mut sink: identitymesh_relay::handlers::ItemSink| {
            let guard = DropFlag(flag.clone());
            let count = count.clone();
            async move {
                let _guard = guard;
                loop {
                    if sink.send(json!({"n": 1})).await.is_err() {
                        return Err("closed".to_string());
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        },
    );
    let agent = RunningAgent::start_with(settings(&server, &pki, "token-r1"), handlers);
    wait_until("relay connected", T, || {
        server.handle.connection_count() == 1
    })
    .await;
    let cid = only_connection(&server);
    let mut stream = server
        .handle
        .invoke_stream(&cid, "Endless", vec![], 1)
        .await
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            stream.next().await,
            Ok(Some(StreamEvent::Item(_)))
        ));
    }
    drop(stream);
    wait_until("the relay's handler was cancelled", T, || {
        stopped.load(Ordering::SeqCst)
    })
    .await;
    let after = sent.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sent.load(Ordering::SeqCst),
        after,
        "nothing is produced after the cancel"
    );
    // The connection itself stays up and usable.
    let pong = server.handle.invoke(&cid, "Ping", vec![]).await;
    assert!(pong.is_err(), "this registry has no Ping: {pong:?}");
    assert_eq!(server.handle.connection_count(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn relay_retries_the_first_connection_and_reconnects_after_a_server_restart() {
    let pki = Pki::new();
    let backend = Arc::new(TestBackend::default());
    // Reserve a port, then start the relay before any server exists.
    let port = common::bind_retry(0).local_addr().unwrap().port();
    let mut s = settings(
        &TlsServer::start(0, &pki, backend.clone(), HubConfig::default()),
        &pki,
        "token-r1",
    );
    s.endpoint.port = port;
    s.resolve[0].port = port;
    let agent = RunningAgent::start(s);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        agent.stats.attempts.load(Ordering::SeqCst) >= 2,
        "the first connection is retried"
    );
    let mut server = TlsServer::start(port, &pki, backend.clone(), HubConfig::default());
    wait_until("first connection", T, || {
        server.handle.connection_count() == 1
    })
    .await;

    // Crash: sockets vanish without a Close.
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let server = TlsServer::start(port, &pki, backend.clone(), HubConfig::default());
    wait_until("reconnect after restart", T, || {
        server.handle.connection_count() == 1
    })
    .await;
    eprintln!("reconnected {:?} after the restart", started.elapsed());
    let cid = only_connection(&server);
    assert_eq!(
        server
            .handle
            .invoke(&cid, "Echo", vec![json!(1)])
            .await
            .unwrap(),
        json!(1)
    );

    // Graceful demotion: Close{allowReconnect:true} → quick reconnect (jitter ≤ 100 ms here).
    let before = agent.stats.connects.load(Ordering::SeqCst);
    assert_eq!(server.handle.close_all(Some("demoted".into())), 1);
    wait_until("quick reconnect", Duration::from_secs(3), || {
        agent.stats.connects.load(Ordering::SeqCst) > before
            && server.handle.connection_count() == 1
    })
    .await;
    agent.stop().await;
}

#[tokio::test]
async fn revoked_relay_is_disconnected_and_keeps_retrying_slowly() {
    let pki = Pki::new();
    let backend = Arc::new(TestBackend::default());
    let server = TlsServer::start(0, &pki, backend.clone(), HubConfig::default());
    let agent = RunningAgent::start(settings(&server, &pki, "token-r9"));
    wait_until("connected", T, || server.handle.connection_count() == 1).await;

    backend.revoked.lock().unwrap().insert("r9".into());
    assert_eq!(
        server.handle.disconnect_relay("r9", "credential revoked"),
        1
    );
    wait_until("disconnected", T, || server.handle.connection_count() == 0).await;
    // It keeps trying (forever), but slowly (≥ 200 ms apart here), and is refused each time.
    wait_until("rejected retries", T, || {
        backend.auth_rejected.load(Ordering::SeqCst) >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.handle.connection_count(), 0);
    assert!(backend.auth_rejected.load(Ordering::SeqCst) <= 6);

    // Un-revoked (a new credential in real life): it comes back by itself.
    backend.revoked.lock().unwrap().clear();
    wait_until("back", T, || server.handle.connection_count() == 1).await;
    agent.stop().await;
}

#[tokio::test]
async fn negotiate_and_websocket_share_one_tls_connection() {
    let pki = Pki::new();
    let backend = Arc::new(TestBackend::default());
    let server = TlsServer::start(0, &pki, backend, HubConfig::default());
    let connected = Connector::new(Arc::new(settings(&server, &pki, "token-r1")))
        .unwrap()
        .connect()
        .await
        .unwrap();
    wait_until("listed", T, || server.handle.connection_count() == 1).await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    drop(connected);
}

#[tokio::test]
async fn clear_errors_for_untrusted_certificates_and_bad_credentials() {
    let pki = Pki::new();
    let other = Pki::new();
    let backend = Arc::new(TestBackend::default());
    let server = TlsServer::start(0, &pki, backend.clone(), HubConfig::default());

    let mut s = settings(&server, &pki, "token-r1");
    s.trust = Trust::Ca(vec![other.ca_der.clone()]);
    let err = Connector::new(Arc::new(s))
        .unwrap()
        .connect()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ConnectError::UntrustedCertificate { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not trusted"), "{err}");

    let s = settings(&server, &pki, "wrong");
    let err = Connector::new(Arc::new(s))
        .unwrap()
        .connect()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ConnectError::Unauthorized { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("enroll"), "{err}");

    backend.revoked.lock().unwrap().insert("r5".into());
    let s = settings(&server, &pki, "token-r5");
    let err = Connector::new(Arc::new(s))
        .unwrap()
        .connect()
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, ConnectError::Unauthorized { status: 403, .. }),
        "{err}"
    );

    server.handle.set_accepting(false);
    let s = settings(&server, &pki, "token-r1");
    let err = Connector::new(Arc::new(s))
        .unwrap()
        .connect()
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ConnectError::Unavailable { .. }), "{err}");

    // Nothing listening.
    let mut s = settings(&server, &pki, "token-r1");
    let port = common::bind_retry(0).local_addr().unwrap().port();
    s.endpoint.port = port;
    s.resolve[0].port = port;
    let err = Connector::new(Arc::new(s))
        .unwrap()
        .connect()
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ConnectError::Connect { .. }), "{err}");

    // Real name resolution (no override): `localhost` comes from the hosts file, no DNS
    // traffic leaves the machine. The server certificate also names localhost.
    server.handle.set_accepting(true);
    let mut s = settings(&server, &pki, "token-r1");
    s.endpoint.host = "localhost".into();
    s.resolve.clear();
    let conn = Connector::new(Arc::new(s)).unwrap().connect().await;
    match conn {
        Ok(c) => assert!(c.addr.ip().is_loopback()),
        // localhost may resolve to ::1 first where the server listens on 127.0.0.1 only;
        // then a connect error to ::1 is the correct outcome of trying every address.
        Err(e) => panic!("connect via localhost failed: {e}"),
    }
}

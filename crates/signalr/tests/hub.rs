//! Hub behaviour over real sockets with a raw WebSocket client (so we control every byte).

mod common;

use common::{wait_until, TestBackend, TestServer};
use futures::{SinkExt as _, StreamExt as _};
use identitymesh_signalr::hub::{HubConfig, InvokeError, StreamEvent};
use identitymesh_signalr::protocol::{HubMessage, NegotiateResponse};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const T: Duration = Duration::from_secs(5);

async fn negotiate(server: &TestServer, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/negotiate?negotiateVersion=1", server.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn negotiated(server: &TestServer, token: &str) -> NegotiateResponse {
    let r = negotiate(server, token).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn open(
    server: &TestServer,
    id: Option<&str>,
    token: &str,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let url = match id {
        Some(id) => format!("ws://{}/hubs/relay?id={id}", server.addr),
        None => format!("ws://{}/hubs/relay", server.addr),
    };
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

fn status_of(e: tokio_tungstenite::tungstenite::Error) -> u16 {
    match e {
        tokio_tungstenite::tungstenite::Error::Http(r) => r.status().as_u16(),
        other => panic!("expected an HTTP error, got {other}"),
    }
}

async fn recv_text(ws: &mut Ws) -> Option<String> {
    loop {
        match tokio::time::timeout(T, ws.next()).await.expect("timed out") {
            Some(Ok(Message::Text(t))) => return Some(t.to_string()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn recv_msg(ws: &mut Ws) -> Option<HubMessage> {
    let t = recv_text(ws).await?;
    let frame = t.strip_suffix('\u{1e}').expect("frame ends with 0x1E");
    Some(HubMessage::parse_str(frame).unwrap())
}

/// Reads until something other than a Ping arrives.
async fn recv_non_ping(ws: &mut Ws) -> Option<HubMessage> {
    loop {
        match recv_msg(ws).await? {
            HubMessage::Ping => continue,
            m => return Some(m),
        }
    }
}

async fn connected(server: &TestServer, token: &str) -> (Ws, NegotiateResponse) {
    let neg = negotiated(server, token).await;
    let mut ws = open(server, neg.connection_token.as_deref(), token)
        .await
        .unwrap();
    ws.send(Message::text("{\"protocol\":\"json\",\"version\":1}\u{1e}"))
        .await
        .unwrap();
    assert_eq!(recv_text(&mut ws).await.unwrap(), "{}\u{1e}");
    (ws, neg)
}

fn start(config: HubConfig) -> (TestServer, Arc<TestBackend>) {
    let backend = Arc::new(TestBackend::default());
    (TestServer::start(0, backend.clone(), config), backend)
}

#[tokio::test]
async fn negotiate_requires_a_valid_credential() {
    let (server, _b) = start(HubConfig::default());
    let r = reqwest::Client::new()
        .post(format!("{}/negotiate?negotiateVersion=1", server.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(negotiate(&server, "bogus").await.status(), 401);
    let neg = negotiated(&server, "token-r1").await;
    assert_eq!(neg.negotiate_version, 1);
    assert_eq!(neg.available_transports[0].transport, "WebSockets");
    assert_ne!(
        neg.connection_token.as_deref(),
        Some(neg.connection_id.as_str())
    );
    // access_token in the query string works too (browsers cannot set headers).
    let r = reqwest::Client::new()
        .post(format!(
            "{}/negotiate?negotiateVersion=1&access_token=token-r2",
            server.url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Revoked → 403.
    _b.revoked.lock().unwrap().insert("r3".into());
    assert_eq!(negotiate(&server, "token-r3").await.status(), 403);
    // Standby → 503.
    server.handle.set_accepting(false);
    assert_eq!(negotiate(&server, "token-r1").await.status(), 503);
}

#[tokio::test]
async fn unknown_id_is_404_second_socket_is_409_and_tokens_expire() {
    let (server, _b) = start(HubConfig {
        negotiate_token_ttl: Duration::from_millis(300),
        ..HubConfig::default()
    });
    assert_eq!(
        status_of(open(&server, Some("nope"), "token-r1").await.unwrap_err()),
        404
    );
    let neg = negotiated(&server, "token-r1").await;
    let id = neg.connection_token.unwrap();
    // Someone else's credential cannot take over the negotiated connection.
    assert_eq!(
        status_of(open(&server, Some(&id), "token-r2").await.unwrap_err()),
        403
    );
    let _ws = open(&server, Some(&id), "token-r1").await.unwrap();
    assert_eq!(
        status_of(open(&server, Some(&id), "token-r1").await.unwrap_err()),
        409
    );
    let neg2 = negotiated(&server, "token-r1").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        status_of(
            open(&server, neg2.connection_token.as_deref(), "token-r1")
                .await
                .unwrap_err()
        ),
        404
    );
}

#[tokio::test]
async fn invocation_completion_and_errors() {
    let (server, backend) = start(HubConfig::default());
    let (mut ws, neg) = connected(&server, "token-r1").await;
    wait_until("listed", T, || server.handle.connection_count() == 1).await;
    assert_eq!(backend.connected.load(Ordering::SeqCst), 1);
    let info = &server.handle.connections()[0];
    assert_eq!(info.connection_id, neg.connection_id);
    assert_eq!(info.relay.relay_id, "r1");

    for (frame, expected) in [
        (
            json!({"type":1,"invocationId":"1","target":"Add","arguments":[2,3]}),
            json!({"type":3,"invocationId":"1","result":5}),
        ),
        (
            json!({"type":1,"invocationId":"2","target":"Fail","arguments":[]}),
            json!({"type":3,"invocationId":"2","error":"it failed"}),
        ),
        (
            json!({"type":4,"invocationId":"3","target":"Add","arguments":[]}),
            json!({"type":3,"invocationId":"3","error":"streaming hub methods are not supported by this hub"}),
        ),
    ] {
        ws.send(Message::text(format!("{frame}\u{1e}")))
            .await
            .unwrap();
        let got = recv_non_ping(&mut ws).await.unwrap();
        assert_eq!(got.to_json(), expected);
    }
    // Two messages in one WebSocket frame, and a frame split across two WebSocket messages.
    ws.send(Message::text(
        "{\"type\":6}\u{1e}{\"type\":1,\"invocationId\":\"4\",\"target\":\"WhoAmI\",\"arguments\":[]}\u{1e}{\"type\":1,\"invo",
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        "cationId\":\"5\",\"target\":\"Add\",\"arguments\":[1,1]}\u{1e}",
    ))
    .await
    .unwrap();
    let mut results = [
        recv_non_ping(&mut ws).await.unwrap().to_json(),
        recv_non_ping(&mut ws).await.unwrap().to_json(),
    ];
    results.sort_by_key(|v| v["invocationId"].as_str().unwrap().to_owned());
    assert_eq!(
        results[0],
        json!({"type":3,"invocationId":"4","result":"r1"})
    );
    assert_eq!(results[1], json!({"type":3,"invocationId":"5","result":2}));

    // A client that goes away is unlisted and reported.
    drop(ws);
    wait_until("unlisted", T, || server.handle.connection_count() == 0).await;
    wait_until("on_disconnected", T, || {
        backend.disconnected.load(Ordering::SeqCst) == 1
    })
    .await;
}

#[tokio::test]
async fn server_invokes_client_single_and_streamed() {
    let (server, _b) = start(HubConfig::default());
    let (mut ws, neg) = connected(&server, "token-r1").await;
    wait_until("listed", T, || server.handle.connection_count() == 1).await;
    let cid = neg.connection_id.clone();
    let h = server.handle.clone();
    let call = tokio::spawn(async move { h.invoke(&cid, "Echo", vec![json!("hi")]).await });
    let HubMessage::Invocation {
        invocation_id: Some(id),
        target,
        arguments,
        ..
    } = recv_non_ping(&mut ws).await.unwrap()
    else {
        panic!("expected an invocation")
    };
    assert_eq!((target.as_str(), arguments), ("Echo", vec![json!("hi")]));
    ws.send(Message::text(
        HubMessage::Completion {
            invocation_id: id,
            result: identitymesh_signalr::protocol::CompletionResult::Value(json!("hi")),
        }
        .to_frame(),
    ))
    .await
    .unwrap();
    assert_eq!(call.await.unwrap().unwrap(), json!("hi"));

    // Streamed: items, then the completion.
    let mut stream = server
        .handle
        .invoke_stream(&neg.connection_id, "Read", vec![], 2)
        .await
        .unwrap();
    let HubMessage::Invocation {
        invocation_id: Some(id),
        ..
    } = recv_non_ping(&mut ws).await.unwrap()
    else {
        panic!("expected an invocation")
    };
    for i in 0..5 {
        ws.send(Message::text(format!(
            "{{\"type\":2,\"invocationId\":\"{id}\",\"item\":{i}}}\u{1e}"
        )))
        .await
        .unwrap();
    }
    ws.send(Message::text(format!(
        "{{\"type\":3,\"invocationId\":\"{id}\",\"result\":\"done\"}}\u{1e}"
    )))
    .await
    .unwrap();
    for i in 0..5 {
        assert_eq!(
            stream.next().await.unwrap(),
            Some(StreamEvent::Item(json!(i)))
        );
    }
    assert_eq!(
        stream.next().await.unwrap(),
        Some(StreamEvent::Completed(json!("done")))
    );
    assert_eq!(stream.next().await.unwrap(), None);

    // A pending invocation fails when the connection goes away.
    let cid = neg.connection_id.clone();
    let h = server.handle.clone();
    let call = tokio::spawn(async move { h.invoke(&cid, "Never", vec![]).await });
    let _ = recv_non_ping(&mut ws).await;
    drop(ws);
    assert_eq!(
        call.await.unwrap().unwrap_err(),
        InvokeError::ConnectionClosed
    );
    assert_eq!(
        server.handle.invoke("nope", "X", vec![]).await.unwrap_err(),
        InvokeError::NotConnected
    );
}

/// Every kind of bad input ends in a Close with an error, and the hub keeps serving.
#[tokio::test]
async fn bad_input_is_closed_with_an_error() {
    let (server, _b) = start(HubConfig {
        max_frame_size: 1024,
        ..HubConfig::default()
    });
    let cases: Vec<(Message, &str)> = vec![
        (Message::text("{not json\u{1e}"), "invalid JSON"),
        (
            Message::text("{\"type\":42}\u{1e}"),
            "unknown message type 42",
        ),
        (
            Message::text("{\"type\":1,\"arguments\":[]}\u{1e}"),
            "missing required property 'target'",
        ),
        (Message::binary(vec![1u8, 2, 3]), "binary frames"),
        (
            Message::text(format!("{}\u{1e}", "x".repeat(2000))),
            "maximum size",
        ),
        (Message::text("x".repeat(2000)), "maximum size"),
    ];
    for (msg, expected) in cases {
        let (mut ws, _) = connected(&server, "token-r1").await;
        ws.send(msg).await.unwrap();
        match recv_non_ping(&mut ws).await {
            Some(HubMessage::Close {
                error: Some(e),
                allow_reconnect: false,
            }) => assert!(e.contains(expected), "{e} should mention {expected}"),
            other => panic!("expected Close for {expected}, got {other:?}"),
        }
        assert!(recv_text(&mut ws).await.is_none(), "socket closes");
    }
    // Invocation before the handshake → handshake error response.
    let neg = negotiated(&server, "token-r1").await;
    let mut ws = open(&server, neg.connection_token.as_deref(), "token-r1")
        .await
        .unwrap();
    ws.send(Message::text(
        "{\"type\":1,\"target\":\"Add\",\"arguments\":[1,2]}\u{1e}",
    ))
    .await
    .unwrap();
    let t = recv_text(&mut ws).await.unwrap();
    assert!(t.contains("before the handshake"), "{t}");
    // Unsupported protocol.
    let neg = negotiated(&server, "token-r1").await;
    let mut ws = open(&server, neg.connection_token.as_deref(), "token-r1")
        .await
        .unwrap();
    ws.send(Message::text(
        "{\"protocol\":\"messagepack\",\"version\":1}\u{1e}",
    ))
    .await
    .unwrap();
    let t = recv_text(&mut ws).await.unwrap();
    assert!(t.contains("messagepack"), "{t}");
    // Still healthy.
    let (mut ws, _) = connected(&server, "token-r1").await;
    ws.send(Message::text(
        "{\"type\":1,\"invocationId\":\"1\",\"target\":\"Add\",\"arguments\":[1,2]}\u{1e}",
    ))
    .await
    .unwrap();
    assert_eq!(
        recv_non_ping(&mut ws).await.unwrap().to_json(),
        json!({"type":3,"invocationId":"1","result":3})
    );
}

#[tokio::test]
async fn keep_alive_handshake_timeout_and_client_timeout() {
    let (server, _b) = start(HubConfig {
        keep_alive_interval: Duration::from_millis(100),
        client_timeout: Duration::from_millis(600),
        handshake_timeout: Duration::from_millis(300),
        ..HubConfig::default()
    });
    let (mut ws, _) = connected(&server, "token-r1").await;
    // Pings arrive while we are silent…
    assert_eq!(recv_msg(&mut ws).await, Some(HubMessage::Ping));
    assert_eq!(recv_msg(&mut ws).await, Some(HubMessage::Ping));
    // …and silence past the client timeout ends in a Close with an error.
    let start = std::time::Instant::now();
    let close = recv_non_ping(&mut ws).await;
    assert!(
        matches!(close, Some(HubMessage::Close { error: Some(ref e), .. }) if e.contains("timeout")),
        "{close:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(2));

    // No handshake at all.
    let neg = negotiated(&server, "token-r1").await;
    let mut ws = open(&server, neg.connection_token.as_deref(), "token-r1")
        .await
        .unwrap();
    let t = recv_text(&mut ws).await.unwrap();
    assert!(t.contains("handshake was not received in time"), "{t}");
}

#[tokio::test]
async fn revocation_close_all_and_direct_connections() {
    let (server, backend) = start(HubConfig::default());
    let (mut a, _) = connected(&server, "token-r1").await;
    let (mut b, _) = connected(&server, "token-r2").await;
    wait_until("two listed", T, || server.handle.connection_count() == 2).await;
    backend.revoked.lock().unwrap().insert("r1".into());
    assert_eq!(
        server.handle.disconnect_relay("r1", "credential revoked"),
        1
    );
    assert_eq!(
        recv_non_ping(&mut a).await,
        Some(HubMessage::Close {
            error: Some("credential revoked".into()),
            allow_reconnect: false
        })
    );
    wait_until("one listed", T, || server.handle.connection_count() == 1).await;
    assert_eq!(server.handle.connections_of("r2").len(), 1);

    assert_eq!(server.handle.close_all(Some("demoted".into())), 1);
    assert_eq!(
        recv_non_ping(&mut b).await,
        Some(HubMessage::Close {
            error: Some("demoted".into()),
            allow_reconnect: true
        })
    );
    wait_until("none listed", T, || server.handle.connection_count() == 0).await;

    // skipNegotiation clients connect without id.
    let mut ws = open(&server, None, "token-r2").await.unwrap();
    ws.send(Message::text("{\"protocol\":\"json\",\"version\":1}\u{1e}"))
        .await
        .unwrap();
    assert_eq!(recv_text(&mut ws).await.unwrap(), "{}\u{1e}");
    wait_until("listed", T, || server.handle.connection_count() == 1).await;
    let v: Value = json!(server.handle.connections()[0].relay.relay_id);
    assert_eq!(v, json!("r2"));
}

#[tokio::test]
async fn revocation_reaches_a_connection_still_in_its_handshake() {
    let (server, _b) = start(HubConfig::default());
    // skipNegotiation: authenticated at the upgrade, not listed until the handshake completes.
    let mut ws = open(&server, None, "token-r1").await.unwrap();
    assert_eq!(
        server.handle.disconnect_relay("r1", "credential revoked"),
        0
    );
    ws.send(Message::text("{\"protocol\":\"json\",\"version\":1}\u{1e}"))
        .await
        .unwrap();
    assert_eq!(recv_text(&mut ws).await.unwrap(), "{}\u{1e}");
    assert_eq!(
        recv_non_ping(&mut ws).await,
        Some(HubMessage::Close {
            error: Some("credential revoked".into()),
            allow_reconnect: false
        })
    );
    assert_eq!(server.handle.connection_count(), 0);
    // A connection authenticated after the revocation is fine (e.g. a new credential).
    let (_ws, _) = connected(&server, "token-r1").await;
    wait_until("listed", T, || server.handle.connection_count() == 1).await;
}

#[tokio::test]
async fn browser_style_access_token_in_the_query() {
    let (server, _b) = start(HubConfig::default());
    let neg: NegotiateResponse = reqwest::Client::new()
        .post(format!(
            "{}/negotiate?negotiateVersion=1&access_token=token-r4",
            server.url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = neg.connection_token.unwrap();
    let url = format!(
        "ws://{}/hubs/relay?id={token}&access_token=token-r4",
        server.addr
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text("{\"protocol\":\"json\",\"version\":1}\u{1e}"))
        .await
        .unwrap();
    assert_eq!(recv_text(&mut ws).await.unwrap(), "{}\u{1e}");
    wait_until("listed", T, || server.handle.connection_count() == 1).await;
    assert_eq!(server.handle.connections()[0].relay.relay_id, "r4");
    // Without any credential the upgrade is refused.
    let neg = negotiated(&server, "token-r4").await;
    let url = format!(
        "ws://{}/hubs/relay?id={}",
        server.addr,
        neg.connection_token.unwrap()
    );
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert_eq!(status_of(err), 401);
    // negotiateVersion 0 (no connectionToken) is refused with a clear message.
    let r = reqwest::Client::new()
        .post(format!("{}/negotiate", server.url()))
        .bearer_auth("token-r4")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("negotiateVersion=1"));
}

/// Past the failure limit an address is answered 429 before its credential is checked: the
/// backend is not asked again, even for a valid credential, until the window ends.
#[tokio::test]
async fn failed_authentications_are_rate_limited_per_address() {
    let backend = Arc::new(TestBackend::default());
    let config = HubConfig {
        auth_failure_limit: 5,
        auth_failure_window: Duration::from_secs(60),
        ..HubConfig::default()
    };
    let server = TestServer::start(0, backend.clone(), config);
    for _ in 0..5 {
        assert_eq!(negotiate(&server, "guess").await.status(), 401);
    }
    let calls = backend.auth_calls.load(Ordering::SeqCst);
    for token in ["guess", "token-r1"] {
        let r = negotiate(&server, token).await;
        assert_eq!(r.status(), 429, "{token}");
        let wait: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
    }
    assert_eq!(
        backend.auth_calls.load(Ordering::SeqCst),
        calls,
        "no credential lookups while blocked"
    );
}

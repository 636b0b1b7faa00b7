//! The relay hub inside a real server process: credentials from the Admin API, the SignalR
//! handshake, relay state in /api/relays, revocation, and Close{allowReconnect} on demotion.

mod common;

use std::time::Duration;

use common::*;
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const RS: char = '\u{1e}';

struct Server {
    proc: Proc,
    base: String,
    ws: String,
    token: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let proc = Proc::spawn(
        &[
            "standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ],
        // Plain HTTP keeps this test about the hub; TLS is covered by the other tests.
        &[("IM_TLS__INSECURE_HTTP", "true".into())],
        dir.path(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_up(
        &reqwest::Client::new(),
        &format!("{base}/health/live"),
        &proc,
    )
    .await;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    Server {
        proc,
        ws: format!("ws://127.0.0.1:{port}"),
        base,
        token,
        _dir: dir,
    }
}

async fn enrol(s: &Server, name: &str) -> (String, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/api/relays", s.base))
        .bearer_auth(&s.token)
        .json(&serde_json::json!({ "name": name }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let v: serde_json::Value = r.json().await.unwrap();
    (
        v["id"].as_str().unwrap().into(),
        v["token"].as_str().unwrap().into(),
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(s: &Server, relay_token: &str) -> Result<Ws, u16> {
    let r = reqwest::Client::new()
        .post(format!(
            "{}/hubs/relay/negotiate?negotiateVersion=1",
            s.base
        ))
        .bearer_auth(relay_token)
        .send()
        .await
        .unwrap();
    if !r.status().is_success() {
        return Err(r.status().as_u16());
    }
    let n: serde_json::Value = r.json().await.unwrap();
    let id = n["connectionToken"].as_str().unwrap();
    let url = format!("{}/hubs/relay?id={id}&access_token={relay_token}", s.ws);
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws.send(Message::text(format!(
        "{{\"protocol\":\"json\",\"version\":1}}{RS}"
    )))
    .await
    .unwrap();
    let reply = next_text(&mut ws).await.unwrap();
    assert_eq!(reply, format!("{{}}{RS}"));
    Ok(ws)
}

/// The next text frame that is not a Ping (type 6).
async fn next_text(ws: &mut Ws) -> Option<String> {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
            .ok()?;
        if let Message::Text(t) = m {
            if !t.contains("\"type\":6") {
                return Some(t.to_string());
            }
        }
    }
}

async fn relays(s: &Server) -> Vec<serde_json::Value> {
    get_json(
        &reqwest::Client::new(),
        &format!("{}/api/relays", s.base),
        Some(&s.token),
    )
    .await
}

#[tokio::test]
async fn relays_connect_are_listed_and_revocation_disconnects_at_once() {
    let s = start().await;
    let (id, relay_token) = enrol(&s, "dc-east").await;
    // A duplicate name is a conflict, not a second credential.
    let dup = reqwest::Client::new()
        .post(format!("{}/api/relays", s.base))
        .bearer_auth(&s.token)
        .json(&serde_json::json!({"name": "dc-east"}))
        .send()
        .await
        .unwrap();
    assert_eq!(dup.status(), 409);

    // Bad credentials: 401; an admin token is not a relay credential either.
    assert_eq!(connect(&s, "imr_nope").await.err(), Some(401));
    assert_eq!(connect(&s, &s.token).await.err(), Some(401));

    let mut ws = connect(&s, &relay_token).await.unwrap();
    ws.send(Message::text(format!(
        "{{\"type\":1,\"invocationId\":\"1\",\"target\":\"GetServerInfo\",\"arguments\":[]}}{RS}"
    )))
    .await
    .unwrap();
    let done: serde_json::Value =
        serde_json::from_str(next_text(&mut ws).await.unwrap().trim_end_matches(RS)).unwrap();
    assert_eq!(done["type"], 3);
    assert_eq!(done["result"]["role"], "active");

    eventually(
        Duration::from_secs(5),
        "relay listed as Connected",
        || async {
            relays(&s)
                .await
                .iter()
                .any(|r| r["id"] == id.as_str() && r["state"] == "Connected")
        },
    )
    .await;
    let listed = relays(&s).await;
    let r = listed.iter().find(|r| r["id"] == id.as_str()).unwrap();
    assert!(
        r["connected_since"].is_string() && r["last_seen"].is_string(),
        "{r}"
    );
    assert!(r.get("token").is_none(), "the credential is never listed");

    let revoke = reqwest::Client::new()
        .delete(format!("{}/api/relays/{id}", s.base))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoke.status(), 200);
    // The socket is closed by the server at once.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return true,
                Some(Ok(Message::Text(t))) if t.contains("\"type\":7") => return true,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "revoked relay still connected");
    assert_eq!(connect(&s, &relay_token).await.err(), Some(403));
    eventually(
        Duration::from_secs(5),
        "revoked relay Disconnected and listed",
        || async {
            relays(&s).await.iter().any(|r| {
                r["id"] == id.as_str() && r["state"] == "Disconnected" && r["revoked"] == true
            })
        },
    )
    .await;
}

#[tokio::test]
async fn shutdown_closes_relays_with_allow_reconnect() {
    let mut s = start().await;
    let (_id, relay_token) = enrol(&s, "dc-west").await;
    let mut ws = connect(&s, &relay_token).await.unwrap();
    s.proc.signal(libc::SIGTERM);
    let close = next_text(&mut ws)
        .await
        .expect("a Close message before the socket ends");
    let v: serde_json::Value = serde_json::from_str(close.trim_end_matches(RS)).unwrap();
    assert_eq!(v["type"], 7, "{v}");
    assert_eq!(v["allowReconnect"], true, "{v}");
    assert!(s.proc.wait(Duration::from_secs(20)).success());
}

/// Guessing relay credentials from one address: after 20 failures in a minute the hub answers
/// 429 with Retry-After, without looking the credential up, for a real relay credential too.
#[tokio::test]
async fn guessed_relay_credentials_are_rate_limited() {
    let mut s = start().await;
    let (_, good) = enrol(&s, "dc-limit").await;
    let c = reqwest::Client::new();
    let negotiate = |token: String| {
        let c = c.clone();
        let url = format!("{}/hubs/relay/negotiate?negotiateVersion=1", s.base);
        async move { c.post(url).bearer_auth(token).send().await.unwrap() }
    };
    assert_eq!(negotiate(good.clone()).await.status(), 200);
    for i in 0..20 {
        let r = negotiate(format!("imr_guess{i}")).await;
        assert_eq!(r.status(), 401, "guess {i}");
    }
    let r = negotiate("imr_guess-more".into()).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(negotiate(good).await.status(), 429, "blocked per address");
    let st = s.proc.terminate(Duration::from_secs(20));
    assert!(st.success(), "{st:?}");
}

//! Listener limits: a client must send its headers (and finish its TLS handshake) within the
//! header-read timeout, an idle connection is closed, no more than `max_connections` are served
//! at once, and a normal client is still served while hundreds of slow ones hold connections.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn limits(header_ms: u64, idle_ms: u64, max: u64) -> Vec<(&'static str, String)> {
    vec![
        ("IM_HTTP__HEADER_READ_TIMEOUT_MS", header_ms.to_string()),
        ("IM_HTTP__IDLE_TIMEOUT_MS", idle_ms.to_string()),
        ("IM_HTTP__MAX_CONNECTIONS", max.to_string()),
    ]
}

struct Server {
    proc: Proc,
    addr: std::net::SocketAddr,
    base: String,
    data: std::path::PathBuf,
}

async fn start(dir: &std::path::Path, tls: bool, env: Vec<(&'static str, String)>) -> Server {
    let data = dir.join(if tls { "tls-data" } else { "plain-data" });
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut env = env;
    if !tls {
        env.push(("IM_TLS__INSECURE_HTTP", "true".into()));
    }
    let proc = Proc::spawn(
        &[
            "standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &env,
        dir,
    );
    let base = format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" });
    wait_up(&insecure_client(), &format!("{base}/health/live"), &proc).await;
    Server {
        proc,
        addr: listen.parse().unwrap(),
        base,
        data,
    }
}

/// An authenticated request whose body stops after its first byte.
fn stalled_post(s: &Server) -> String {
    let token = std::fs::read_to_string(s.data.join("admin.token")).unwrap();
    format!(
        "POST /api/connectors HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
        token.trim()
    )
}

/// How long until the server closes `s` (reads EOF or an error), up to `within`.
async fn closed_after(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within.saturating_sub(t.elapsed()), s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn slow_and_idle_clients_are_closed_and_connections_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path(), false, limits(800, 1500, 8)).await;

    // Headers started and never finished: closed after the header-read timeout.
    let mut slow = TcpStream::connect(s.addr).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = closed_after(&mut slow, Duration::from_secs(10)).await;
    assert!(
        t.is_some_and(|t| t < Duration::from_secs(5)),
        "a client that never finishes its headers is closed: {t:?}"
    );

    // Keep-alive, then silence: closed (hyper's header-read timer runs between requests too).
    let mut idle = TcpStream::connect(s.addr).await.unwrap();
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(closed_after(&mut idle, Duration::from_secs(10))
        .await
        .is_some());

    // A body that stops arriving: nothing moves, so the connection is closed when idle.
    let mut stalled = TcpStream::connect(s.addr).await.unwrap();
    stalled
        .write_all(stalled_post(&s).as_bytes())
        .await
        .unwrap();
    let t = closed_after(&mut stalled, Duration::from_secs(20)).await;
    assert!(
        t.is_some_and(|t| t >= Duration::from_millis(1000) && t < Duration::from_secs(10)),
        "a stalled body is closed by the idle timeout: {t:?}"
    );

    // The cap: 8 silent connections hold every slot, so a 9th is not served until one of them
    // is closed by its timeout.
    let mut holders = Vec::new();
    for _ in 0..8 {
        holders.push(TcpStream::connect(s.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut ninth = TcpStream::connect(s.addr).await.unwrap();
    let asked = Instant::now();
    ninth
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    ninth.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let waited = asked.elapsed();
    assert!(
        waited >= Duration::from_millis(500),
        "the 9th connection waited for a slot ({waited:?})"
    );
    drop(holders);
    let st = s.proc.terminate(Duration::from_secs(20));
    assert!(st.success(), "{st:?}; {}", s.proc.output());
}

#[tokio::test]
async fn a_normal_client_is_served_while_hundreds_of_slow_ones_hold_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path(), true, limits(1000, 5000, 128)).await;
    let token = std::fs::read_to_string(s.data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();

    // 300 clients that connect and never start their TLS handshake, and never leave.
    let mut slow = Vec::new();
    for _ in 0..300 {
        if let Ok(c) = TcpStream::connect(s.addr).await {
            slow.push(c);
        }
    }
    assert!(slow.len() >= 250, "only {} slow connections", slow.len());
    // A silent TLS client is dropped after the header-read timeout, not the old fixed 10 s.
    let t = closed_after(&mut slow[0], Duration::from_secs(20)).await;
    assert!(
        t.is_some_and(|t| t < Duration::from_secs(8)),
        "closed after {t:?}"
    );

    let c = insecure_client();
    let ready = tokio::time::timeout(
        Duration::from_secs(30),
        c.get(format!("{}/health/ready", s.base)).send(),
    )
    .await
    .expect("health/ready answered despite the slow clients")
    .unwrap();
    assert_eq!(ready.status(), 200);
    let api = tokio::time::timeout(
        Duration::from_secs(30),
        c.get(format!("{}/api/instances", s.base))
            .bearer_auth(&token)
            .send(),
    )
    .await
    .expect("the API answered despite the slow clients")
    .unwrap();
    assert_eq!(api.status(), 200);
    drop(slow);
    let st = s.proc.terminate(Duration::from_secs(20));
    assert!(st.success(), "{st:?}; {}", s.proc.output());
}

#[tokio::test]
async fn a_request_the_server_cannot_answer_in_time_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = limits(5000, 10_000, 64);
    env.push(("IM_HTTP__REQUEST_TIMEOUT_MS", "700".into()));
    env.push(("IM_ENGINE__DRAIN_TIMEOUT_MS", "200".into()));
    let mut s = start(dir.path(), false, env).await;
    // The handler waits for a body that never comes; the request timeout answers for it.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(stalled_post(&s).as_bytes()).await.unwrap();
    let t = Instant::now();
    let mut head = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut head))
        .await
        .expect("an answer within the request timeout")
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 503", "after {:?}", t.elapsed());
    let st = s.proc.terminate(Duration::from_secs(20));
    assert!(st.success(), "{st:?}; {}", s.proc.output());
}

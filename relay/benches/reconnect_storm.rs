//! Reconnect-storm benchmark: N relays (default 1,000) against one hub on this machine.
//!
//!     cargo bench -p identitymesh-relay --bench reconnect_storm -- --relays 1000 [--plain] [--down-ms 3000]
//!
//! The hub runs in a child process (this binary with `--hub-child`), so its RSS is the hub's
//! alone and killing it is a real crash. Figures printed:
//! - hub RSS per idle connection ((RSS with N idle relays − RSS before) / N),
//! - after SIGKILL and restart: time from "hub ready" until each relay is connected again
//!   (p50 / p99 / max), and the peak rate of connection attempts per second (relay side, in a
//!   sliding 1 s window) and of completed connects per second (hub side).
//!
//! Traffic stays on 127.0.0.1; everything stops by itself.

use identitymesh_relay::agent::{Agent, AgentStats};
use identitymesh_relay::backoff::RetryPolicy;
use identitymesh_relay::config::RelaySettings;
use identitymesh_relay::connect::{Endpoint, ResolveOverride};
use identitymesh_relay::handlers::HandlerRegistry;
use identitymesh_relay::tls::Trust;
use identitymesh_signalr::hub::{
    router, AuthError, ConnectionInfo, HubBackend, HubConfig, InvocationContext, RelayIdentity,
};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const HOST: &str = "hub.test";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn arg_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn has_flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn raise_nofile() -> u64 {
    // Each relay holds one socket on each side; the default soft limit (1024) is far too low.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        r.rlim_cur
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- hub child process

/// Reports each connect on stdout as `C <relay> <unix ms>`.
struct BenchBackend {
    out: std::sync::mpsc::Sender<String>,
}

impl HubBackend for BenchBackend {
    async fn authenticate(&self, bearer: &str) -> Result<RelayIdentity, AuthError> {
        let id = bearer
            .strip_prefix("bench-")
            .ok_or_else(|| AuthError::Invalid("bad".into()))?;
        Ok(RelayIdentity {
            relay_id: id.into(),
            name: id.into(),
        })
    }
    async fn on_connected(&self, conn: &ConnectionInfo) {
        let _ = self
            .out
            .send(format!("C {} {}", conn.relay.relay_id, now_ms()));
    }
    async fn handle_invocation(
        &self,
        _ctx: InvocationContext,
        _target: String,
        _args: Vec<Value>,
    ) -> Result<Value, String> {
        Ok(Value::Null)
    }
}

fn hub_child(port: u16, tls_dir: Option<PathBuf>) {
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    // One writer thread, so connection tasks never block on stdout.
    std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        while let Ok(line) = rx.recv() {
            let _ = writeln!(out, "{line}");
            while let Ok(more) = rx.try_recv() {
                let _ = writeln!(out, "{more}");
            }
            let _ = out.flush();
        }
    });
    // "TRIM" on stdin: return freed heap to the OS so the parent can tell memory held by
    // connections from fragmentation left over from the connect storm.
    let trim_tx = tx.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if line.trim() == "TRIM" {
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                unsafe {
                    libc::malloc_trim(0);
                }
                let _ = trim_tx.send("TRIMMED 0".to_string());
            }
        }
    });
    let mut config = HubConfig::default();
    // Experiments: BENCH_WS_READ_BUFFER overrides the hub's WebSocket read buffer size.
    if let Some(v) = std::env::var("BENCH_WS_READ_BUFFER")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.ws_read_buffer_size = v;
    }
    let (app, _handle) = router::<_, ()>(Arc::new(BenchBackend { out: tx.clone() }), config);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind");
        let _ = tx.send(format!("READY {}", now_ms()));
        match tls_dir {
            None => {
                let _ = axum::serve(listener, app).await;
            }
            Some(dir) => {
                let cert = std::fs::read(dir.join("cert.der")).unwrap();
                let key = std::fs::read(dir.join("key.der")).unwrap();
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(
                        vec![cert.into()],
                        rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
                    )
                    .unwrap();
                cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let app = app.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper_util::service::TowerToHyperService::new(app);
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                    });
                }
            }
        }
    });
}

// ---------------------------------------------------------------- parent (relays + measurements)

#[derive(Default)]
struct HubEvents {
    ready_ms: Option<u64>,
    trimmed: bool,
    /// relay → connect times (unix ms), in order.
    connects: HashMap<String, Vec<u64>>,
}

struct HubProcess {
    child: Child,
    events: Arc<Mutex<HubEvents>>,
}

impl HubProcess {
    fn start(port: u16, tls_dir: Option<&PathBuf>) -> HubProcess {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg("--hub-child").arg(port.to_string());
        if let Some(d) = tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start hub child");
        let events = Arc::new(Mutex::new(HubEvents::default()));
        let ev = events.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut parts = line.split_whitespace();
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("TRIMMED"), _, _) => {
                        ev.lock().unwrap().trimmed = true;
                    }
                    (Some("READY"), Some(t), None) => {
                        ev.lock().unwrap().ready_ms = t.parse().ok();
                    }
                    (Some("C"), Some(id), Some(t)) => {
                        if let Ok(t) = t.parse() {
                            ev.lock()
                                .unwrap()
                                .connects
                                .entry(id.to_owned())
                                .or_default()
                                .push(t);
                        }
                    }
                    _ => {}
                }
            }
        });
        HubProcess { child, events }
    }

    fn wait_ready(&self) -> u64 {
        let start = Instant::now();
        loop {
            if let Some(t) = self.events.lock().unwrap().ready_ms {
                return t;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "hub never ready");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks the child to malloc_trim and waits for it.
    fn trim(&mut self) {
        self.events.lock().unwrap().trimmed = false;
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = writeln!(stdin, "TRIM");
            let _ = stdin.flush();
        }
        let start = Instant::now();
        while !self.events.lock().unwrap().trimmed && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn connected(&self) -> usize {
        self.events.lock().unwrap().connects.len()
    }

    fn kill(mut self) {
        // SIGKILL by pid: a crash, not a graceful close.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Peak count within any 1 s window of the given event times (ms).
fn peak_per_second(times: &mut [u64]) -> usize {
    times.sort_unstable();
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..times.len() {
        while times[hi] - times[lo] >= 1000 {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

fn main() {
    if let Some(port) = arg_value("--hub-child") {
        hub_child(
            port.parse().expect("port"),
            arg_value("--tls-dir").map(PathBuf::from),
        );
        return;
    }
    let n: usize = arg_value("--relays")
        .or_else(|| std::env::var("BENCH_RELAYS").ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let down_ms: u64 = arg_value("--down-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let tls = !has_flag("--plain");
    let nofile = raise_nofile();
    // One socket per relay in each process, plus the short-lived negotiate sockets.
    assert!(
        nofile as usize > n + 500,
        "RLIMIT_NOFILE is {nofile}; {n} relays need more than {}",
        n + 500
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tmp = tempfile::tempdir().unwrap();
    let mut trust = Trust::PublicRoots;
    if tls {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![HOST.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(tmp.path().join("cert.der"), cert.der()).unwrap();
        std::fs::write(tmp.path().join("key.der"), key.serialize_der()).unwrap();
        // Self-signed leaf as its own trust anchor stands in for the cluster CA here.
        trust = Trust::Ca(vec![cert.der().clone()]);
    }
    let tls_dir = tls.then(|| tmp.path().to_path_buf());
    let scheme = if tls { "https" } else { "http" };

    println!(
        "reconnect_storm: {n} relays, {} hub, downtime {down_ms} ms, default retry policy {:?}",
        if tls { "TLS" } else { "plain-HTTP" },
        RetryPolicy::default()
    );
    let mut hub = HubProcess::start(port, tls_dir.as_ref());
    hub.wait_ready();
    std::thread::sleep(Duration::from_millis(300));
    hub.trim();
    let rss_before = rss_kib(hub.child.id());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stats: Vec<Arc<AgentStats>> = Vec::with_capacity(n);
    let endpoint = Endpoint::parse(&format!("{scheme}://{HOST}:{port}"), true).unwrap();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let settings = RelaySettings {
            endpoint: endpoint.clone(),
            token: format!("bench-{i}"),
            trust: trust.clone(),
            resolve: vec![ResolveOverride::parse(&format!("{HOST}:{port}:127.0.0.1")).unwrap()],
            retry: RetryPolicy::default(),
            keep_alive: Duration::from_secs(15),
            server_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        };
        let agent = Agent::new(settings, HandlerRegistry::with_diagnostics()).unwrap();
        stats.push(agent.stats());
        let rx = stop_rx.clone();
        tasks.push(rt.spawn(async move { agent.run(rx).await }));
    }
    let t0 = Instant::now();
    while hub.connected() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "only {} of {n} relays connected initially",
            hub.connected()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("initial connect of {n} relays: {:?}", t0.elapsed());
    // Let allocations settle, then measure idle memory.
    std::thread::sleep(Duration::from_secs(3));
    let rss_after = rss_kib(hub.child.id());
    hub.trim();
    let rss_trimmed = rss_kib(hub.child.id());
    let per = |after: u64| (after.saturating_sub(rss_before) as f64 * 1024.0) / n as f64 / 1000.0;
    println!(
        "hub RSS: {rss_before} KiB before, {rss_after} KiB with {n} idle relays → {:.1} KB per connection; after malloc_trim {rss_trimmed} KiB → {:.1} KB per connection (target < 20 KB)",
        per(rss_after),
        per(rss_trimmed)
    );

    // Sample relay-side attempt counters every 20 ms to get attempts per second.
    let sample = {
        let stats = stats.clone();
        move || -> u64 {
            stats
                .iter()
                .map(|s| s.attempts.load(Ordering::Relaxed))
                .sum()
        }
    };
    let kill_at = now_ms();
    hub.kill();
    let mut samples: Vec<(u64, u64)> = vec![(now_ms(), sample())];
    let down_until = Instant::now() + Duration::from_millis(down_ms);
    while Instant::now() < down_until {
        std::thread::sleep(Duration::from_millis(20));
        samples.push((now_ms(), sample()));
    }
    let hub = HubProcess::start(port, tls_dir.as_ref());
    let ready = hub.wait_ready();
    let t1 = Instant::now();
    while hub.connected() < n && t1.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
        samples.push((now_ms(), sample()));
    }
    let reconnected = hub.connected();
    // Attempt times: spread each sample's increment over its timestamp.
    let mut attempt_times = Vec::new();
    for w in samples.windows(2) {
        for _ in 0..(w[1].1 - w[0].1) {
            attempt_times.push(w[1].0);
        }
    }
    let total_attempts = attempt_times.len();
    let peak_attempts = peak_per_second(&mut attempt_times);
    let (mut delays, mut connect_times): (Vec<u64>, Vec<u64>) = {
        let ev = hub.events.lock().unwrap();
        ev.connects
            .values()
            .filter_map(|v| v.first().copied())
            .map(|t| (t.saturating_sub(ready), t))
            .unzip()
    };
    delays.sort_unstable();
    let peak_connects = peak_per_second(&mut connect_times);
    println!(
        "after SIGKILL + {down_ms} ms down: hub ready {} ms after the kill; {reconnected}/{n} relays back",
        ready.saturating_sub(kill_at)
    );
    println!(
        "time from hub ready to reconnected: p50 {} ms, p99 {} ms, max {} ms (target: all within 10,000 ms)",
        percentile(&delays, 0.50),
        percentile(&delays, 0.99),
        delays.last().copied().unwrap_or(0)
    );
    println!(
        "connection attempts (relay side, incl. refused while down): {total_attempts} total, peak {peak_attempts}/s in any 1 s window; completed connects (hub side): peak {peak_connects}/s"
    );
    let _ = stop_tx.send(true);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    hub.kill();
}

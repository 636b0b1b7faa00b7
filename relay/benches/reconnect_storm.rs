//! Reconnect-storm benchmark: N relays (default 1,000) against one hub on this machine.
//!
//!     cargo bench -p identitymesh-relay --bench reconnect_storm -- --relays 1000 [--plain] [--down-ms 3000] [--mimalloc]
//!
//! The hub runs in a child process (this binary with `--hub-child`), so its RSS is the hub's
//! alone and killing it is a real crash. Both processes raise their soft RLIMIT_NOFILE to the
//! hard limit (each relay holds one socket on each side). Figures printed:
//! - hub RSS per idle connection ((RSS with N idle relays − RSS before) / N), on glibc malloc
//!   or with `--mimalloc` on the server binary's allocator, and with glibc the heap in use
//!   per connection (what connections hold, without fragmentation),
//! - after SIGKILL and restart: time from "hub ready" until each relay is connected again
//!   (p50 / p99 / max), and the peak rate of connection attempts per second (relay side, in a
//!   sliding 1 s window) and of completed connects per second (hub side).
//!
//! Traffic stays on 127.0.0.1; everything stops by itself.

use identitymesh_relay::agent::{Agent, AgentStats};
use identitymesh_relay::backoff::RetryPolicy;
use identitymesh_relay::config::RelaySettings;
use identitymesh_relay::endpoint::{Endpoint, ResolveOverride};
use identitymesh_relay::handlers::HandlerRegistry;
use identitymesh_relay::tls::Trust;
use identitymesh_signalr::hub::{
    router, AuthError, ConnectionInfo, HubBackend, HubConfig, InvocationContext, RelayIdentity,
};
use serde_json::Value;
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// glibc malloc, or with `--mimalloc` (env `BENCH_MIMALLOC` in the hub child) mimalloc, which
/// the server binary uses (server/src/main.rs). Decided on the first allocation, before any
/// memory exists, so nothing is ever freed by the other allocator.
struct HubAlloc;

static ALLOC_MODE: AtomicU8 = AtomicU8::new(0);

fn use_mimalloc() -> bool {
    let mut mode = ALLOC_MODE.load(Ordering::Relaxed);
    if mode == 0 {
        // SAFETY: getenv only reads the environment and does not allocate.
        let mi = unsafe { !libc::getenv(c"BENCH_MIMALLOC".as_ptr()).is_null() };
        mode = if mi { 2 } else { 1 };
        ALLOC_MODE.store(mode, Ordering::Relaxed);
    }
    mode == 2
}

// SAFETY: forwards to one allocator for the whole life of the process.
unsafe impl GlobalAlloc for HubAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if use_mimalloc() {
            mimalloc::MiMalloc.alloc(l)
        } else {
            System.alloc(l)
        }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if use_mimalloc() {
            mimalloc::MiMalloc.alloc_zeroed(l)
        } else {
            System.alloc_zeroed(l)
        }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if use_mimalloc() {
            mimalloc::MiMalloc.dealloc(p, l)
        } else {
            System.dealloc(p, l)
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if use_mimalloc() {
            mimalloc::MiMalloc.realloc(p, l, new)
        } else {
            System.realloc(p, l, new)
        }
    }
}

#[global_allocator]
static ALLOC: HubAlloc = HubAlloc;

extern "C" {
    // mimalloc's own API (linked through the mimalloc crate): return freed pages to the OS.
    fn mi_collect(force: bool);
}

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
                // SAFETY: both only walk the allocator's own free lists.
                if use_mimalloc() {
                    unsafe { mi_collect(true) };
                } else {
                    #[cfg(all(target_os = "linux", target_env = "gnu"))]
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
                // glibc's bytes in use: the live heap, without fragmentation (0 on mimalloc).
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                let in_use = if use_mimalloc() {
                    0
                } else {
                    // SAFETY: mallinfo2 only reads the allocator's statistics.
                    unsafe { libc::mallinfo2() }.uordblks
                };
                #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
                let in_use = 0;
                let _ = trim_tx.send(format!("TRIMMED {in_use}"));
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
    /// Heap bytes in use, as the last TRIM reported them.
    heap_in_use: u64,
    /// relay → connect times (unix ms), in order.
    connects: HashMap<String, Vec<u64>>,
}

struct HubProcess {
    child: Child,
    events: Arc<Mutex<HubEvents>>,
}

impl HubProcess {
    fn start(port: u16, tls_dir: Option<&PathBuf>) -> HubProcess {
        // Experiments: BENCH_HUB_WRAP runs the hub under a wrapper (e.g. valgrind).
        let wrap = std::env::var("BENCH_HUB_WRAP").unwrap_or_default();
        let mut wrap = wrap.split_whitespace();
        let mut cmd = match wrap.next() {
            Some(prog) => {
                let mut c = Command::new(prog);
                c.args(wrap).arg(std::env::current_exe().unwrap());
                c
            }
            None => Command::new(std::env::current_exe().unwrap()),
        };
        cmd.arg("--hub-child").arg(port.to_string());
        if let Some(d) = tls_dir {
            cmd.arg("--tls-dir").arg(d);
        }
        if has_flag("--mimalloc") {
            cmd.env("BENCH_MIMALLOC", "1");
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
                    (Some("TRIMMED"), n, _) => {
                        let mut ev = ev.lock().unwrap();
                        ev.trimmed = true;
                        ev.heap_in_use = n.and_then(|n| n.parse().ok()).unwrap_or(0);
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
            assert!(start.elapsed() < Duration::from_secs(60), "hub never ready");
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
        let leaf = identitymesh_test_support::pki::self_signed(&[HOST]).unwrap();
        std::fs::write(tmp.path().join("cert.der"), &leaf.cert_der).unwrap();
        std::fs::write(tmp.path().join("key.der"), &leaf.key_der).unwrap();
        // Self-signed leaf as its own trust anchor stands in for the cluster CA here.
        trust = Trust::Ca(vec![leaf.cert_der.into()]);
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
    let heap_before = hub.events.lock().unwrap().heap_in_use;

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
    std::thread::sleep(Duration::from_secs(
        std::env::var("BENCH_IDLE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3),
    ));
    let rss_after = rss_kib(hub.child.id());
    hub.trim();
    let rss_trimmed = rss_kib(hub.child.id());
    let heap_after = hub.events.lock().unwrap().heap_in_use;
    let per = |after: u64| (after.saturating_sub(rss_before) as f64 * 1024.0) / n as f64 / 1000.0;
    println!(
        "hub RSS ({}): {rss_before} KiB before, {rss_after} KiB with {n} idle relays → {:.1} KB per connection; after trim {rss_trimmed} KiB → {:.1} KB per connection (target < 16 KB)",
        if has_flag("--mimalloc") { "mimalloc" } else { "glibc malloc" },
        per(rss_after),
        per(rss_trimmed)
    );
    if heap_after > 0 {
        println!(
            "hub heap in use (glibc mallinfo2): {:.1} KB per connection",
            heap_after.saturating_sub(heap_before) as f64 / n as f64 / 1000.0
        );
    }

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

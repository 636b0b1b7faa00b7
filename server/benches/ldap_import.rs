//! Sync-engine import benchmark: a real OpenLDAP slapd (loopback, LDAPS) imported by a real
//! standalone server process into its embedded SQLite store, driven through the Admin API.
//!
//!     cargo bench -p identitymesh-server --bench ldap_import -- [--entries 100000] [--reps 3]
//!         [--sizes 10000,100000] [--variants import,compose] [--peers keycloak|none] [--no-peer]
//!         [--keycloak-heap "-Xms64m -Xmx512m"] [--keep]
//!
//! Environment equivalents: `BENCH_ENTRIES`, `BENCH_REPS`, `BENCH_SIZES`, `BENCH_VARIANTS`,
//! `BENCH_PEERS`, `BENCH_KEYCLOAK_HEAP`; `BENCH_SERVER_BIN` measures another server binary (A/B runs).
//! `--entries N` alone measures N/10 and N (the small size is for the memory comparison);
//! `--sizes` lists the people counts explicitly. Each size has `N` people plus `N/10 + 1`
//! groups (the fixture's generator); "objects" below counts both, as the run does.
//!
//! Per size: generate the directory, `slapadd` it, start slapd once. Per variant and rep:
//! - a fresh server process and data dir; the bind password as a secret; one LDAP connector
//!   (`import`: rules without object types, so the run only imports; `compose`: the people
//!   rules of `server/tests/sync_ldap.rs`, so people also become identities);
//! - a full run: wall clock from the POST until the run is no longer `running` (and the run's
//!   own started_at → finished_at), objects/s;
//! - `ldapsearch` reading the same entries (the connector's two searches, same filters, scopes,
//!   attributes and page size, over LDAPS) with the server idle; the ratio connector/ldapsearch;
//! - 1% of the people get a new `mail` with one `ldapmodify` (timed apart from the run), then a
//!   delta run, whose counts must show exactly those updates; then 10% (other people) likewise:
//!   a delta's time should follow the change, not the directory;
//! - the server's peak RSS (VmHWM from /proc, read just before it is stopped; one process per
//!   rep, so it covers that rep's full and delta runs).
//!
//!
//! Then, per size, the peer (on by default; `--peers none` or `--no-peer` skips it): Keycloak's
//! LDAP user federation syncing the same slapd and entries, its objects/s, its peak memory and
//! our import+compose objects/s over its; see `ldap_import/keycloak_peer.rs`.
//!
//! Everything listens on 127.0.0.1, every process is stopped by pid, temp dirs are removed.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use identitymesh_connectors::testing::{
    generate_people, Slapd, GROUPS_BASE, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD,
};
use identitymesh_test_support::procfs;
use serde_json::{json, Value};

mod common;
#[path = "ldap_import/keycloak_peer.rs"]
mod keycloak_peer;

use common::{arg_value, free_port, loadavg};

const BIN: &str = env!("CARGO_BIN_EXE_identitymesh-server");

/// The server binary measured: this build's, or `BENCH_SERVER_BIN` (an A/B comparison against
/// a binary built from another commit, in the same run conditions).
fn server_bin() -> String {
    std::env::var("BENCH_SERVER_BIN").unwrap_or_else(|_| BIN.to_string())
}
/// Same page size as the fixture's connector config, so ldapsearch pages alike.
const PAGE_SIZE: u32 = 500;
const TARGET_OBJECTS_PER_S: f64 = 20_000.0;
const TARGET_RATIO: f64 = 3.0;
/// Peak RSS growth (largest size / smallest size) still called "independent of the size".
const MEMORY_INDEPENDENT_MAX: f64 = 1.5;

// ---------------------------------------------------------------- arguments

fn setting(flag: &str, env: &str) -> Option<String> {
    arg_value(flag).or_else(|| std::env::var(env).ok())
}

fn parse_list(s: &str, what: &str) -> Vec<usize> {
    s.split(',')
        .map(|v| {
            v.trim()
                .replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{what}: {v:?} is not a number"))
        })
        .collect()
}

struct Settings {
    sizes: Vec<usize>,
    reps: usize,
    variants: Vec<Variant>,
    keep: bool,
    run_timeout: Duration,
    /// Run the Keycloak peer per size.
    keycloak: bool,
}

fn settings() -> Settings {
    let sizes = match (
        setting("--sizes", "BENCH_SIZES"),
        setting("--entries", "BENCH_ENTRIES"),
    ) {
        (Some(s), _) => parse_list(&s, "--sizes"),
        (None, Some(n)) => {
            let n = parse_list(&n, "--entries")[0];
            if n >= 1000 {
                vec![n / 10, n]
            } else {
                vec![n]
            }
        }
        (None, None) => vec![10_000, 100_000],
    };
    assert!(
        sizes.iter().all(|&n| n >= 100),
        "sizes must be at least 100 (1% of the people are modified)"
    );
    let reps = setting("--reps", "BENCH_REPS")
        .map(|r| parse_list(&r, "--reps")[0])
        .unwrap_or(3)
        .max(1);
    let variants = setting("--variants", "BENCH_VARIANTS")
        .unwrap_or_else(|| "import,compose".into())
        .split(',')
        .map(|v| match v.trim() {
            "import" => Variant::Import,
            "compose" => Variant::Compose,
            other => panic!("--variants: unknown variant {other:?} (import, compose)"),
        })
        .collect();
    let run_timeout = Duration::from_secs(
        setting("--run-timeout-s", "BENCH_RUN_TIMEOUT_S")
            .map(|t| parse_list(&t, "--run-timeout-s")[0] as u64)
            .unwrap_or(3600),
    );
    Settings {
        sizes,
        reps,
        variants,
        keep: std::env::args().any(|a| a == "--keep"),
        run_timeout,
        keycloak: keycloak_peer::enabled(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// No object-type rules: the run imports into the connector space and composes nothing.
    Import,
    /// The people rules of the LDAP sync test: people are joined/projected into identities.
    Compose,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Import => "import",
            Variant::Compose => "import+compose",
        }
    }

    fn rules(self) -> Value {
        match self {
            Variant::Import => json!({"precedence": 20}),
            Variant::Compose => json!({
                "precedence": 20,
                "object_types": {
                    "people": {
                        "join": [{"source": "lower(uid)", "identity_attribute": "uid"}],
                        "flows": [
                            {"target": "uid", "expression": "lower(uid)"},
                            {"target": "mail", "expression": "mail"},
                            {"target": "displayName", "expression": "trim(cn)"},
                            {"target": "photo", "expression": "jpegPhoto"},
                            {"target": "employeeNumber", "expression": "employeeNumber"}
                        ],
                        "display_name": "cn"
                    }
                }
            }),
        }
    }
}

// ---------------------------------------------------------------- small helpers

fn signal(pid: u32, sig: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn parse_time_ms(v: &Value) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(v.as_str()?)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn count(v: &Value, what: &str) -> i64 {
    v["counts"][what].as_i64().unwrap_or(-1)
}

// ---------------------------------------------------------------- the server process

struct Server {
    child: Option<Child>,
    dir: PathBuf,
    base: String,
    token: String,
    client: reqwest::Client,
}

impl Server {
    async fn start(dir: &Path) -> Server {
        let data = dir.join("data");
        std::fs::create_dir_all(dir).unwrap();
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(server_bin());
        cmd.arg("standalone")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(&listen)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.txt")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr.txt")).unwrap());
        // Only defaults: a stray IM_* from the shell must not change what is measured.
        for (k, _) in std::env::vars() {
            if k.starts_with("IM_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd.spawn().expect("starting identitymesh-server");
        let client = reqwest::Client::builder()
            // The standalone server serves a self-signed development certificate.
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut s = Server {
            child: Some(child),
            dir: dir.to_path_buf(),
            base: format!("https://127.0.0.1:{port}"),
            token: String::new(),
            client,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited during start ({st}); {}", s.output());
            }
            if s.client
                .get(format!("{}/health/live", s.base))
                .send()
                .await
                .is_ok()
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server did not answer within 60 s; {}",
                s.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s.token = std::fs::read_to_string(data.join("admin.token"))
            .expect("reading admin.token")
            .trim()
            .to_string();
        s
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    fn output(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "stdout (tail):\n{}\nstderr (tail):\n{}",
            tail(read("stdout.txt")),
            tail(read("stderr.txt"))
        )
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let r = req
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("request failed: {e}; {}", self.output()));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn get(&self, path: &str) -> Value {
        let (st, v) = self
            .send(self.client.get(format!("{}{path}", self.base)))
            .await;
        assert_eq!(st, 200, "GET {path}: {v}");
        v
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(&body))
            .await
    }

    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.client.put(format!("{}{path}", self.base)).json(&body))
            .await
    }

    /// Starts a run and polls it until it is no longer running; returns the final run and
    /// the wall-clock time from the POST to the first poll that saw it finished.
    async fn run(&self, connector: &str, mode: &str, timeout: Duration) -> (Value, Duration) {
        let t0 = Instant::now();
        let (st, run) = self
            .post(
                &format!("/api/connectors/{connector}/runs"),
                json!({"mode": mode}),
            )
            .await;
        assert_eq!(st, 202, "starting a {mode} run: {run}");
        let id = run["id"].as_str().unwrap().to_string();
        loop {
            let r = self.get(&format!("/api/runs/{id}")).await;
            if r["status"] != "running" {
                return (r, t0.elapsed());
            }
            assert!(
                t0.elapsed() < timeout,
                "{mode} run {id} still running after {timeout:?}: {r}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// User + system CPU seconds so far (from /proc); read before [`Server::stop`].
    fn cpu_s(&self) -> f64 {
        procfs::cpu_seconds(self.pid()).unwrap_or(f64::NAN)
    }

    /// Peak RSS (VmHWM) in KiB; read before [`Server::stop`].
    fn peak_rss_kib(&self) -> u64 {
        procfs::status_kib(self.pid(), "VmHWM:").unwrap_or(0)
    }

    /// SIGTERM, SIGKILL after 60 s; returns whether the exit was clean.
    fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        signal(child.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("server {} ignored SIGTERM for 60 s; killing it", child.id());
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------- ldapsearch / ldapmodify

/// The connector's two searches with the OpenLDAP command-line client: same bases, scopes,
/// filters, attributes and page size, over LDAPS, output read (and counted) through a pipe.
/// Returns (seconds, entries).
fn ldapsearch(url: &str, ca_file: &Path) -> (f64, usize) {
    let searches = [
        (PEOPLE_BASE, "sub", "(objectClass=inetOrgPerson)"),
        (GROUPS_BASE, "one", "(objectClass=groupOfNames)"),
    ];
    let t0 = Instant::now();
    let mut entries = 0;
    for (base, scope, filter) in searches {
        let mut child = Command::new("ldapsearch")
            .env("LDAPTLS_CACERT", ca_file)
            .env("LDAPTLS_REQCERT", "demand")
            .args(["-H", url, "-x", "-D", ROOT_DN, "-w", ROOT_PASSWORD])
            .args(["-b", base, "-s", scope, "-LLL", "-o", "ldif-wrap=no"])
            .args(["-E", &format!("pr={PAGE_SIZE}/noprompt")])
            .args([filter, "*", "entryUUID", "entryCSN"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ldapsearch");
        let mut out = child.stdout.take().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        // Entries begin with "dn:" (or "dn::") at the start of a line. `matched` is how much
        // of "dn:" the current line has matched so far, None once it cannot be a DN line.
        let mut matched: Option<usize> = Some(0);
        loop {
            let n = out.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                matched = match (b, matched) {
                    (b'\n', _) => Some(0),
                    (_, Some(i)) if b == b"dn:"[i] => {
                        if i == 2 {
                            entries += 1;
                            None
                        } else {
                            Some(i + 1)
                        }
                    }
                    _ => None,
                };
            }
        }
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "ldapsearch {base}: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    (t0.elapsed().as_secs_f64(), entries)
}

/// Replaces `mail` on the given people with one `ldapmodify` over LDAPS. Returns seconds.
fn ldapmodify(url: &str, ca_file: &Path, dns: &[String], tag: &str, work: &Path) -> f64 {
    let mut ldif = String::new();
    for dn in dns {
        let uid = dn
            .strip_prefix("uid=")
            .and_then(|r| r.split(',').next())
            .expect("modified people are uid=… entries");
        let _ = write!(
            ldif,
            "dn: {dn}\nchangetype: modify\nreplace: mail\nmail: {uid}.{tag}@example.org\n-\n\n"
        );
    }
    let file = work.join(format!("modify-{tag}.ldif"));
    std::fs::write(&file, ldif).unwrap();
    let t0 = Instant::now();
    let o = Command::new("ldapmodify")
        .env("LDAPTLS_CACERT", ca_file)
        .env("LDAPTLS_REQCERT", "demand")
        .args(["-H", url, "-x", "-D", ROOT_DN, "-w", ROOT_PASSWORD, "-f"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .expect("running ldapmodify");
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "ldapmodify: {}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = std::fs::remove_file(&file);
    secs
}

// ---------------------------------------------------------------- one rep

#[derive(Debug, Clone)]
struct Rep {
    objects: usize,
    full_wall: f64,
    full_own: f64,
    ldapsearch: f64,
    /// One per entry of [`DELTA_PERCENTS`].
    deltas: Vec<Delta>,
    peak_rss_kib: u64,
    /// The server's user + system CPU over the rep: on a shared machine it moves less than
    /// wall time does.
    cpu_s: f64,
    load: String,
}

/// A delta run after `modified` people changed.
#[derive(Debug, Clone)]
struct Delta {
    modified: usize,
    /// `ldapmodify`'s time, apart from the run.
    modify: f64,
    wall: f64,
    own: f64,
    unchanged: i64,
}

/// The share of the people each rep modifies before a delta run, in order.
const DELTA_PERCENTS: [usize; 2] = [1, 10];

/// Every `100 / percent`-th person, from an offset that keeps the sets apart and away from the
/// awkward DNs at the start (1%: 50, 150, …; 10%: 55, 65, …).
fn people_to_modify(
    people: &[identitymesh_connectors::testing::GeneratedEntry],
    percent: usize,
) -> Vec<String> {
    let step = 100 / percent;
    people
        .iter()
        .skip(50 + (step / 2) % 50)
        .step_by(step)
        .map(|p| p.dn.clone())
        .collect()
}

impl Rep {
    fn objects_per_s(&self) -> f64 {
        self.objects as f64 / self.full_wall
    }
    fn ratio(&self) -> f64 {
        self.full_wall / self.ldapsearch
    }
}

struct Directory<'a> {
    slapd: &'a Slapd,
    ca_file: &'a Path,
    people: usize,
    groups: usize,
    /// DNs of the people each rep modifies, one list per entry of [`DELTA_PERCENTS`].
    to_modify: &'a [Vec<String>],
}

fn run_own_secs(run: &Value) -> f64 {
    match (
        parse_time_ms(&run["started_at"]),
        parse_time_ms(&run["finished_at"]),
    ) {
        (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
        _ => f64::NAN,
    }
}

async fn one_rep(
    d: &Directory<'_>,
    variant: Variant,
    rep: usize,
    work: &Path,
    s: &Settings,
) -> Rep {
    let load_before = loadavg();
    let mut server = Server::start(work).await;

    let (st, body) = server
        .put("/api/secrets/ldap-bind", json!({"value": ROOT_PASSWORD}))
        .await;
    assert_eq!(st, 200, "setting the secret: {body}");
    let mut config = serde_json::to_value(d.slapd.ldap_config()).unwrap();
    config["bind_password_ref"] = json!("ldap-bind");
    let (st, body) = server
        .post(
            "/api/connectors",
            json!({"name": "bench-ldap", "kind": "ldap", "config": config, "rules": variant.rules()}),
        )
        .await;
    assert_eq!(st, 201, "creating the connector: {body}");
    let id = body["id"].as_str().unwrap().to_string();

    // Full import.
    let (full, full_wall) = server.run(&id, "full", s.run_timeout).await;
    let objects = d.people + d.groups;
    assert_eq!(
        full["status"],
        "succeeded",
        "full run: {full}; {}",
        server.output()
    );
    assert_eq!(count(&full, "added"), objects as i64, "full run: {full}");
    for c in ["updated", "deleted", "failed"] {
        assert_eq!(count(&full, c), 0, "full run {c}: {full}");
    }
    if variant == Variant::Compose {
        let ids = server.get("/api/identities?limit=1").await;
        assert_eq!(
            ids["total"], d.people as i64,
            "every person becomes an identity: {ids}"
        );
    }

    // The directory's own client reading the same entries, server idle.
    let (ldapsearch, seen) = ldapsearch(&d.slapd.ldaps_url(), d.ca_file);
    assert_eq!(
        seen, objects,
        "ldapsearch read a different number of entries"
    );

    let mut deltas = Vec::new();
    for (percent, dns) in DELTA_PERCENTS.iter().zip(d.to_modify) {
        deltas.push(
            delta_after(
                &server,
                d,
                &id,
                dns,
                &format!("{}p{percent}r{rep}", variant.name().replace('+', "")),
                work,
                s,
            )
            .await,
        );
    }

    let peak_rss_kib = server.peak_rss_kib();
    let cpu_s = server.cpu_s();
    let clean = server.stop();
    assert!(clean, "server did not stop cleanly; {}", server.output());
    Rep {
        objects,
        full_wall: full_wall.as_secs_f64(),
        full_own: run_own_secs(&full),
        ldapsearch,
        deltas,
        peak_rss_kib,
        cpu_s,
        load: format!("{load_before} → {}", loadavg()),
    }
}

/// Gives `dns` a new `mail` (timed apart), then runs a delta, whose counts must show exactly
/// those updates.
async fn delta_after(
    server: &Server,
    d: &Directory<'_>,
    connector: &str,
    dns: &[String],
    tag: &str,
    work: &Path,
    s: &Settings,
) -> Delta {
    let modify = ldapmodify(&d.slapd.ldaps_url(), d.ca_file, dns, tag, work);
    let (delta, wall) = server.run(connector, "delta", s.run_timeout).await;
    assert_eq!(
        delta["status"],
        "succeeded",
        "delta run: {delta}; {}",
        server.output()
    );
    assert_eq!(
        count(&delta, "updated"),
        dns.len() as i64,
        "delta run: every modified person, and only those, is updated: {delta}"
    );
    for c in ["added", "deleted", "failed"] {
        assert_eq!(count(&delta, c), 0, "delta run {c}: {delta}");
    }
    // At-least-once: the boundary entry of each object type may be read again, no more.
    let unchanged = count(&delta, "unchanged");
    assert!(
        (0..=2).contains(&unchanged),
        "delta run read more than the changed entries: {delta}"
    );
    Delta {
        modified: dns.len(),
        modify,
        wall: wall.as_secs_f64(),
        own: run_own_secs(&delta),
        unchanged,
    }
}

// ---------------------------------------------------------------- statistics and report

/// (median, min, max)
fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (med, v[0], v[n - 1])
}

fn fmt_stat(s: (f64, f64, f64), prec: usize) -> String {
    format!(
        "{:.prec$} ({:.prec$}–{:.prec$})",
        s.0,
        s.1,
        s.2,
        prec = prec
    )
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Result_ {
    people: usize,
    variant: Variant,
    reps: Vec<Rep>,
}

fn report(results: &[Result_], s: &Settings) {
    println!();
    println!(
        "== ldap_import: medians over {} rep(s), (min–max) ==",
        s.reps
    );
    println!(
        "{:>8} {:>8} {:<15} {:>24} {:>22} {:>20} {:>18} {:>20} {:>20} {:>22}",
        "people",
        "objects",
        "variant",
        "full objects/s",
        "full wall s",
        "full run-own s",
        "ldapsearch s",
        "ratio conn/ldapsrch",
        "delta 1% wall s",
        "peak RSS MiB"
    );
    for r in results {
        let col = |f: &dyn Fn(&Rep) -> f64| stats(r.reps.iter().map(f).collect());
        println!(
            "{:>8} {:>8} {:<15} {:>24} {:>22} {:>20} {:>18} {:>20} {:>20} {:>22}",
            r.people,
            r.reps[0].objects,
            r.variant.name(),
            fmt_stat(col(&Rep::objects_per_s), 0),
            fmt_stat(col(&|x| x.full_wall), 2),
            fmt_stat(col(&|x| x.full_own), 2),
            fmt_stat(col(&|x| x.ldapsearch), 2),
            fmt_stat(col(&Rep::ratio), 2),
            fmt_stat(col(&|x| x.deltas[0].wall), 2),
            fmt_stat(col(&|x| mib(x.peak_rss_kib)), 1),
        );
    }
    println!();
    for r in results {
        let col = |f: &dyn Fn(&Rep) -> f64| stats(r.reps.iter().map(f).collect());
        println!(
            "{:>8} people, {:<15} server CPU over the rep (full + deltas): {} s",
            r.people,
            r.variant.name(),
            fmt_stat(col(&|x| x.cpu_s), 2),
        );
        for (i, percent) in DELTA_PERCENTS.iter().enumerate() {
            let modified = r.reps[0].deltas[i].modified;
            println!(
                "{:>8} people, {:<15} delta after {percent}% ({modified}) modified: wall {} s, run-own {} s, {} ms per changed entry; ldapmodify {} s",
                r.people,
                r.variant.name(),
                fmt_stat(col(&|x| x.deltas[i].wall), 3),
                fmt_stat(col(&|x| x.deltas[i].own), 3),
                fmt_stat(col(&|x| 1000.0 * x.deltas[i].wall / modified as f64), 3),
                fmt_stat(col(&|x| x.deltas[i].modify), 3),
            );
        }
        // Proportional to the change: 10× the entries take about 10× as long (a delta that
        // read the whole directory would take about as long at both).
        let last = DELTA_PERCENTS.len() - 1;
        println!(
            "{:>8} people, {:<15} delta {}% / {}% wall: {}× for {}× the changed entries",
            r.people,
            r.variant.name(),
            DELTA_PERCENTS[last],
            DELTA_PERCENTS[0],
            fmt_stat(col(&|x| x.deltas[last].wall / x.deltas[0].wall), 2),
            r.reps[0].deltas[last].modified as f64 / r.reps[0].deltas[0].modified as f64,
        );
    }

    println!();
    let (Some(&small), Some(&large)) = (s.sizes.iter().min(), s.sizes.iter().max()) else {
        return;
    };
    for &v in &s.variants {
        let find = |n: usize| {
            results
                .iter()
                .find(|r| r.people == n && r.variant == v)
                .map(|r| stats(r.reps.iter().map(|x| mib(x.peak_rss_kib)).collect()).0)
        };
        let large_r = results.iter().find(|r| r.people == large && r.variant == v);
        if let Some(r) = large_r {
            let ops = stats(r.reps.iter().map(Rep::objects_per_s).collect()).0;
            let ratio = stats(r.reps.iter().map(Rep::ratio).collect()).0;
            println!(
                "target {:<15} at {large} people: {ops:.0} objects/s (target ≥ {TARGET_OBJECTS_PER_S:.0}: {}), {ratio:.2}× ldapsearch (target ≤ {TARGET_RATIO}: {})",
                v.name(),
                if ops >= TARGET_OBJECTS_PER_S { "MET" } else { "MISSED" },
                if ratio <= TARGET_RATIO { "MET" } else { "MISSED" },
            );
        }
        if small != large {
            if let (Some(a), Some(b)) = (find(small), find(large)) {
                let growth = b / a;
                println!(
                    "peak RSS {:<15} {large}/{small} people: {b:.1} MiB / {a:.1} MiB = {growth:.2}× (independent of size if ≤ {MEMORY_INDEPENDENT_MAX}: {})",
                    v.name(),
                    if growth <= MEMORY_INDEPENDENT_MAX { "MET" } else { "MISSED" },
                );
            }
        }
    }
}

// ---------------------------------------------------------------- main

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let s = settings();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "ldap_import: sizes {:?} people, {} rep(s), variants {:?}, peer {}; {cpus} CPU(s), load {} at start",
        s.sizes,
        s.reps,
        s.variants.iter().map(|v| v.name()).collect::<Vec<_>>(),
        if s.keycloak { "keycloak" } else { "none" },
        loadavg()
    );
    println!("server binary: {}", server_bin());

    let root = tempfile::Builder::new()
        .prefix("im-ldap-import-")
        .tempdir()
        .unwrap();
    let mut results = Vec::new();
    let mut peers = Vec::new();
    for &n in &s.sizes {
        let t0 = Instant::now();
        let generated = generate_people(n, 42);
        let gen_s = t0.elapsed().as_secs_f64();
        let size_dir = root.path().join(format!("n{n}"));
        let t1 = Instant::now();
        let mut slapd = Slapd::launch(&size_dir.join("slapd"), Some(&generated.ldif))
            .await
            .expect("starting slapd");
        let load_s = t1.elapsed().as_secs_f64();
        let ca_file = size_dir.join("ca.pem");
        std::fs::write(&ca_file, slapd.ca_pem()).unwrap();
        let to_modify: Vec<Vec<String>> = DELTA_PERCENTS
            .iter()
            .map(|&p| people_to_modify(&generated.people, p))
            .collect();
        let (people, groups) = (generated.people.len(), generated.groups.len());
        drop(generated);
        println!(
            "\n-- {n} people + {groups} groups: generated in {gen_s:.1} s, slapadd + slapd start {load_s:.1} s (slapd pid {:?})",
            slapd.pid()
        );
        let dir = Directory {
            slapd: &slapd,
            ca_file: &ca_file,
            people,
            groups,
            to_modify: &to_modify,
        };
        for &variant in &s.variants {
            let mut reps = Vec::new();
            for rep in 1..=s.reps {
                let work = size_dir.join(format!("{}-{rep}", variant.name().replace('+', "-")));
                let r = one_rep(&dir, variant, rep, &work, &s).await;
                println!(
                    "{n:>7} {:<15} rep {rep}: full {} objects in {:.2} s wall ({:.2} s run-own) = {:.0} objects/s; \
                     ldapsearch {:.2} s (ratio {:.2}); {}; peak RSS {:.1} MiB; server CPU {:.2} s; load {}",
                    variant.name(),
                    r.objects,
                    r.full_wall,
                    r.full_own,
                    r.objects_per_s(),
                    r.ldapsearch,
                    r.ratio(),
                    r.deltas
                        .iter()
                        .map(|x| format!(
                            "ldapmodify {} in {:.2} s, delta {:.3} s wall ({:.3} s run-own, {} updated, {} unchanged)",
                            x.modified, x.modify, x.wall, x.own, x.modified, x.unchanged
                        ))
                        .collect::<Vec<_>>()
                        .join("; "),
                    mib(r.peak_rss_kib),
                    r.cpu_s,
                    r.load,
                );
                if s.keep {
                    println!("   kept: {}", work.display());
                } else {
                    let _ = std::fs::remove_dir_all(&work);
                }
                reps.push(r);
            }
            results.push(Result_ {
                people: n,
                variant,
                reps,
            });
        }
        if s.keycloak {
            peers.push(keycloak_peer::run(&dir, &size_dir, &s, &results).await);
        }
        slapd.stop();
        if !s.keep {
            let _ = std::fs::remove_dir_all(&size_dir);
        }
    }
    report(&results, &s);
    keycloak_peer::report(&peers, &results, &s);
    println!("load at end: {}", loadavg());
    if s.keep {
        println!("kept: {}", root.keep().display());
    }
}

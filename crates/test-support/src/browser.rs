//! A real browser for tests: Debian's chromium (`/usr/bin/chromium`, apt package `chromium`),
//! headless, driven by playwright-core from `tests/browser/driver.mjs` (Node runs only this
//! test client).
//!
//! [`Browser::launch`] starts `node tests/browser/driver.mjs` in a process group of its own with
//! a fresh profile (a temporary `--user-data-dir`) and waits for the browser. Each step is one
//! JSON line to the driver and one JSON line back (the protocol is in driver.mjs); the same
//! browser context lives until the [`Browser`] is dropped, so a test can act on its servers
//! between steps (stop one, start another on the same port) and the browser keeps its cookies.
//! Screenshots go to the run directory the test names, `NN-name.png`, and their paths are
//! printed. The driver's stderr (page console errors, failed requests) is `driver.log` there.
//!
//! A missing tool is an error that names what to install ([`BrowserError::Missing`]): tests
//! `expect` it, so they fail, never skip. Dropping the [`Browser`] closes the browser; if it
//! does not exit within a few seconds, the driver's and the browser's process groups are
//! killed by id.
//!
//! The calls block (a reader thread and a channel give each step its timeout); the browser and
//! the servers under test are separate processes, so async tests can call them directly.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Debian's chromium: the only browser the tests use.
pub const CHROMIUM: &str = "/usr/bin/chromium";

#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    #[error(
        "browser harness: {what} is missing ({path}): {install}; `cargo xtask test` installs it"
    )]
    Missing {
        what: &'static str,
        path: String,
        install: &'static str,
    },
    #[error("browser harness: {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("browser harness: the driver did not start: {0}")]
    Start(String),
    #[error("browser harness: step {step} failed: {error}{shot}\n  driver log: {log}", shot = screenshot.as_ref().map(|p| format!("\n  screenshot: {}", p.display())).unwrap_or_default())]
    Step {
        step: String,
        error: String,
        screenshot: Option<PathBuf>,
        log: String,
    },
    #[error("browser harness: step {step}: no answer within {within:?} (driver {state})\n  driver log: {log}")]
    Timeout {
        step: String,
        within: Duration,
        state: String,
        log: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BrowserError {
    let what = what.into();
    move |source| BrowserError::Io { what, source }
}

/// How a browser is launched.
#[derive(Debug, Clone)]
pub struct Options {
    /// Screenshots and the driver log go here (created; earlier `NN-*.png` files removed).
    pub artifacts: PathBuf,
    /// The driver's default per-step timeout (auto-waits for elements, navigations, text).
    pub step_timeout: Duration,
    /// The browser: Debian's chromium.
    pub chromium: PathBuf,
    /// `tests/browser/driver.mjs` of this workspace.
    pub driver: PathBuf,
}

impl Options {
    pub fn new(artifacts: impl Into<PathBuf>) -> Self {
        Options {
            artifacts: artifacts.into(),
            step_timeout: Duration::from_secs(30),
            chromium: PathBuf::from(CHROMIUM),
            driver: driver_path(),
        }
    }
}

/// `tests/browser/driver.mjs`, looked up from the running test's package (cargo sets
/// CARGO_MANIFEST_DIR at run time) upwards, then from where this crate was built.
pub fn driver_path() -> PathBuf {
    let rel = Path::new("tests/browser/driver.mjs");
    let starts = [
        std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    ];
    for start in starts.into_iter().flatten() {
        for dir in start.ancestors() {
            if dir.join(rel).is_file() {
                return dir.join(rel);
            }
        }
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn find_on_path(cmd: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

/// What one `fetch` step answered.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: u16,
    pub url: String,
    pub body: String,
    /// The body parsed as JSON, `Null` when it is not JSON.
    pub json: Value,
}

/// A headless chromium with one browser context, driven step by step.
pub struct Browser {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    next_id: u64,
    browser_pids: Vec<i32>,
    artifacts: PathBuf,
    log: PathBuf,
    step_timeout: Duration,
    // The profile and temporary files; removed on close, after the browser has gone.
    scratch: Option<tempfile::TempDir>,
    pub chromium_version: String,
}

impl Browser {
    /// Launches chromium with the default [`Options`] for this run directory.
    pub fn launch(artifacts: impl Into<PathBuf>) -> Result<Browser, BrowserError> {
        Self::launch_with(Options::new(artifacts))
    }

    pub fn launch_with(opts: Options) -> Result<Browser, BrowserError> {
        if !opts.chromium.is_file() {
            return Err(BrowserError::Missing {
                what: "Debian's chromium",
                path: opts.chromium.display().to_string(),
                install: "apt-get install chromium",
            });
        }
        let node = find_on_path("node").ok_or(BrowserError::Missing {
            what: "node",
            path: "node on PATH".into(),
            install: "apt-get install nodejs npm",
        })?;
        if !opts.driver.is_file() {
            return Err(BrowserError::Missing {
                what: "the browser driver",
                path: opts.driver.display().to_string(),
                install: "it is tests/browser/driver.mjs in the workspace",
            });
        }
        let driver_dir = opts.driver.parent().unwrap_or(Path::new("."));
        let pw = driver_dir.join("node_modules/playwright-core/package.json");
        if !pw.is_file() {
            return Err(BrowserError::Missing {
                what: "playwright-core",
                path: pw.display().to_string(),
                install: "run `npm ci` in tests/browser",
            });
        }
        std::fs::create_dir_all(&opts.artifacts)
            .map_err(io(format!("creating {}", opts.artifacts.display())))?;
        clear_old_artifacts(&opts.artifacts);
        // A folder of this browser's own: the fresh profile (the driver refuses one that is not
        // empty) and the temporary files of node, playwright and chromium (TMPDIR), all removed
        // on drop, also when the driver was killed before it could clean up.
        let scratch = tempfile::Builder::new()
            .prefix("im-browser-")
            .tempdir()
            .map_err(io("creating the browser's scratch folder"))?;
        let profile = scratch.path().join("profile");
        let tmp = scratch.path().join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        let log = opts.artifacts.join("driver.log");
        let log_file =
            std::fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let mut cmd = Command::new(&node);
        cmd.arg(&opts.driver)
            .arg("--user-data-dir")
            .arg(&profile)
            .arg("--artifacts")
            .arg(&opts.artifacts)
            .arg("--chromium")
            .arg(&opts.chromium)
            .arg("--timeout-ms")
            .arg(opts.step_timeout.as_millis().to_string())
            .current_dir(driver_dir)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(io(format!(
            "starting {} {}",
            node.display(),
            opts.driver.display()
        )))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut b = Browser {
            child: Some(child),
            stdin,
            lines,
            next_id: 1,
            browser_pids: Vec::new(),
            artifacts: opts.artifacts.clone(),
            log,
            step_timeout: opts.step_timeout,
            scratch: Some(scratch),
            chromium_version: String::new(),
        };
        let ready = b
            .read_line(Duration::from_secs(60) + opts.step_timeout, "launch")
            .map_err(|e| BrowserError::Start(e.to_string()))?;
        let v: Value = serde_json::from_str(&ready)
            .map_err(|e| BrowserError::Start(format!("{e}: {ready}")))?;
        if v["ready"] != true {
            return Err(BrowserError::Start(format!(
                "{}\n{}",
                v["error"],
                b.log_tail()
            )));
        }
        b.browser_pids = v["browser_pids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_i64())
                    .map(|p| p as i32)
                    .collect()
            })
            .unwrap_or_default();
        b.chromium_version = v["chromium"].as_str().unwrap_or("").to_string();
        println!(
            "browser: chromium {} (pids {:?}), artifacts in {}",
            b.chromium_version,
            b.browser_pids,
            b.artifacts.display()
        );
        Ok(b)
    }

    /// The driver's pid (its process group's id); `None` once closed.
    pub fn driver_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The browser's pids as the driver reported them at launch (each leads its process group).
    pub fn browser_pids(&self) -> &[i32] {
        &self.browser_pids
    }

    /// Where this browser's screenshots and driver log go.
    pub fn artifacts(&self) -> &Path {
        &self.artifacts
    }

    fn log_tail(&self) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "{} (last lines:)\n{}",
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    fn read_line(&mut self, within: Duration, step: &str) -> Result<String, BrowserError> {
        match self.lines.recv_timeout(within) {
            Ok(l) => Ok(l),
            Err(e) => {
                let state = match (e, self.child.as_mut().map(|c| c.try_wait())) {
                    (_, Some(Ok(Some(st)))) => format!("exited: {st}"),
                    (RecvTimeoutError::Disconnected, _) => "closed its output".into(),
                    _ => "still running".into(),
                };
                Err(BrowserError::Timeout {
                    step: step.to_string(),
                    within,
                    state,
                    log: self.log_tail(),
                })
            }
        }
    }

    /// Sends one step (`{"op": ..., ...}`, see driver.mjs) and returns the driver's answer, or
    /// the step's failure as an error (with the screenshot the driver took of the page).
    pub fn try_step(&mut self, step: Value) -> Result<Value, BrowserError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut step = step;
        step["id"] = json!(id);
        let shown = short(&step);
        let t0 = Instant::now();
        let timeout = step["timeout_ms"]
            .as_u64()
            .map(Duration::from_millis)
            .unwrap_or(self.step_timeout)
            + Duration::from_secs(15);
        let line = serde_json::to_string(&step).expect("a step is JSON");
        let stdin = self.stdin.as_mut().ok_or_else(|| BrowserError::Step {
            step: shown.clone(),
            error: "the browser was closed".into(),
            screenshot: None,
            log: String::new(),
        })?;
        if let Err(e) = writeln!(stdin, "{line}").and_then(|_| stdin.flush()) {
            return Err(BrowserError::Step {
                step: shown,
                error: format!("writing to the driver: {e}"),
                screenshot: None,
                log: self.log_tail(),
            });
        }
        let answer = loop {
            let l = self.read_line(timeout, &shown)?;
            let v: Value = match serde_json::from_str(&l) {
                Ok(v) => v,
                Err(_) => continue, // not an answer (stray output)
            };
            if v["id"] == json!(id) {
                break v;
            }
        };
        if answer["ok"] == true {
            println!(
                "browser: #{id} {shown}: ok ({} ms)",
                t0.elapsed().as_millis()
            );
            if let Some(p) = answer["path"].as_str() {
                println!("browser: screenshot {p}");
            }
            Ok(answer)
        } else {
            let screenshot = answer["screenshot"].as_str().map(PathBuf::from);
            if let Some(p) = &screenshot {
                println!("browser: #{id} failed; screenshot {}", p.display());
            }
            Err(BrowserError::Step {
                step: shown,
                error: format!(
                    "{} (page: {})",
                    answer["error"].as_str().unwrap_or("?"),
                    answer["url"].as_str().unwrap_or("?")
                ),
                screenshot,
                log: self.log_tail(),
            })
        }
    }

    /// [`Browser::try_step`] that panics with the failure (for tests).
    #[track_caller]
    pub fn step(&mut self, step: Value) -> Value {
        match self.try_step(step) {
            Ok(v) => v,
            Err(e) => panic!("{e}"),
        }
    }

    /// Opens `url` and waits for its load event; the answer has `url`, `status` and `title`.
    #[track_caller]
    pub fn goto(&mut self, url: &str) -> Value {
        self.step(json!({"op": "goto", "url": url}))
    }

    /// Fills the form field whose label is `label`.
    #[track_caller]
    pub fn fill_label(&mut self, label: &str, value: &str) {
        self.step(json!({"op": "fill", "label": label, "value": value}));
    }

    /// Fills the field that `selector` (CSS or Playwright) names.
    #[track_caller]
    pub fn fill(&mut self, selector: &str, value: &str) {
        self.step(json!({"op": "fill", "selector": selector, "value": value}));
    }

    /// Clicks the element with this accessible role and name (e.g. "button", "Sign In"); the
    /// page's URL once any navigation it started has loaded.
    #[track_caller]
    pub fn click_role(&mut self, role: &str, name: &str) -> String {
        let v = self.step(json!({"op": "click", "role": role, "name": name}));
        v["url"].as_str().unwrap_or_default().to_string()
    }

    /// Clicks the element `selector` names.
    #[track_caller]
    pub fn click(&mut self, selector: &str) -> String {
        let v = self.step(json!({"op": "click", "selector": selector}));
        v["url"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until the page's URL starts with `prefix`; the URL.
    #[track_caller]
    pub fn wait_url_prefix(&mut self, prefix: &str) -> String {
        let v = self.step(json!({"op": "wait_url", "prefix": prefix}));
        v["url"].as_str().unwrap_or_default().to_string()
    }

    /// Waits until `text` is visible on the page.
    #[track_caller]
    pub fn wait_text(&mut self, text: &str) {
        self.step(json!({"op": "wait_text", "text": text}));
    }

    /// The page's text does not contain `text` (checked once the page has loaded).
    #[track_caller]
    pub fn expect_no_text(&mut self, text: &str) {
        self.step(json!({"op": "expect_text", "text": text, "present": false}));
    }

    /// The page's visible text (`document.body.innerText`).
    #[track_caller]
    pub fn text(&mut self) -> String {
        let v = self.step(json!({"op": "text"}));
        v["text"].as_str().unwrap_or_default().to_string()
    }

    /// The page's URL.
    #[track_caller]
    pub fn url(&mut self) -> String {
        let v = self.step(json!({"op": "url"}));
        v["url"].as_str().unwrap_or_default().to_string()
    }

    /// Saves `NN-name.png` (the full page) in the run directory and prints its path.
    #[track_caller]
    pub fn screenshot(&mut self, name: &str) -> PathBuf {
        let v = self.step(json!({"op": "screenshot", "name": name}));
        PathBuf::from(v["path"].as_str().unwrap_or_default())
    }

    /// `fetch(url)` (GET) in the page: its origin and cookies.
    #[track_caller]
    pub fn fetch(&mut self, url: &str) -> Fetched {
        self.fetch_with(json!({"url": url}))
    }

    /// `fetch` in the page with `{url, method?, headers?, body?}`.
    #[track_caller]
    pub fn fetch_with(&mut self, request: Value) -> Fetched {
        let mut s = request;
        s["op"] = json!("fetch");
        let v = self.step(s);
        Fetched {
            status: v["status"].as_u64().unwrap_or(0) as u16,
            url: v["url"].as_str().unwrap_or_default().to_string(),
            body: v["body"].as_str().unwrap_or_default().to_string(),
            json: v["json"].clone(),
        }
    }

    /// A JavaScript expression's value in the page.
    #[track_caller]
    pub fn eval(&mut self, expression: &str) -> Value {
        self.step(json!({"op": "eval", "expression": expression}))["value"].clone()
    }

    /// The context's cookies (for `urls`, or all): name, value, domain, path, secure, httpOnly,
    /// sameSite, expires.
    #[track_caller]
    pub fn cookies(&mut self, urls: &[&str]) -> Vec<Value> {
        let s = if urls.is_empty() {
            json!({"op": "cookies"})
        } else {
            json!({"op": "cookies", "urls": urls})
        };
        self.step(s)["cookies"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Closes the browser and waits for the driver; true when it exited by itself in time.
    pub fn close(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // End of input: the driver closes the context (chromium exits) and then exits.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        let clean = loop {
            match child.try_wait() {
                Ok(Some(_)) => break true,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break false,
            }
        };
        if !clean {
            eprintln!(
                "browser: the driver did not exit within 10 s; killing its process group {} and the browser's {:?}",
                child.id(),
                self.browser_pids
            );
            // SAFETY: kill(2) on the process groups this harness started: the driver's (its
            // own group, pid = pgid) and chromium's (playwright starts it as a group leader).
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
        // Chromium outliving the driver (e.g. the driver was killed): stop its group too. The
        // pids were our own descendants; after a clean exit they are gone (ESRCH).
        for &pid in &self.browser_pids {
            if Path::new(&format!("/proc/{pid}")).exists() {
                // SAFETY: as above.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
            }
        }
        drop(self.scratch.take());
        clean
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.close();
    }
}

/// Removes screenshots of an earlier run from the run directory (only `NN-*.png`).
fn clear_old_artifacts(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            let numbered = name.len() > 3
                && name.as_bytes()[..2].iter().all(u8::is_ascii_digit)
                && name.as_bytes()[2] == b'-';
            if numbered && name.ends_with(".png") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A step as shown in the test's output: the op and its fields, long values shortened.
fn short(step: &Value) -> String {
    let mut s = step.clone();
    if let Some(o) = s.as_object_mut() {
        o.remove("id");
    }
    let t = s.to_string();
    if t.chars().count() > 200 {
        format!("{}…", t.chars().take(200).collect::<String>())
    } else {
        t
    }
}

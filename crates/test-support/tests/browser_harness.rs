//! The browser harness against a small HTTP server of the test's own on loopback: the steps
//! (navigation, forms by label and role, text present and absent, the page's fetch with its
//! cookies, screenshots, a failing step with its screenshot), one session across tabs, a
//! missing browser as an error, and no browser process left behind, also when the driver is
//! killed.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use identitymesh_test_support::browser::{Browser, BrowserError, Options};
use serde_json::json;

const PAGE: &str = r#"<!doctype html><html><head><title>Harness page</title></head><body>
<h1>Harness page</h1>
<form onsubmit="event.preventDefault(); document.getElementById('out').textContent = 'Hello, ' + document.getElementById('who').value;">
<label for="who">Your name</label><input id="who" name="who">
<button type="submit">Greet</button>
</form>
<p id="out"></p>
</body></html>"#;

/// Serves PAGE at /, sets a cookie at /set, echoes the request's Cookie header as JSON at
/// /echo; one request per connection, until the test ends.
fn serve() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            let _ = r.read_line(&mut first);
            let mut cookie = String::new();
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("cookie:") {
                    cookie = v.trim().to_string();
                }
            }
            let path = first.split(' ').nth(1).unwrap_or("/").to_string();
            let (ctype, extra, body) = match path.as_str() {
                "/set" => (
                    "text/html",
                    "Set-Cookie: hs=1; HttpOnly; Path=/\r\n",
                    "<p>cookie set</p>".to_string(),
                ),
                "/echo" => (
                    "application/json",
                    "",
                    json!({"cookie": cookie}).to_string(),
                ),
                "/" => ("text/html", "", PAGE.to_string()),
                _ => ("text/plain", "", "not here".to_string()),
            };
            let status = if ["/", "/set", "/echo"].contains(&path.as_str()) {
                "200 OK"
            } else {
                "404 Not Found"
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}; charset=utf-8\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    base
}

fn artifacts(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-artifacts")
        .join("browser_harness")
        .join(name)
}

/// A process is gone (or a zombie waiting to be reaped).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

fn all_gone_within(pids: &[i32], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if pids.iter().all(|&p| gone(p)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn steps_run_in_one_browser_session() {
    let base = serve();
    let dir = artifacts("steps");
    let mut b = Browser::launch(&dir).expect("the browser");
    assert!(!b.chromium_version.is_empty());
    let pids = b.browser_pids().to_vec();
    assert!(!pids.is_empty(), "the driver names the browser's pid");

    let r = b.goto(&format!("{base}/set"));
    assert_eq!(
        (r["status"].as_u64(), r["url"].as_str()),
        (Some(200), Some(format!("{base}/set").as_str())),
        "{r}"
    );
    let cookies = b.cookies(&[]);
    assert!(
        cookies
            .iter()
            .any(|c| c["name"] == "hs" && c["httpOnly"] == true),
        "{cookies:?}"
    );

    let r = b.goto(&format!("{base}/"));
    assert_eq!(r["title"], "Harness page", "{r}");
    b.fill_label("Your name", "Zoë");
    b.click_role("button", "Greet");
    b.wait_text("Hello, Zoë");
    b.expect_no_text("Goodbye");
    assert!(b.text().contains("Hello, Zoë"));
    let shot = b.screenshot("greeted");
    assert!(shot.ends_with("01-greeted.png"), "{}", shot.display());
    assert!(std::fs::metadata(&shot).unwrap().len() > 1000);

    // The page's fetch goes with the page's cookies (the HttpOnly one too).
    let f = b.fetch("/echo");
    assert_eq!(f.status, 200, "{}", f.body);
    assert_eq!(f.json["cookie"], "hs=1", "{}", f.body);
    let f = b.fetch("/missing");
    assert_eq!((f.status, f.body.as_str()), (404, "not here"));
    assert_eq!(
        b.eval("document.title + ' ' + (1 + 2)"),
        json!("Harness page 3")
    );
    // Script cannot read the HttpOnly cookie.
    assert_eq!(b.eval("document.cookie"), json!(""));

    // A failing step is an error naming what was missing, with a screenshot of the page.
    match b.try_step(json!({"op": "wait_text", "text": "never there", "timeout_ms": 500})) {
        Err(BrowserError::Step {
            error, screenshot, ..
        }) => {
            assert!(
                error.contains("never there") && error.contains("Hello, Zoë"),
                "{error}"
            );
            let p = screenshot.expect("a screenshot of the failure");
            assert!(
                p.ends_with("02-failed-wait_text.png") && p.is_file(),
                "{}",
                p.display()
            );
        }
        other => panic!("expected a failed step: {other:?}"),
    }
    match b.try_step(json!({"op": "expect_text", "text": "Hello", "present": false})) {
        Err(BrowserError::Step { error, .. }) => {
            assert!(error.contains("should not be"), "{error}")
        }
        other => panic!("expected a failed step: {other:?}"),
    }
    match b.try_step(json!({"op": "no-such-op"})) {
        Err(BrowserError::Step { error, .. }) => assert!(error.contains("unknown op"), "{error}"),
        other => panic!("expected a failed step: {other:?}"),
    }
    // The session goes on after failures; a new tab shares the context's cookies.
    b.step(json!({"op": "new_page"}));
    b.goto(&format!("{base}/"));
    assert_eq!(b.fetch("/echo").json["cookie"], "hs=1");

    assert!(b.close(), "the driver exits by itself on end of input");
    assert!(
        all_gone_within(&pids, Duration::from_secs(5)),
        "browser processes {pids:?} outlived close()"
    );
}

#[test]
fn a_missing_browser_is_an_error_naming_the_package() {
    let mut o = Options::new(artifacts("missing"));
    o.chromium = PathBuf::from("/nonexistent/chromium");
    let e = Browser::launch_with(o).err().expect("no browser there");
    let m = e.to_string();
    assert!(matches!(e, BrowserError::Missing { .. }), "{m}");
    assert!(
        m.contains("apt-get install chromium") && m.contains("cargo xtask test"),
        "{m}"
    );
}

#[test]
fn a_killed_driver_leaves_no_browser_behind() {
    let mut b = Browser::launch(artifacts("killed")).expect("the browser");
    let pids = b.browser_pids().to_vec();
    let driver = b.driver_pid().unwrap() as i32;
    // SAFETY: kill(2) on the driver this test started.
    unsafe {
        libc::kill(driver, libc::SIGKILL);
    }
    let e = b
        .try_step(json!({"op": "url"}))
        .expect_err("no driver to answer");
    assert!(e.to_string().contains("driver"), "{e}");
    b.close();
    assert!(
        all_gone_within(&pids, Duration::from_secs(5)),
        "browser processes {pids:?} outlived the killed driver"
    );
}

//! The Admin UI in a real browser (Debian's headless chromium through the test-support harness)
//! against a standalone server signed in with the bootstrap token: every page renders with a
//! label on each control and a name on each button and link; the keyboard reaches the skip
//! link first and signs in with Enter; a connector with a broken rule shows the error at its
//! path with the position marked, is fixed, runs, and its objects and identities show up; a
//! schedule is created, disabled and enabled; a secret is set and never shown; a relay's
//! credential is shown once; the audit log filters by action; sign-out ends the session.
//!
//! Screenshots of each step: `<target>/tmp/browser-artifacts/browser_ui/`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use identitymesh_test_support::browser::Browser;
use serde_json::json;

/// Every form control with a label, every button and link with a name, one h1 and a main.
const A11Y: &str = r#"(() => {
  const bad = [];
  for (const el of document.querySelectorAll('input:not([type=hidden]), select, textarea'))
    if (!el.labels || el.labels.length === 0) bad.push('unlabelled ' + el.outerHTML.slice(0, 90));
  for (const el of document.querySelectorAll('button, a[href]'))
    if (!(el.textContent.trim() || el.getAttribute('aria-label'))) bad.push('unnamed ' + el.outerHTML.slice(0, 90));
  if (document.querySelectorAll('h1').length !== 1) bad.push('h1 count ' + document.querySelectorAll('h1').length);
  if (!document.querySelector('main')) bad.push('no main');
  return bad;
})()"#;

fn check_a11y(b: &mut Browser, page: &str) {
    let bad = b.eval(A11Y);
    assert_eq!(bad, json!([]), "{page}: {bad}");
}

#[tokio::test]
async fn every_page_works_in_a_browser_from_sign_in_to_sign_out() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut server = Proc::spawn(
        &[
            "standalone",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &[],
        tmp.path(),
    );
    let base = format!("https://127.0.0.1:{port}");
    wait_up(&insecure_client(), &format!("{base}/health/live"), &server).await;
    let token = std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string();
    // A drop folder with two people for the CSV connector.
    let folder = data.join("drop").join("hr");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("people.csv"),
        "id,mail,cn,photo\n1,Ann.Lee@Example.org,Ann Lee,\n2,bo@example.org,Bo Ek,\n",
    )
    .unwrap();

    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-artifacts")
        .join("browser_ui");
    let mut b = Browser::launch(artifacts).expect("the browser");

    // Not signed in: the sign-in page, reached by keyboard, Enter submits.
    let at = b.goto(&format!("{base}/connectors"));
    assert_eq!(
        at["url"],
        format!("{base}/signin?next=%2Fconnectors"),
        "{at}"
    );
    check_a11y(&mut b, "/signin");
    b.screenshot("signin");
    b.fill_label("Bootstrap admin token", "imb_wrong");
    b.step(json!({"op": "press", "label": "Bootstrap admin token", "key": "Enter"}));
    b.wait_text("the token is in the file the server printed at start");
    b.screenshot("signin-refused");
    b.fill_label("Bootstrap admin token", &token);
    b.step(json!({"op": "press", "label": "Bootstrap admin token", "key": "Enter"}));
    b.wait_url_prefix(&format!("{base}/connectors"));
    b.wait_text("No connector yet.");

    // The keyboard's first stop is the skip link.
    b.goto(&format!("{base}/"));
    b.step(json!({"op": "press", "key": "Tab"}));
    assert_eq!(
        b.eval("document.activeElement.textContent"),
        json!("Skip to content")
    );
    b.wait_text("Schedules are running");
    b.screenshot("overview");

    // A connector with a broken rule: the error at its path, the position marked.
    b.goto(&format!("{base}/connectors/new"));
    check_a11y(&mut b, "/connectors/new");
    b.fill_label("Name", "hr");
    b.step(json!({"op": "eval", "expression": "(() => { const k = document.getElementById('c-kind'); k.value = 'csv'; k.dispatchEvent(new Event('change')); return k.value })()"}));
    let config = b.eval("document.getElementById('c-config').value");
    assert!(
        config.as_str().unwrap().contains("anchor_column"),
        "the CSV template: {config}"
    );
    let rules = |expr: &str| {
        json!({"precedence": 10, "object_types": {"people": {
            "join": [{"source": "lower(mail)", "identity_attribute": "mail"}],
            "flows": [{"target": "mail", "expression": expr}, {"target": "cn", "expression": "cn"}],
            "display_name": "cn"}}})
        .to_string()
    };
    b.fill_label("Rules (JSON)", &rules("lower(mail"));
    b.click_role("button", "Create connector");
    b.wait_text("rules.object_types.people.flows[0].expression");
    let marked = b.eval("document.querySelector('.outcome mark') && document.querySelector('.outcome code.expr').textContent");
    assert_eq!(
        marked,
        json!("lower(mail "),
        "the expression shown with the marked end: {marked}"
    );
    assert_eq!(
        b.eval("document.getElementById('c-rules').getAttribute('aria-invalid')"),
        json!("true")
    );
    b.screenshot("connector-bad-rule");
    b.fill_label("Rules (JSON)", &rules("lower(mail)"));
    b.click_role("button", "Create connector");
    let url = b.step(json!({"op": "wait_url", "regex": "/connectors/[0-9a-f]{32}$"}))["url"]
        .as_str()
        .unwrap()
        .to_string();
    let connector = url.rsplit('/').next().unwrap().to_string();
    assert_eq!(connector.len(), 32, "{url}");
    b.wait_text("Connector hr");
    check_a11y(&mut b, "/connectors/{id}");

    // Test the connection, then run it and watch the run to its end.
    b.click_role("button", "Test connection");
    b.wait_text("\"ok\": true");
    b.click_role("button", "Run full import now");
    b.wait_url_prefix(&format!("{base}/runs/"));
    b.step(json!({"op": "wait_text", "text": "succeeded", "timeout_ms": 30000}));
    b.screenshot("run-succeeded");
    let counts = b.fetch(&format!("/api/connectors/{connector}"));
    assert_eq!(counts.json["objects"], 2, "{}", counts.body);

    // The connector space: search by value, one object's attributes, its identity.
    b.goto(&format!(
        "{base}/connectors/{connector}/objects?search=ann.lee"
    ));
    check_a11y(&mut b, "connector space");
    b.wait_text("2 objects in this connector space.");
    b.screenshot("connector-space");
    b.click_role("link", "1");
    b.wait_text("Ann.Lee@Example.org");
    b.click("dd a[href^='/identities/']");
    b.wait_text("ann.lee@example.org");
    b.screenshot("identity");
    b.goto(&format!("{base}/identities?search=bo%20e"));
    b.wait_text("Bo Ek");
    b.expect_no_text("Ann Lee");

    // Schedules: create, disable, enable; pause and resume all.
    b.goto(&format!("{base}/schedules"));
    check_a11y(&mut b, "/schedules");
    b.fill_label("When", "15m");
    b.click_role("button", "Create schedule");
    b.wait_text("15m");
    b.click_role("button", "Disable");
    // The page comes back with the other button (a click waits for its button to appear).
    b.click_role("button", "Enable");
    b.click_role("button", "Disable");
    b.click_role("button", "Enable");
    b.click_role("button", "Pause all schedules");
    b.wait_text("Resume all schedules");
    b.screenshot("schedules-paused");
    b.click_role("button", "Resume all schedules");
    b.wait_text("Pause all schedules");

    // Secrets: the value is sealed and never shown.
    b.goto(&format!("{base}/secrets"));
    check_a11y(&mut b, "/secrets");
    b.fill_label("Name", "dc1-bind");
    b.fill_label("Value", "s3cr3t-value-7");
    b.click_role("button", "Set value");
    b.wait_text("dc1-bind");
    b.expect_no_text("s3cr3t-value-7");
    let html = b.eval("document.documentElement.outerHTML");
    assert!(!html.as_str().unwrap().contains("s3cr3t-value-7"));

    // Relays: the credential once, then never again; revoked.
    b.goto(&format!("{base}/relays"));
    check_a11y(&mut b, "/relays");
    b.fill_label("Name", "branch-1");
    b.click_role("button", "Register");
    b.wait_text("imr_");
    b.screenshot("relay-credential");
    b.goto(&format!("{base}/relays"));
    b.wait_text("branch-1");
    b.expect_no_text("imr_");
    b.eval("window.confirm = () => true");
    b.click_role("button", "Revoke");
    b.wait_text("Revoked");

    // The audit log, by action prefix.
    b.goto(&format!("{base}/audit?action=relay."));
    check_a11y(&mut b, "/audit");
    b.wait_text("relay.revoke");
    b.expect_no_text("connector.create");
    b.goto(&format!("{base}/audit?since=yesterday"));
    b.wait_text("since must be an RFC 3339 timestamp");
    b.screenshot("audit-bad-filter");
    for page in ["/", "/connectors", "/runs", "/identities"] {
        b.goto(&format!("{base}{page}"));
        check_a11y(&mut b, page);
    }

    // Sign-out: the session ends, pages send the browser to sign in again.
    b.click_role("button", "Sign out");
    b.wait_url_prefix(&format!("{base}/signin"));
    let at = b.goto(&format!("{base}/runs"));
    assert_eq!(at["url"], format!("{base}/signin?next=%2Fruns"), "{at}");
    let s = b.fetch("/auth/session");
    assert_eq!(s.status, 401, "{}", s.body);
    assert!(b.close());
    server.terminate(Duration::from_secs(10));
    println!("browser_ui: {:?}", t0.elapsed());
}

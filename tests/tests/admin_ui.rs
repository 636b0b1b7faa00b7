//! The Admin UI in a real browser on a real two-pod cluster (issue 16): Debian's chromium
//! (through the test-support harness) signs in through a real Keycloak over HTTPS, uses the UI
//! through the client Service, and keeps its session across a planned switchover and a kill -9
//! failover.
//!
//! The pieces, all on loopback or inside the harness's node namespaces:
//! - Keycloak serves HTTPS on 127.0.0.1:K with a certificate from a test CA (SAN IP 127.0.0.1);
//!   the issuer is `https://127.0.0.1:K/realms/im`. The realm's UI client grants client roles
//!   named as the server's permissions, through the groups (im-admins: alice, im-viewers: bob),
//!   and a client-role mapper puts them in the ID token's `permissions` claim: the CRD maps
//!   `permissionsClaim`, not the server's role_permissions table.
//! - The tests' slapd is the directory an LDAP connector reads (LDAPS, its own test CA).
//! - The harness exposes both host ports inside every node namespace at the same 127.0.0.1
//!   address ([`identitymesh_tests::Cluster::expose_host_port`]), so the pods reach the issuer
//!   at the URL the browser uses, and the directory.
//! - A front door on a fixed 127.0.0.1:F forwards each connection to the Service proxy's current
//!   listener for the client Service ([`identitymesh_tests::Cluster::front_door`]), as a load
//!   balancer would: the browser has one origin for the whole run, and the cluster's
//!   `spec.oidc.ui.redirectUrl` is `https://127.0.0.1:F/auth/callback`.
//! - The cluster gets `spec.oidc` with the issuer, `ui` (client id, a Secret with the client
//!   secret, the redirect URL) and `ca` (a ConfigMap with the test CA).
//!
//! The scenario (one chromium session for alice, a screenshot at every step): `/` sends her to
//! `/signin`, then to Keycloak; signed in, the overview names the active pod and the schedules
//! running; she pauses and resumes them; sets the directory's bind password on the Secrets
//! page; creates an LDAP connector whose rule is broken (the problem names the rule's path and
//! marks the position), fixes it, tests the connection and runs a full import to `succeeded`.
//! A planned switchover: the same session, without signing in again, sees the other pod active
//! and pauses and resumes there. A kill -9 of the active's process: after the failover the same
//! again. The operator's AdminUiReady condition is True (UiServed) for the active of the moment
//! at the start and after each cutover. Finally bob, a viewer, in a fresh browser: he opens the
//! connector's page and, signed in, is back on it; no "New connector" link, no Test/Run/Clear
//! buttons, and writes forced through the page's fetch with his CSRF token are refused with 403
//! naming connectors.write.
//!
//! Screenshots: `<target>/tmp/browser-artifacts/admin_ui/{alice,bob}/`.
//!
//! Needs root, `cargo xtask tools`, slapd, the sqlite3 CLI, chromium, node with
//! tests/browser's npm packages, Keycloak's distribution (fetched with mvn on first use) and
//! `cargo build --workspace --bins`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use identitymesh_connectors::testing::{Slapd, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD};
use identitymesh_test_support::browser::Browser;
use identitymesh_test_support::keycloak::{Distribution, Https, Keycloak, Options};
use identitymesh_tests::operator_env::*;
use identitymesh_tests::pki::LoopbackTls;
use identitymesh_tests::process::pid_alive;
use serde_json::{json, Value};

const REALM: &str = "im";
const CLIENT: &str = "identitymesh-ui";
const CLIENT_SECRET: &str = "ui-client-secret-c1u5t3r";
/// The Secret and ConfigMap the cluster's spec.oidc names.
const CLIENT_SECRET_NAME: &str = "im-ui-client";
const IDP_CA_CONFIG_MAP: &str = "im-idp-ca";
/// The stored secret the connector binds with.
const BIND_SECRET: &str = "directory-bind";
const CONNECTOR: &str = "corp-directory";

/// Every permission the server knows, as client roles of the UI client.
const PERMISSIONS: &[&str] = &[
    "dashboard.read",
    "connectors.write",
    "schedules.manage",
    "relays.manage",
    "secrets.write",
    "audit.read",
];
const ADMIN_PERMISSIONS: &[&str] = &[
    "dashboard.read",
    "connectors.write",
    "schedules.manage",
    "secrets.write",
];
const VIEWER_PERMISSIONS: &[&str] = &["dashboard.read"];

fn artifacts(who: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-artifacts")
        .join("admin_ui")
        .join(who)
}

/// The realm: alice in im-admins, bob in im-viewers (passwords `<name>-pw`); the confidential
/// UI client (code flow, S256 PKCE) with one redirect URI, the cluster's front door; the
/// server's permissions as the client's roles, granted through the groups, and a mapper that
/// puts the user's roles of this client into the `permissions` claim of the ID token.
fn realm(redirect: &str) -> Value {
    use identitymesh_test_support::keycloak::realm::{ui_client, user};
    let permissions = json!([{
        "name": "permissions",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-usermodel-client-role-mapper",
        "config": {
            "usermodel.clientRoleMapping.clientId": CLIENT,
            "claim.name": "permissions", "multivalued": "true", "jsonType.label": "String",
            "id.token.claim": "true", "access.token.claim": "true",
            "userinfo.token.claim": "true"
        }
    }]);
    json!({
        "realm": REALM,
        "enabled": true,
        "roles": {"client": {CLIENT: PERMISSIONS.iter().map(|p| json!({"name": p})).collect::<Vec<_>>()}},
        "groups": [
            {"name": "im-admins", "clientRoles": {CLIENT: ADMIN_PERMISSIONS}},
            {"name": "im-viewers", "clientRoles": {CLIENT: VIEWER_PERMISSIONS}}
        ],
        "users": [user("alice", "im-admins"), user("bob", "im-viewers")],
        "clients": [ui_client(CLIENT, CLIENT_SECRET, &[redirect.to_string()], permissions)]
    })
}

/// The directory the connector reads: three people under ou=people.
fn directory_ldif() -> String {
    let person = |uid: &str, cn: &str, sn: &str| {
        format!(
            "dn: uid={uid},{PEOPLE_BASE}\nobjectClass: top\nobjectClass: person\nobjectClass: organizationalPerson\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {cn}\nsn: {sn}\nmail: {uid}@Example.org\n\n"
        )
    };
    format!(
        "dn: dc=example,dc=org\nobjectClass: top\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example Org\n\n\
         dn: {PEOPLE_BASE}\nobjectClass: organizationalUnit\nou: people\n\n{}{}{}",
        person("ada", "Ada Lovelace", "Lovelace"),
        person("grace", "Grace Hopper", "Hopper"),
        person("edsger", "Edsger Dijkstra", "Dijkstra"),
    )
}
const PEOPLE: usize = 3;

fn rules(first_flow: &str) -> Value {
    json!({
        "precedence": 100,
        "object_types": {"people": {
            "join": [{"source": "lower(uid)", "identity_attribute": "uid"}],
            "flows": [
                {"target": "mail", "expression": first_flow},
                {"target": "uid", "expression": "lower(uid)"}
            ],
            "display_name": "cn"
        }}
    })
}

/// Keycloak over HTTPS (and HTTP for its admin client) with [`realm`] imported; the issuer.
async fn start_keycloak(dir: &Path, tls: &LoopbackTls, redirect: &str) -> (Keycloak, String) {
    let dist = Distribution::ensure().expect("fetching Keycloak");
    let options = Options {
        https: Some(Https {
            certificate_file: tls.cert.clone(),
            key_file: tls.key.clone(),
        }),
        ..Options::default()
    };
    let kc = Keycloak::start(&dist, dir, options)
        .await
        .expect("starting Keycloak");
    kc.admin()
        .expect("Keycloak admin client")
        .import_realm(&realm(redirect))
        .await
        .expect("importing the realm");
    let issuer = format!(
        "{}/realms/{REALM}",
        kc.https_base_url().expect("Keycloak serves HTTPS")
    );
    (kc, issuer)
}

fn condition<'a>(st: &'a Status, kind: &str) -> Option<&'a Value> {
    st.conditions.iter().find(|c| c["type"] == kind)
}

/// Waits until AdminUiReady has `status` and `reason` for `active` (its message names the
/// instance the operator asked); returns the condition.
async fn wait_admin_ui_is(env: &Env, active: &str, status: &str, reason: &str) -> Value {
    let (want, st_want, why) = (active.to_string(), status.to_string(), reason.to_string());
    let st = env
        .wait_status(
            &format!("AdminUiReady {status} ({reason}) for {active}"),
            WAIT,
            move |s| {
                condition(s, "AdminUiReady").is_some_and(|c| {
                    c["status"] == st_want.as_str()
                        && c["reason"] == why.as_str()
                        && c["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with(&format!("{want} ")))
                })
            },
        )
        .await;
    let c = condition(&st, "AdminUiReady").cloned().unwrap_or_default();
    println!("AdminUiReady: {c}");
    c
}

/// AdminUiReady True (UiServed) for `active`.
async fn wait_admin_ui(env: &Env, active: &str) -> Value {
    wait_admin_ui_is(env, active, "True", "UiServed").await
}

/// Waits until `to` is active with `epoch` and the cluster has settled again.
async fn wait_active(env: &Env, what: &str, to: &str, epoch: i64) -> Status {
    let to = to.to_string();
    env.wait_status(what, WAIT, move |s| {
        s.active.as_deref() == Some(to.as_str()) && s.epoch == epoch && s.settled()
    })
    .await
}

/// Polls a JavaScript expression in the page until it yields `want` (as a string). A page that
/// navigates meanwhile (a button's reload) is read again once it has loaded.
#[track_caller]
fn wait_eval(b: &mut Browser, expression: &str, want: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        let v = match b.try_step(json!({"op": "eval", "expression": expression})) {
            Ok(v) => v["value"].clone(),
            Err(e) if e.to_string().contains("Execution context was destroyed") => Value::Null,
            Err(e) => panic!("{e}"),
        };
        if v.as_str() == Some(want) {
            return;
        }
        if started.elapsed() > timeout {
            let shot = b.screenshot("wait-eval-failed");
            panic!(
                "{expression} stayed {v} (wanted {want:?}) for {timeout:?}; screenshot {}",
                shot.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

const ACTIVE_INSTANCE: &str =
    "document.querySelector('[data-testid=active-instance]')?.textContent ?? null";
const SYNC_STATE: &str = "document.querySelector('[data-testid=sync-state]')?.textContent ?? null";

/// Signs `user` in from a page: `page` (a path) sends the unsigned browser to the sign-in page,
/// its provider button to Keycloak's login page, and after the callback the browser is back on
/// `page` at `base`.
fn sign_in(b: &mut Browser, base: &str, kc_https: &str, user: &str, page: &str) {
    let at = b.goto(&format!("{base}{page}"));
    let url = at["url"].as_str().unwrap_or_default().to_string();
    assert!(
        url.starts_with(&format!("{base}/signin")),
        "an unsigned browser is sent to the sign-in page: {at}"
    );
    if page != "/" {
        assert!(
            url.contains(&format!("next={}", page.replace('/', "%2F"))),
            "the sign-in page knows where to come back to: {url}"
        );
    }
    b.wait_text("Sign in with the identity provider");
    b.screenshot(&format!("{user}-signin-page"));
    b.click_role("link", "Sign in with the identity provider");
    let login = b.wait_url_prefix(&format!(
        "{kc_https}/realms/{REALM}/protocol/openid-connect/auth?"
    ));
    assert!(
        login.contains("code_challenge_method=S256"),
        "PKCE: {login}"
    );
    let port = base.rsplit(':').next().unwrap_or_default();
    let redirect = format!("redirect_uri=https%3A%2F%2F127.0.0.1%3A{port}%2Fauth%2Fcallback");
    assert!(login.contains(&redirect), "{redirect} in {login}");
    b.wait_text("Sign in to your account");
    b.screenshot(&format!("{user}-keycloak-login"));
    b.fill_label("Username or email", user);
    b.fill_label("Password", &format!("{user}-pw"));
    b.screenshot(&format!("{user}-login-filled"));
    let landed = b.click_role("button", "Sign In");
    assert_eq!(
        landed,
        format!("{base}{page}"),
        "back on the page that asked for the sign-in"
    );
}

/// On the overview: pauses all schedules, sees them paused, resumes them, sees them running.
/// (The buttons reload the page once the API has answered: the texts are waited for, and the
/// state is read from the page that has them.)
fn pause_and_resume(b: &mut Browser, label: &str) {
    assert_eq!(
        b.eval(SYNC_STATE),
        json!("running"),
        "{label}: running before"
    );
    b.click_role("button", "Pause all schedules");
    b.wait_text("Schedules are paused");
    b.wait_text("Resume all schedules");
    assert_eq!(b.eval(SYNC_STATE), json!("paused"), "{label}: paused");
    b.screenshot(&format!("{label}-paused"));
    b.click_role("button", "Resume all schedules");
    b.wait_text("Schedules are running");
    b.wait_text("Pause all schedules");
    assert_eq!(
        b.eval(SYNC_STATE),
        json!("running"),
        "{label}: running again"
    );
    b.screenshot(&format!("{label}-resumed"));
}

/// Opens `url` in the signed-in browser; a cutover may just have closed the connection the
/// browser had (the proxy closes those of an endpoint that left), so a network error is tried
/// again for a while.
fn goto_again(b: &mut Browser, url: &str) -> Value {
    let started = Instant::now();
    loop {
        match b.try_step(json!({"op": "goto", "url": url})) {
            Ok(v) => return v,
            Err(e) if e.to_string().contains("net::ERR_") && started.elapsed() < WAIT => {
                println!("{url}: {e}; again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

/// Opens the overview in the signed-in browser and waits until it names `active`.
fn overview_names(b: &mut Browser, base: &str, active: &str, label: &str) {
    let at = goto_again(b, &format!("{base}/"));
    assert_eq!(
        at["url"].as_str(),
        Some(format!("{base}/").as_str()),
        "{label}: still signed in, no detour to the sign-in page: {at}"
    );
    // The Service reached the new active before this load; a page still naming the old one
    // would be a stale connection, so it is loaded again for a while before failing.
    let started = Instant::now();
    loop {
        let shown = b.eval(ACTIVE_INSTANCE);
        if shown.as_str() == Some(active) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{label}: the overview names {shown} active, not {active}"
        );
        std::thread::sleep(Duration::from_millis(500));
        goto_again(b, &format!("{base}/"));
    }
    b.wait_text("Schedules are");
    b.screenshot(&format!("{label}-overview"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_ui_in_chromium_through_switchover_and_failover() {
    let _serial = SERIAL.lock().await;
    init_tracing();
    let t0 = Instant::now();
    let work = tempfile::tempdir().expect("a work dir");

    // The front door's port first: the realm and the cluster need the redirect URL.
    let front = std::net::TcpListener::bind("127.0.0.1:0").expect("front door port");
    let f = front.local_addr().expect("front door address").port();
    let base = format!("https://127.0.0.1:{f}");
    let redirect = format!("{base}/auth/callback");
    let tls = LoopbackTls::generate(&work.path().join("idp-tls"), "keycloak").expect("test CA");

    let opts = EnvOptions::default();
    let (kc_dir, slapd_dir, ldif) = (
        work.path().join("keycloak"),
        work.path().join("slapd"),
        directory_ldif(),
    );
    let (env, (mut kc, issuer), slapd) = tokio::join!(
        Env::boot(&opts),
        start_keycloak(&kc_dir, &tls, &redirect),
        async {
            Slapd::launch(&slapd_dir, Some(&ldif))
                .await
                .expect("starting slapd")
        }
    );
    let mut env = env;
    let kc_https = kc.https_base_url().expect("Keycloak serves HTTPS");
    println!(
        "harness, Keycloak ({issuer}) and slapd up after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // The pods reach the directory at the address the test uses (the issuer comes below).
    env.cluster
        .expose_host_port(slapd.ldaps_port())
        .await
        .expect("expose slapd in the node namespaces");

    let objects = json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Secret",
             "metadata": {"name": CLIENT_SECRET_NAME, "namespace": env.ns},
             "stringData": {"clientSecret": CLIENT_SECRET}},
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": IDP_CA_CONFIG_MAP, "namespace": env.ns},
             "data": {"ca.crt": tls.ca_pem}}
        ]
    });
    env.cluster
        .kubectl_with_stdin(&["apply", "-f", "-"], Some(&objects.to_string()))
        .await
        .expect("create the UI client's Secret and the issuer's CA ConfigMap");
    env.create_cluster(json!({
        "oidc": {
            "issuer": issuer,
            "audience": CLIENT,
            "permissionsClaim": "permissions",
            "ui": {
                "clientId": CLIENT,
                "clientSecret": {"name": CLIENT_SECRET_NAME, "key": "clientSecret"},
                "redirectUrl": redirect
            },
            "ca": {"name": IDP_CA_CONFIG_MAP, "key": "ca.crt"}
        }
    }))
    .await;
    env.cluster
        .front_door(front, &env.ns, CLUSTER, SERVICE_PORT)
        .expect("the front door");

    let st = env.wait_settled("the first settled state").await;
    let (a, s, e) = (st.active.unwrap(), st.standby.unwrap(), st.epoch);
    env.wait_service_active(e, WAIT).await;
    // The pods cannot reach the issuer yet (nothing listens on its port in their namespaces):
    // the operator's check says so, naming the discovery URL and why.
    let c = wait_admin_ui_is(&env, &a, "False", "IssuerUnreachable").await;
    let m = c["message"].as_str().unwrap_or_default();
    assert!(
        m.contains(&format!("{issuer}/.well-known/openid-configuration")),
        "{c}"
    );
    assert!(m.contains("Connection refused"), "the cause: {c}");
    // Exposed in every node namespace at the same address: the active reads the document.
    env.cluster
        .expose_host_port(kc.https_port().expect("HTTPS port"))
        .await
        .expect("expose Keycloak in the node namespaces");
    wait_admin_ui(&env, &a).await;
    println!(
        "cluster settled (active {a}, standby {s}, epoch {e}) after {:.1}s",
        t0.elapsed().as_secs_f64()
    );

    // ---------------------------------------------------------------- alice signs in
    let t_browser = Instant::now();
    let mut alice = Browser::launch(artifacts("alice")).expect("the browser");
    sign_in(&mut alice, &base, &kc_https, "alice", "/");
    let session = alice.fetch("/auth/session");
    assert_eq!(session.status, 200, "{}", session.body);
    assert_eq!(session.json["name"], "alice Operator", "{}", session.body);
    let mut perms: Vec<&str> = session.json["permissions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    perms.sort_unstable();
    let mut want = ADMIN_PERMISSIONS.to_vec();
    want.sort_unstable();
    assert_eq!(
        perms, want,
        "alice's permissions from the ID token: {}",
        session.body
    );
    overview_names(&mut alice, &base, &a, "alice-first");
    pause_and_resume(&mut alice, "alice-first");

    // The directory's bind password, on the Secrets page.
    alice.goto(&format!("{base}/secrets"));
    alice.wait_text("No secret yet.");
    alice.fill_label("Name", BIND_SECRET);
    alice.fill_label("Value", ROOT_PASSWORD);
    alice.screenshot("alice-secret-filled");
    alice.click_role("button", "Set value");
    // The input's value is not page text: the name shows once the reloaded page lists it.
    alice.wait_text(BIND_SECRET);
    assert_eq!(
        alice.eval("document.querySelector('main table code')?.textContent ?? null"),
        json!(BIND_SECRET),
        "the secret is listed by name"
    );
    alice.expect_no_text(ROOT_PASSWORD);
    alice.screenshot("alice-secret-set");

    // A connector with a broken rule: the problem names the rule's path and marks the position.
    alice.goto(&format!("{base}/connectors"));
    alice.wait_text("No connector yet.");
    alice.screenshot("alice-connectors-empty");
    alice.click_role("link", "New connector");
    alice.wait_url_prefix(&format!("{base}/connectors/new"));
    let config = json!({
        "url": format!("ldaps://127.0.0.1:{}", slapd.ldaps_port()),
        "ca_pem": slapd.ca_pem(),
        "bind_dn": ROOT_DN,
        "bind_password_ref": BIND_SECRET,
        "object_types": {"people": {"base_dn": PEOPLE_BASE, "filter": "(objectClass=inetOrgPerson)"}}
    });
    alice.fill_label("Name", CONNECTOR);
    alice.fill_label(
        "Configuration (JSON)",
        &serde_json::to_string_pretty(&config).unwrap(),
    );
    let broken = "lower(mail";
    alice.fill_label(
        "Rules (JSON)",
        &serde_json::to_string_pretty(&rules(broken)).unwrap(),
    );
    alice.screenshot("alice-connector-broken-rule");
    alice.click_role("button", "Create connector");
    alice.wait_text("at position");
    let problem = alice.eval("document.querySelector('.outcome.problem')?.innerText ?? null");
    let problem = problem.as_str().unwrap_or_default().to_string();
    let path = "rules.object_types.people.flows[0].expression at position";
    assert!(
        problem.contains(path),
        "the problem names {path}: {problem:?}"
    );
    let pos: usize = problem
        .split(path)
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("a position after {path}: {problem:?}"));
    assert!(
        pos <= broken.chars().count(),
        "position {pos} within {broken:?}"
    );
    // The expression is shown with the character at the position marked.
    let marked = alice.eval(
        "(() => { const m = document.querySelector('.outcome.problem code.expr mark'); \
          return m ? [m.parentElement.textContent, m.textContent] : null })()",
    );
    assert_eq!(
        marked[0].as_str().map(str::trim_end),
        Some(broken),
        "the expression shown: {marked}"
    );
    let at_pos = broken
        .chars()
        .nth(pos)
        .map(String::from)
        .unwrap_or(" ".into());
    assert_eq!(
        marked[1].as_str(),
        Some(at_pos.as_str()),
        "marked: {marked}"
    );
    assert_eq!(
        alice.eval("document.getElementById('c-rules').getAttribute('aria-invalid')"),
        json!("true"),
        "the rules field is flagged"
    );
    alice.screenshot("alice-connector-rule-error");
    let created = alice.eval("location.pathname");
    assert_eq!(created, json!("/connectors/new"), "nothing was created");

    // Fixed and saved.
    alice.fill_label(
        "Rules (JSON)",
        &serde_json::to_string_pretty(&rules("lower(mail)")).unwrap(),
    );
    alice.click_role("button", "Create connector");
    let url = alice.step(json!({"op": "wait_url", "regex": format!("^{}/connectors/(?!new)[^/]+$", regex_escape(&base))}))
        ["url"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let connector_path = url.trim_start_matches(&base).to_string();
    alice.wait_text(&format!("Connector {CONNECTOR}"));
    alice.screenshot("alice-connector-created");

    // Test the connection: the active pod binds to slapd through the node's forwarder.
    alice.click_role("button", "Test connection");
    alice.wait_text("\"ok\"");
    let answer = alice.eval("document.querySelector('.outcome.answer pre')?.textContent ?? null");
    let answer: Value = serde_json::from_str(answer.as_str().unwrap_or("null")).unwrap_or_default();
    assert_eq!(answer["ok"], true, "the connection test: {answer}");
    alice.screenshot("alice-connector-tested");

    // Run a full import and watch the run page until it has succeeded.
    alice.click_role("button", "Run full import now");
    alice.wait_url_prefix(&format!("{base}/runs/"));
    alice.screenshot("alice-run-started");
    // The page follows the run and reloads when it is done.
    alice.step(json!({"op": "wait_text", "text": "succeeded", "timeout_ms": 60_000}));
    wait_eval(
        &mut alice,
        "document.querySelector('dd[data-field=status]')?.innerText ?? null",
        "succeeded",
        Duration::from_secs(10),
    );
    let added =
        alice.eval("document.querySelector('dd[data-field=\"counts.added\"]')?.innerText ?? null");
    assert_eq!(added, json!(PEOPLE.to_string()), "every person imported");
    let ran_on = alice.text();
    assert!(
        ran_on.contains(&format!("{a} at epoch {e}")),
        "the run ran on the active {a} at epoch {e}: {ran_on}"
    );
    alice.screenshot("alice-run-succeeded");

    // ---------------------------------------------------------------- planned switchover
    env.request_switchover().await;
    let st = wait_active(&env, "settled after the switchover", &s, e + 1).await;
    assert_eq!(
        st.last_transition.as_ref().map(|t| t["kind"].clone()),
        Some(json!("Switchover"))
    );
    assert_eq!(st.standby.as_deref(), Some(a.as_str()));
    env.wait_service_active(e + 1, WAIT).await;
    wait_admin_ui(&env, &s).await;
    overview_names(&mut alice, &base, &s, "alice-after-switchover");
    pause_and_resume(&mut alice, "alice-after-switchover");
    // The connector and its run are the cluster's, not a pod's.
    alice.goto(&format!("{base}{connector_path}"));
    alice.wait_text(&format!("Connector {CONNECTOR}"));
    alice.wait_text("succeeded");
    alice.screenshot("alice-connector-after-switchover");

    // ---------------------------------------------------------------- kill -9 of the active
    let killed = env
        .cluster
        .kill_pod_process(&env.ns, &s)
        .expect("kill the active's process");
    let st = wait_active(&env, "settled after the failover", &a, e + 2).await;
    assert_eq!(
        st.last_transition.as_ref().map(|t| t["kind"].clone()),
        Some(json!("Failover"))
    );
    for p in &killed {
        assert!(!pid_alive(*p), "killed process {p} is gone");
    }
    env.wait_service_active(e + 2, WAIT).await;
    wait_admin_ui(&env, &a).await;
    overview_names(&mut alice, &base, &a, "alice-after-failover");
    pause_and_resume(&mut alice, "alice-after-failover");
    let session = alice.fetch("/auth/session");
    assert_eq!(session.status, 200, "{}", session.body);
    assert_eq!(session.json["name"], "alice Operator", "{}", session.body);
    assert!(alice.close(), "the browser closed by itself");

    // ---------------------------------------------------------------- bob, a viewer
    let mut bob = Browser::launch(artifacts("bob")).expect("the browser");
    // He opens the connector's page: signed in, he is back on it.
    sign_in(&mut bob, &base, &kc_https, "bob", &connector_path);
    bob.wait_text(&format!("Connector {CONNECTOR}"));
    bob.screenshot("bob-back-on-the-connector");
    let session = bob.fetch("/auth/session");
    assert_eq!(session.status, 200, "{}", session.body);
    assert_eq!(
        session.json["permissions"],
        json!(VIEWER_PERMISSIONS),
        "{}",
        session.body
    );
    let csrf = session.json["csrf_token"]
        .as_str()
        .expect("a CSRF token")
        .to_string();
    bob.goto(&format!("{base}/"));
    wait_eval(&mut bob, ACTIVE_INSTANCE, &a, Duration::from_secs(10));
    bob.wait_text("Schedules are");
    bob.expect_no_text("Pause all schedules");
    // No invitation to register a relay either: that needs relays.manage.
    bob.wait_text("No relay is registered.");
    bob.expect_no_text("Register one");
    bob.screenshot("bob-overview");
    bob.goto(&format!("{base}/connectors"));
    bob.wait_text(CONNECTOR);
    bob.expect_no_text("New connector");
    bob.screenshot("bob-connectors");
    bob.goto(&format!("{base}{connector_path}"));
    bob.wait_text(&format!("Connector {CONNECTOR}"));
    bob.wait_text("You may look at this connector");
    for button in [
        "Test connection",
        "Run full import now",
        "Run delta import now",
        "Clear connector space",
    ] {
        bob.expect_no_text(button);
    }
    assert_eq!(
        bob.eval("document.querySelectorAll('button[data-api]').length"),
        json!(0),
        "no action button for a viewer"
    );
    bob.screenshot("bob-connector");
    // Forced through the page's own fetch, with his CSRF token: refused by the API.
    let forced = bob.fetch_with(json!({
        "url": format!("/api{connector_path}/test"), "method": "POST",
        "headers": {"x-csrf-token": csrf}
    }));
    assert_eq!(forced.status, 403, "{}", forced.body);
    assert!(
        forced.body.contains("connectors.write"),
        "the refusal names connectors.write: {}",
        forced.body
    );
    let forced = bob.fetch_with(json!({
        "url": format!("/api{connector_path}"), "method": "PUT",
        "headers": {"x-csrf-token": csrf},
        "body": {"name": "renamed-by-bob", "kind": "ldap", "config": config, "rules": rules("lower(mail)")}
    }));
    assert_eq!(forced.status, 403, "{}", forced.body);
    assert!(
        forced.body.contains("connectors.write"),
        "the refusal names connectors.write: {}",
        forced.body
    );
    bob.goto(&format!("{base}{connector_path}"));
    bob.expect_no_text("renamed-by-bob");
    bob.screenshot("bob-connector-unchanged");
    assert!(bob.close(), "the browser closed by itself");
    println!(
        "browser part took {:.1}s",
        t_browser.elapsed().as_secs_f64()
    );

    env.slices
        .assert_never_two("admin UI through switchover and failover");
    assert!(kc.stop(), "Keycloak did not stop on SIGTERM");
    drop(slapd);
    drop(env);
    println!("test took {:.1}s", t0.elapsed().as_secs_f64());
}

/// `s` with the characters a JavaScript regular expression treats specially escaped.
fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if r"\^$.|?*+()[]{}/".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

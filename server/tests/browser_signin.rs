//! Browser sign-in in a real browser (Debian's headless chromium through the test-support
//! harness): `/auth/login` sends chromium to Keycloak's login page, alice fills it in and
//! submits, Keycloak sends her back to `/auth/callback`, the server sets the session cookie and
//! `/auth/session` in the page names her and her permissions. Then the active server is killed
//! and another one, started with the same keyring.json, takes its port (the same origin, as
//! behind a Service): the same browser, without signing in again, still has its session there,
//! and a write with the session's CSRF token works. Bob, a viewer, signs in in a browser of his
//! own and has no `connectors.write`.
//!
//! The second test signs in with a directory account: Keycloak federates the tests' slapd
//! (LDAPS, users and their groups through the group mapper), and alice's password and groups
//! are the directory's.
//!
//! Screenshots of each step: `<target>/tmp/browser-artifacts/browser_signin/<who>/`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::oidc::{
    loopback_redirects, realm, start_keycloak, start_keycloak_with, start_server_on, Server, REALM,
};
use common::*;
use identitymesh_connectors::testing::{Slapd, GROUPS_BASE, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD};
use identitymesh_test_support::browser::Browser;
use identitymesh_test_support::keycloak::{GroupMapper, LdapFederation, Options};
use serde_json::json;

/// The groups' permissions here: admins may also edit connectors, viewers only read.
const ADMIN_PERMISSIONS: &[&str] = &[
    "dashboard.read",
    "connectors.write",
    "schedules.manage",
    "relays.manage",
];
const ROLES: &[(&str, &[&str])] = &[
    ("im-admins", ADMIN_PERMISSIONS),
    ("im-viewers", &["dashboard.read"]),
];

fn artifacts(who: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-artifacts")
        .join("browser_signin")
        .join(who)
}

/// Signs `user` in through Keycloak's login page in `b`: from `/auth/login` to the server's
/// landing page after the callback. Screenshots on the way, prefixed with the user.
fn sign_in(b: &mut Browser, server: &Server, kc_base: &str, user: &str) {
    sign_in_with(b, server, kc_base, user, &format!("{user}-pw"));
}

fn sign_in_with(b: &mut Browser, server: &Server, kc_base: &str, user: &str, password: &str) {
    let login = b.goto(&format!("{}/auth/login", server.base));
    // The server redirected to the provider: Keycloak's own login page.
    let at = login["url"].as_str().unwrap();
    assert!(
        at.starts_with(&format!(
            "{kc_base}/realms/im/protocol/openid-connect/auth?"
        )),
        "{login}"
    );
    assert!(at.contains("code_challenge_method=S256"), "PKCE: {at}");
    b.wait_text("Sign in to your account");
    b.screenshot(&format!("{user}-keycloak-login"));
    b.fill_label("Username or email", user);
    b.fill_label("Password", password);
    b.screenshot(&format!("{user}-login-filled"));
    let landed = b.click_role("button", "Sign In");
    // Back on the server (the callback answered 303 to /).
    assert_eq!(landed, format!("{}/", server.base), "after the sign-in");
    b.screenshot(&format!("{user}-back-on-server"));
}

#[tokio::test]
async fn sign_in_in_chromium_and_the_session_survives_a_failover() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let (mut kc, issuer) = start_keycloak(&tmp.path().join("keycloak")).await;
    let kc_base = kc.base_url();
    println!("keycloak up after {:?}", t0.elapsed());
    let port = free_port();
    let mut a = start_server_on(&tmp.path().join("a"), &issuer, port, None, ROLES).await;

    let t_browser = Instant::now();
    let mut alice = Browser::launch(artifacts("alice")).expect("the browser");
    sign_in(&mut alice, &a, &kc_base, "alice");

    // The session cookie is the server's, HttpOnly and Secure: the page's script cannot read it.
    let cookies = alice.cookies(&[&a.base]);
    let session = cookies
        .iter()
        .find(|c| c["name"] == "im_session")
        .unwrap_or_else(|| panic!("no session cookie: {cookies:?}"));
    assert_eq!(session["httpOnly"], true, "{session}");
    assert_eq!(session["secure"], true, "{session}");
    assert_eq!(session["sameSite"], "Lax", "{session}");
    assert!(
        !cookies.iter().any(|c| c["name"] == "im_login"),
        "the sign-in cookie is cleared: {cookies:?}"
    );
    let script_sees = alice.eval("document.cookie");
    assert!(
        !script_sees.as_str().unwrap_or("").contains("im_session"),
        "{script_sees}"
    );

    // The session, as the page's own fetch sees it.
    let s = alice.fetch("/auth/session");
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.json["name"], "alice Operator", "{}", s.body);
    assert_eq!(
        s.json["permissions"],
        json!(ADMIN_PERMISSIONS),
        "{}",
        s.body
    );
    let csrf = s.json["csrf_token"].as_str().unwrap().to_string();
    // And as a page: what a person who opens it sees.
    alice.goto(&format!("{}/auth/session", a.base));
    alice.wait_text("alice Operator");
    alice.wait_text("connectors.write");
    alice.screenshot("alice-session-on-a");
    // A write with the session's CSRF token (and not without it).
    let w = alice.fetch_with(json!({"url": "/api/sync/pause", "method": "POST"}));
    assert_eq!(w.status, 403, "{}", w.body);
    let w = alice.fetch_with(json!({
        "url": "/api/sync/pause", "method": "POST", "headers": {"x-csrf-token": csrf}
    }));
    assert_eq!(w.status, 200, "{}", w.body);

    // Failover: the active server dies; another with the same keyring.json takes its port.
    let ring = a.dir.join("data/keyring.json");
    assert!(ring.is_file(), "the first server's key ring");
    a.proc.signal(libc::SIGKILL);
    a.proc.wait(Duration::from_secs(10));
    let b = start_server_on(&tmp.path().join("b"), &issuer, port, Some(&ring), ROLES).await;
    // Same browser, same cookie, no sign-in: the session is there.
    let s = alice.fetch("/auth/session");
    assert_eq!(s.status, 200, "{}; {}", s.body, b.proc.output());
    assert_eq!(s.json["name"], "alice Operator", "{}", s.body);
    assert_eq!(s.json["csrf_token"], csrf.as_str(), "{}", s.body);
    alice.goto(&format!("{}/auth/session", b.base));
    alice.wait_text("alice Operator");
    alice.screenshot("alice-session-on-b-after-failover");
    let w = alice.fetch_with(json!({
        "url": "/api/sync/resume", "method": "POST", "headers": {"x-csrf-token": csrf}
    }));
    assert_eq!(w.status, 200, "{}", w.body);
    let log = log_text(&b.dir.join("data"));
    assert!(
        !log.contains("session cookie refused"),
        "the second server opened the cookie: {log}"
    );
    assert!(alice.close(), "the browser closed by itself");

    // A viewer in a browser of his own: signed in, no connectors.write.
    let mut bob = Browser::launch(artifacts("bob")).expect("the browser");
    sign_in(&mut bob, &b, &kc_base, "bob");
    let s = bob.fetch("/auth/session");
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(
        s.json["permissions"],
        json!(["dashboard.read"]),
        "{}",
        s.body
    );
    bob.goto(&format!("{}/auth/session", b.base));
    bob.wait_text("bob Operator");
    bob.expect_no_text("connectors.write");
    bob.screenshot("bob-session");
    let bob_csrf = s.json["csrf_token"].as_str().unwrap();
    let w = bob.fetch_with(json!({
        "url": "/api/sync/pause", "method": "POST", "headers": {"x-csrf-token": bob_csrf}
    }));
    assert_eq!(w.status, 403, "{}", w.body);
    // Sign-out from the UI ends the session here and at the provider, and comes back to the
    // sign-in page; signing in again asks for the password again.
    bob.goto(&format!("{}/", b.base));
    bob.wait_text("Schedules are");
    bob.click_role("button", "Sign out");
    bob.wait_text("Do you want to log out?");
    bob.screenshot("bob-keycloak-logout");
    bob.click_role("button", "Logout");
    let back = bob.wait_url_prefix(&format!("{}/signin", b.base));
    assert_eq!(back, format!("{}/signin", b.base));
    bob.screenshot("bob-signed-out");
    let s = bob.fetch("/auth/session");
    assert_eq!(s.status, 401, "{}", s.body);
    let again = bob.goto(&format!("{}/auth/login", b.base));
    assert!(
        again["url"].as_str().unwrap().starts_with(&kc_base),
        "{again}"
    );
    bob.wait_text("Sign in to your account");
    assert!(bob.close(), "the browser closed by itself");
    println!("browser part took {:?}", t_browser.elapsed());

    let mut b = b;
    b.proc.terminate(Duration::from_secs(30));
    assert!(kc.stop(), "Keycloak did not stop on SIGTERM");
    println!("test took {:?}", t0.elapsed());
}

/// The directory: alice in cn=im-admins, her password only in slapd.
fn directory_ldif() -> String {
    format!(
        "dn: dc=example,dc=org
objectClass: top
objectClass: dcObject
objectClass: organization
dc: example
o: Example Org

dn: {PEOPLE_BASE}
objectClass: organizationalUnit
ou: people

dn: {GROUPS_BASE}
objectClass: organizationalUnit
ou: groups

dn: uid=alice,{PEOPLE_BASE}
objectClass: top
objectClass: person
objectClass: organizationalPerson
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: Directory
mail: alice@example.org
userPassword: alice-directory-pw

dn: cn=im-admins,{GROUPS_BASE}
objectClass: groupOfNames
cn: im-admins
member: uid=alice,{PEOPLE_BASE}

"
    )
}

#[tokio::test]
async fn sign_in_with_a_directory_account_federated_from_slapd() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let slapd = Slapd::launch(&tmp.path().join("slapd"), Some(&directory_ldif()))
        .await
        .expect("starting slapd");
    let ca = tmp.path().join("directory-ca.pem");
    std::fs::write(&ca, slapd.ca_pem()).unwrap();
    // The realm without local users or groups: both come from the directory.
    let mut rep = realm(&loopback_redirects());
    let o = rep.as_object_mut().unwrap();
    o.remove("users");
    o.remove("groups");
    let options = Options {
        trusted_ca_files: vec![ca],
        ..Options::default()
    };
    let (mut kc, issuer) = start_keycloak_with(&tmp.path().join("keycloak"), options, &rep).await;
    let admin = kc.admin().unwrap();
    let provider = admin
        .add_ldap_federation(
            REALM,
            &LdapFederation::openldap(slapd.ldaps_url(), ROOT_DN, ROOT_PASSWORD, PEOPLE_BASE),
        )
        .await
        .unwrap();
    admin
        .add_group_mapper(REALM, &provider, &GroupMapper::group_of_names(GROUPS_BASE))
        .await
        .unwrap();
    let synced = admin.sync_users(REALM, &provider, true).await.unwrap();
    assert_eq!((synced.added, synced.failed), (1, 0), "{synced:?}");
    let found = admin
        .get_json(&format!("/realms/{REALM}/users?username=alice&exact=true"))
        .await
        .unwrap();
    assert_eq!(found[0]["federationLink"], provider.as_str(), "{found}");
    println!("slapd and keycloak up after {:?}", t0.elapsed());

    let server = start_server_on(&tmp.path().join("a"), &issuer, free_port(), None, ROLES).await;
    let kc_base = kc.base_url();
    let mut b = Browser::launch(artifacts("directory-alice")).expect("the browser");
    // A wrong password is refused by the directory's bind, on Keycloak's page.
    b.goto(&format!("{}/auth/login", server.base));
    b.wait_text("Sign in to your account");
    b.fill_label("Username or email", "alice");
    b.fill_label("Password", "alice-pw");
    b.click_role("button", "Sign In");
    b.wait_text("Invalid username or password.");
    b.screenshot("directory-alice-wrong-password");
    // The directory's password signs her in; her permissions come from the directory group.
    sign_in_with(&mut b, &server, &kc_base, "alice", "alice-directory-pw");
    let s = b.fetch("/auth/session");
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.json["name"], "Alice Directory", "{}", s.body);
    assert_eq!(
        s.json["permissions"],
        json!(ADMIN_PERMISSIONS),
        "{}",
        s.body
    );
    b.goto(&format!("{}/auth/session", server.base));
    b.wait_text("Alice Directory");
    b.screenshot("directory-alice-session");
    assert!(b.close(), "the browser closed by itself");

    let mut server = server;
    server.proc.terminate(Duration::from_secs(30));
    assert!(kc.stop(), "Keycloak did not stop on SIGTERM");
    drop(slapd);
    println!("test took {:?}", t0.elapsed());
}

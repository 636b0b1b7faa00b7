//! Browser sign-in against a real Keycloak: the realm (the UI client `identitymesh-ui`, alice
//! in im-admins and bob in im-viewers, passwords `<name>-pw`), Keycloak started from the
//! test-support fixture with that realm, and standalone servers configured for it. Used by
//! oidc_keycloak.rs (reqwest as the browser) and browser_signin.rs (chromium).

use std::path::{Path, PathBuf};

use identitymesh_test_support::keycloak::{Distribution, Keycloak, Options};
use serde_json::json;

use super::{free_port, insecure_client, wait_up, Proc};

pub const REALM: &str = "im";
pub const CLIENT: &str = "identitymesh-ui";
pub const CLIENT_SECRET: &str = "ui-client-secret-7d1f";

/// The groups' permissions oidc_keycloak.rs checks: (group, permissions).
pub const ROLE_PERMISSIONS: &[(&str, &[&str])] = &[
    (
        "im-admins",
        &["dashboard.read", "schedules.manage", "relays.manage"],
    ),
    ("im-viewers", &["dashboard.read"]),
];

/// The realm: groups im-admins and im-viewers, users alice (admin) and bob (viewer) with
/// password `<name>-pw`, and the confidential UI client (code flow with S256 PKCE, a groups
/// claim) allowed to redirect to `redirects`.
pub fn realm(redirects: &[String]) -> serde_json::Value {
    use identitymesh_test_support::keycloak::realm::{ui_client, user};
    let groups = json!([{
        "name": "groups",
        "protocol": "openid-connect",
        "protocolMapper": "oidc-group-membership-mapper",
        "config": {"claim.name": "groups", "full.path": "false", "id.token.claim": "true",
                   "access.token.claim": "true", "userinfo.token.claim": "true"}
    }]);
    json!({
        "realm": REALM,
        "enabled": true,
        "groups": [{"name": "im-admins"}, {"name": "im-viewers"}],
        "users": [user("alice", "im-admins"), user("bob", "im-viewers")],
        "clients": [ui_client(CLIENT, CLIENT_SECRET, redirects, groups)]
    })
}

/// Redirects the realm's client allows: any loopback HTTPS port (the servers pick free ports).
pub fn loopback_redirects() -> Vec<String> {
    vec![
        "https://127.0.0.1:*".to_string(),
        "https://127.0.0.1/*".to_string(),
    ]
}

/// Keycloak from the fixture (the distribution fetched once and cached) under `dir`, with
/// [`realm`] imported for [`loopback_redirects`]; and the realm's issuer URL.
pub async fn start_keycloak(dir: &Path) -> (Keycloak, String) {
    start_keycloak_with(dir, Options::default(), &realm(&loopback_redirects())).await
}

/// Keycloak started with `options`, with `realm` (a representation named [`REALM`]) imported.
pub async fn start_keycloak_with(
    dir: &Path,
    options: Options,
    realm: &serde_json::Value,
) -> (Keycloak, String) {
    let dist = Distribution::ensure().expect("fetching Keycloak");
    let kc = Keycloak::start(&dist, dir, options)
        .await
        .expect("starting Keycloak");
    kc.admin().unwrap().import_realm(realm).await.unwrap();
    let issuer = format!("{}/realms/{REALM}", kc.base_url());
    (kc, issuer)
}

/// The server's config: the realm as issuer, the UI client, groups mapped to permissions.
pub fn server_toml(
    dir: &Path,
    issuer: &str,
    port: u16,
    keyring: Option<&Path>,
    roles: &[(&str, &[&str])],
) -> PathBuf {
    let secret = dir.join("client-secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    let keyring = keyring
        .map(|k| format!("[keyring]\nfile = \"{}\"\n", k.display()))
        .unwrap_or_default();
    let roles: String = roles
        .iter()
        .map(|(group, perms)| format!("{group:?} = {perms:?}\n"))
        .collect();
    let text = format!(
        r#"{keyring}
[auth.oidc]
issuer = "{issuer}"
audience = "identitymesh"
client_id = "{CLIENT}"
client_secret_file = "{secret}"
redirect_url = "https://127.0.0.1:{port}/auth/callback"
roles_claim = "groups"
[auth.oidc.role_permissions]
{roles}"#,
        secret = secret.display()
    );
    let f = dir.join("server.toml");
    std::fs::write(&f, text).unwrap();
    f
}

/// A standalone server signed in through the realm; its data (and generated keyring.json) in
/// `<dir>/data`.
pub struct Server {
    pub proc: Proc,
    pub base: String,
    pub port: u16,
    pub dir: PathBuf,
}

/// A standalone server on a free port with [`ROLE_PERMISSIONS`], using `keyring` (otherwise
/// the one it generates in its data folder).
pub async fn start_server(dir: &Path, issuer: &str, keyring: Option<&Path>) -> Server {
    start_server_on(dir, issuer, free_port(), keyring, ROLE_PERMISSIONS).await
}

/// A standalone server on `port` (e.g. the port of one that was stopped: the same origin for
/// the browser, as behind a Service) with these group permissions.
pub async fn start_server_on(
    dir: &Path,
    issuer: &str,
    port: u16,
    keyring: Option<&Path>,
    roles: &[(&str, &[&str])],
) -> Server {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = server_toml(dir, issuer, port, keyring, roles);
    let data = dir.join("data");
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "standalone",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        &listen,
        "--config",
        cfg.to_str().unwrap(),
    ];
    let proc = Proc::spawn(&args, &[], dir);
    let base = format!("https://127.0.0.1:{port}");
    wait_up(&insecure_client(), &format!("{base}/health/live"), &proc).await;
    Server {
        proc,
        base,
        port,
        dir: dir.to_path_buf(),
    }
}

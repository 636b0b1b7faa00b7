//! Pieces of a realm to import (`Admin::import_realm` and friends take the JSON Keycloak's
//! export format uses): a test user with a password, and a confidential client for a web UI.

use serde_json::{json, Value};

/// A user `name` in group `group`, password `<name>-pw`, e-mail verified, nothing left to do
/// at first sign-in.
pub fn user(name: &str, group: &str) -> Value {
    json!({
        "username": name, "enabled": true, "emailVerified": true,
        "firstName": name, "lastName": "Operator", "email": format!("{name}@example.org"),
        "groups": [format!("/{group}")], "requiredActions": [],
        "credentials": [{"type": "password", "value": format!("{name}-pw"), "temporary": false}]
    })
}

/// A confidential client for the authorization code flow with S256 PKCE enforced, `redirects`
/// as its valid redirect URIs, and `mappers` as its protocol mappers.
pub fn ui_client(id: &str, secret: &str, redirects: &[String], mappers: Value) -> Value {
    json!({
        "clientId": id,
        "enabled": true,
        "publicClient": false,
        "clientAuthenticatorType": "client-secret",
        "secret": secret,
        "standardFlowEnabled": true,
        "directAccessGrantsEnabled": false,
        "redirectUris": redirects,
        // Sign-out at Keycloak may come back to any loopback server (the tests' ports vary).
        "attributes": {"pkce.code.challenge.method": "S256",
                       "post.logout.redirect.uris": "https://127.0.0.1:*"},
        "protocolMappers": mappers,
    })
}

//! The sign-in page: at the identity provider when one is configured, otherwise with the
//! bootstrap admin token of a standalone server.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::Response;
use maud::html;
use serde::Deserialize;

use crate::ui::layout;
use crate::ui::{redirect, Ctx, Ui};

#[derive(Deserialize)]
pub struct Next {
    next: Option<String>,
}

/// Where to go after signing in: a path on this server only (never another site).
pub fn local_path(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

/// The way to the provider, carrying the page that sent the browser here (`/auth/login` keeps
/// it in the sealed sign-in cookie and the callback leads back to it).
fn provider_link(next: &str) -> String {
    if next == "/" {
        "/auth/login".into()
    } else {
        format!("/auth/login?next={}", crate::ui::enc(next))
    }
}

pub async fn page(
    State(ui): State<Arc<Ui>>,
    signed_in: Result<Ctx, Response>,
    q: Result<Query<Next>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let next = q.ok().and_then(|Query(n)| n.next);
    let next = local_path(next.as_deref()).to_string();
    match signed_in {
        Ok(ctx) => return ctx.finish(redirect(&next)),
        // A standby's page, a refused cookie's notice, a server without sessions: as it is.
        Err(res) if res.status() != axum::http::StatusCode::SEE_OTHER => return res,
        Err(_) => {}
    }
    render(&ui, &next, None)
}

/// The sign-in page; `notice` says why the browser is signed out (a refused session cookie).
pub fn render(ui: &Ui, next: &str, notice: Option<&str>) -> Response {
    let form = if ui.app.auth.oidc_sign_in() {
        html! {
            p { "Sign in with your organisation's account." }
            p { a.button href=(provider_link(next)) data-testid="signin-provider" { "Sign in with the identity provider" } }
        }
    } else {
        html! {
            p { "This standalone server has no identity provider configured. Sign in with the bootstrap admin token: "
                "the server wrote it to " code { "admin.token" } " in its data folder at first start." }
            form data-signin=(next) {
                div.field {
                    label for="t-token" { "Bootstrap admin token" }
                    input id="t-token" type="password" name="token" required autocomplete="off";
                }
                div.actions { button type="submit" { "Sign in" } }
                (layout::outcome())
            }
        }
    };
    let body = html! {
        @if let Some(why) = notice {
            section.refusal role="alert" { p { "You are signed out: " (why) "." } }
        }
        (form)
    };
    match notice {
        None => layout::bare("Sign in", body),
        Some(_) => layout::bare_with_status(axum::http::StatusCode::UNAUTHORIZED, "Sign in", body),
    }
}

#[cfg(test)]
mod tests {
    use super::{local_path, provider_link};

    #[test]
    fn the_provider_link_carries_the_page_to_come_back_to() {
        assert_eq!(provider_link("/"), "/auth/login");
        assert_eq!(
            provider_link("/connectors/c1?x=1&y=2"),
            "/auth/login?next=%2Fconnectors%2Fc1%3Fx%3D1%26y%3D2"
        );
    }

    #[test]
    fn only_local_paths_are_followed_after_sign_in() {
        assert_eq!(local_path(Some("/connectors?x=1")), "/connectors?x=1");
        for bad in [
            "https://evil.example/",
            "//evil.example/",
            "/\\evil",
            "connectors",
            "",
        ] {
            assert_eq!(local_path(Some(bad)), "/", "{bad}");
        }
        assert_eq!(local_path(None), "/");
    }
}

//! The page shell (navigation, who is signed in, sign-out) and small rendering helpers.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};
use serde_json::Value;

use super::{Ctx, Refusal};
use crate::auth::Permission;
use crate::store::InstanceRow;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The navigation's sections, each shown to those who may read it.
const SECTIONS: &[(&str, &str, Option<Permission>)] = &[
    ("/", "Overview", None),
    ("/connectors", "Connectors", None),
    ("/runs", "Runs", None),
    ("/schedules", "Schedules", None),
    ("/identities", "Identities", None),
    ("/relays", "Relays", None),
    ("/audit", "Audit log", Some(Permission::AuditRead)),
    ("/secrets", "Secrets", Some(Permission::SecretsWrite)),
];

fn head(title: &str, csrf: Option<&str>) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            @if let Some(t) = csrf { meta name="csrf-token" content=(t); }
            title { (title) " · IdentityMesh" }
            // No icon: a browser would otherwise ask for /favicon.ico on every page.
            link rel="icon" href="data:,";
            link rel="stylesheet" href={ "/assets/app.css?v=" (VERSION) };
            script src={ "/assets/app.js?v=" (VERSION) } defer {}
        }
    }
}

/// A page of the signed-in UI: `section` is the navigation entry it belongs to.
pub fn page(ctx: &Ctx, section: &str, title: &str, body: Markup) -> Response {
    page_with_status(ctx, StatusCode::OK, section, title, body)
}

pub fn page_with_status(
    ctx: &Ctx,
    status: StatusCode,
    section: &str,
    title: &str,
    body: Markup,
) -> Response {
    let s = &ctx.session;
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, Some(&s.csrf)))
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/" { "IdentityMesh" }
                    nav aria-label="Sections" {
                        ul {
                            @for (href, label, need) in SECTIONS {
                                @if need.is_none_or(|p| s.may(p)) {
                                    li {
                                        a href=(href) aria-current=[(*href == section).then_some("page")] { (label) }
                                    }
                                }
                            }
                        }
                    }
                    div.who {
                        span title=(s.subject) { (if s.name.is_empty() { &s.subject } else { &s.name }) }
                        button.link type="button" data-signout { "Sign out" }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    ctx.finish((status, Html(markup.into_string())).into_response())
}

/// A page for a read the API refused.
pub fn refused(ctx: &Ctx, section: &str, title: &str, r: Refusal) -> Response {
    if matches!(r, Refusal::SignIn(_)) {
        let to = format!("/signin?next={}", super::enc(&ctx.here));
        return ctx.finish(super::redirect(&to));
    }
    page_with_status(ctx, r.status(), section, title, r.markup())
}

/// A page outside the signed-in shell (sign-in, refusals, a standby).
pub fn bare(title: &str, body: Markup) -> Response {
    bare_with_status(StatusCode::OK, title, body)
}

pub fn bare_with_status(status: StatusCode, title: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, None))
            body.bare {
                main id="main" {
                    p.brand { "IdentityMesh" }
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    (status, Html(markup.into_string())).into_response()
}

/// What a standby (or fenced) instance shows for every page.
pub fn standby(role: &str, active: Option<&InstanceRow>) -> Response {
    let body = html! {
        section.refusal role="status" {
            p { "This instance is " strong { (role) } "; the Admin UI is served by the active instance." }
            @match active {
                Some(a) => p { "The active instance is " strong { (a.instance) } " on " (a.host)
                    " (epoch " (a.epoch) ", version " (a.version) "). Open the UI through the Service's address." },
                None => p { "No instance is active right now; a failover may be in progress. Try again in a few seconds." },
            }
        }
    };
    bare("Not the active instance", body)
}

/// A JSON value as display text (strings without quotes, null as a dash).
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An attribute's values: a list for a multi-valued one, the text for one value.
pub fn values(v: &Value) -> Markup {
    match v.as_array() {
        Some(a) if a.len() == 1 => html! { (text(&a[0])) },
        Some(a) => html! { ul.values { @for x in a { li { (text(x)) } } } },
        None => html! { (text(v)) },
    }
}

/// An RFC 3339 timestamp as a `<time>` element, shown in UTC to the second.
pub fn when(v: &Value) -> Markup {
    match v.as_str() {
        Some(t) if !t.is_empty() => {
            let shown = chrono::DateTime::parse_from_rfc3339(t)
                .map(|d| {
                    d.with_timezone(&chrono::Utc)
                        .format("%Y-%m-%d %H:%M:%S UTC")
                        .to_string()
                })
                .unwrap_or_else(|_| t.to_string());
            html! { time datetime=(t) { (shown) } }
        }
        _ => html! { "—" },
    }
}

/// A status word as a badge whose class names it (for colour; the word carries the meaning).
pub fn badge(word: &str) -> Markup {
    let class = word.to_ascii_lowercase();
    html! { span class={ "badge " (class) } { (word) } }
}

/// A pre-rendered JSON document, pretty-printed.
pub fn json_block(v: &Value) -> Markup {
    let s = serde_json::to_string_pretty(v).unwrap_or_default();
    html! { pre.json { (s) } }
}

/// The box a form's or button's API answer is shown in (problems with their field paths).
pub fn outcome() -> Markup {
    html! { div.outcome role="status" aria-live="polite" {} }
}

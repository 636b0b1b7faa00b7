//! The audit log, filtered by actor, action and time.

use axum::extract::Query;
use axum::response::Response;
use maud::html;
use serde::Deserialize;

use crate::ui::layout::{self, text};
use crate::ui::{enc, Ctx};

#[derive(Deserialize, Default)]
pub struct Filter {
    actor: Option<String>,
    action: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

pub async fn page(
    ctx: Ctx,
    q: Result<Query<Filter>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let f = q.map(|Query(f)| f).unwrap_or_default();
    let mut path = "/api/audit?limit=200".to_string();
    for (k, v) in [
        ("actor", &f.actor),
        ("action", &f.action),
        ("since", &f.since),
        ("until", &f.until),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            path.push_str(&format!("&{k}={}", enc(v)));
        }
    }
    let filter = html! {
        form.search method="get" action="/audit" role="search" aria-label="Filter the audit log" {
            label for="a-actor" { "Actor" }
            input id="a-actor" name="actor" value=[f.actor.as_deref()];
            label for="a-action" { "Action" }
            input id="a-action" name="action" value=[f.action.as_deref()] placeholder="connector. or promote";
            label for="a-since" { "Since" }
            input id="a-since" name="since" value=[f.since.as_deref()] placeholder="2026-12-01T00:00:00Z";
            label for="a-until" { "Until" }
            input id="a-until" name="until" value=[f.until.as_deref()] placeholder="RFC 3339";
            button type="submit" { "Filter" }
        }
    };
    let rows = match ctx.get(&path).await {
        Ok(v) => v,
        Err(r) => {
            let body = html! { (filter) (r.markup()) };
            if matches!(r, crate::ui::Refusal::SignIn(_)) {
                return layout::refused(&ctx, "/audit", "Audit log", r);
            }
            return layout::page_with_status(&ctx, r.status(), "/audit", "Audit log", body);
        }
    };
    let rows = rows.as_array().cloned().unwrap_or_default();
    let body = html! {
        (filter)
        @if rows.is_empty() {
            p.empty { "No entry matches." }
        } @else {
            table {
                thead { tr { th scope="col" { "When" } th scope="col" { "Actor" } th scope="col" { "Action" }
                    th scope="col" { "Target" } th scope="col" { "Detail" } } }
                tbody {
                    @for e in &rows {
                        tr {
                            td { (at(&e["at_ms"])) }
                            td { (text(&e["actor"])) }
                            td { code { (text(&e["action"])) } }
                            td { (text(&e["target"])) }
                            td.detail { (text(&e["detail"])) }
                        }
                    }
                }
            }
        }
    };
    layout::page(&ctx, "/audit", "Audit log", body)
}

/// The entry's time: milliseconds since the epoch in the API's answer.
fn at(v: &serde_json::Value) -> maud::Markup {
    let t = v
        .as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|d| d.to_rfc3339())
        .map(serde_json::Value::String)
        .unwrap_or_default();
    layout::when(&t)
}

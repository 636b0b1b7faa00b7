//! Run history, and one run with its counts and per-object errors (watched live while it runs).

use std::collections::BTreeMap;

use axum::extract::{Path, Query};
use axum::response::Response;
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::connector_link;
use crate::ui::layout::{self, badge, text, when};
use crate::ui::{enc, Ctx};

const COUNTS: [&str; 5] = ["added", "updated", "unchanged", "deleted", "failed"];

#[derive(Deserialize)]
pub struct RunsQuery {
    connector: Option<String>,
}

pub async fn list(
    ctx: Ctx,
    q: Result<Query<RunsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let connector = q
        .ok()
        .and_then(|Query(q)| q.connector)
        .filter(|c| !c.is_empty());
    let path = match &connector {
        Some(c) => format!("/api/runs?limit=200&connector={}", enc(c)),
        None => "/api/runs?limit=200".into(),
    };
    let runs = match ctx.get(&path).await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/runs", "Runs", r),
    };
    let names = ctx.connector_names().await.unwrap_or_default();
    let body = html! {
        @if let Some(c) = &connector {
            p { "Runs of " (connector_link(&names, c)) ". " a href="/runs" { "All runs" } }
        }
        (table(&names, runs.as_array().map(Vec::as_slice).unwrap_or_default()))
    };
    layout::page(&ctx, "/runs", "Runs", body)
}

/// A table of runs, newest first, each linking to its page.
pub fn table(names: &BTreeMap<String, String>, runs: &[Value]) -> Markup {
    html! {
        @if runs.is_empty() {
            p.empty { "No run yet." }
        } @else {
            table {
                thead { tr {
                    th scope="col" { "Started" } th scope="col" { "Connector" } th scope="col" { "Mode" }
                    th scope="col" { "Trigger" } th scope="col" { "Status" }
                    @for c in COUNTS { th scope="col" { (c) } }
                } }
                tbody {
                    @for r in runs {
                        tr {
                            td { a href={ "/runs/" (enc(r["id"].as_str().unwrap_or_default())) } { (when(&r["started_at"])) } }
                            td { (connector_link(names, r["connector_id"].as_str().unwrap_or_default())) }
                            td { (text(&r["mode"])) }
                            td { (text(&r["trigger"])) }
                            td { (badge(r["status"].as_str().unwrap_or("unknown"))) }
                            @for c in COUNTS { td.num { (text(&r["counts"][c])) } }
                        }
                    }
                }
            }
        }
    }
}

/// A run in progress as a table row whose counts `app.js` refreshes until it finishes.
pub fn live_row(names: &BTreeMap<String, String>, r: &Value) -> Markup {
    let id = r["id"].as_str().unwrap_or_default();
    html! {
        tr data-watch-run=(id) {
            td { (connector_link(names, r["connector_id"].as_str().unwrap_or_default())) }
            td { (text(&r["mode"])) }
            td { a href={ "/runs/" (enc(id)) } { (when(&r["started_at"])) } }
            @for c in COUNTS { td.num data-field={ "counts." (c) } { (text(&r["counts"][c])) } }
            td data-field="status" { (text(&r["status"])) }
        }
    }
}

pub async fn one(ctx: Ctx, Path(id): Path<String>) -> Response {
    let r = match ctx.get(&format!("/api/runs/{}", enc(&id))).await {
        Ok(v) => v,
        Err(e) => return layout::refused(&ctx, "/runs", "Run", e),
    };
    let names = ctx.connector_names().await.unwrap_or_default();
    let running = r["status"] == "running";
    let errors = r["errors"].as_array().cloned().unwrap_or_default();
    let body = html! {
        dl.facts data-watch-run=[running.then_some(id.as_str())] data-reload-when-done {
            dt { "Connector" } dd { (connector_link(&names, r["connector_id"].as_str().unwrap_or_default())) }
            dt { "Status" } dd data-field="status" { (badge(r["status"].as_str().unwrap_or("unknown"))) }
            dt { "Mode" } dd { (text(&r["mode"])) " (" (text(&r["trigger"])) ")" }
            dt { "Instance" } dd { (text(&r["instance"])) " at epoch " (text(&r["epoch"])) }
            dt { "Started" } dd { (when(&r["started_at"])) }
            dt { "Finished" } dd { (when(&r["finished_at"])) }
            @for c in COUNTS { dt { (c) } dd data-field={ "counts." (c) } { (text(&r["counts"][c])) } }
        }
        @if let Some(e) = r["error"].as_str() {
            section.refusal role="alert" { h2 { "The run failed" } p { (e) } }
        }
        section aria-labelledby="h-errors" {
            h2 id="h-errors" { "Objects that failed (" (errors.len()) ")" }
            @if errors.is_empty() {
                p.empty { "None." }
            } @else {
                table {
                    thead { tr { th scope="col" { "Where" } th scope="col" { "Why" } } }
                    tbody {
                        @for e in &errors {
                            tr { td { code { (text(&e["location"])) } } td { (text(&e["reason"])) } }
                        }
                    }
                }
            }
        }
    };
    layout::page(&ctx, "/runs", "Run", body)
}

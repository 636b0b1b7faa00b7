//! Overview: the instances and their roles, the last cutover, relays, whether the engine is
//! paused, and the runs in progress with live counts.

use axum::response::Response;
use maud::{html, Markup};
use serde_json::Value;

use crate::auth::Permission;
use crate::ui::layout::{self, badge, text, when};
use crate::ui::Ctx;

pub async fn page(ctx: Ctx) -> Response {
    let instances = ctx.get("/api/instances").await;
    let sync = ctx.get("/api/sync").await;
    let relays = ctx.get("/api/relays").await;
    let names = ctx.connector_names().await.unwrap_or_default();
    let mut running = Vec::new();
    if let Ok(s) = &sync {
        for r in s["running"].as_array().into_iter().flatten() {
            if let Some(id) = r["run_id"].as_str() {
                if let Ok(run) = ctx.get(&format!("/api/runs/{}", crate::ui::enc(id))).await {
                    running.push(run);
                }
            }
        }
    }
    let body = html! {
        section aria-labelledby="h-instances" {
            h2 id="h-instances" { "Instances" }
            @match &instances {
                Ok(v) => (instances_table(v)),
                Err(r) => (r.markup()),
            }
        }
        section aria-labelledby="h-sync" {
            h2 id="h-sync" { "Sync engine" }
            @match &sync {
                Ok(s) => (sync_state(&ctx, s)),
                Err(r) => (r.markup()),
            }
        }
        section aria-labelledby="h-running" {
            h2 id="h-running" { "Runs in progress" }
            @if running.is_empty() {
                p.empty { "No run is in progress." }
            } @else {
                table {
                    thead { tr { th scope="col" { "Connector" } th scope="col" { "Mode" } th scope="col" { "Started" }
                        th scope="col" { "Added" } th scope="col" { "Updated" } th scope="col" { "Unchanged" }
                        th scope="col" { "Deleted" } th scope="col" { "Failed" } th scope="col" { "Status" } } }
                    tbody {
                        @for r in &running {
                            (super::runs::live_row(&names, r))
                        }
                    }
                }
            }
        }
        section aria-labelledby="h-relays" {
            h2 id="h-relays" { "Relays" }
            @match &relays {
                Ok(v) => (relay_summary(&ctx, v)),
                Err(r) => (r.markup()),
            }
        }
    };
    layout::page(&ctx, "/", "Overview", body)
}

fn instances_table(v: &Value) -> Markup {
    let rows = v.as_array().cloned().unwrap_or_default();
    let active = rows.iter().find(|r| r["role"] == "active");
    html! {
        @match active {
            Some(a) => p.lead { "Active: " strong data-testid="active-instance" { (text(&a["instance"])) }
                " at epoch " strong { (text(&a["epoch"])) } " (the epoch moves on at every cutover)." },
            None => p.lead.warn { "No instance is active." },
        }
        table {
            thead { tr {
                th scope="col" { "Instance" } th scope="col" { "Host" } th scope="col" { "Role" }
                th scope="col" { "Epoch" } th scope="col" { "Version" } th scope="col" { "Started" }
                th scope="col" { "Last heartbeat" }
            } }
            tbody {
                @for r in &rows {
                    tr {
                        td { (text(&r["instance"])) }
                        td { (text(&r["host"])) }
                        td { (badge(r["role"].as_str().unwrap_or("unknown"))) }
                        td { (text(&r["epoch"])) }
                        td { (text(&r["version"])) }
                        td { (when(&r["started_at"])) }
                        td { (when(&r["last_heartbeat"])) }
                    }
                }
            }
        }
    }
}

fn sync_state(ctx: &Ctx, s: &Value) -> Markup {
    let paused = s["paused"].as_bool().unwrap_or(false);
    let last = &s["last_cutover"];
    html! {
        @if last.is_object() {
            p data-testid="last-cutover" { "Last cutover: " strong { (text(&last["instance"])) } " became active at epoch "
                (text(&last["epoch"])) ", " (when(&last["at"])) " (by " (text(&last["by"])) ")." }
        }
        p.lead {
            "Schedules are "
            @if paused { strong data-testid="sync-state" { "paused" } ": no new run starts; running ones finish." }
            @else { strong data-testid="sync-state" { "running" } "." }
        }
        @if ctx.session.may(Permission::SchedulesManage) {
            (pause_button(paused))
        }
    }
}

/// Pause or resume all schedules (the runbook's drain step), shown where it is needed.
pub fn pause_button(paused: bool) -> Markup {
    html! {
        div.actions {
            @if paused {
                button type="button" data-api="POST /api/sync/resume" data-then="reload" { "Resume all schedules" }
            } @else {
                button type="button" data-api="POST /api/sync/pause" data-then="reload" { "Pause all schedules" }
            }
            (layout::outcome())
        }
    }
}

fn relay_summary(ctx: &Ctx, v: &Value) -> Markup {
    let rows: Vec<&Value> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["revoked"] != true)
        .collect();
    let connected = rows.iter().filter(|r| r["state"] == "Connected").count();
    html! {
        @if rows.is_empty() {
            p.empty {
                "No relay is registered."
                // Only for those who may: the relays page has no form for anyone else.
                @if ctx.session.may(Permission::RelaysManage) {
                    " " a href="/relays" { "Register one" } " to reach directories on other networks."
                }
            }
        } @else {
            p.lead { (connected) " of " (rows.len()) " relays connected." }
            ul.relays {
                @for r in &rows {
                    li { (text(&r["name"])) " " (badge(r["state"].as_str().unwrap_or("unknown")))
                        @if let Some(i) = r["instance"].as_str() { " to " (i) } }
                }
            }
        }
    }
}

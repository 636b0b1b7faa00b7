//! Schedules: pause and resume them all (the drain step of the runbook), create one, enable or
//! disable one, delete one.

use axum::response::Response;
use maud::html;
use serde_json::json;

use super::connector_link;
use crate::auth::Permission;
use crate::ui::layout::{self, text, when};
use crate::ui::{enc, Ctx};

pub async fn page(ctx: Ctx) -> Response {
    let list = match ctx.get("/api/schedules").await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/schedules", "Schedules", r),
    };
    let sync = ctx.get("/api/sync").await.ok();
    let names = ctx.connector_names().await.unwrap_or_default();
    let manage = ctx.session.may(Permission::SchedulesManage);
    let rows = list.as_array().cloned().unwrap_or_default();
    let paused = sync
        .as_ref()
        .and_then(|s| s["paused"].as_bool())
        .unwrap_or(false);
    let body = html! {
        section aria-labelledby="h-all" {
            h2 id="h-all" { "All schedules" }
            p.lead { "Schedules are " strong data-testid="sync-state" { @if paused { "paused" } @else { "running" } } "."
                @if paused { " No new run starts until they are resumed." } }
            @if manage { (super::overview::pause_button(paused)) }
        }
        section aria-labelledby="h-list" {
            h2 id="h-list" { "Schedules" }
            @if rows.is_empty() {
                p.empty { "No schedule yet." }
            } @else {
                table {
                    thead { tr { th scope="col" { "Connector" } th scope="col" { "When" } th scope="col" { "Mode" }
                        th scope="col" { "Enabled" } th scope="col" { "Next run" }
                        @if manage { th scope="col" { "Actions" } } } }
                    tbody {
                        @for s in &rows {
                            @let id = enc(s["id"].as_str().unwrap_or_default());
                            @let enabled = s["enabled"] == true;
                            tr {
                                td { (connector_link(&names, s["connector_id"].as_str().unwrap_or_default())) }
                                td { (text(&s["kind"])) " " code { (text(&s["spec"])) } }
                                td { (text(&s["mode"])) }
                                td { @if enabled { "yes" } @else { "no" } }
                                td { (when(&s["next_run"])) }
                                @if manage {
                                    td.actions {
                                        button type="button" data-api={ "PATCH /api/schedules/" (id) }
                                            data-body=(json!({"enabled": !enabled}).to_string()) data-then="reload" {
                                            @if enabled { "Disable" } @else { "Enable" }
                                        }
                                        button.danger type="button" data-api={ "DELETE /api/schedules/" (id) } data-then="reload"
                                            data-confirm="Delete this schedule?" { "Delete" }
                                        (layout::outcome())
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if manage {
            section aria-labelledby="h-new" {
                h2 id="h-new" { "New schedule" }
                form data-api="POST /api/schedules" data-then="reload" {
                    div.field {
                        label for="s-connector" { "Connector" }
                        select id="s-connector" name="connector_id" required {
                            @for (id, name) in &names { option value=(id) { (name) } }
                        }
                    }
                    div.field {
                        label for="s-kind" { "Kind" }
                        select id="s-kind" name="kind" {
                            option value="interval" { "Every interval (e.g. 15m, 1h)" }
                            option value="cron" { "Cron (five fields, UTC)" }
                        }
                    }
                    div.field {
                        label for="s-spec" { "When" }
                        input id="s-spec" name="spec" required placeholder="15m or */15 * * * *";
                    }
                    div.field {
                        label for="s-mode" { "Mode" }
                        select id="s-mode" name="mode" {
                            option value="delta" { "Delta import" }
                            option value="full" { "Full import" }
                        }
                    }
                    div.field.check {
                        input id="s-enabled" type="checkbox" name="enabled" checked;
                        label for="s-enabled" { "Enabled" }
                    }
                    div.actions { button type="submit" { "Create schedule" } }
                    (layout::outcome())
                }
            }
        }
    };
    layout::page(&ctx, "/schedules", "Schedules", body)
}

//! Connectors: the list, a new one, and one connector (edit, test the connection, run now and
//! watch the run, clear its connector space, delete it).

use axum::extract::Path;
use axum::response::Response;
use maud::{html, Markup};
use serde_json::{json, Value};

use crate::auth::Permission;
use crate::ui::layout::{self, badge, json_block, text, when};
use crate::ui::{enc, Ctx};

pub async fn list(ctx: Ctx) -> Response {
    let list = match ctx.get("/api/connectors").await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/connectors", "Connectors", r),
    };
    let rows = list.as_array().cloned().unwrap_or_default();
    let body = html! {
        @if ctx.session.may(Permission::ConnectorsWrite) {
            p { a.button href="/connectors/new" { "New connector" } }
        }
        @if rows.is_empty() {
            p.empty { "No connector yet." }
        } @else {
            table {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Kind" } th scope="col" { "Via relay" }
                    th scope="col" { "Canary" } th scope="col" { "Changed" } } }
                tbody {
                    @for c in &rows {
                        tr {
                            td { a href={ "/connectors/" (enc(c["id"].as_str().unwrap_or_default())) } { (text(&c["name"])) } }
                            td { (text(&c["kind"])) }
                            td { (text(&c["relay_id"])) }
                            td { @if c["canary"] == true { "yes" } @else { "no" } }
                            td { (when(&c["updated_at"])) }
                        }
                    }
                }
            }
        }
    };
    layout::page(&ctx, "/connectors", "Connectors", body)
}

/// A starting point for each kind's config (the API lists every problem of what is saved).
fn template(kind: &str) -> Value {
    match kind {
        "csv" => json!({
            "folder": "hr", "pattern": "*.csv", "object_type": "people", "anchor_column": "id"
        }),
        _ => json!({
            "url": "ldaps://dc1.example.org:636",
            "bind_dn": "cn=sync,ou=Service,dc=example,dc=org",
            "bind_password_ref": "dc1-bind",
            "object_types": {"people": {"base_dn": "ou=People,dc=example,dc=org"}}
        }),
    }
}

fn rules_template() -> Value {
    json!({
        "precedence": 100,
        "object_types": {"people": {
            "join": [{"source": "lower(uid)", "identity_attribute": "uid"}],
            "flows": [{"target": "uid", "expression": "lower(uid)"}, {"target": "mail", "expression": "mail"}],
            "display_name": "cn"
        }}
    })
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// The connector form, for a new connector (`c` absent) or an existing one.
async fn form(ctx: &Ctx, c: Option<&Value>) -> Markup {
    let relays = ctx.get("/api/relays").await.unwrap_or(Value::Null);
    let relays: Vec<&Value> = relays
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["revoked"] != true)
        .collect();
    let kind = c.and_then(|c| c["kind"].as_str()).unwrap_or("ldap");
    let (api, then) = match c {
        None => ("POST /api/connectors".to_string(), "go:/connectors/{id}"),
        Some(c) => (
            format!(
                "PUT /api/connectors/{}",
                enc(c["id"].as_str().unwrap_or_default())
            ),
            "reload",
        ),
    };
    let config = c
        .map(|c| c["config"].clone())
        .unwrap_or_else(|| template(kind));
    let rules = c.map(|c| c["rules"].clone()).unwrap_or_else(rules_template);
    let relay = c.and_then(|c| c["relay_id"].as_str()).unwrap_or_default();
    html! {
        form.connector data-api=(api) data-then=(then) {
            div.field {
                label for="c-name" { "Name" }
                input id="c-name" name="name" required maxlength="128" value=[c.map(|c| text(&c["name"]))];
            }
            div.field {
                label for="c-kind" { "Kind" }
                @if c.is_some() {
                    input id="c-kind" name="kind" readonly value=(kind);
                } @else {
                    select id="c-kind" name="kind" data-templates=(json!({"ldap": pretty(&template("ldap")), "csv": pretty(&template("csv"))})) {
                        option value="ldap" selected { "LDAP directory" }
                        option value="csv" { "CSV drop folder" }
                    }
                }
            }
            div.field {
                label for="c-config" { "Configuration (JSON)" }
                textarea id="c-config" name="config" data-kind="json" rows="10" spellcheck="false" { (pretty(&config)) }
                p.hint { "Secrets are named by reference (" code { "bind_password_ref" } "), never written here; set values on the Secrets page." }
            }
            div.field {
                label for="c-rules" { "Rules (JSON)" }
                textarea id="c-rules" name="rules" data-kind="json" rows="14" spellcheck="false" { (pretty(&rules)) }
                p.hint { "Joins and attribute flows per object type. An error is shown with its path and marked at its position." }
            }
            div.field {
                label for="c-relay" { "Read through relay" }
                select id="c-relay" name="relay_id" data-kind="optional" {
                    option value="" selected[relay.is_empty()] { "None: this server reads the source" }
                    @for r in &relays {
                        @let id = r["id"].as_str().unwrap_or_default();
                        option value=(id) selected[id == relay] { (text(&r["name"])) " (" (text(&r["state"])) ")" }
                    }
                }
            }
            div.field.check {
                input id="c-canary" type="checkbox" name="canary" checked[c.is_some_and(|c| c["canary"] == true)];
                label for="c-canary" { "Canary (the operator's post-cutover check reads it)" }
            }
            div.actions {
                button type="submit" { @if c.is_some() { "Save" } @else { "Create connector" } }
            }
            (layout::outcome())
        }
    }
}

pub async fn create(ctx: Ctx) -> Response {
    if !ctx.session.may(Permission::ConnectorsWrite) {
        let r = crate::ui::Refusal::Forbidden(
            "creating a connector needs the connectors.write permission".into(),
        );
        return layout::refused(&ctx, "/connectors", "New connector", r);
    }
    let body = form(&ctx, None).await;
    layout::page(&ctx, "/connectors", "New connector", body)
}

pub async fn one(ctx: Ctx, Path(id): Path<String>) -> Response {
    let path = format!("/api/connectors/{}", enc(&id));
    let c = match ctx.get(&path).await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/connectors", "Connector", r),
    };
    let runs = ctx
        .get(&format!("/api/runs?limit=10&connector={}", enc(&id)))
        .await
        .unwrap_or(Value::Null);
    let names = ctx.connector_names().await.unwrap_or_default();
    let s = &ctx.session;
    let edit = if s.may(Permission::ConnectorsWrite) {
        Some(form(&ctx, Some(&c)).await)
    } else {
        None
    };
    let title = format!("Connector {}", text(&c["name"]));
    let body = html! {
        dl.facts {
            dt { "Kind" } dd { (text(&c["kind"])) }
            dt { "Objects in its connector space" }
            dd { a href={ (path.trim_start_matches("/api")) "/objects" } { (text(&c["objects"])) } }
            dt { "Created" } dd { (when(&c["created_at"])) }
            dt { "Changed" } dd { (when(&c["updated_at"])) }
        }
        section aria-labelledby="h-actions" {
            h2 id="h-actions" { "Actions" }
            div.actions {
                @if s.may(Permission::ConnectorsWrite) {
                    button type="button" data-api={ "POST " (path) "/test" } data-then="show" { "Test connection" }
                }
                @if s.may(Permission::SchedulesManage) {
                    button type="button" data-api={ "POST " (path) "/runs" } data-body=r#"{"mode":"full"}"# data-then="go:/runs/{id}" { "Run full import now" }
                    button type="button" data-api={ "POST " (path) "/runs" } data-body=r#"{"mode":"delta"}"# data-then="go:/runs/{id}" { "Run delta import now" }
                }
                @if s.may(Permission::ConnectorsWrite) {
                    button.danger type="button" data-api={ "POST " (path) "/clear" } data-then="go:/runs/{id}"
                        data-confirm="Remove every object of this connector and its contributions to identities?" { "Clear connector space" }
                    button.danger type="button" data-api={ "DELETE " (path) } data-then="go:/connectors"
                        data-confirm="Delete this connector? Its connector space must be empty." { "Delete" }
                }
                (layout::outcome())
            }
            @if !s.may(Permission::ConnectorsWrite) && !s.may(Permission::SchedulesManage) {
                p.hint { "You may look at this connector; changing or running it needs connectors.write or schedules.manage." }
            }
        }
        section aria-labelledby="h-recent" {
            h2 id="h-recent" { "Recent runs" }
            (super::runs::table(&names, runs.as_array().map(Vec::as_slice).unwrap_or_default()))
            p { a href={ "/runs?connector=" (enc(&id)) } { "All runs of this connector" } }
        }
        section aria-labelledby="h-edit" {
            @if let Some(edit) = &edit {
                h2 id="h-edit" { "Edit" }
                (edit)
            } @else {
                h2 id="h-edit" { "Configuration" }
                (json_block(&c["config"]))
                h3 { "Rules" }
                (json_block(&c["rules"]))
            }
        }
        @if c["canary"] == true { p { (badge("canary")) " The operator's post-cutover check runs this connector." } }
    };
    layout::page(&ctx, "/connectors", &title, body)
}

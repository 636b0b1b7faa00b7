//! The connector space of one connector: its staged objects, searched by DN or attribute, and
//! one object's raw attributes (binary values as base64) with the identity it joined.

use axum::extract::{Path, Query};
use axum::response::Response;
use maud::html;

use super::Paging;
use crate::ui::layout::{self, badge, text};
use crate::ui::{enc, Ctx};

pub async fn list(
    ctx: Ctx,
    Path(id): Path<String>,
    q: Result<Query<Paging>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let paging = Paging::of(q);
    let names = ctx.connector_names().await.unwrap_or_default();
    let name = names.get(&id).cloned().unwrap_or_else(|| id.clone());
    let title = format!("Connector space of {name}");
    let path = paging.api_path(&format!("/api/connectors/{}/objects?limit=50", enc(&id)));
    let v = match ctx.get(&path).await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/connectors", &title, r),
    };
    let items = v["items"].as_array().cloned().unwrap_or_default();
    let base = format!("/connectors/{}/objects", enc(&id));
    let body = html! {
        p { a href={ "/connectors/" (enc(&id)) } { "Back to the connector" } }
        (paging.form(&base, "o-search", "part of a DN or of an attribute value"))
        p.lead { (text(&v["total"])) " objects in this connector space." }
        @if items.is_empty() {
            p.empty { "No object matches." }
        } @else {
            table {
                thead { tr { th scope="col" { "Object" } th scope="col" { "Type" } th scope="col" { "State" } th scope="col" { "Joined identity" } } }
                tbody {
                    @for o in &items {
                        @let anchor = o["anchor"].as_str().unwrap_or_default();
                        tr {
                            td { a href={ (base) "/" (enc(anchor)) } { code { (anchor) } } }
                            td { (text(&o["object_type"])) }
                            td { @if o["deleted"] == true { (badge("deleted")) } @else { (badge("present")) } }
                            td { @match o["identity_id"].as_str() {
                                Some(i) => a href={ "/identities/" (enc(i)) } { code { (i) } },
                                None => "—",
                            } }
                        }
                    }
                }
            }
        }
        (paging.next_link(&base, v["next_after"].as_str()))
    };
    layout::page(&ctx, "/connectors", &title, body)
}

pub async fn one(ctx: Ctx, Path((id, anchor)): Path<(String, String)>) -> Response {
    let path = format!("/api/connectors/{}/objects/{}", enc(&id), enc(&anchor));
    let o = match ctx.get(&path).await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/connectors", "Connector object", r),
    };
    let attrs = o["attributes"].as_array().cloned().unwrap_or_default();
    // Attributes the server could not parse are shown as stored.
    let unparsed = o["attributes_json"].as_str().map(str::to_string);
    let body = html! {
        p { a href={ "/connectors/" (enc(&id)) "/objects" } { "Back to the connector space" } }
        dl.facts {
            dt { "Anchor" } dd { code { (anchor) } }
            dt { "Type" } dd { (text(&o["object_type"])) }
            dt { "State" } dd { @if o["deleted"] == true { (badge("deleted")) } @else { (badge("present")) } }
            @if let Some(dn) = o["dn"].as_str() { dt { "DN" } dd { code { (dn) } } }
            dt { "Last seen by run" } dd { @match o["seen_in_run"].as_str() {
                Some(r) => a href={ "/runs/" (enc(r)) } { code { (r) } },
                None => "—",
            } }
            dt { "Joined identity" } dd { @match o["identity_id"].as_str() {
                Some(i) => a href={ "/identities/" (enc(i)) } { code { (i) } },
                None => "none",
            } }
        }
        h2 { "Attributes as imported" }
        @if let Some(raw) = &unparsed { pre.json { (raw) } }
        table {
            thead { tr { th scope="col" { "Attribute" } th scope="col" { "Values" } } }
            tbody {
                @for a in &attrs {
                    tr {
                        th scope="row" { (text(&a["name"])) }
                        td { ul.values { @for v in a["values"].as_array().into_iter().flatten() {
                            li { code { (text(&v["value"])) } @if v["binary"] == true { " " span.hint { "(binary, base64)" } } }
                        } } }
                    }
                }
            }
        }
    };
    layout::page(&ctx, "/connectors", "Connector object", body)
}

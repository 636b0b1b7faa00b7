//! Identities: search and page through them; one identity with each attribute's source
//! connector and the connector objects linked to it.

use axum::extract::{Path, Query};
use axum::response::Response;
use maud::html;

use super::{connector_link, Paging};
use crate::ui::layout::{self, json_block, text, values, when};
use crate::ui::{enc, Ctx};

pub async fn list(
    ctx: Ctx,
    q: Result<Query<Paging>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let paging = Paging::of(q);
    let v = match ctx.get(&paging.api_path("/api/identities?limit=50")).await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/identities", "Identities", r),
    };
    let items = v["items"].as_array().cloned().unwrap_or_default();
    let body = html! {
        (paging.form("/identities", "i-search", "part of the name, or an identity id"))
        p.lead { (text(&v["total"])) " identities in all." }
        @if items.is_empty() {
            p.empty { "No identity matches." }
        } @else {
            table {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Id" } th scope="col" { "Changed" } } }
                tbody {
                    @for i in &items {
                        tr {
                            td { a href={ "/identities/" (enc(i["id"].as_str().unwrap_or_default())) } { (text(&i["display_name"])) } }
                            td { code { (text(&i["id"])) } }
                            td { (when(&i["updated_at"])) }
                        }
                    }
                }
            }
        }
        (paging.next_link("/identities", v["next"].as_str()))
    };
    layout::page(&ctx, "/identities", "Identities", body)
}

pub async fn one(ctx: Ctx, Path(id): Path<String>) -> Response {
    let v = match ctx.get(&format!("/api/identities/{}", enc(&id))).await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/identities", "Identity", r),
    };
    let names = ctx.connector_names().await.unwrap_or_default();
    let attrs = v["attributes"].as_object().cloned().unwrap_or_default();
    let links = v["links"].as_array().cloned().unwrap_or_default();
    let title = format!("Identity {}", text(&v["display_name"]));
    let body = html! {
        dl.facts {
            dt { "Id" } dd { code { (text(&v["id"])) } }
            dt { "Created" } dd { (when(&v["created_at"])) }
            dt { "Changed" } dd { (when(&v["updated_at"])) }
        }
        section aria-labelledby="h-attrs" {
            h2 id="h-attrs" { "Attributes" }
            table {
                thead { tr { th scope="col" { "Attribute" } th scope="col" { "Value" } th scope="col" { "From connector" } } }
                tbody {
                    @for (name, value) in &attrs {
                        tr {
                            th scope="row" { (name) }
                            td { (values(value)) }
                            td { (connector_link(&names, v["sources"][name].as_str().unwrap_or_default())) }
                        }
                    }
                }
            }
        }
        section aria-labelledby="h-links" {
            h2 id="h-links" { "Linked connector objects" }
            table {
                thead { tr { th scope="col" { "Connector" } th scope="col" { "Object" } th scope="col" { "Precedence" } th scope="col" { "Contributes" } } }
                tbody {
                    @for l in &links {
                        @let c = l["connector_id"].as_str().unwrap_or_default();
                        @let anchor = l["anchor"].as_str().unwrap_or_default();
                        tr {
                            td { (connector_link(&names, c)) }
                            td { a href={ "/connectors/" (enc(c)) "/objects/" (enc(anchor)) } { code { (anchor) } } }
                            td { (text(&l["precedence"])) }
                            td { (json_block(&l["contribution"])) }
                        }
                    }
                }
            }
        }
    };
    layout::page(&ctx, "/identities", &title, body)
}

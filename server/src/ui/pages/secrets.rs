//! Secrets: names and key ids only. A value can be set (and is never shown) or deleted.

use axum::response::Response;
use maud::html;

use crate::ui::layout::{self, text, when};
use crate::ui::{enc, Ctx};

pub async fn page(ctx: Ctx) -> Response {
    let list = match ctx.get("/api/secrets").await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/secrets", "Secrets", r),
    };
    let rows = list.as_array().cloned().unwrap_or_default();
    let body = html! {
        p.lead { "Values are sealed with the key ring and never shown again, here or in the API." }
        @if rows.is_empty() {
            p.empty { "No secret yet." }
        } @else {
            table {
                thead { tr { th scope="col" { "Name" } th scope="col" { "Sealed with key" } th scope="col" { "Set" } th scope="col" { "Actions" } } }
                tbody {
                    @for s in &rows {
                        tr {
                            td { code { (text(&s["name"])) } }
                            td { code { (text(&s["key_id"])) } }
                            td { (when(&s["updated_at"])) }
                            td.actions {
                                button.danger type="button" data-api={ "DELETE /api/secrets/" (enc(s["name"].as_str().unwrap_or_default())) }
                                    data-then="reload" data-confirm="Delete this secret? Connectors that name it will fail to bind." { "Delete" }
                                (layout::outcome())
                            }
                        }
                    }
                }
            }
        }
        section aria-labelledby="h-set" {
            h2 id="h-set" { "Set a value" }
            form data-api="PUT /api/secrets/{name}" data-then="reload" autocomplete="off" {
                div.field {
                    label for="x-name" { "Name" }
                    input id="x-name" name="name" data-in-path required placeholder="dc1-bind";
                }
                div.field {
                    label for="x-value" { "Value" }
                    input id="x-value" type="password" name="value" required autocomplete="new-password";
                }
                div.actions { button type="submit" { "Set value" } }
                (layout::outcome())
            }
        }
    };
    layout::page(&ctx, "/secrets", "Secrets", body)
}

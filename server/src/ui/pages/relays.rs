//! Relays: connected or not; register one (its credential is shown once), revoke one.

use axum::response::Response;
use maud::html;

use crate::auth::Permission;
use crate::ui::layout::{self, badge, text, when};
use crate::ui::{enc, Ctx};

pub async fn page(ctx: Ctx) -> Response {
    let list = match ctx.get("/api/relays").await {
        Ok(v) => v,
        Err(r) => return layout::refused(&ctx, "/relays", "Relays", r),
    };
    let manage = ctx.session.may(Permission::RelaysManage);
    let rows = list.as_array().cloned().unwrap_or_default();
    let body = html! {
        @if rows.is_empty() {
            p.empty { "No relay is registered." }
        } @else {
            table {
                thead { tr { th scope="col" { "Name" } th scope="col" { "State" } th scope="col" { "Connected to" }
                    th scope="col" { "Version" } th scope="col" { "Since" } th scope="col" { "Last seen" }
                    @if manage { th scope="col" { "Actions" } } } }
                tbody {
                    @for r in &rows {
                        @let revoked = r["revoked"] == true;
                        tr {
                            td { (text(&r["name"])) }
                            td { @if revoked { (badge("Revoked")) } @else { (badge(r["state"].as_str().unwrap_or("unknown"))) } }
                            td { (text(&r["instance"])) }
                            td { (text(&r["version"])) }
                            td { (when(&r["connected_since"])) }
                            td { (when(&r["last_seen"])) }
                            @if manage {
                                td.actions {
                                    @if !revoked {
                                        button.danger type="button" data-api={ "DELETE /api/relays/" (enc(r["id"].as_str().unwrap_or_default())) }
                                            data-then="reload" data-confirm="Revoke this relay? It is disconnected at once." { "Revoke" }
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
                h2 id="h-new" { "Register a relay" }
                form data-api="POST /api/relays" data-then="show" {
                    div.field {
                        label for="r-name" { "Name" }
                        input id="r-name" name="name" required maxlength="128" placeholder="branch-office-1";
                    }
                    div.actions { button type="submit" { "Register" } }
                    p.hint { "The relay's credential is shown once, below; give it to the relay's installer. It cannot be shown again." }
                    (layout::outcome())
                }
            }
        }
    };
    layout::page(&ctx, "/relays", "Relays", body)
}

//! One module per section of the UI. Each handler reads what it shows through [`Ctx::get`] and
//! renders controls only for what the caller's permissions allow (the API enforces them anyway).

pub mod audit;
pub mod connectors;
pub mod identities;
pub mod overview;
pub mod relays;
pub mod runs;
pub mod schedules;
pub mod secrets;
pub mod signin;
pub mod space;

use std::collections::BTreeMap;

use maud::{html, Markup};
use serde::Deserialize;

use super::{enc, Ctx, Refusal};

impl Ctx {
    /// Connector id → name, for pages that show connector ids.
    pub async fn connector_names(&self) -> Result<BTreeMap<String, String>, Refusal> {
        let list = self.get("/api/connectors").await?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["id"].as_str()?.to_string(),
                    c["name"].as_str()?.to_string(),
                ))
            })
            .collect())
    }
}

/// A link to a connector by its name (or its id when it has none, e.g. since deleted).
pub fn connector_link(names: &BTreeMap<String, String>, id: &str) -> Markup {
    html! {
        @match names.get(id) {
            Some(n) => a href={ "/connectors/" (super::enc(id)) } { (n) },
            None => code { (id) },
        }
    }
}

/// `?search=&after=` of a searched, paged list page.
#[derive(Deserialize, Default)]
pub struct Paging {
    #[serde(default)]
    search: String,
    #[serde(default)]
    after: String,
}

impl Paging {
    /// The page's query, or none (an unreadable query shows the first page).
    pub fn of(
        q: Result<axum::extract::Query<Paging>, axum::extract::rejection::QueryRejection>,
    ) -> Paging {
        q.map(|axum::extract::Query(p)| p).unwrap_or_default()
    }

    /// `api` (which already has `?limit=`) with this page's search and position.
    pub fn api_path(&self, api: &str) -> String {
        let mut path = api.to_string();
        if !self.search.is_empty() {
            path.push_str(&format!("&search={}", enc(&self.search)));
        }
        if !self.after.is_empty() {
            path.push_str(&format!("&after={}", enc(&self.after)));
        }
        path
    }

    /// The search box, posting back to `action`.
    pub fn form(&self, action: &str, id: &str, placeholder: &str) -> Markup {
        html! {
            form.search method="get" action=(action) role="search" {
                label for=(id) { "Search" }
                input id=(id) type="search" name="search" value=(self.search) placeholder=(placeholder);
                button type="submit" { "Search" }
            }
        }
    }

    /// "Next page" when the API named a next position.
    pub fn next_link(&self, action: &str, next: Option<&str>) -> Markup {
        html! {
            @if let Some(next) = next {
                p { a rel="next" href={ (action) "?search=" (enc(&self.search)) "&after=" (enc(next)) } { "Next page" } }
            }
        }
    }
}

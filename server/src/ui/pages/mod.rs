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

use super::{Ctx, Refusal};

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

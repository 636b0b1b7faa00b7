//! The licence file: customer-bound (one file for every host of a customer, so both pods mount
//! the same Secret), never machine-bound, with an expiry.
//!
//! ```json
//! {"format":1,"customer":"Contoso","licence_id":"L-1","edition":"enterprise",
//!  "issued":"2026-01-01T00:00:00Z","expires":"2027-01-01T00:00:00Z"}
//! ```

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Licence {
    pub format: u32,
    pub customer: String,
    pub licence_id: String,
    pub edition: String,
    pub issued: DateTime<Utc>,
    pub expires: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LicenceStatus {
    Valid(Licence),
    Missing(String),
    Unreadable(String),
    Expired(Licence),
}

impl LicenceStatus {
    pub fn is_valid(&self) -> bool {
        matches!(self, LicenceStatus::Valid(_))
    }

    /// One line for the readiness body and logs.
    pub fn detail(&self) -> String {
        match self {
            LicenceStatus::Valid(l) => format!(
                "licence {} for {} valid until {}",
                l.licence_id,
                l.customer,
                l.expires.to_rfc3339()
            ),
            LicenceStatus::Missing(why) => why.clone(),
            LicenceStatus::Unreadable(why) => why.clone(),
            LicenceStatus::Expired(l) => format!(
                "licence {} for {} expired at {}; install a renewed licence file",
                l.licence_id,
                l.customer,
                l.expires.to_rfc3339()
            ),
        }
    }
}

pub fn check(path: Option<&Path>, now: DateTime<Utc>) -> LicenceStatus {
    let Some(path) = path else {
        return LicenceStatus::Missing(
            "no licence configured; set licence.file (IM_LICENCE__FILE)".into(),
        );
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return LicenceStatus::Missing(format!("licence file {} not found", path.display()))
        }
        Err(e) => {
            return LicenceStatus::Unreadable(format!(
                "licence file {} cannot be read: {e}",
                path.display()
            ))
        }
    };
    match parse(&text) {
        Ok(l) if l.expires <= now => LicenceStatus::Expired(l),
        Ok(l) => LicenceStatus::Valid(l),
        Err(e) => LicenceStatus::Unreadable(format!("licence file {}: {e}", path.display())),
    }
}

pub fn parse(text: &str) -> Result<Licence, String> {
    let l: Licence = serde_json::from_str(text).map_err(|e| {
        format!("not a valid licence ({e}); expected JSON with format, customer, licence_id, edition, issued, expires")
    })?;
    if l.format != 1 {
        return Err(format!(
            "licence format {} is not supported (expected 1)",
            l.format
        ));
    }
    if l.customer.trim().is_empty() {
        return Err("licence has an empty customer".into());
    }
    if l.expires <= l.issued {
        return Err("licence expires before it was issued".into());
    }
    Ok(l)
}

/// The evaluation licence a standalone install writes on first start.
pub fn evaluation(now: DateTime<Utc>) -> Licence {
    Licence {
        format: 1,
        customer: "Evaluation".into(),
        licence_id: format!("EVAL-{}", now.format("%Y%m%d")),
        edition: "evaluation".into(),
        issued: now,
        expires: now + chrono::Duration::days(90),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn states() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("licence.json");
        let now = at("2026-06-01T00:00:00Z");
        assert!(matches!(check(Some(&p), now), LicenceStatus::Missing(_)));
        assert!(matches!(check(None, now), LicenceStatus::Missing(_)));
        std::fs::write(&p, "{not json").unwrap();
        let s = check(Some(&p), now);
        assert!(matches!(s, LicenceStatus::Unreadable(_)), "{s:?}");
        let lic = Licence {
            format: 1,
            customer: "Contoso".into(),
            licence_id: "L-1".into(),
            edition: "enterprise".into(),
            issued: at("2026-01-01T00:00:00Z"),
            expires: at("2027-01-01T00:00:00Z"),
        };
        std::fs::write(&p, serde_json::to_string(&lic).unwrap()).unwrap();
        assert!(check(Some(&p), now).is_valid());
        let s = check(Some(&p), at("2027-01-02T00:00:00Z"));
        assert!(matches!(s, LicenceStatus::Expired(_)));
        assert!(s.detail().contains("expired"));
    }

    #[test]
    fn rejects_bad_fields() {
        assert!(parse(r#"{"format":2,"customer":"c","licence_id":"1","edition":"e","issued":"2026-01-01T00:00:00Z","expires":"2027-01-01T00:00:00Z"}"#).is_err());
        assert!(parse(r#"{"format":1,"customer":" ","licence_id":"1","edition":"e","issued":"2026-01-01T00:00:00Z","expires":"2027-01-01T00:00:00Z"}"#).is_err());
        assert!(parse(r#"{"format":1,"customer":"c","licence_id":"1","edition":"e","issued":"2026-01-01T00:00:00Z","expires":"2025-01-01T00:00:00Z"}"#).is_err());
        assert!(parse(r#"{"format":1,"customer":"c","licence_id":"1","edition":"e","issued":"2026-01-01T00:00:00Z","expires":"2027-01-01T00:00:00Z","machine":"x"}"#).is_err());
    }
}

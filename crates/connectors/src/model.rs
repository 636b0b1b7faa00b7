//! What a connector produces: objects with an anchor and multi-valued attributes, each value
//! text or bytes. The JSON form is the one stored in `cs_objects.attributes_json` and the one a
//! relay streams, so a value read directly or through a relay is byte-for-byte the same.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One attribute value. Text is kept as the directory returned it (non-ASCII included); bytes
/// (objectGUID, jpegPhoto, any value that is not UTF-8) are kept as bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Value {
    Text(String),
    Binary(Vec<u8>),
}

impl Value {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            Value::Binary(_) => None,
        }
    }
}

/// Text as a JSON string, bytes as `{"base64": "..."}`.
impl Serialize for Value {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Value::Text(t) => s.serialize_str(t),
            Value::Binary(b) => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry(
                    "base64",
                    &base64::engine::general_purpose::STANDARD.encode(b),
                )?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Text(String),
            Binary { base64: String },
        }
        match Wire::deserialize(d)? {
            Wire::Text(t) => Ok(Value::Text(t)),
            Wire::Binary { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64.as_bytes())
                .map(Value::Binary)
                .map_err(|e| serde::de::Error::custom(format!("invalid base64 value: {e}"))),
        }
    }
}

/// Attribute name → values. Names keep the directory's spelling; ordered for stable JSON, so an
/// unchanged object serialises to the same bytes and is recognised as unchanged.
pub type Attributes = BTreeMap<String, Vec<Value>>;

/// One object read from a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectorObject {
    /// Stable identity in the source (entryUUID, objectGUID, a CSV key column).
    pub anchor: String,
    pub object_type: String,
    /// The LDAP DN (as returned, escapes intact), when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dn: Option<String>,
    pub attributes: Attributes,
    /// Where the source holds it (`file.csv:17`), for a problem found after the connector: a
    /// CSV connector rejects a duplicate anchor within one page itself, and whoever commits the
    /// pages rejects one an earlier page of the run held, naming this. Not stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

impl ConnectorObject {
    /// The stored form: attributes (and the DN as the pseudo-attribute `dn`) as JSON.
    pub fn attributes_json(&self) -> String {
        serde_json::to_string(&StoredAttributes {
            dn: self.dn.as_deref(),
            attributes: &self.attributes,
        })
        .unwrap_or_else(|_| "{}".into())
    }
}

#[derive(Serialize)]
struct StoredAttributes<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    dn: Option<&'a str>,
    attributes: &'a Attributes,
}

/// Full import reads everything (and lets the caller detect deletions); delta reads what
/// changed at or after the watermark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ImportMode {
    Full,
    Delta { watermark: String },
}

/// A page of objects, in source order. Pages are sent through a bounded channel, so a slow
/// consumer slows the reader instead of growing memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub objects: Vec<ConnectorObject>,
    /// Rows the source could not turn into objects (CSV line errors), reported, not fatal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// Where: `file.csv:17`, or a DN.
    pub location: String,
    pub reason: String,
}

/// What an import ends with: the watermark to store once every page is committed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportSummary {
    pub objects: u64,
    pub rejected: u64,
    /// The highest change marker seen (None when the source has none, e.g. CSV).
    pub watermark: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_json() {
        let mut attrs = Attributes::new();
        attrs.insert(
            "cn".into(),
            vec![Value::Text("Zoë Ünal".into()), Value::Text("Z. Ü.".into())],
        );
        attrs.insert(
            "objectGUID".into(),
            vec![Value::Binary(vec![0, 159, 255, 10])],
        );
        let o = ConnectorObject {
            anchor: "a1".into(),
            object_type: "people".into(),
            dn: Some(r"cn=Doe\, John,ou=people,dc=example,dc=org".into()),
            attributes: attrs,
            location: None,
        };
        let j = serde_json::to_string(&o).unwrap();
        let back: ConnectorObject = serde_json::from_str(&j).unwrap();
        assert_eq!(back, o);
        assert!(j.contains(r#"{"base64":"AJ//Cg=="}"#), "{j}");
    }

    #[test]
    fn bad_base64_is_an_error_not_a_panic() {
        let e = serde_json::from_str::<Value>(r#"{"base64":"***"}"#).unwrap_err();
        assert!(e.to_string().contains("invalid base64"), "{e}");
    }
}

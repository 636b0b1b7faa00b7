//! The composer: per-connector rules that decide which identity an imported object belongs to
//! (join / project), what it contributes (flows), how contributions from several connectors
//! combine (precedence), and what changed (the audit diff). Everything here is pure: the engine
//! reads the store, calls these functions, and writes what they decide.

use std::collections::{BTreeMap, BTreeSet};

use identitymesh_connectors::model::{Attributes, Value};
use serde::{Deserialize, Serialize};

use super::expr::{self, Expr, ExprError};

/// Rules for one connector, as stored with the connector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorRules {
    /// Lower wins when two connectors supply the same identity attribute.
    pub precedence: i32,
    /// Object type (as the connector names it) → rules. Object types not listed take no part in
    /// identities.
    #[serde(default)]
    pub object_types: BTreeMap<String, ObjectTypeRules>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectTypeRules {
    /// Tried in order; the first rule that finds anything decides.
    #[serde(default)]
    pub join: Vec<JoinRule>,
    /// Create a new identity when no join rule matches.
    #[serde(default = "default_project")]
    pub project: bool,
    #[serde(default)]
    pub flows: Vec<FlowRule>,
    /// An expression for the identity's display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

fn default_project() -> bool {
    true
}

/// Matches when the identity's `identity_attribute` equals the value of `source`
/// (case-insensitive, text only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRule {
    /// An expression over the connector object.
    pub source: String,
    pub identity_attribute: String,
}

/// Writes the value of `expression` to the identity attribute `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowRule {
    pub target: String,
    pub expression: String,
}

/// A rule set that cannot be used. `path` locates the field, e.g.
/// `object_types.people.flows[2].expression`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RulesError {
    #[error("{path}: {source}")]
    Expression { path: String, source: ExprError },
    #[error("{path}: the object type name is empty; use the object type the connector reports, e.g. \"people\"")]
    EmptyObjectType { path: String },
    #[error("{path}: the flow target is empty; name the identity attribute this flow writes")]
    EmptyTarget { path: String },
    #[error(
        "{path}: '{name}' is not a valid identity attribute name; use 1 to {MAX_ATTRIBUTE_NAME_CHARS} ASCII letters, digits, '-', '_' or ';', starting with a letter or '_'"
    )]
    InvalidAttributeName { path: String, name: String },
    #[error(
        "{path}: '{target}' is already written by {first_path}; keep one flow per identity attribute (coalesce(a, b) picks the first source that has a value)"
    )]
    DuplicateTarget {
        path: String,
        target: String,
        first_path: String,
    },
}

/// Longest identity attribute name accepted; longer ones are almost certainly a pasted value.
pub const MAX_ATTRIBUTE_NAME_CHARS: usize = 128;

fn check_attribute_name(path: String, name: &str) -> Result<(), RulesError> {
    if name.is_empty() {
        return Err(RulesError::EmptyTarget { path });
    }
    if !expr::is_bare_name(name) || name.chars().count() > MAX_ATTRIBUTE_NAME_CHARS {
        return Err(RulesError::InvalidAttributeName {
            path,
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn compile_expr(path: String, src: &str) -> Result<Expr, RulesError> {
    expr::parse(src).map_err(|source| RulesError::Expression { path, source })
}

impl ConnectorRules {
    /// Parses and checks every rule. The first problem found (in object type name order, then
    /// join, flows, display name) is returned with its path.
    pub fn compile(&self) -> Result<CompiledRules, RulesError> {
        let mut object_types = BTreeMap::new();
        for (name, rules) in &self.object_types {
            let base = format!("object_types.{name}");
            if name.trim().is_empty() {
                return Err(RulesError::EmptyObjectType { path: base });
            }
            let mut join = Vec::with_capacity(rules.join.len());
            for (i, j) in rules.join.iter().enumerate() {
                let source = compile_expr(format!("{base}.join[{i}].source"), &j.source)?;
                check_attribute_name(
                    format!("{base}.join[{i}].identity_attribute"),
                    &j.identity_attribute,
                )
                .map_err(|e| match e {
                    // An empty join attribute is a bad name, not a bad flow target.
                    RulesError::EmptyTarget { path } => RulesError::InvalidAttributeName {
                        path,
                        name: String::new(),
                    },
                    e => e,
                })?;
                join.push(CompiledJoin {
                    source,
                    identity_attribute: j.identity_attribute.clone(),
                });
            }
            let mut flows = Vec::with_capacity(rules.flows.len());
            // Lower-cased target → path of the flow that first wrote it: identity attribute
            // names are compared case-insensitively, like directory attribute names.
            let mut seen: BTreeMap<String, String> = BTreeMap::new();
            for (i, f) in rules.flows.iter().enumerate() {
                let path = format!("{base}.flows[{i}]");
                check_attribute_name(format!("{path}.target"), &f.target)?;
                let expression = compile_expr(format!("{path}.expression"), &f.expression)?;
                if let Some(first) = seen.get(&f.target.to_ascii_lowercase()) {
                    return Err(RulesError::DuplicateTarget {
                        path: format!("{path}.target"),
                        target: f.target.clone(),
                        first_path: first.clone(),
                    });
                }
                seen.insert(f.target.to_ascii_lowercase(), format!("{path}.target"));
                flows.push((f.target.clone(), expression));
            }
            let display_name = rules
                .display_name
                .as_deref()
                .map(|src| compile_expr(format!("{base}.display_name"), src))
                .transpose()?;
            object_types.insert(
                name.clone(),
                CompiledObjectType {
                    join,
                    project: rules.project,
                    flows,
                    display_name,
                },
            );
        }
        Ok(CompiledRules {
            precedence: self.precedence,
            object_types,
        })
    }
}

/// Rules with every expression parsed; built by [`ConnectorRules::compile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRules {
    precedence: i32,
    object_types: BTreeMap<String, CompiledObjectType>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CompiledObjectType {
    join: Vec<CompiledJoin>,
    project: bool,
    flows: Vec<(String, Expr)>,
    display_name: Option<Expr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CompiledJoin {
    source: Expr,
    identity_attribute: String,
}

/// What one connector object supplies to its identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contribution {
    /// Identity attribute → values; flows that evaluate to nothing are left out.
    pub attributes: Attributes,
    pub display_name: Option<String>,
}

impl Contribution {
    /// Labels the contribution with its connector, ready for [`merge`].
    pub fn from_connector(
        self,
        connector: impl Into<String>,
        precedence: i32,
    ) -> SourceContribution {
        SourceContribution {
            connector: connector.into(),
            precedence,
            attributes: self.attributes,
            display_name: self.display_name,
        }
    }
}

/// The normal form a join compares: lower case (Unicode). The engine must store or look up
/// identity attribute values in this same form.
pub fn join_value(s: &str) -> String {
    s.to_lowercase()
}

impl CompiledRules {
    pub fn precedence(&self) -> i32 {
        self.precedence
    }

    /// Object types that have rules, in name order.
    pub fn object_types(&self) -> impl Iterator<Item = &str> {
        self.object_types.keys().map(String::as_str)
    }

    /// Whether this object type has rules (the composer reads its objects).
    pub fn has(&self, object_type: &str) -> bool {
        self.object_types.contains_key(object_type)
    }

    /// Whether an unmatched object of this type creates a new identity. False for object
    /// types without rules: those never become identities.
    pub fn project(&self, object_type: &str) -> bool {
        self.object_types
            .get(object_type)
            .is_some_and(|o| o.project)
    }

    /// `(identity attribute, join_value(source value))` for each join rule, in rule order.
    /// A rule whose source has no text value is skipped, so indexes into the result (and the
    /// `rule_index` of [`JoinDecision::Ambiguous`]) count only the rules that produced a key.
    /// A multi-valued source joins on its first non-empty text value.
    pub fn join_keys(
        &self,
        object_type: &str,
        attrs: &Attributes,
        dn: Option<&str>,
    ) -> Vec<(String, String)> {
        let Some(o) = self.object_types.get(object_type) else {
            return Vec::new();
        };
        o.join
            .iter()
            .filter_map(|j| {
                j.source
                    .eval_text(attrs, dn)
                    .map(|v| (j.identity_attribute.clone(), join_value(&v)))
            })
            .collect()
    }

    /// What the object supplies. Empty for object types without rules.
    pub fn contribution(
        &self,
        object_type: &str,
        attrs: &Attributes,
        dn: Option<&str>,
    ) -> Contribution {
        let Some(o) = self.object_types.get(object_type) else {
            return Contribution::default();
        };
        let attributes = o
            .flows
            .iter()
            .filter_map(|(target, e)| {
                let v = e.eval(attrs, dn);
                expr::has_content(&v).then(|| (target.clone(), v))
            })
            .collect();
        let display_name = o.display_name.as_ref().and_then(|e| e.eval_text(attrs, dn));
        Contribution {
            attributes,
            display_name,
        }
    }
}

/// What to do with an imported object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum JoinDecision {
    /// Already linked to this identity: keep the link.
    Linked(String),
    /// Link to this existing identity.
    Join(String),
    /// A join key matched several identities. Nothing is linked; report it so a person can fix
    /// the data or the rules.
    Ambiguous {
        rule_index: usize,
        candidates: Vec<String>,
    },
    /// Create a new identity.
    Project,
    /// Nothing matched and projection is off: the object stays unlinked (a disconnector).
    NoMatch,
}

/// Decides the join. `candidates_per_rule[i]` are the identity ids whose attribute matched join
/// key `i` (as returned by [`CompiledRules::join_keys`]).
///
/// The first key that matched anything decides: one identity → join; several → ambiguous,
/// even if a later key matches exactly one, because a later (weaker) rule must not overrule an
/// earlier one that found a conflict. Duplicate ids within one key count once.
pub fn decide(
    existing_link: Option<&str>,
    candidates_per_rule: &[Vec<String>],
    project: bool,
) -> JoinDecision {
    if let Some(id) = existing_link {
        return JoinDecision::Linked(id.to_owned());
    }
    for (rule_index, found) in candidates_per_rule.iter().enumerate() {
        let mut seen = BTreeSet::new();
        let candidates: Vec<String> = found
            .iter()
            .filter(|id| seen.insert(id.as_str()))
            .cloned()
            .collect();
        match candidates.len() {
            0 => continue,
            1 => return JoinDecision::Join(candidates.into_iter().next().unwrap_or_default()),
            _ => {
                return JoinDecision::Ambiguous {
                    rule_index,
                    candidates,
                }
            }
        }
    }
    if project {
        JoinDecision::Project
    } else {
        JoinDecision::NoMatch
    }
}

/// One connector's contribution to an identity, as [`merge`] takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceContribution {
    pub connector: String,
    pub precedence: i32,
    pub attributes: Attributes,
    pub display_name: Option<String>,
}

/// An identity's attributes as the contributions combine, with where each came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergedIdentity {
    pub attributes: Attributes,
    /// Attribute → the connector that supplied it.
    pub sources: BTreeMap<String, String>,
    pub display_name: Option<String>,
    pub display_name_source: Option<String>,
}

/// Combines contributions: for each attribute (and the display name) the contribution with the
/// lowest precedence number that has a value wins; equal precedence falls back to connector
/// name order, so the result does not depend on the order contributions were loaded in.
/// Attribute names are compared exactly here; compile keeps one connector's targets distinct.
pub fn merge(contributions: &[SourceContribution]) -> MergedIdentity {
    let mut ordered: Vec<&SourceContribution> = contributions.iter().collect();
    ordered.sort_by(|a, b| (a.precedence, &a.connector).cmp(&(b.precedence, &b.connector)));
    let mut merged = MergedIdentity::default();
    for c in ordered {
        for (name, values) in &c.attributes {
            if expr::has_content(values) && !merged.attributes.contains_key(name) {
                merged.attributes.insert(name.clone(), values.clone());
                merged.sources.insert(name.clone(), c.connector.clone());
            }
        }
        if merged.display_name.is_none() {
            if let Some(d) = c.display_name.as_ref().filter(|d| !d.is_empty()) {
                merged.display_name = Some(d.clone());
                merged.display_name_source = Some(c.connector.clone());
            }
        }
    }
    merged
}

/// One attribute's change, for the audit log. An empty list means absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttributeChange {
    pub attribute: String,
    pub before: Vec<Value>,
    pub after: Vec<Value>,
}

impl AttributeChange {
    pub fn kind(&self) -> ChangeKind {
        match (self.before.is_empty(), self.after.is_empty()) {
            (true, _) => ChangeKind::Added,
            (_, true) => ChangeKind::Removed,
            _ => ChangeKind::Changed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Changed,
    Removed,
}

/// Added, changed and removed attributes, in name order; unchanged ones are omitted. Values
/// are compared as sets with multiplicity (directory attributes are unordered), and an empty
/// value list is the same as an absent attribute.
pub fn diff(before: &Attributes, after: &Attributes) -> Vec<AttributeChange> {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    let empty = Vec::new();
    names
        .into_iter()
        .filter_map(|name| {
            let b = before.get(name).unwrap_or(&empty);
            let a = after.get(name).unwrap_or(&empty);
            (!same_values(b, a)).then(|| AttributeChange {
                attribute: name.clone(),
                before: b.clone(),
                after: a.clone(),
            })
        })
        .collect()
}

fn same_values(a: &[Value], b: &[Value]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if a == b {
        return true;
    }
    let mut a: Vec<&Value> = a.iter().collect();
    let mut b: Vec<&Value> = b.iter().collect();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    fn attrs(pairs: &[(&str, &[&str])]) -> Attributes {
        pairs
            .iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| t(v)).collect()))
            .collect()
    }

    const HR_RULES: &str = r#"{
        "precedence": 10,
        "object_types": {
            "people": {
                "join": [
                    {"source": "[Employee ID]", "identity_attribute": "employeeId"},
                    {"source": "lower(Email)", "identity_attribute": "mail"}
                ],
                "flows": [
                    {"target": "employeeId", "expression": "[Employee ID]"},
                    {"target": "department", "expression": "trim(Department)"},
                    {"target": "givenName", "expression": "[First Name]"}
                ],
                "display_name": "concat([First Name], \" \", [Last Name])"
            }
        }
    }"#;

    const LDAP_RULES: &str = r#"{
        "precedence": 20,
        "object_types": {
            "people": {
                "join": [
                    {"source": "employeeNumber", "identity_attribute": "employeeId"},
                    {"source": "mail", "identity_attribute": "mail"}
                ],
                "project": false,
                "flows": [
                    {"target": "mail", "expression": "mail"},
                    {"target": "department", "expression": "ou"},
                    {"target": "givenName", "expression": "givenName"},
                    {"target": "photo", "expression": "jpegPhoto"}
                ],
                "display_name": "cn"
            }
        }
    }"#;

    fn rules(json: &str) -> CompiledRules {
        let r: ConnectorRules = serde_json::from_str(json).expect("test rules parse");
        r.compile().expect("test rules compile")
    }

    fn hr_row() -> Attributes {
        attrs(&[
            ("Employee ID", &["E-42"]),
            ("First Name", &["Zoë"]),
            ("Last Name", &["Ünal"]),
            ("Department", &[" Research "]),
            ("Email", &[]),
        ])
    }

    fn ldap_entry() -> Attributes {
        let mut a = attrs(&[
            ("employeeNumber", &["E-42"]),
            ("mail", &["Zoe.Unal@Example.org", "zoe@example.org"]),
            ("ou", &["Engineering"]),
            ("givenName", &["Zoe"]),
            ("cn", &["Zoe Unal"]),
        ]);
        a.insert("jpegPhoto".into(), vec![Value::Binary(vec![0xff, 0xd8])]);
        a
    }

    #[test]
    fn join_keys_follow_rule_order_and_skip_missing_sources() {
        let ldap = rules(LDAP_RULES);
        assert_eq!(
            ldap.join_keys("people", &ldap_entry(), None),
            vec![
                ("employeeId".to_string(), "e-42".to_string()),
                ("mail".to_string(), "zoe.unal@example.org".to_string()),
            ]
        );
        let hr = rules(HR_RULES);
        // No Email value: only the first rule yields a key.
        assert_eq!(
            hr.join_keys("people", &hr_row(), None),
            vec![("employeeId".to_string(), "e-42".to_string())]
        );
        assert!(hr.join_keys("groups", &hr_row(), None).is_empty());
        assert!(hr.project("people"));
        assert!(!ldap.project("people"));
        assert!(!hr.project("groups"));
        assert_eq!(hr.precedence(), 10);
        assert_eq!(hr.object_types().collect::<Vec<_>>(), ["people"]);
    }

    #[test]
    fn join_decisions() {
        let v = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        use JoinDecision::*;
        // An existing link is kept whatever the rules find now.
        assert_eq!(
            decide(Some("id-1"), &[v(&["id-2"])], true),
            Linked("id-1".into())
        );
        assert_eq!(
            decide(None, &[v(&["id-2"]), v(&["id-3"])], true),
            Join("id-2".into())
        );
        // The first rule found nothing: the second decides.
        assert_eq!(
            decide(None, &[v(&[]), v(&["id-3"])], false),
            Join("id-3".into())
        );
        // The first rule found two: do not guess, even though the second is unique.
        assert_eq!(
            decide(None, &[v(&[]), v(&["id-2", "id-5"]), v(&["id-2"])], true),
            Ambiguous {
                rule_index: 1,
                candidates: v(&["id-2", "id-5"])
            }
        );
        // The same identity found twice by one key is one candidate.
        assert_eq!(
            decide(None, &[v(&["id-7", "id-7"])], true),
            Join("id-7".into())
        );
        assert_eq!(decide(None, &[v(&[]), v(&[])], true), Project);
        assert_eq!(decide(None, &[], true), Project);
        assert_eq!(decide(None, &[v(&[])], false), NoMatch);
        let j = serde_json::to_string(&Ambiguous {
            rule_index: 0,
            candidates: v(&["a", "b"]),
        })
        .unwrap();
        assert_eq!(
            j,
            r#"{"decision":"ambiguous","rule_index":0,"candidates":["a","b"]}"#
        );
    }

    #[test]
    fn contributions_evaluate_flows_and_display_name() {
        let c = rules(HR_RULES).contribution("people", &hr_row(), None);
        assert_eq!(
            c.attributes,
            attrs(&[
                ("employeeId", &["E-42"]),
                ("department", &["Research"]),
                ("givenName", &["Zoë"]),
            ])
        );
        assert_eq!(c.display_name.as_deref(), Some("Zoë Ünal"));
        let c = rules(LDAP_RULES).contribution("people", &ldap_entry(), None);
        assert_eq!(c.attributes["mail"].len(), 2, "every mail value flows");
        assert_eq!(c.attributes["photo"], vec![Value::Binary(vec![0xff, 0xd8])]);
        assert_eq!(
            rules(LDAP_RULES).contribution("groups", &ldap_entry(), None),
            Contribution::default()
        );
    }

    fn contributions() -> (SourceContribution, SourceContribution) {
        let hr = rules(HR_RULES)
            .contribution("people", &hr_row(), None)
            .from_connector("hr-csv", 10);
        let ldap = rules(LDAP_RULES)
            .contribution("people", &ldap_entry(), None)
            .from_connector("ldap", 20);
        (hr, ldap)
    }

    #[test]
    fn merge_takes_each_attribute_from_the_best_source_that_has_it() {
        let (hr, ldap) = contributions();
        // Load order must not matter.
        for input in [
            vec![hr.clone(), ldap.clone()],
            vec![ldap.clone(), hr.clone()],
        ] {
            let m = merge(&input);
            assert_eq!(m.attributes["department"], vec![t("Research")]);
            assert_eq!(m.sources["department"], "hr-csv");
            assert_eq!(m.attributes["givenName"], vec![t("Zoë")]);
            assert_eq!(m.sources["givenName"], "hr-csv");
            // HR has no mail: LDAP supplies it.
            assert_eq!(
                m.attributes["mail"],
                vec![t("Zoe.Unal@Example.org"), t("zoe@example.org")]
            );
            assert_eq!(m.sources["mail"], "ldap");
            assert_eq!(m.sources["photo"], "ldap");
            assert_eq!(m.sources["employeeId"], "hr-csv");
            assert_eq!(m.display_name.as_deref(), Some("Zoë Ünal"));
            assert_eq!(m.display_name_source.as_deref(), Some("hr-csv"));
        }
    }

    #[test]
    fn removing_a_contribution_falls_back_to_the_next_connector() {
        let (hr, ldap) = contributions();
        let before = merge(&[hr, ldap.clone()]);
        let after = merge(&[ldap]);
        assert_eq!(after.attributes["department"], vec![t("Engineering")]);
        assert_eq!(after.sources["department"], "ldap");
        assert_eq!(after.display_name.as_deref(), Some("Zoe Unal"));
        assert!(!after.attributes.contains_key("employeeId"));
        let changes = diff(&before.attributes, &after.attributes);
        let names: Vec<_> = changes
            .iter()
            .map(|c| (c.attribute.as_str(), c.kind()))
            .collect();
        assert_eq!(
            names,
            [
                ("department", ChangeKind::Changed),
                ("employeeId", ChangeKind::Removed),
                ("givenName", ChangeKind::Changed),
            ]
        );
    }

    #[test]
    fn merge_ties_and_empty_values() {
        let c = |name: &str, prec: i32, dept: &[&str], display: Option<&str>| SourceContribution {
            connector: name.into(),
            precedence: prec,
            attributes: attrs(&[("department", dept)]),
            display_name: display.map(str::to_owned),
        };
        // Same precedence: connector name order decides.
        let m = merge(&[
            c("zeta", 5, &["Z"], Some("Z")),
            c("alpha", 5, &["A"], Some("A")),
        ]);
        assert_eq!(m.sources["department"], "alpha");
        assert_eq!(m.display_name.as_deref(), Some("A"));
        // An empty value or display name does not win over a real one further down.
        let m = merge(&[
            c("first", 1, &[""], Some("")),
            c("second", 2, &["B"], Some("B")),
        ]);
        assert_eq!(m.attributes["department"], vec![t("B")]);
        assert_eq!(m.display_name_source.as_deref(), Some("second"));
        // Negative precedence numbers rank first.
        let m = merge(&[c("pos", 0, &["P"], None), c("neg", -1, &["N"], None)]);
        assert_eq!(m.sources["department"], "neg");
        assert_eq!(m.display_name, None);
        assert_eq!(merge(&[]), MergedIdentity::default());
    }

    #[test]
    fn diff_reports_added_changed_removed_only() {
        let before = attrs(&[
            ("same", &["x"]),
            ("reordered", &["a", "b"]),
            ("changed", &["old"]),
            ("removed", &["gone"]),
            ("emptyBefore", &[]),
            ("grown", &["a"]),
        ]);
        let mut after = attrs(&[
            ("same", &["x"]),
            ("reordered", &["b", "a"]),
            ("changed", &["new"]),
            ("added", &["fresh"]),
            ("grown", &["a", "a"]),
        ]);
        after.insert("photo".into(), vec![Value::Binary(vec![1])]);
        let d = diff(&before, &after);
        let expected = vec![
            AttributeChange {
                attribute: "added".into(),
                before: vec![],
                after: vec![t("fresh")],
            },
            AttributeChange {
                attribute: "changed".into(),
                before: vec![t("old")],
                after: vec![t("new")],
            },
            AttributeChange {
                attribute: "grown".into(),
                before: vec![t("a")],
                after: vec![t("a"), t("a")],
            },
            AttributeChange {
                attribute: "photo".into(),
                before: vec![],
                after: vec![Value::Binary(vec![1])],
            },
            AttributeChange {
                attribute: "removed".into(),
                before: vec![t("gone")],
                after: vec![],
            },
        ];
        assert_eq!(d, expected);
        assert_eq!(
            d.iter().map(AttributeChange::kind).collect::<Vec<_>>(),
            [
                ChangeKind::Added,
                ChangeKind::Changed,
                ChangeKind::Changed,
                ChangeKind::Added,
                ChangeKind::Removed
            ]
        );
        assert!(diff(&after, &after).is_empty());
        let j = serde_json::to_string(&d[3]).unwrap();
        assert_eq!(
            j,
            r#"{"attribute":"photo","before":[],"after":[{"base64":"AQ=="}]}"#
        );
    }

    fn compile_err(json: &str) -> String {
        let r: ConnectorRules = serde_json::from_str(json).expect("rules parse");
        r.compile().expect_err("rules must be refused").to_string()
    }

    #[test]
    fn compile_errors_name_the_path_and_position() {
        let e = compile_err(
            r#"{"precedence": 1, "object_types": {"people": {"flows": [
                {"target": "a", "expression": "a"},
                {"target": "b", "expression": "b"},
                {"target": "c", "expression": "concat(givenName sn)"}
            ]}}}"#,
        );
        assert_eq!(
            e,
            "object_types.people.flows[2].expression: position 17: expected ',' or ')' after argument 1 of concat, found 'sn'"
        );
        let e = compile_err(
            r#"{"precedence": 1, "object_types": {"people": {"join": [
                {"source": "lowr(mail)", "identity_attribute": "mail"}]}}}"#,
        );
        assert!(
            e.starts_with(
                "object_types.people.join[0].source: position 0: unknown function 'lowr'"
            ),
            "{e}"
        );
        let e = compile_err(
            r#"{"precedence": 1, "object_types": {"people": {"join": [
                {"source": "mail", "identity_attribute": "e mail"}]}}}"#,
        );
        assert_eq!(
            e,
            "object_types.people.join[0].identity_attribute: 'e mail' is not a valid identity attribute name; use 1 to 128 ASCII letters, digits, '-', '_' or ';', starting with a letter or '_'"
        );
        let e = compile_err(
            r#"{"precedence": 1, "object_types": {"people": {"join": [
                {"source": "mail", "identity_attribute": ""}]}}}"#,
        );
        assert!(
            e.contains("join[0].identity_attribute: '' is not a valid"),
            "{e}"
        );
        let e = compile_err(
            r#"{"precedence": 1, "object_types": {"people": {"display_name": "concat(cn"}}}"#,
        );
        assert_eq!(
            e,
            "object_types.people.display_name: position 9: expected ')' after the arguments of concat"
        );
        let e = compile_err(
            r#"{"precedence": 1, "object_types": {"people": {"flows": [
                {"target": "", "expression": "a"}]}}}"#,
        );
        assert!(
            e.starts_with("object_types.people.flows[0].target: the flow target is empty"),
            "{e}"
        );
        let e = compile_err(
            r#"{"precedence": 1, "object_types": {"people": {"flows": [
                {"target": "mail", "expression": "mail"},
                {"target": "Mail", "expression": "otherMailbox"}]}}}"#,
        );
        assert_eq!(
            e,
            "object_types.people.flows[1].target: 'Mail' is already written by object_types.people.flows[0].target; keep one flow per identity attribute (coalesce(a, b) picks the first source that has a value)"
        );
        let long = "a".repeat(MAX_ATTRIBUTE_NAME_CHARS + 1);
        let e = compile_err(&format!(
            r#"{{"precedence": 1, "object_types": {{"people": {{"flows": [
                {{"target": "{long}", "expression": "a"}}]}}}}}}"#
        ));
        assert!(e.contains("is not a valid identity attribute name"), "{e}");
        let e = compile_err(r#"{"precedence": 1, "object_types": {" ": {}}}"#);
        assert!(
            e.starts_with("object_types. : the object type name is empty"),
            "{e}"
        );
    }

    #[test]
    fn rules_round_trip_and_reject_unknown_fields() {
        for json in [HR_RULES, LDAP_RULES] {
            let r: ConnectorRules = serde_json::from_str(json).unwrap();
            let back: ConnectorRules =
                serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            assert_eq!(back, r);
        }
        let minimal: ConnectorRules =
            serde_json::from_str(r#"{"precedence": 3, "object_types": {"people": {}}}"#).unwrap();
        let people = &minimal.object_types["people"];
        assert!(people.project, "project defaults to true");
        assert!(people.join.is_empty() && people.flows.is_empty() && people.display_name.is_none());
        for (json, field) in [
            (r#"{"precedence": 1, "objectTypes": {}}"#, "objectTypes"),
            (
                r#"{"precedence": 1, "object_types": {"p": {"flow": []}}}"#,
                "flow",
            ),
            (
                r#"{"precedence": 1, "object_types": {"p": {"join": [{"source": "a", "identity_attribute": "b", "weight": 2}]}}}"#,
                "weight",
            ),
            (
                r#"{"precedence": 1, "object_types": {"p": {"flows": [{"target": "a", "expr": "b"}]}}}"#,
                "expr",
            ),
        ] {
            let e = serde_json::from_str::<ConnectorRules>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("unknown field `{field}`")), "{e}");
        }
        let e = serde_json::from_str::<ConnectorRules>(r#"{"object_types": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field `precedence`"), "{e}");
    }
}

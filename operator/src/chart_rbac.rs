//! The chart's RBAC against the API calls the operator makes: every call is granted, and
//! nothing else is (the chart promises "exactly what the controller calls"). The e2e test runs
//! the operator under the chart's ServiceAccount; this catches a missing or extra grant without
//! a control plane. Add a row here when the controller starts calling something new.

use std::collections::{BTreeMap, BTreeSet};

/// (role kind, API group, resource) → verbs the operator uses.
const CALLS: &[(&str, &str, &str, &[&str])] = &[
    (
        "ClusterRole",
        "identitymesh.io",
        "identitymeshclusters",
        &["get", "list", "watch", "patch"],
    ),
    (
        "ClusterRole",
        "identitymesh.io",
        "identitymeshclusters/status",
        &["get", "update"],
    ),
    (
        "ClusterRole",
        "",
        "pods",
        &["get", "list", "watch", "create", "delete"],
    ),
    // Server-side apply: patch, and create when the object is new.
    (
        "ClusterRole",
        "",
        "services",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "ClusterRole",
        "",
        "configmaps",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "ClusterRole",
        "",
        "secrets",
        &["get", "list", "watch", "create", "patch"],
    ),
    // Read per pod in world.rs, watched for cordons (controller::run).
    ("ClusterRole", "", "nodes", &["get", "list", "watch"]),
    // Applied like the Services and owned (watched); removed by garbage collection only.
    (
        "ClusterRole",
        "policy",
        "poddisruptionbudgets",
        &["get", "list", "watch", "create", "patch"],
    ),
    (
        "ClusterRole",
        "events.k8s.io",
        "events",
        &["create", "patch"],
    ),
    (
        "Role",
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
];

/// The template with its Helm directives taken out: whole-line actions dropped, inline
/// expressions replaced by a placeholder (the rules themselves are not templated).
fn untemplated(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("{{") {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            out.push_str("placeholder");
            rest = rest[start..]
                .find("}}")
                .map_or("", |e| &rest[start + e + 2..]);
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

type Grants = BTreeMap<(String, String, String), BTreeSet<String>>;

fn grants(text: &str) -> Grants {
    use serde::Deserialize;
    let mut g = Grants::new();
    for doc in serde_yaml::Deserializer::from_str(&untemplated(text)) {
        let v = serde_yaml::Value::deserialize(doc).expect("rbac.yaml parses once untemplated");
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        let Some(rules) = v["rules"].as_sequence() else {
            continue;
        };
        let strs = |v: &serde_yaml::Value| -> Vec<String> {
            v.as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        for r in rules {
            for group in strs(&r["apiGroups"]) {
                for res in strs(&r["resources"]) {
                    g.entry((kind.clone(), group.clone(), res))
                        .or_default()
                        .extend(strs(&r["verbs"]));
                }
            }
        }
    }
    g
}

#[test]
fn the_charts_rbac_grants_exactly_what_the_operator_calls() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/identitymesh-operator/templates/rbac.yaml");
    let text = std::fs::read_to_string(&path).expect("read the chart's rbac.yaml");
    let granted = grants(&text);
    let wanted: Grants = CALLS
        .iter()
        .map(|(k, g, r, verbs)| {
            (
                (k.to_string(), g.to_string(), r.to_string()),
                verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    for (key, verbs) in &wanted {
        let have = granted.get(key).cloned().unwrap_or_default();
        let missing: Vec<_> = verbs.difference(&have).collect();
        assert!(
            missing.is_empty(),
            "{key:?}: the chart does not grant {missing:?}"
        );
    }
    for (key, verbs) in &granted {
        let used = wanted.get(key).cloned().unwrap_or_default();
        let extra: Vec<_> = verbs.difference(&used).collect();
        assert!(
            extra.is_empty(),
            "{key:?}: the chart grants {extra:?}, which the operator never calls"
        );
    }
}

#[test]
fn untemplating_keeps_the_rules_and_drops_the_directives() {
    let t = "{{- if .Values.rbac.create }}\nkind: Role\nmetadata:\n  name: {{ include \"x\" . }}-leader\n  labels:\n    {{- include \"l\" . | nindent 4 }}\nrules:\n  - apiGroups: [\"\"]\n    resources: [\"pods\"]\n    verbs: [\"get\"]\n{{- end }}\n";
    let u = untemplated(t);
    assert!(!u.contains("{{"), "{u}");
    assert!(u.contains("name: placeholder-leader"), "{u}");
    let g = grants(t);
    assert_eq!(
        g.get(&("Role".into(), "".into(), "pods".into())),
        Some(&BTreeSet::from(["get".to_string()]))
    );
}

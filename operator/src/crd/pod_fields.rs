//! Admission rules for the spec fields the operator copies into the server pods and the client
//! Service: the checks the pod and Service APIs make (k8s.io/kubernetes pkg/apis/core/validation),
//! said again as CEL so that a spec the pods could never be built from is refused when it is
//! applied, with a message naming the field, instead of being refused later, pod by pod.
//!
//! Rules on our own fields (nodeSelector, service.annotations) are attached by the derive in
//! crd.rs; the fields typed with k8s-openapi structs (tolerations, resources) get theirs here,
//! on the generated schema, together with the bounds that keep the apiserver's CEL cost estimate
//! small (an unbounded string or map is costed at the maximum request size).
//!
//! Left to the apiserver (reported as SpecRejected naming the field when it refuses a pod or the
//! Service): the total size of service.annotations (256 KiB) and hugepage sizes that are not a
//! whole number of pages.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool, ValidationRule,
};

/// A label key (what the API calls a qualified name): an optional DNS-subdomain prefix and '/',
/// then a name of at most 63 letters, digits, '-', '_' and '.', starting and ending with a
/// letter or digit. CEL string literals take no `\.`, hence `[.]`.
macro_rules! label_key {
    () => {
        "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    };
}

/// An annotation key: a label key whose prefix may be in any case (the API lower-cases it
/// before the check).
macro_rules! annotation_key {
    () => {
        "^([a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
    };
}

/// The prefix of a key, when it has one, is at most 253 characters (a DNS subdomain's bound).
macro_rules! prefix_bound {
    () => {
        "^([^/]{1,253}/)?[^/]*$"
    };
}

/// A label value: empty, or at most 63 letters, digits, '-', '_' and '.', starting and ending
/// with a letter or digit.
macro_rules! label_value {
    () => {
        "^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
    };
}

pub const NODE_SELECTOR_KEYS_RULE: &str = concat!(
    "self.all(k, k.matches('",
    label_key!(),
    "') && k.matches('",
    prefix_bound!(),
    "'))"
);
pub const NODE_SELECTOR_KEYS_MESSAGE: &str = "nodeSelector keys must be node label keys ([prefix/]name, the name at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit, the optional prefix a DNS subdomain; e.g. agentpool or example.com/pool): the pod API refuses any other";

pub const NODE_SELECTOR_VALUES_RULE: &str =
    concat!("self.all(k, self[k].matches('", label_value!(), "'))");
pub const NODE_SELECTOR_VALUES_MESSAGE: &str = "nodeSelector values must be node label values (empty, or at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit): the pod API refuses any other";

pub const ANNOTATION_KEYS_RULE: &str = concat!(
    "self.all(k, k.matches('",
    annotation_key!(),
    "') && k.matches('",
    prefix_bound!(),
    "'))"
);
pub const ANNOTATION_KEYS_MESSAGE: &str = "service.annotations keys must be annotation keys ([prefix/]name, the name at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit, the optional prefix a DNS subdomain; e.g. service.beta.kubernetes.io/azure-load-balancer-internal): the Service API refuses any other";

/// Rules on each item of spec.tolerations, in the order the pod API checks them.
pub const TOLERATION_RULES: &[(&str, &str)] = &[
    (
        concat!(
            "!has(self.key) || self.key == '' || (self.key.matches('",
            label_key!(),
            "') && self.key.matches('",
            prefix_bound!(),
            "'))"
        ),
        "tolerations[].key must be a taint key ([prefix/]name, e.g. node.kubernetes.io/os or dedicated), or empty with operator Exists",
    ),
    (
        "!has(self.operator) || self.operator in ['', 'Equal', 'Exists']",
        "tolerations[].operator must be Equal (the default) or Exists",
    ),
    (
        "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
        "tolerations[].operator must be Exists when key is empty (that tolerates every taint); set a key to match one taint",
    ),
    (
        "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
        "tolerations[].value must be empty when operator is Exists (Exists matches every value of the key)",
    ),
    (
        concat!(
            "(has(self.operator) && self.operator == 'Exists') || !has(self.value) || self.value.matches('",
            label_value!(),
            "')"
        ),
        "tolerations[].value must be a taint value (empty, or at most 63 letters, digits, '-', '_' and '.' starting and ending with a letter or digit)",
    ),
    (
        "!has(self.effect) || self.effect in ['', 'NoSchedule', 'PreferNoSchedule', 'NoExecute']",
        "tolerations[].effect must be NoSchedule, PreferNoSchedule or NoExecute, or empty for every effect",
    ),
    (
        "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        "tolerations[].tolerationSeconds needs effect NoExecute: it bounds how long the pod stays on a node tainted NoExecute, and the pod API refuses it with any other effect",
    ),
];

/// A resource name a container may ask for: cpu, memory, ephemeral-storage, hugepages-<size>,
/// or an extended resource `<domain>/<name>` outside kubernetes.io (and not `requests.*`, which
/// names quota). `K` stands for the key.
macro_rules! resource_name_ok {
    () => {
        concat!(
            "(K in ['cpu', 'memory', 'ephemeral-storage'] || K.matches('^hugepages-[1-9][0-9]*(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')",
            " || (K.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$')",
            " && K.matches('^[^/]{1,244}/') && !K.contains('kubernetes.io/') && !K.startsWith('requests.')))"
        )
    };
}

/// A map of quantities keyed by resource name (`M`: requests or limits).
macro_rules! quantity_rules {
    ($m:literal) => {
        [
            (
                concat!("!has(self.", $m, ") || self.", $m, ".all(K, ", resource_name_ok!(), ")"),
                concat!("resources.", $m, " keys must be cpu, memory, ephemeral-storage, hugepages-<size> (e.g. hugepages-2Mi) or an extended resource <domain>/<name> outside kubernetes.io (e.g. example.com/gpu)"),
            ),
            (
                concat!("!has(self.", $m, ") || self.", $m, ".all(K, isQuantity(string(self.", $m, "[K])))"),
                concat!("resources.", $m, " values must be quantities, e.g. 500m or 2 (cpu), 512Mi or 4Gi (memory)"),
            ),
            (
                concat!("!has(self.", $m, ") || self.", $m, ".all(K, !isQuantity(string(self.", $m, "[K])) || sign(quantity(string(self.", $m, "[K]))) >= 0)"),
                concat!("resources.", $m, " must not be negative"),
            ),
            (
                concat!("!has(self.", $m, ") || self.", $m, ".all(K, !K.contains('/') || !isQuantity(string(self.", $m, "[K])) || quantity(string(self.", $m, "[K])).isInteger())"),
                concat!("resources.", $m, " of extended resources (<domain>/<name>) must be whole numbers"),
            ),
        ]
    };
}

/// Rules on spec.resources as a whole.
pub fn resource_rules() -> Vec<(&'static str, &'static str)> {
    let mut out = vec![(
        "!has(self.claims) || size(self.claims) == 0",
        "resources.claims must be empty: the server pods declare no resource claims, and the pod API refuses a container that uses one",
    )];
    out.extend(quantity_rules!("requests"));
    out.extend(quantity_rules!("limits"));
    out.extend([
        (
            concat!(
                "!has(self.requests) || self.requests.all(K, !has(self.limits) || !(K in self.limits)",
                " || !isQuantity(string(self.requests[K])) || !isQuantity(string(self.limits[K]))",
                " || quantity(string(self.requests[K])).compareTo(quantity(string(self.limits[K]))) <= 0)"
            ),
            "resources.requests must not exceed resources.limits of the same resource (e.g. requests.memory 2Gi with limits.memory 1Gi): lower the request or raise the limit",
        ),
        (
            concat!(
                "!has(self.requests) || self.requests.all(K, !(K.startsWith('hugepages-') || K.contains('/'))",
                " || (has(self.limits) && K in self.limits))"
            ),
            "resources.requests of hugepages-* and extended resources (<domain>/<name>) need the same amount in resources.limits: they cannot be overcommitted",
        ),
        (
            concat!(
                "!has(self.requests) || self.requests.all(K, !(K.startsWith('hugepages-') || K.contains('/'))",
                " || !has(self.limits) || !(K in self.limits)",
                " || !isQuantity(string(self.requests[K])) || !isQuantity(string(self.limits[K]))",
                " || quantity(string(self.requests[K])).compareTo(quantity(string(self.limits[K]))) == 0)"
            ),
            "resources.requests of hugepages-* and extended resources (<domain>/<name>) must equal their resources.limits: they cannot be overcommitted",
        ),
        (
            concat!(
                "!((has(self.requests) && self.requests.exists(K, K.startsWith('hugepages-')))",
                " || (has(self.limits) && self.limits.exists(K, K.startsWith('hugepages-'))))",
                " || (has(self.requests) && ('cpu' in self.requests || 'memory' in self.requests))",
                " || (has(self.limits) && ('cpu' in self.limits || 'memory' in self.limits))"
            ),
            "resources with hugepages-* need a cpu or memory request or limit beside them",
        ),
    ]);
    out
}

/// At most this many resource names in requests or limits, keys and quantities this long: far
/// more than a container uses, and they bound the CEL cost estimate.
const MAX_RESOURCES: i64 = 16;
const MAX_QUANTITY_LEN: i64 = 64;
const MAX_TOLERATIONS: i64 = 64;
const MAX_NODE_SELECTOR: i64 = 64;
const MAX_SERVICE_ANNOTATIONS: i64 = 128;

fn rule(rule: &str, message: &str) -> ValidationRule {
    ValidationRule {
        rule: rule.to_string(),
        message: Some(message.to_string()),
        ..Default::default()
    }
}

fn property<'a>(s: &'a mut JSONSchemaProps, name: &str) -> Option<&'a mut JSONSchemaProps> {
    s.properties.as_mut()?.get_mut(name)
}

fn items(s: &mut JSONSchemaProps) -> Option<&mut JSONSchemaProps> {
    match s.items.as_mut()? {
        JSONSchemaPropsOrArray::Schema(i) => Some(i),
        JSONSchemaPropsOrArray::Schemas(_) => None,
    }
}

fn additional(s: &mut JSONSchemaProps) -> Option<&mut JSONSchemaProps> {
    match s.additional_properties.as_mut()? {
        JSONSchemaPropsOrBool::Schema(v) => Some(v),
        JSONSchemaPropsOrBool::Bool(_) => None,
    }
}

/// Adds the rules and bounds above to the spec schema. Panics (in the unit tests that render the
/// CRD) if the generated schema no longer has the shape they are written for.
pub fn add_rules(spec: &mut JSONSchemaProps) {
    let tolerations = property(spec, "tolerations").expect("spec.tolerations in the schema");
    tolerations.max_items = Some(MAX_TOLERATIONS);
    let item = items(tolerations).expect("spec.tolerations items");
    for (field, max) in [
        ("key", 253 + 1 + 63),
        ("value", 63),
        ("operator", 16),
        ("effect", 32),
    ] {
        property(item, field)
            .unwrap_or_else(|| panic!("spec.tolerations[].{field} in the schema"))
            .max_length = Some(max);
    }
    item.x_kubernetes_validations =
        Some(TOLERATION_RULES.iter().map(|(r, m)| rule(r, m)).collect());

    let resources = property(spec, "resources").expect("spec.resources in the schema");
    for map in ["requests", "limits"] {
        let m = property(resources, map)
            .unwrap_or_else(|| panic!("spec.resources.{map} in the schema"));
        m.max_properties = Some(MAX_RESOURCES);
        additional(m)
            .unwrap_or_else(|| panic!("spec.resources.{map} values"))
            .max_length = Some(MAX_QUANTITY_LEN);
    }
    let claims = property(resources, "claims").expect("spec.resources.claims in the schema");
    claims.max_items = Some(MAX_RESOURCES);
    resources.x_kubernetes_validations =
        Some(resource_rules().iter().map(|(r, m)| rule(r, m)).collect());

    let selector = property(spec, "nodeSelector").expect("spec.nodeSelector in the schema");
    selector.max_properties = Some(MAX_NODE_SELECTOR);
    additional(selector)
        .expect("spec.nodeSelector values")
        .max_length = Some(63);
    let service = property(spec, "service").expect("spec.service in the schema");
    property(service, "annotations")
        .expect("spec.service.annotations in the schema")
        .max_properties = Some(MAX_SERVICE_ANNOTATIONS);
}

//! The client Service (selector names the active pod) and the headless per-pod Service.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    meta, spec_hash, stamp_hash, Names, HTTPS_PORT, INTERNAL_PORT, LABEL_CLUSTER, LABEL_INSTANCE,
};
use crate::crd::IdentityMeshCluster;

/// Selector of the client Service. With no active pod it names no pod (an empty instance value
/// matches none of ours), so clients never reach a standby.
pub fn client_selector(names: &Names, active: Option<&str>) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_CLUSTER.to_string(), names.cluster.clone()),
        (
            LABEL_INSTANCE.to_string(),
            active.unwrap_or_default().to_string(),
        ),
    ])
}

/// The client Service. Swinging it to another pod is one write of this object.
pub fn build_client_service(
    imc: &IdentityMeshCluster,
    names: &Names,
    active: Option<&str>,
) -> Service {
    let mut m = meta(imc, names, names.client_service());
    if !imc.spec.service.annotations.is_empty() {
        m.annotations = Some(imc.spec.service.annotations.clone());
    }
    let mut svc = Service {
        metadata: m,
        spec: Some(ServiceSpec {
            type_: Some(imc.spec.service.type_.as_str().into()),
            selector: Some(client_selector(names, active)),
            ports: Some(vec![ServicePort {
                name: Some("https".into()),
                port: imc.spec.service.port,
                target_port: Some(IntOrString::String("https".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    let h = spec_hash(&svc);
    stamp_hash(&mut svc.metadata, h);
    svc
}

/// Headless Service: per-pod DNS for both pods, Ready or not, so the operator and the
/// certificate SANs can name each pod.
pub fn build_headless_service(imc: &IdentityMeshCluster, names: &Names) -> Service {
    let mut svc = Service {
        metadata: meta(imc, names, names.headless_service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(
                LABEL_CLUSTER.to_string(),
                names.cluster.clone(),
            )])),
            ports: Some(vec![
                ServicePort {
                    name: Some("https".into()),
                    port: HTTPS_PORT,
                    target_port: Some(IntOrString::Int(HTTPS_PORT)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("internal".into()),
                    port: INTERNAL_PORT,
                    target_port: Some(IntOrString::Int(INTERNAL_PORT)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    };
    let h = spec_hash(&svc);
    stamp_hash(&mut svc.metadata, h);
    svc
}

/// The pod the client Service currently selects, if any.
pub fn selected_pod(svc: &Service) -> Option<String> {
    svc.spec
        .as_ref()?
        .selector
        .as_ref()?
        .get(LABEL_INSTANCE)
        .filter(|v| !v.is_empty())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::hash_of;
    use crate::builders::test_support::cluster;

    #[test]
    fn client_service_selects_active_only() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let svc = build_client_service(&imc, &names, Some("im-b"));
        let sel = svc
            .spec
            .as_ref()
            .and_then(|s| s.selector.clone())
            .expect("selector");
        assert_eq!(sel.get(LABEL_INSTANCE).map(String::as_str), Some("im-b"));
        assert_eq!(sel.get(LABEL_CLUSTER).map(String::as_str), Some("im"));
        assert_eq!(selected_pod(&svc).as_deref(), Some("im-b"));
        let port = &svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .expect("ports")[0];
        assert_eq!(port.port, 443);
        assert_eq!(port.target_port, Some(IntOrString::String("https".into())));
        assert!(svc.metadata.owner_references.is_some());
    }

    #[test]
    fn swing_changes_only_selector_and_hash() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let a = build_client_service(&imc, &names, Some("im-a"));
        let b = build_client_service(&imc, &names, Some("im-b"));
        assert_ne!(hash_of(&a.metadata), hash_of(&b.metadata));
        let mut a2 = a.clone();
        a2.spec.as_mut().expect("spec").selector = b.spec.as_ref().and_then(|s| s.selector.clone());
        a2.metadata.annotations = b.metadata.annotations.clone();
        assert_eq!(a2, b);
    }

    #[test]
    fn no_active_selects_nothing() {
        let imc = cluster("im", "prod");
        let svc = build_client_service(&imc, &Names::of(&imc), None);
        assert_eq!(selected_pod(&svc), None);
        let sel = svc.spec.and_then(|s| s.selector).expect("selector");
        assert_eq!(sel.get(LABEL_INSTANCE).map(String::as_str), Some(""));
    }

    #[test]
    fn service_annotations_and_type() {
        let mut imc = cluster("im", "prod");
        imc.spec.service.type_ = crate::crd::ServiceType::LoadBalancer;
        imc.spec
            .service
            .annotations
            .insert("a/b".into(), "c".into());
        let svc = build_client_service(&imc, &Names::of(&imc), None);
        assert_eq!(
            svc.spec.as_ref().and_then(|s| s.type_.as_deref()),
            Some("LoadBalancer")
        );
        assert_eq!(
            svc.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("a/b"))
                .map(String::as_str),
            Some("c")
        );
    }

    #[test]
    fn headless_publishes_not_ready() {
        let imc = cluster("im", "prod");
        let svc = build_headless_service(&imc, &Names::of(&imc));
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(svc.metadata.name.as_deref(), Some("im-pods"));
        assert!(!spec.selector.expect("sel").contains_key(LABEL_INSTANCE));
    }
}

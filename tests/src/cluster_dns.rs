//! Cluster DNS names for pods, as an `/etc/hosts` file: what CoreDNS would answer.
//!
//! - a Service with a ClusterIP: `<svc>.<ns>.svc.cluster.local`, `<svc>.<ns>.svc`, `<svc>.<ns>`
//!   and, for pods in the same namespace, `<svc>`;
//! - a headless Service's endpoint with a hostname (a pod with `hostname` and `subdomain`):
//!   `<hostname>.<svc>.<ns>.svc.cluster.local` and `<hostname>.<svc>.<ns>.svc`.
//!
//! The Service proxy keeps a [`ClusterDns`] current from its watches; the pod runtime writes each
//! pod's hosts file from it and bind-mounts that at /etc/hosts in the pod.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Name records of the cluster, sorted so that the hosts file only changes when they do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    /// (namespace, service, ClusterIP)
    pub services: BTreeSet<(String, String, IpAddr)>,
    /// (namespace, headless service, hostname, address)
    pub endpoints: BTreeSet<(String, String, String, IpAddr)>,
}

/// Shared between the Service proxy (writer) and the pod runtime (reader).
#[derive(Debug, Clone, Default)]
pub struct ClusterDns(Arc<Mutex<Records>>);

impl ClusterDns {
    pub fn set(&self, r: Records) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }
    pub fn get(&self) -> Records {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Pure: the records the Services and their slices give.
pub fn records<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Records {
    let mut r = Records::default();
    let mut headless = BTreeSet::new();
    for svc in services {
        let (Some(ns), Some(name), Some(spec)) = (
            svc.metadata.namespace.clone(),
            svc.metadata.name.clone(),
            svc.spec.as_ref(),
        ) else {
            continue;
        };
        match spec.cluster_ip.as_deref() {
            Some("None") => {
                headless.insert((ns, name));
            }
            Some(ip) => {
                if let Ok(ip) = ip.parse() {
                    r.services.insert((ns, name, ip));
                }
            }
            None => {}
        }
    }
    for slice in slices {
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kubernetes.io/service-name"))
        else {
            continue;
        };
        if !headless.contains(&(ns.clone(), svc.clone())) {
            continue;
        }
        for ep in &slice.endpoints {
            let Some(host) = &ep.hostname else { continue };
            for a in &ep.addresses {
                if let Ok(ip) = a.parse() {
                    r.endpoints
                        .insert((ns.clone(), svc.clone(), host.clone(), ip));
                }
            }
        }
    }
    r
}

/// Pure: the hosts file of a pod in namespace `ns` with hostname `hostname` at `pod_ip`.
pub fn hosts_file(r: &Records, ns: &str, hostname: &str, pod_ip: IpAddr) -> String {
    let d = CLUSTER_DOMAIN;
    let mut out = String::from(
        "# Kubernetes-managed hosts file (the test harness's cluster DNS).\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    out.push_str(&format!("{pod_ip}\t{hostname}\n"));
    for (sns, name, ip) in &r.services {
        let mut names = vec![
            format!("{name}.{sns}.svc.{d}"),
            format!("{name}.{sns}.svc"),
            format!("{name}.{sns}"),
        ];
        if sns == ns {
            names.push(name.clone());
        }
        out.push_str(&format!("{ip}\t{}\n", names.join(" ")));
    }
    for (sns, svc, host, ip) in &r.endpoints {
        out.push_str(&format!(
            "{ip}\t{host}.{svc}.{sns}.svc.{d} {host}.{svc}.{sns}.svc\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "ports": [{"port": 443}]}
        }))
        .unwrap()
    }

    #[test]
    fn services_and_headless_endpoints_get_their_cluster_names() {
        let services = [
            svc("identitymesh", "im", "10.96.0.20"),
            svc("identitymesh", "im-pods", "None"),
            svc("default", "kubernetes", "10.96.0.1"),
            // Not yet allocated: no record.
            svc("other", "pending", ""),
        ];
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "identitymesh", "name": "im-pods-x",
                         "labels": {"kubernetes.io/service-name": "im-pods"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.201.0.2"], "hostname": "im-a"},
                {"addresses": ["10.201.0.6"]}
            ]
        }))
        .unwrap();
        // A slice of a ClusterIP Service gives no per-pod names.
        let other: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "identitymesh", "name": "im-x",
                         "labels": {"kubernetes.io/service-name": "im"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.201.0.2"], "hostname": "im-a"}]
        }))
        .unwrap();
        let r = records(&services, [&slice, &other]);
        assert_eq!(r.services.len(), 2, "{r:?}");
        assert_eq!(r.endpoints.len(), 1, "{r:?}");

        let hosts = hosts_file(
            &r,
            "identitymesh",
            "relay-0",
            "10.201.0.10".parse().unwrap(),
        );
        let lines: Vec<&str> = hosts.lines().collect();
        assert!(lines.contains(&"10.201.0.10\trelay-0"), "{hosts}");
        assert!(
            lines.contains(&"10.96.0.20\tim.identitymesh.svc.cluster.local im.identitymesh.svc im.identitymesh im"),
            "{hosts}"
        );
        assert!(
            lines.contains(&"10.96.0.1\tkubernetes.default.svc.cluster.local kubernetes.default.svc kubernetes.default"),
            "another namespace's Service has no short name: {hosts}"
        );
        assert!(
            lines.contains(&"10.201.0.2\tim-a.im-pods.identitymesh.svc.cluster.local im-a.im-pods.identitymesh.svc"),
            "{hosts}"
        );
        assert!(!hosts.contains("pending"), "{hosts}");
        assert_eq!(
            hosts,
            hosts_file(
                &records(&services, [&slice, &other]),
                "identitymesh",
                "relay-0",
                "10.201.0.10".parse().unwrap()
            ),
            "the same records give the same file"
        );
    }
}

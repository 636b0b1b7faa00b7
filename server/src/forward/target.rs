//! Where a forwarded request goes: the fence holder's public URL, from the configured template.

pub use identitymesh_contract::forwarding::INSTANCE_PLACEHOLDER as PLACEHOLDER;

/// A peer's address: what to resolve and connect to, and the name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host: String,
    pub port: u16,
}

impl Peer {
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }
}

/// Checks a template as the config loader does: an `https://` origin (the request carries the
/// client's credentials, never in clear text) with `{instance}` once, in the host.
pub fn check_template(template: &str) -> Result<(), String> {
    if template.matches(PLACEHOLDER).count() != 1 {
        return Err(format!(
            "`{template}` must contain {PLACEHOLDER} exactly once, where the active's instance \
             name goes, e.g. https://{PLACEHOLDER}.im-pods.prod.svc:8443"
        ));
    }
    peer(template, "im-a").map(|_| ())
}

/// The peer serving instance `instance` under `template`. Instance names come from the fence
/// row; anything but a DNS name (or an IP literal) is refused rather than spliced into a URL.
pub fn peer(template: &str, instance: &str) -> Result<Peer, String> {
    let name_ok = !instance.is_empty()
        && instance.len() <= 253
        && instance
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !name_ok {
        return Err(format!(
            "instance name {instance:?} is not a DNS name; cannot address it"
        ));
    }
    let text = template.replace(PLACEHOLDER, instance);
    let url = url::Url::parse(&text)
        .map_err(|e| format!("`{template}` is not a URL once {PLACEHOLDER} is filled in: {e}"))?;
    if url.scheme() != "https" {
        return Err(format!(
            "`{template}` must be an https:// URL: forwarded requests carry the client's \
             credentials"
        ));
    }
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
        || !(url.path().is_empty() || url.path() == "/")
    {
        return Err(format!(
            "`{template}` must be an origin only (scheme, host, port), no path, query or user"
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("`{template}` has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    // The placeholder must land in the host, or every instance would be the same peer.
    if !host.contains(instance) {
        return Err(format!(
            "`{template}`: {PLACEHOLDER} must be part of the host name"
        ));
    }
    Ok(Peer {
        host,
        port: url.port_or_known_default().unwrap_or(443),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_https_origins_with_the_instance_in_the_host() {
        let t = "https://{instance}.im-pods.prod.svc:8443";
        check_template(t).unwrap();
        assert_eq!(
            peer(t, "im-b").unwrap(),
            Peer {
                host: "im-b.im-pods.prod.svc".into(),
                port: 8443
            }
        );
        assert_eq!(peer("https://{instance}", "h").unwrap().port, 443);
        // An IP literal as the name (tests on loopback addresses).
        assert_eq!(
            peer("https://{instance}:9", "127.0.0.2").unwrap().host,
            "127.0.0.2"
        );
        for (bad, why) in [
            ("https://im-pods.prod.svc:8443", "exactly once"),
            ("https://{instance}.{instance}:1", "exactly once"),
            ("http://{instance}.im-pods:8443", "https://"),
            ("https://{instance}.x:8443/api", "origin only"),
            ("https://{instance}.x:8443?a=b", "origin only"),
            ("https://u:p@{instance}.x", "origin only"),
            ("https://x:8443/{instance}", "host"),
            ("https://{instance}.x:99999", "not a URL"),
        ] {
            let e = check_template(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn instance_names_are_never_spliced_into_a_url_unchecked() {
        let t = "https://{instance}.im-pods.prod.svc:8443";
        for bad in ["", "evil.com/", "a@b", "a:1", "im b", "a?x"] {
            assert!(peer(t, bad).is_err(), "{bad:?}");
        }
    }
}

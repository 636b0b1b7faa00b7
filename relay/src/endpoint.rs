//! Where the hub is: the server URL a relay is configured with, and curl-style address
//! overrides (`--resolve`).

use std::net::IpAddr;

/// Where the hub is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Hub path, e.g. `/hubs/relay`.
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid server URL '{url}': {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

impl Endpoint {
    /// Accepts `https://host[:port][/base]` or `wss://…`; the hub path `/hubs/relay` is
    /// appended unless the URL already ends with it.
    pub fn parse(url: &str, allow_insecure: bool) -> Result<Self, UrlError> {
        let err = |reason: &str| UrlError {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: hyper::Uri = url
            .trim()
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| err(&e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("https") | Some("wss") => true,
            Some("http") | Some("ws") if allow_insecure => false,
            Some("http") | Some("ws") => {
                return Err(err(
                    "plain http is not allowed; use https:// (the relay only talks TLS)",
                ))
            }
            _ => return Err(err("expected https://host[:port]")),
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| err("missing host name"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if uri.query().is_some() {
            return Err(err("a query string is not allowed"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base = uri.path().trim_end_matches('/');
        let path = if base.ends_with("/hubs/relay") {
            base.to_owned()
        } else {
            format!("{base}/hubs/relay")
        };
        Ok(Self {
            tls,
            host,
            port,
            path,
        })
    }

    pub(crate) fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// curl's `--resolve host:port:addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOverride {
    pub host: String,
    pub port: u16,
    pub addr: IpAddr,
}

impl ResolveOverride {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid --resolve '{s}': expected name:port:address");
        let (host, rest) = s.split_once(':').ok_or_else(bad)?;
        let (port, addr) = rest.split_once(':').ok_or_else(bad)?;
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        Ok(Self {
            host: host.to_owned(),
            port: port.parse().map_err(|_| bad())?,
            addr: addr.parse().map_err(|_| bad())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        let e = Endpoint::parse("https://imesh.example.com", false).unwrap();
        assert_eq!(
            e,
            Endpoint {
                tls: true,
                host: "imesh.example.com".into(),
                port: 443,
                path: "/hubs/relay".into()
            }
        );
        let e = Endpoint::parse("wss://h:8443/base/hubs/relay/", false).unwrap();
        assert_eq!((e.port, e.path.as_str()), (8443, "/base/hubs/relay"));
        let e = Endpoint::parse("https://h:8443/im", false).unwrap();
        assert_eq!(e.path, "/im/hubs/relay");
        assert_eq!(e.authority(), "h:8443");
        assert!(Endpoint::parse("http://h", false)
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(!Endpoint::parse("http://h", true).unwrap().tls);
        assert!(Endpoint::parse("h:443", false).is_err());
        assert!(Endpoint::parse("https://", false).is_err());
        assert!(Endpoint::parse("https://h/?x=1", false).is_err());
        assert!(Endpoint::parse("not a url", false).is_err());
        let e = Endpoint::parse("https://[::1]:9000", false).unwrap();
        assert_eq!(
            (e.host.as_str(), e.authority().as_str()),
            ("::1", "[::1]:9000")
        );
    }

    #[test]
    fn resolve_override_parsing() {
        let o = ResolveOverride::parse("hub.test:8443:127.0.0.1").unwrap();
        assert_eq!(o.port, 8443);
        assert_eq!(o.addr, "127.0.0.1".parse::<IpAddr>().unwrap());
        let o = ResolveOverride::parse("hub.test:8443:[::1]").unwrap();
        assert_eq!(o.addr, "::1".parse::<IpAddr>().unwrap());
        assert!(ResolveOverride::parse("hub.test:x:127.0.0.1").is_err());
        assert!(ResolveOverride::parse("hub.test").is_err());
    }
}

//! The forwarding decisions, as pure functions of what a request and the fence say: which
//! requests forward, what a non-active instance does while no newer holder exists, when a
//! request may be retried, and which headers cross.

use std::net::IpAddr;
use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};

use crate::store::Fence;

/// Set on a request one instance forwards to another; an instance that is not active refuses a
/// request carrying it, so a request is forwarded at most once and never loops.
pub const FORWARDED_BY: &str = "x-identitymesh-forwarded-by";
/// Set on the refusal of a forwarded request by an instance that is not active: the request was
/// not handled, so the forwarding instance may try again.
pub const REFUSED: &str = "x-identitymesh-refused";

/// What the public listener does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Handle it here.
    Serve,
    /// Pass it to the active instance.
    Forward,
    /// Already forwarded once, to an instance that is not active: answer 503.
    Refuse,
}

/// Requests about this very instance, or that must stay on it, are never forwarded: probes
/// (`/health/*` answer for this pod), the internal API, the relay hub (relays reconnect through
/// the Service by themselves) and metrics.
pub fn forwards_path(path: &str) -> bool {
    const LOCAL: [&str; 4] = ["/health", "/internal", "/hubs", "/metrics"];
    !LOCAL.iter().any(|p| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// `serving`: this instance is active and not demoting (it got a request permit).
pub fn action(path: &str, serving: bool, forwarded: bool) -> Action {
    if serving || !forwards_path(path) {
        Action::Serve
    } else if forwarded {
        Action::Refuse
    } else {
        Action::Forward
    }
}

/// One look at the fence by an instance holding a request it does not serve itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// This instance became active meanwhile (and got a request permit).
    Serve,
    /// Another instance holds the fence: forward to it.
    Forward { instance: String, epoch: i64 },
    /// No newer holder yet (between a demotion and the next promotion): ask again.
    Wait { why: String },
}

/// `serving` as in [`action`]: an active instance that is demoting waits like a demoted one.
pub fn step(fence: &Fence, me: &str, serving: bool) -> Step {
    if serving {
        return Step::Serve;
    }
    if fence.epoch == 0 || fence.holder.is_empty() {
        return Step::Wait {
            why: "no instance has been promoted yet".into(),
        };
    }
    if fence.holder == me {
        // Demoting, or demoted and not yet succeeded (or an older process under this name
        // holds it): forwarding to this name would come back here.
        return Step::Wait {
            why: format!(
                "{me} was demoted at epoch {} and no instance has been promoted since",
                fence.epoch
            ),
        };
    }
    Step::Forward {
        instance: fence.holder.clone(),
        epoch: fence.epoch,
    }
}

/// Whether a not-yet-active instance refusing a forwarded request should first wait for its
/// own role to flip: the fence already names this process with a newer epoch than it runs
/// under, i.e. its promotion committed and the role is being set.
pub fn promotion_landing(fence: &Fence, me: &str, incarnation: &str, own_epoch: i64) -> bool {
    fence.holder == me && fence.holder_incarnation == incarnation && fence.epoch > own_epoch
}

/// How long to sleep before the next look at the fence, or None once the hold bound is spent.
pub fn next_poll(elapsed: Duration, hold: Duration, poll: Duration) -> Option<Duration> {
    let left = hold.checked_sub(elapsed).filter(|l| !l.is_zero())?;
    Some(left.min(poll))
}

/// Where a forwarding attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Resolving, connecting or the TLS handshake: no byte of the request left this instance.
    Connect,
    /// After the request started to go out: the peer may have acted on it.
    Sent,
    /// The peer refused it unhandled ([`REFUSED`]): it was not active either.
    Refused,
}

/// Whether a failed attempt may be made again (within the hold bound). Once any byte may have
/// reached the peer only a safe method with no body is repeated: a write must never apply twice.
/// A refused request was not handled, but a streamed body is gone once sent: only an empty one
/// can be sent again.
pub fn may_retry(stage: Stage, method: &Method, body_empty: bool) -> bool {
    match stage {
        Stage::Connect => true,
        Stage::Refused => body_empty,
        Stage::Sent => {
            body_empty && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and never cross a proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `headers` without the hop-by-hop ones, nor those the Connection header names.
pub fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let hop = HOP_BY_HOP.contains(name)
            || *name == header::UPGRADE
            || named.iter().any(|n| n == name.as_str());
        if !hop {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The headers of a forwarded request: the client's end-to-end headers unchanged
/// (Authorization and Cookie included: the active authenticates the caller itself), the
/// original Host, `X-Forwarded-For` / `-Proto`, and [`FORWARDED_BY`].
pub fn request_headers(
    headers: &HeaderMap,
    authority: Option<&str>,
    client: Option<IpAddr>,
    proto: &'static str,
    me: &str,
) -> HeaderMap {
    let mut out = end_to_end(headers);
    // HTTP/2 carries the host in the URI's authority, HTTP/1.1 in Host; the peer speaks 1.1.
    if !out.contains_key(header::HOST) {
        if let Some(v) = authority.and_then(|a| HeaderValue::from_str(a).ok()) {
            out.insert(header::HOST, v);
        }
    }
    if let Some(ip) = client {
        let xff = HeaderName::from_static("x-forwarded-for");
        let chain = match out.get(&xff).and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip.to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&chain) {
            out.insert(xff, v);
        }
    }
    out.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    if let Ok(v) = HeaderValue::from_str(me) {
        out.insert(HeaderName::from_static(FORWARDED_BY), v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(epoch: i64, holder: &str, incarnation: &str) -> Fence {
        Fence {
            epoch,
            holder: holder.into(),
            holder_incarnation: incarnation.into(),
        }
    }

    #[test]
    fn only_admin_api_and_ui_requests_forward() {
        for p in [
            "/",
            "/api/connectors",
            "/api/openapi.json",
            "/auth/session",
            "/connectors/x",
            "/assets/app.js",
            "/healthz",
            "/hubsx",
        ] {
            assert!(forwards_path(p), "{p}");
        }
        for p in [
            "/health/ready",
            "/health/live",
            "/health",
            "/internal/v1/status",
            "/hubs/relay",
            "/hubs/relay/negotiate",
            "/metrics",
        ] {
            assert!(!forwards_path(p), "{p}");
        }
    }

    #[test]
    fn the_active_serves_everything_others_forward_once() {
        use Action::*;
        let cases = [
            // (path, serving as active, already forwarded) -> action
            ("/api/connectors", true, false, Serve),
            // The active is where forwarded requests land.
            ("/api/connectors", true, true, Serve),
            // A standby, or an active finishing its requests before it demotes.
            ("/api/connectors", false, false, Forward),
            ("/", false, false, Forward),
            // Never forwarded twice: a loop is refused.
            ("/api/connectors", false, true, Refuse),
            ("/health/ready", false, false, Serve),
            ("/health/ready", false, true, Serve),
            ("/hubs/relay", false, false, Serve),
        ];
        for (path, serving, fwd, want) in cases {
            assert_eq!(action(path, serving, fwd), want, "{path} {serving} {fwd}");
        }
    }

    #[test]
    fn a_demoted_instance_waits_for_the_next_holder_then_forwards() {
        // Demoted im-a still holds epoch 7: nobody newer yet.
        assert!(matches!(
            step(&fence(7, "im-a", "p1"), "im-a", false),
            Step::Wait { why } if why.contains("demoted at epoch 7")
        ));
        // An older process under the same name holds it: still not someone to forward to.
        assert!(matches!(
            step(&fence(7, "im-a", "old"), "im-a", false),
            Step::Wait { .. }
        ));
        assert!(matches!(
            step(&fence(0, "", ""), "im-a", false),
            Step::Wait { why } if why.contains("no instance")
        ));
        // The promotion committed: forward to the new holder.
        assert_eq!(
            step(&fence(8, "im-b", "p2"), "im-a", false),
            Step::Forward {
                instance: "im-b".into(),
                epoch: 8
            }
        );
        // Promoted itself while holding: serve here.
        assert_eq!(step(&fence(9, "im-a", "p1"), "im-a", true), Step::Serve);
    }

    #[test]
    fn a_refusal_waits_only_for_its_own_promotion_landing() {
        // im-b's promotion to 8 committed, its role still says epoch 7.
        assert!(promotion_landing(&fence(8, "im-b", "p2"), "im-b", "p2", 7));
        // Demoted im-a, holding its old epoch: refuse at once.
        assert!(!promotion_landing(&fence(7, "im-a", "p1"), "im-a", "p1", 7));
        // Another incarnation or another name holds it.
        assert!(!promotion_landing(&fence(8, "im-b", "p1"), "im-b", "p2", 7));
        assert!(!promotion_landing(&fence(8, "im-a", "p2"), "im-b", "p2", 7));
    }

    #[test]
    fn the_hold_is_bounded() {
        let ms = Duration::from_millis;
        let (hold, poll) = (ms(5000), ms(50));
        assert_eq!(next_poll(ms(0), hold, poll), Some(ms(50)));
        assert_eq!(next_poll(ms(4980), hold, poll), Some(ms(20)));
        assert_eq!(next_poll(ms(5000), hold, poll), None);
        assert_eq!(next_poll(ms(9000), hold, poll), None);
        // hold_ms = 0: no waiting at all.
        assert_eq!(next_poll(ms(0), ms(0), poll), None);
    }

    #[test]
    fn writes_are_never_repeated_once_sent() {
        let cases = [
            (Stage::Connect, Method::POST, false, true),
            (Stage::Refused, Method::POST, true, true),
            (Stage::Refused, Method::POST, false, false),
            (Stage::Sent, Method::POST, false, false),
            (Stage::Sent, Method::PUT, true, false),
            (Stage::Sent, Method::DELETE, true, false),
            (Stage::Sent, Method::GET, true, true),
            (Stage::Sent, Method::HEAD, true, true),
            // A GET with a streamed body is not repeated either: the body is gone.
            (Stage::Sent, Method::GET, false, false),
        ];
        for (stage, m, empty, want) in cases {
            assert_eq!(may_retry(stage, &m, empty), want, "{stage:?} {m} {empty}");
        }
    }

    #[test]
    fn credentials_cross_hop_by_hop_headers_do_not() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
        h.append(header::COOKIE, "a=1".parse().unwrap());
        h.append(header::COOKIE, "b=2".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.9".parse().unwrap());
        h.insert(FORWARDED_BY, "spoofed".parse().unwrap());
        let out = request_headers(
            &h,
            Some("im.prod.svc"),
            Some("10.1.2.3".parse().unwrap()),
            "https",
            "im-a",
        );
        assert_eq!(out[header::AUTHORIZATION], "Bearer t");
        let cookies: Vec<_> = out.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
        for gone in [
            "connection",
            "keep-alive",
            "x-private",
            "transfer-encoding",
            "upgrade",
            "te",
        ] {
            assert!(!out.contains_key(gone), "{gone}");
        }
        assert_eq!(out[header::HOST], "im.prod.svc");
        assert_eq!(out["x-forwarded-for"], "10.0.0.9, 10.1.2.3");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out[FORWARDED_BY], "im-a");
        // An HTTP/1.1 client's Host stays as sent.
        h.insert(header::HOST, "im:8443".parse().unwrap());
        let out = request_headers(&h, Some("other"), None, "https", "im-a");
        assert_eq!(out[header::HOST], "im:8443");
        assert!(!out.contains_key("x-forwarded-for") || out["x-forwarded-for"] == "10.0.0.9");
    }

    #[test]
    fn response_cookies_pass_unchanged() {
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            "im_session=x; Secure; HttpOnly".parse().unwrap(),
        );
        h.append(header::SET_COOKIE, "im_csrf=y".parse().unwrap());
        h.insert(header::CONNECTION, "close".parse().unwrap());
        let out = end_to_end(&h);
        let set: Vec<_> = out.get_all(header::SET_COOKIE).iter().collect();
        assert_eq!(set, ["im_session=x; Secure; HttpOnly", "im_csrf=y"]);
        assert!(!out.contains_key(header::CONNECTION));
    }
}

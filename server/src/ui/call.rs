//! Reads through the Admin API, in-process, with the browser's own credentials.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use maud::{html, Markup};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::Value;
use tower::ServiceExt;

use super::Ctx;

/// Why the API did not answer a page's read.
#[derive(Debug)]
pub enum Refusal {
    /// 401: no session, or it ended.
    SignIn(String),
    /// 403: the caller may not read this.
    Forbidden(String),
    NotFound(String),
    Failed(StatusCode, String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::SignIn(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::NotFound(_) => StatusCode::NOT_FOUND,
            Refusal::Failed(s, _) => *s,
        }
    }

    /// The refusal as a page section: what went wrong and what to do.
    pub fn markup(&self) -> Markup {
        let (title, detail) = match self {
            Refusal::SignIn(d) => ("You are not signed in", d),
            Refusal::Forbidden(d) => ("You may not see this", d),
            Refusal::NotFound(d) => ("Not found", d),
            Refusal::Failed(_, d) => ("The server could not answer", d),
        };
        html! {
            section.refusal role="alert" {
                h2 { (title) }
                p { (detail) }
                @if matches!(self, Refusal::SignIn(_)) { p { a href="/signin" { "Sign in" } } }
            }
        }
    }
}

/// Path segments: everything but unreserved characters is escaped (a DN's `,`, `=` and `/`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `s` as one URL path segment or query value.
pub fn enc(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The API's `detail`, or a short description of a body that is not a problem.
fn detail_of(body: &Value, status: StatusCode) -> String {
    body["detail"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("the Admin API answered {status}"))
}

impl Ctx {
    /// `GET path` on the Admin API as this browser: the JSON answer, or why there is none.
    pub async fn get(&self, path: &str) -> Result<Value, Refusal> {
        let mut req = Request::builder().method("GET").uri(path);
        for (k, v) in &self.forward {
            req = req.header(k, v);
        }
        let req = req
            .header(header::ACCEPT, "application/json")
            .body(Body::empty())
            .map_err(|e| {
                Refusal::Failed(StatusCode::BAD_REQUEST, format!("bad path {path}: {e}"))
            })?;
        let res = self
            .ui
            .api
            .clone()
            .oneshot(req)
            .await
            .unwrap_or_else(|never| match never {});
        let status = res.status();
        {
            let mut set = self.set_cookies.lock().unwrap_or_else(|e| e.into_inner());
            set.extend(res.headers().get_all(header::SET_COOKIE).iter().cloned());
        }
        let bytes = axum::body::to_bytes(res.into_body(), 64 * 1024 * 1024)
            .await
            .map_err(|e| Refusal::Failed(StatusCode::BAD_GATEWAY, format!("read {path}: {e}")))?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        match status {
            s if s.is_success() => Ok(body),
            StatusCode::UNAUTHORIZED => Err(Refusal::SignIn(detail_of(&body, status))),
            StatusCode::FORBIDDEN => Err(Refusal::Forbidden(detail_of(&body, status))),
            StatusCode::NOT_FOUND => Err(Refusal::NotFound(detail_of(&body, status))),
            s => Err(Refusal::Failed(s, detail_of(&body, s))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dn_is_one_path_segment() {
        let dn = "cn=Ann Lee/ops,ou=People,dc=example,dc=org";
        let e = enc(dn);
        assert!(
            !e.contains('/') && !e.contains(',') && !e.contains(' '),
            "{e}"
        );
        let back = percent_encoding::percent_decode_str(&e)
            .decode_utf8()
            .unwrap();
        assert_eq!(back, dn);
    }
}

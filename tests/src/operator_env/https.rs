//! HTTPS requests through the Service as a client makes them, with the cluster CA.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one GET /health/ready through the Service returned.
#[derive(Debug, Clone)]
pub struct Ready {
    pub code: u16,
    pub role: String,
    pub epoch: i64,
}

fn roots(ca_pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()).flatten() {
        roots.add(c).expect("CA certificate");
    }
    roots
}

/// HTTPS GET verified against the cluster CA for `sni` (a DNS name of the client Service).
pub async fn https_get(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    https_request(addr, sni, ca_pem, "GET", path, None, None, timeout).await
}

/// Joins the chunks of a `Transfer-Encoding: chunked` body.
fn dechunk(body: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| format!("truncated chunked body {body:?}"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| format!("truncated chunk in {body:?}"))?;
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// One HTTPS request (HTTP/1.1, `Connection: close`) verified against the cluster CA for
/// `sni`, with an optional bearer token and JSON body; returns the status and the body.
#[allow(clippy::too_many_arguments)]
pub async fn https_request(
    addr: SocketAddr,
    sni: &str,
    ca_pem: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    json_body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots(ca_pem))
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n");
    if let Some(t) = bearer {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = json_body.unwrap_or("");
    if json_body.is_some() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body);
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        tls.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        // A peer that closes without close_notify still gave us the whole response.
        if let Err(e) = tls.read_to_end(&mut buf).await {
            if buf.is_empty() {
                return Err(format!("read: {e}"));
            }
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("bad response {text:?}"))?;
        let (headers, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let chunked = headers.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(body)?
        } else {
            body.to_string()
        };
        Ok((code, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| "timeout".to_string())?
}

/// An Admin API client of the client Service (through the Service proxy), with a bearer token.
#[derive(Clone)]
pub struct AdminClient {
    pub addr: SocketAddr,
    pub sni: String,
    pub ca: String,
    pub token: String,
    pub timeout: Duration,
}

impl AdminClient {
    /// One request; the answer's status and JSON body (null when it is not JSON).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), String> {
        let body = body.map(serde_json::Value::to_string);
        let (code, text) = https_request(
            self.addr,
            &self.sni,
            &self.ca,
            method,
            path,
            Some(&self.token),
            body.as_deref(),
            self.timeout,
        )
        .await?;
        Ok((
            code,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        ))
    }
}

impl super::Env {
    /// An [`AdminClient`] with `token` (give the servers it with `EnvOptions::admin_token` or a
    /// bootstrap token file) and a per-request `timeout`.
    pub async fn admin_client(&mut self, token: &str, timeout: Duration) -> AdminClient {
        AdminClient {
            addr: self.proxy_addr().await,
            sni: self.service_dns(),
            ca: self.ca_pem().await,
            token: token.to_string(),
            timeout,
        }
    }
}

//! One connection attempt: resolve → TCP → TLS → negotiate → WebSocket → SignalR handshake.
//!
//! The name is resolved on every attempt (never cached), so after a cutover the relay follows
//! DNS / the Service to the new active pod.

use crate::config::RelaySettings;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use identitymesh_signalr::protocol::{
    FrameSplitter, HandshakeRequest, HandshakeResponse, NegotiateResponse, DEFAULT_MAX_FRAME_SIZE,
};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host} resolved to no addresses")]
    NoAddresses { host: String },
    #[error("cannot connect to {host} ({addrs}): {reason}")]
    Connect {
        host: String,
        addrs: String,
        reason: String,
    },
    #[error("the server certificate of {host} is not trusted: {detail}. The relay trusts only the CA it was enrolled with; re-enroll with the cluster CA (--ca-file) if the cluster CA changed")]
    UntrustedCertificate { host: String, detail: String },
    #[error("TLS handshake with {host} failed: {detail}")]
    Tls { host: String, detail: String },
    #[error("the server rejected the relay credential (HTTP {status}: {body}); it is invalid or has been revoked — issue a new one and run `identitymesh-relay enroll` again")]
    Unauthorized { status: u16, body: String },
    #[error(
        "the hub is not accepting relays right now (HTTP 503, e.g. a standby instance): {body}"
    )]
    Unavailable { body: String },
    #[error("unexpected HTTP {status} from {stage}: {body}")]
    Http {
        stage: &'static str,
        status: u16,
        body: String,
    },
    #[error("{stage} failed: {detail}")]
    Protocol { stage: &'static str, detail: String },
    #[error("{stage} timed out after {after:?}")]
    Timeout {
        stage: &'static str,
        after: Duration,
    },
}

impl ConnectError {
    /// Credential problems are retried slowly; everything else with the normal backoff.
    pub fn is_auth(&self) -> bool {
        matches!(self, ConnectError::Unauthorized { .. })
    }
}

/// TCP or TLS-over-TCP, so the rest of the code has one stream type.
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Builds the per-attempt connector (TLS config is built once per agent).
#[derive(Clone)]
pub struct Connector {
    settings: Arc<RelaySettings>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A connected, handshaken hub session.
pub struct Connected {
    pub ws: WebSocketStream<MaybeTls>,
    pub connection_id: String,
    pub addr: SocketAddr,
    /// Frames that arrived right behind the handshake response.
    pub leftover: Vec<String>,
    pub splitter: FrameSplitter,
}

async fn timed<T>(
    stage: &'static str,
    after: Duration,
    f: impl std::future::Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    tokio::time::timeout(after, f)
        .await
        .map_err(|_| ConnectError::Timeout { stage, after })?
}

impl Connector {
    pub fn new(settings: Arc<RelaySettings>) -> Result<Self, crate::tls::TlsSetupError> {
        let tls = if settings.endpoint.tls {
            Some(crate::tls::client_config(&settings.trust)?)
        } else {
            None
        };
        Ok(Self { settings, tls })
    }

    pub fn settings(&self) -> &RelaySettings {
        &self.settings
    }

    /// Resolves the hub name now (no caching across attempts).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, ConnectError> {
        let ep = &self.settings.endpoint;
        let overridden: Vec<SocketAddr> = self
            .settings
            .resolve
            .iter()
            .filter(|o| o.host.eq_ignore_ascii_case(&ep.host) && o.port == ep.port)
            .map(|o| SocketAddr::new(o.addr, ep.port))
            .collect();
        if !overridden.is_empty() {
            return Ok(overridden);
        }
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((ep.host.as_str(), ep.port))
            .await
            .map_err(|source| ConnectError::Resolve {
                host: ep.host.clone(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(ConnectError::NoAddresses {
                host: ep.host.clone(),
            });
        }
        Ok(addrs)
    }

    async fn open(&self, addr: SocketAddr) -> Result<MaybeTls, ConnectError> {
        let ep = &self.settings.endpoint;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ConnectError::Connect {
                host: ep.host.clone(),
                addrs: addr.to_string(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let Some(cfg) = &self.tls else {
            return Ok(MaybeTls::Plain(tcp));
        };
        let name = rustls::pki_types::ServerName::try_from(ep.host.clone()).map_err(|e| {
            ConnectError::Tls {
                host: ep.host.clone(),
                detail: format!("invalid server name: {e}"),
            }
        })?;
        let tls = tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(&ep.host, e))?;
        Ok(MaybeTls::Tls(Box::new(tls)))
    }

    /// Tries each resolved address in order; the first that accepts TCP+TLS wins.
    async fn open_any(&self, addrs: &[SocketAddr]) -> Result<(MaybeTls, SocketAddr), ConnectError> {
        let mut last = None;
        for &addr in addrs {
            match timed(
                "TCP/TLS connect",
                self.settings.connect_timeout,
                self.open(addr),
            )
            .await
            {
                Ok(s) => return Ok((s, addr)),
                // A certificate problem will not improve on another address of the same name.
                Err(e @ ConnectError::UntrustedCertificate { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ConnectError::NoAddresses {
            host: self.settings.endpoint.host.clone(),
        }))
    }

    /// `POST <hub>/negotiate?negotiateVersion=1` → the connection token, and the stream back
    /// when the server kept it open, so the WebSocket upgrade reuses it (one TCP and TLS
    /// handshake per attempt instead of two, on both sides).
    async fn negotiate(
        &self,
        stream: MaybeTls,
    ) -> Result<(NegotiateResponse, Option<MaybeTls>), ConnectError> {
        let ep = &self.settings.endpoint;
        let proto = |detail: String| ConnectError::Protocol {
            stage: "negotiate",
            detail,
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| proto(e.to_string()))?;
        let conn_task = tokio::spawn(conn.without_shutdown());
        let req = hyper::Request::post(format!("{}/negotiate?negotiateVersion=1", ep.path))
            .header(hyper::header::HOST, ep.authority())
            .header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", self.settings.token),
            )
            .header(hyper::header::USER_AGENT, crate::USER_AGENT)
            .header(hyper::header::CONTENT_LENGTH, "0")
            .body(Empty::<Bytes>::new())
            .map_err(|e| proto(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| proto(e.to_string()))?;
        let status = resp.status().as_u16();
        let closing = resp
            .headers()
            .get(hyper::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.to_ascii_lowercase().contains("close"));
        // Bound what we read: a negotiate body is tiny.
        let body = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| proto(e.to_string()))?
            .to_bytes();
        // With the sender gone and the response read, the connection task ends and hands the
        // stream back. Anything unexpected (close, unread bytes, a slow finish): new stream.
        drop(sender);
        let mut reused = None;
        if status == 200 && !closing {
            let abort = conn_task.abort_handle();
            match tokio::time::timeout(Duration::from_secs(1), conn_task).await {
                Ok(Ok(Ok(parts))) if parts.read_buf.is_empty() => {
                    reused = Some(parts.io.into_inner());
                }
                Ok(_) => {}
                Err(_) => abort.abort(),
            }
        } else {
            conn_task.abort();
        }
        let text = String::from_utf8_lossy(&body)
            .chars()
            .take(300)
            .collect::<String>();
        match status {
            200 => serde_json::from_slice::<NegotiateResponse>(&body)
                .map(|neg| (neg, reused))
                .map_err(|e| proto(format!("invalid negotiate response: {e}"))),
            401 | 403 => Err(ConnectError::Unauthorized { status, body: text }),
            503 => Err(ConnectError::Unavailable { body: text }),
            _ => Err(ConnectError::Http {
                stage: "negotiate",
                status,
                body: text,
            }),
        }
    }

    /// Only negotiates: used by `enroll` to check trust and credential.
    pub async fn check(&self) -> Result<SocketAddr, ConnectError> {
        let addrs = self.resolve().await?;
        let (stream, addr) = self.open_any(&addrs).await?;
        timed(
            "negotiate",
            self.settings.connect_timeout,
            self.negotiate(stream),
        )
        .await?;
        Ok(addr)
    }

    /// One full connection attempt.
    pub async fn connect(&self) -> Result<Connected, ConnectError> {
        let ep = &self.settings.endpoint;
        let t = self.settings.connect_timeout;
        let addrs = self.resolve().await?;
        let (stream, addr) = self.open_any(&addrs).await?;
        let (neg, reused) = timed("negotiate", t, self.negotiate(stream)).await?;
        let token = neg
            .connection_token
            .clone()
            .ok_or_else(|| ConnectError::Protocol {
                stage: "negotiate",
                detail: "response has no connectionToken (negotiateVersion 1 required)".into(),
            })?;
        if !neg
            .available_transports
            .iter()
            .any(|tr| tr.transport == "WebSockets")
        {
            return Err(ConnectError::Protocol {
                stage: "negotiate",
                detail: "the server offers no WebSockets transport".into(),
            });
        }
        // Same connection, or at least the same address as negotiate: the token lives in that
        // server process.
        let stream = match reused {
            Some(s) => s,
            None => timed("TCP/TLS connect", t, self.open(addr)).await?,
        };
        let scheme = if ep.tls { "wss" } else { "ws" };
        let url = format!(
            "{scheme}://{}{}?id={}",
            ep.authority(),
            ep.path,
            percent_encode(&token)
        );
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
            .map_err(|e| ConnectError::Protocol {
                stage: "WebSocket request",
                detail: e.to_string(),
            })?;
        let h = req.headers_mut();
        let bearer = format!("Bearer {}", self.settings.token)
            .parse()
            .map_err(|_| ConnectError::Protocol {
                stage: "WebSocket request",
                detail: "the token contains characters not allowed in a header".into(),
            })?;
        h.insert(hyper::header::AUTHORIZATION, bearer);
        h.insert(
            hyper::header::USER_AGENT,
            hyper::header::HeaderValue::from_static(crate::USER_AGENT),
        );
        let mut cfg = tungstenite::protocol::WebSocketConfig::default();
        cfg.max_message_size = Some(DEFAULT_MAX_FRAME_SIZE + 1024);
        cfg.max_frame_size = Some(DEFAULT_MAX_FRAME_SIZE + 1024);
        cfg.read_buffer_size = 16 * 1024;
        cfg.write_buffer_size = 0;
        let (mut ws, _resp) = timed("WebSocket upgrade", t, async {
            tokio_tungstenite::client_async_with_config(req, stream, Some(cfg))
                .await
                .map_err(|e| ws_error(&ep.host, e))
        })
        .await?;
        let (splitter, leftover) =
            timed("SignalR handshake", t, signalr_handshake(&mut ws)).await?;
        Ok(Connected {
            ws,
            connection_id: neg.connection_id,
            addr,
            leftover,
            splitter,
        })
    }
}

async fn signalr_handshake(
    ws: &mut WebSocketStream<MaybeTls>,
) -> Result<(FrameSplitter, Vec<String>), ConnectError> {
    use futures::{SinkExt as _, StreamExt as _};
    let proto = |detail: String| ConnectError::Protocol {
        stage: "SignalR handshake",
        detail,
    };
    ws.send(tungstenite::Message::text(
        HandshakeRequest::json_v1().to_frame(),
    ))
    .await
    .map_err(|e| proto(e.to_string()))?;
    let mut splitter = FrameSplitter::new(DEFAULT_MAX_FRAME_SIZE);
    loop {
        let msg = ws
            .next()
            .await
            .ok_or_else(|| proto("connection closed before the handshake response".into()))?
            .map_err(|e| proto(e.to_string()))?;
        let text = match msg {
            tungstenite::Message::Text(t) => t,
            tungstenite::Message::Close(_) => {
                return Err(proto("server closed during the handshake".into()))
            }
            tungstenite::Message::Binary(_) => {
                return Err(proto("binary frame during the handshake".into()))
            }
            _ => continue,
        };
        let frames = splitter
            .push_collect(text.as_bytes())
            .map_err(|e| proto(e.to_string()))?;
        let mut it = frames.into_iter();
        let Some(first) = it.next() else { continue };
        let resp = HandshakeResponse::parse(first.as_bytes()).map_err(|e| proto(e.to_string()))?;
        if let Some(e) = resp.error {
            return Err(proto(format!("server rejected the handshake: {e}")));
        }
        return Ok((splitter, it.collect()));
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn tls_error(host: &str, e: io::Error) -> ConnectError {
    if let Some(rustls_err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        if let rustls::Error::InvalidCertificate(cert) = rustls_err {
            return ConnectError::UntrustedCertificate {
                host: host.to_owned(),
                detail: format!("{cert:?}"),
            };
        }
        return ConnectError::Tls {
            host: host.to_owned(),
            detail: rustls_err.to_string(),
        };
    }
    ConnectError::Tls {
        host: host.to_owned(),
        detail: e.to_string(),
    }
}

fn ws_error(host: &str, e: tungstenite::Error) -> ConnectError {
    match e {
        tungstenite::Error::Http(resp) => {
            let status = resp.status().as_u16();
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).chars().take(300).collect())
                .unwrap_or_default();
            match status {
                401 | 403 => ConnectError::Unauthorized { status, body },
                503 => ConnectError::Unavailable { body },
                _ => ConnectError::Http {
                    stage: "WebSocket upgrade",
                    status,
                    body,
                },
            }
        }
        tungstenite::Error::Io(io) => tls_error(host, io),
        other => ConnectError::Protocol {
            stage: "WebSocket upgrade",
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_percent_encoded() {
        assert_eq!(percent_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(percent_encode("Az09-_.~"), "Az09-_.~");
    }
}

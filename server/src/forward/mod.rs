//! Forwarding to the active instance. The Service proxy applies an endpoint change some time
//! after the selector swings (kube-proxy: about a second), so clients keep reaching the demoted
//! pod for a while; it passes their Admin API and UI requests to the instance that holds the
//! fence and relays the answer, holding them (bounded) while no newer holder exists yet.
//!
//! The decisions are pure ([`decide`], [`target`]); this module is the I/O around them: read
//! the fence, wait, connect to the peer over TLS verified against the cluster CA, stream the
//! request once and the answer back.

pub mod decide;
pub mod target;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, request::Parts, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::Limited;
use hyper::body::Body as _;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;

use crate::api::MAX_BODY_BYTES;
use crate::config::ForwardingConfig;
use crate::engine::Engine;
use crate::problem::Problem;
use crate::store::Role;
use decide::{Action, Stage, Step, FORWARDED_BY, REFUSED};

/// How often a held request looks at the fence again.
const POLL: Duration = Duration::from_millis(50);
/// One attempt to reach the peer (resolve, connect, TLS), within the hold bound.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Forwarder {
    engine: Arc<Engine>,
    template: String,
    ca_file: PathBuf,
    hold: Duration,
    /// How clients reached this listener, for X-Forwarded-Proto.
    proto: &'static str,
    /// The peer TLS configuration and the CA file's mtime it was built from: re-read when the
    /// operator rotates the CA, without a watcher (forwarding is rare).
    tls: Mutex<Option<(Option<SystemTime>, Arc<ClientConfig>)>>,
}

/// Why one attempt failed, and the peer's answer when it gave one.
struct Failed {
    stage: Stage,
    why: String,
    answer: Option<Response>,
}

impl Failed {
    fn at(stage: Stage, why: impl Into<String>) -> Self {
        Self {
            stage,
            why: why.into(),
            answer: None,
        }
    }
}

impl Forwarder {
    /// Checks the settings and the CA file now, so a mistake stops the start, not a switchover.
    pub fn new(
        engine: Arc<Engine>,
        cfg: &ForwardingConfig,
        ca_file: &Path,
        plain_http: bool,
    ) -> anyhow::Result<Arc<Self>> {
        let template = cfg
            .peer_url_template
            .clone()
            .ok_or_else(|| anyhow::anyhow!("forwarding.peer_url_template is required"))?;
        target::check_template(&template)
            .map_err(|e| anyhow::anyhow!("forwarding.peer_url_template: {e}"))?;
        let fw = Self {
            engine,
            template,
            ca_file: ca_file.to_path_buf(),
            hold: Duration::from_millis(cfg.hold_ms),
            proto: if plain_http { "http" } else { "https" },
            tls: Mutex::new(None),
        };
        fw.client_config()
            .map_err(|e| anyhow::anyhow!("forwarding.ca_file (IM_FORWARDING__CA_FILE): {e}"))?;
        Ok(Arc::new(fw))
    }

    fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let stamp = std::fs::metadata(&self.ca_file)
            .and_then(|m| m.modified())
            .ok();
        let mut cached = self.tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, cfg)) = cached.as_ref() {
            if *at == stamp {
                return Ok(cfg.clone());
            }
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in crate::tls::load_certs(&self.ca_file).map_err(|e| e.to_string())? {
            roots.add(c).map_err(|e| {
                format!(
                    "{}: not a usable CA certificate: {e}",
                    self.ca_file.display()
                )
            })?;
        }
        let mut cfg =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        *cached = Some((stamp, cfg.clone()));
        Ok(cfg)
    }

    /// A request that must be forwarded: look at the fence until someone else holds it (or
    /// this instance became active), then forward; past the hold bound, 503.
    async fn forward(&self, req: Request, next: Next) -> Response {
        let started = Instant::now();
        let me = self.engine.instance();
        let (parts, body) = req.into_parts();
        let body_empty = body.size_hint().exact() == Some(0);
        let mut body = Some(body);
        let mut why;
        loop {
            let permit = self.engine.begin_request();
            let step = match permit {
                Some(_) => Step::Serve,
                None => match self.engine.store().fence().await {
                    Ok(f) => decide::step(&f, me, false),
                    Err(e) => Step::Wait {
                        why: format!("the fence cannot be read: {e}"),
                    },
                },
            };
            match step {
                Step::Serve => {
                    let body = body.take().unwrap_or_else(Body::empty);
                    // `permit` lives until the return: the request runs under it.
                    return next.run(Request::from_parts(parts, body)).await;
                }
                Step::Forward { instance, epoch } => {
                    match self.attempt(&parts, &mut body, &instance).await {
                        Ok(res) => {
                            tracing::info!(
                                method = %parts.method, path = parts.uri.path(), to = %instance,
                                epoch, status = res.status().as_u16(),
                                held_ms = started.elapsed().as_millis() as u64,
                                "forwarded a request to the active instance"
                            );
                            return res;
                        }
                        Err(f) if decide::may_retry(f.stage, &parts.method, body_empty) => {
                            why = format!("{instance} (epoch {epoch}): {}", f.why);
                        }
                        Err(mut f) => {
                            tracing::warn!(
                                method = %parts.method, path = parts.uri.path(), to = %instance,
                                stage = ?f.stage, error = %f.why,
                                "forwarding to the active instance failed"
                            );
                            return match f.answer.take() {
                                Some(answer) => answer,
                                None => failed_answer(&instance, &f),
                            };
                        }
                    }
                }
                Step::Wait { why: w } => why = w,
            }
            match decide::next_poll(started.elapsed(), self.hold, POLL) {
                Some(d) => tokio::time::sleep(d).await,
                None => {
                    tracing::warn!(
                        method = %parts.method, path = parts.uri.path(), hold_ms = self.hold.as_millis() as u64,
                        reason = %why, "no active instance to forward a request to within the hold bound"
                    );
                    return unavailable(
                        format!(
                            "this instance ({me}) is not active and found no active instance to \
                             pass the request to within {} ms: {why}. A switchover may be in \
                             progress; retry shortly",
                            self.hold.as_millis()
                        ),
                        false,
                    );
                }
            }
        }
    }

    /// One attempt at the peer serving `instance`; the body goes out at most once.
    async fn attempt(
        &self,
        parts: &Parts,
        body: &mut Option<Body>,
        instance: &str,
    ) -> Result<Response, Failed> {
        let peer =
            target::peer(&self.template, instance).map_err(|e| Failed::at(Stage::Connect, e))?;
        let tls = self
            .client_config()
            .map_err(|e| Failed::at(Stage::Connect, e))?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect(&peer, tls))
            .await
            .map_err(|_| {
                Failed::at(
                    Stage::Connect,
                    format!("{} did not answer within {CONNECT_TIMEOUT:?}", peer.url()),
                )
            })?
            .map_err(|e| Failed::at(Stage::Connect, format!("{}: {e}", peer.url())))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failed::at(Stage::Connect, format!("{}: {e}", peer.url())))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });

        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let mut headers = decide::request_headers(
            &parts.headers,
            parts.uri.authority().map(|a| a.as_str()),
            client,
            self.proto,
            self.engine.instance(),
        );
        // One request per connection: forwarding happens only around a switchover.
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let out_body = match body.take() {
            Some(b) => Body::new(Limited::new(b, MAX_BODY_BYTES)),
            None => Body::empty(),
        };
        let mut out = axum::http::Request::builder()
            .method(parts.method.clone())
            .uri(path)
            .body(out_body)
            .map_err(|e| Failed::at(Stage::Connect, e.to_string()))?;
        *out.headers_mut() = headers;

        let res = sender.send_request(out).await.map_err(|e| {
            let mut f = Failed::at(Stage::Sent, chain(&e));
            if too_large(&e) {
                f.answer = Some(
                    Problem::new(
                        axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
                    )
                    .into_response(),
                );
            }
            f
        })?;
        let (mut rp, incoming) = res.into_parts();
        rp.headers = decide::end_to_end(&rp.headers);
        let refused = rp.headers.contains_key(REFUSED);
        let res = Response::from_parts(rp, Body::new(incoming));
        if refused {
            return Err(Failed {
                stage: Stage::Refused,
                why: format!("{instance} is not active either"),
                answer: Some(res),
            });
        }
        Ok(res)
    }

    /// A forwarded request reached this instance, which is not active. It never forwards it
    /// again; it waits only when its own promotion has committed and its role is being set.
    async fn refuse(&self, req: Request, next: Next, by: &str) -> Response {
        let me = self.engine.instance();
        let own = self.engine.status();
        let landing = matches!(self.engine.store().fence().await,
            Ok(f) if decide::promotion_landing(&f, me, self.engine.incarnation(), own.epoch));
        if landing {
            let mut roles = self.engine.subscribe();
            let active =
                tokio::time::timeout(self.hold, roles.wait_for(|s| s.role == Role::Active))
                    .await
                    .is_ok_and(|r| r.is_ok());
            if let Some(_permit) = active.then(|| self.engine.begin_request()).flatten() {
                return next.run(req).await;
            }
        }
        tracing::warn!(
            path = req.uri().path(),
            forwarded_by = by,
            "refused a forwarded request: this instance is not active and forwards at most once"
        );
        unavailable(
            format!(
                "{by} forwarded this request to {me}, which is not active either; a request is \
                 forwarded at most once. A switchover may be in progress; retry shortly"
            ),
            true,
        )
    }
}

/// The middleware on the public listener (see [`decide::action`]).
pub async fn layer(State(fw): State<Arc<Forwarder>>, req: Request, next: Next) -> Response {
    let by = req
        .headers()
        .get(FORWARDED_BY)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    // Held until the answer is returned: a planned demotion waits for it (see
    // Engine::begin_request).
    let permit = decide::forwards_path(req.uri().path())
        .then(|| fw.engine.begin_request())
        .flatten();
    match decide::action(req.uri().path(), permit.is_some(), by.is_some()) {
        Action::Serve => next.run(req).await,
        Action::Forward => fw.forward(req, next).await,
        Action::Refuse => {
            fw.refuse(req, next, by.as_deref().unwrap_or_default())
                .await
        }
    }
}

async fn connect(
    peer: &target::Peer,
    tls: Arc<ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let addrs = tokio::net::lookup_host((peer.host.as_str(), peer.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", peer.host))?;
    let mut last = format!("{} resolves to no address", peer.host);
    let mut tcp = None;
    for a in addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = format!("connect {a}: {e}"),
        }
    }
    let tcp = tcp.ok_or(last)?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from(peer.host.clone())
        .map_err(|e| format!("{}: {e}", peer.host))?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))
}

/// 503 with Retry-After; `refused` marks a forwarded request left unhandled (see [`REFUSED`]).
fn unavailable(detail: String, refused: bool) -> Response {
    let mut res = Problem::unavailable(detail).into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    if refused {
        res.headers_mut()
            .insert(REFUSED, HeaderValue::from_static("not-active"));
    }
    res
}

/// The answer when the peer's own answer did not arrive after the request went out.
fn failed_answer(instance: &str, f: &Failed) -> Response {
    Problem::new(
        axum::http::StatusCode::BAD_GATEWAY,
        format!(
            "the request was passed to the active instance {instance}, but its answer did not \
             arrive ({}); it may have been applied, so check before repeating a change",
            f.why
        ),
    )
    .into_response()
}

/// An error with its causes, on one line (hyper's own text stops at the first).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = c.source();
    }
    false
}

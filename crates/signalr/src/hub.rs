//! A SignalR hub served by axum: negotiate + WebSocket transport + JSON hub protocol.
//!
//! The server plugs in a [`HubBackend`] (authentication, hub methods, connect/disconnect
//! notifications) and gets back an axum [`Router`] to mount and a [`HubHandle`] to list,
//! revoke, close and invoke relay connections.
//!
//! ```no_run
//! use identitymesh_signalr::hub::{
//!     router, AuthError, HubBackend, HubConfig, InvocationContext, RelayIdentity,
//! };
//! use serde_json::Value;
//! use std::sync::Arc;
//!
//! struct Relays; // the server's relay store
//!
//! impl HubBackend for Relays {
//!     async fn authenticate(&self, bearer: &str) -> Result<RelayIdentity, AuthError> {
//!         // Look up the hashed credential; Revoked → 403, unknown → 401.
//!         let _ = bearer;
//!         Ok(RelayIdentity { relay_id: "r1".into(), name: "dc-east".into() })
//!     }
//!     async fn handle_invocation(
//!         &self,
//!         _ctx: InvocationContext,
//!         target: String,
//!         _args: Vec<Value>,
//!     ) -> Result<Value, String> {
//!         Err(format!("unknown hub method {target}"))
//!     }
//! }
//!
//! # async fn demo() {
//! let (hub_routes, hub) = router::<_, ()>(Arc::new(Relays), HubConfig::default());
//! let app = axum::Router::new().merge(hub_routes); // + the Admin API routes
//! // serve `app` with upgrades enabled (axum::serve, or hyper-util's
//! // serve_connection_with_upgrades behind rustls; offer ALPN "http/1.1").
//! # let _ = app;
//! // Server → relay request:
//! let conn = &hub.connections_of("r1")[0];
//! let pong = hub.invoke(conn, "Ping", vec![]).await;
//! // Demotion / shutdown:
//! hub.set_accepting(false);
//! hub.close_all(Some("instance demoted".into()));
//! # let _ = pong;
//! # }
//! ```
//!
//! Per connection the hub runs exactly one task and keeps every buffer lazy: an idle relay
//! costs a WebSocket with a small read buffer, one bounded command channel and a few words of
//! bookkeeping.

use crate::auth_limit::AuthFailures;
use crate::protocol::{
    CompletionResult, FrameSplitter, HandshakeRequest, HandshakeResponse, HubMessage,
    NegotiateResponse, ProtocolError, DEFAULT_MAX_FRAME_SIZE,
};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use rand::RngCore as _;
use serde::Deserialize;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Who a credential belongs to, as decided by [`HubBackend::authenticate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayIdentity {
    /// Stable id of the relay (the credential's owner); revocation targets this.
    pub relay_id: String,
    /// Human-readable name for logs and the relay list.
    pub name: String,
}

/// Why authentication failed. Maps to the HTTP status of negotiate / upgrade.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Unknown or malformed credential → 401.
    #[error("invalid credential: {0}")]
    Invalid(String),
    /// Known but revoked or disabled → 403.
    #[error("credential revoked: {0}")]
    Revoked(String),
    /// The backend could not decide (e.g. the database is down) → 503, relays retry.
    #[error("authentication unavailable: {0}")]
    Unavailable(String),
}

/// A snapshot of one live connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub connection_id: String,
    pub relay: RelayIdentity,
    pub connected_at: SystemTime,
    /// Last time any message arrived from the client (pings included).
    pub last_seen: SystemTime,
    /// `X-SignalR-User-Agent` (official clients) or `User-Agent` (our relay sends its version).
    pub user_agent: Option<String>,
}

/// Context of a client→server invocation.
#[derive(Debug, Clone)]
pub struct InvocationContext {
    pub connection_id: String,
    pub relay: RelayIdentity,
    /// None for fire-and-forget sends; the result is then discarded.
    pub invocation_id: Option<String>,
}

/// What the server implements. Futures must be `Send`; `async fn` in the impl is fine.
pub trait HubBackend: Send + Sync + 'static {
    /// Checks a bearer credential (from `Authorization: Bearer` or `access_token`).
    /// Called on negotiate and again on the WebSocket upgrade.
    fn authenticate(
        &self,
        bearer: &str,
    ) -> impl Future<Output = Result<RelayIdentity, AuthError>> + Send;

    /// After the handshake succeeded and the connection is listed.
    fn on_connected(&self, _conn: &ConnectionInfo) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// After the connection ended for any reason (it is no longer listed).
    fn on_disconnected(
        &self,
        _conn: &ConnectionInfo,
        _reason: &str,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// A hub method called by the client. `Err(message)` becomes a Completion error.
    fn handle_invocation(
        &self,
        ctx: InvocationContext,
        target: String,
        args: Vec<Value>,
    ) -> impl Future<Output = Result<Value, String>> + Send;
}

/// Timing and size limits. Defaults match ASP.NET Core's hub defaults.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Path of the hub; negotiate is `<path>/negotiate`.
    pub path: String,
    /// Send a Ping when nothing else was sent for this long.
    pub keep_alive_interval: Duration,
    /// Close the connection when nothing arrived from the client for this long.
    pub client_timeout: Duration,
    /// The handshake must arrive within this long after the upgrade.
    pub handshake_timeout: Duration,
    /// A negotiated connection token not used by a WebSocket within this long is forgotten.
    pub negotiate_token_ttl: Duration,
    pub max_frame_size: usize,
    /// Client→server invocations running at once per connection; more get a Completion error.
    pub max_concurrent_invocations: usize,
    /// tungstenite's read buffer is allocated up front, so it dominates idle memory.
    pub ws_read_buffer_size: usize,
    /// Failed authentications a source address may make per window before it is answered
    /// 429 without its credential being checked (needs the peer address: axum's
    /// `ConnectInfo<SocketAddr>` in the request's extensions).
    pub auth_failure_limit: u32,
    pub auth_failure_window: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            path: "/hubs/relay".into(),
            keep_alive_interval: Duration::from_secs(15),
            client_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(15),
            negotiate_token_ttl: Duration::from_secs(30),
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_concurrent_invocations: 32,
            ws_read_buffer_size: 2048,
            auth_failure_limit: 20,
            auth_failure_window: Duration::from_secs(60),
        }
    }
}

/// Error of a server→client invocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvokeError {
    #[error("no such connection (relay not connected)")]
    NotConnected,
    #[error("the connection closed before the invocation completed")]
    ConnectionClosed,
    #[error("the relay reported an error: {0}")]
    Remote(String),
}

/// One event of a streamed server→client invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Item(Value),
    /// The final Completion; `Value::Null` when it carried no result.
    Completed(Value),
}

/// Receiving side of [`HubHandle::invoke_stream`]. The channel is bounded: while the consumer
/// does not read, the hub stops reading that connection's socket, so TCP backpressure reaches
/// the relay and nobody buffers without bound.
pub struct InvocationStream {
    rx: mpsc::Receiver<Result<StreamEvent, InvokeError>>,
    done: bool,
}

impl InvocationStream {
    /// Next item; `Ok(Some(Completed(..)))` ends the stream, after which `Ok(None)` follows.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, InvokeError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Ok(StreamEvent::Completed(v))) => {
                self.done = true;
                Ok(Some(StreamEvent::Completed(v)))
            }
            Some(Ok(ev)) => Ok(Some(ev)),
            Some(Err(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                Err(InvokeError::ConnectionClosed)
            }
        }
    }
}

enum Reply {
    Single(oneshot::Sender<Result<Value, InvokeError>>),
    Stream(mpsc::Sender<Result<StreamEvent, InvokeError>>),
}

struct InvokeRequest {
    target: String,
    args: Vec<Value>,
    reply: Option<Reply>,
}

/// Commands to a connection task. They travel boxed: tokio's channel allocates a block of 32
/// slots with the channel, so every idle connection pays 32 × the slot size.
enum Command {
    Invoke(InvokeRequest),
    /// A pre-serialized frame (Completion of a client invocation).
    Frame(String),
}

struct CloseRequest {
    error: Option<String>,
    allow_reconnect: bool,
}

struct ConnMeta {
    connection_id: String,
    relay: RelayIdentity,
    connected_at: SystemTime,
    last_seen_ms: AtomicU64,
    user_agent: Option<String>,
}

impl ConnMeta {
    fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            connection_id: self.connection_id.clone(),
            relay: self.relay.clone(),
            connected_at: self.connected_at,
            last_seen: UNIX_EPOCH
                + Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed)),
            user_agent: self.user_agent.clone(),
        }
    }
    fn touch(&self) {
        self.last_seen_ms.store(now_ms(), Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct ConnEntry {
    meta: Arc<ConnMeta>,
    commands: mpsc::Sender<Box<Command>>,
    close: Option<oneshot::Sender<CloseRequest>>,
}

struct TokenEntry {
    connection_id: String,
    relay: RelayIdentity,
    created: Instant,
    connected: bool,
}

#[derive(Default)]
struct Registry {
    /// connectionToken → negotiated connection.
    tokens: HashMap<String, TokenEntry>,
    /// connectionId → live connection.
    conns: HashMap<String, ConnEntry>,
    last_sweep: Option<Instant>,
    /// relay → when it was last revoked; lets a connection still in its handshake (which is
    /// not listed yet) notice a revocation that happened after its upgrade.
    revoked_at: HashMap<String, Instant>,
}

struct Shared {
    registry: Mutex<Registry>,
    accepting: AtomicBool,
    auth_failures: Mutex<AuthFailures>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the hub, so recover instead of propagating the poison.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Control of the hub from the rest of the server.
#[derive(Clone)]
pub struct HubHandle {
    shared: Arc<Shared>,
}

impl HubHandle {
    /// Live connections (handshake completed).
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared
            .lock()
            .conns
            .values()
            .map(|c| c.meta.info())
            .collect()
    }

    pub fn connection_count(&self) -> usize {
        self.shared.lock().conns.len()
    }

    /// Connection ids of one relay, newest first.
    pub fn connections_of(&self, relay_id: &str) -> Vec<String> {
        let reg = self.shared.lock();
        let mut v: Vec<_> = reg
            .conns
            .values()
            .filter(|c| c.meta.relay.relay_id == relay_id)
            .map(|c| (c.meta.connected_at, c.meta.connection_id.clone()))
            .collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.0));
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// Revocation: closes every connection of `relay_id` at once (Close without
    /// allowReconnect) and forgets its unused negotiate tokens. Returns how many were closed.
    pub fn disconnect_relay(&self, relay_id: &str, reason: &str) -> usize {
        let mut reg = self.shared.lock();
        reg.tokens.retain(|_, t| t.relay.relay_id != relay_id);
        let now = Instant::now();
        // Only handshakes in flight need this, so old entries can go.
        reg.revoked_at
            .retain(|_, t| now.duration_since(*t) < Duration::from_secs(300));
        reg.revoked_at.insert(relay_id.to_owned(), now);
        let mut n = 0;
        for c in reg.conns.values_mut() {
            if c.meta.relay.relay_id == relay_id {
                if let Some(tx) = c.close.take() {
                    let _ = tx.send(CloseRequest {
                        error: Some(reason.to_owned()),
                        allow_reconnect: false,
                    });
                    n += 1;
                }
            }
        }
        n
    }

    /// Closes one connection.
    pub fn disconnect(
        &self,
        connection_id: &str,
        error: Option<String>,
        allow_reconnect: bool,
    ) -> bool {
        let mut reg = self.shared.lock();
        match reg
            .conns
            .get_mut(connection_id)
            .and_then(|c| c.close.take())
        {
            Some(tx) => tx
                .send(CloseRequest {
                    error,
                    allow_reconnect,
                })
                .is_ok(),
            None => false,
        }
    }

    /// Shutdown / demotion: closes every connection with `allowReconnect: true` so relays
    /// reconnect (through the Service, to the new active). Returns how many were closed.
    pub fn close_all(&self, reason: Option<String>) -> usize {
        let mut reg = self.shared.lock();
        reg.tokens.clear();
        let mut n = 0;
        for c in reg.conns.values_mut() {
            if let Some(tx) = c.close.take() {
                let _ = tx.send(CloseRequest {
                    error: reason.clone(),
                    allow_reconnect: true,
                });
                n += 1;
            }
        }
        n
    }

    /// While false, negotiate and upgrade answer 503 (a demoted instance takes no relays).
    pub fn set_accepting(&self, accepting: bool) {
        self.shared.accepting.store(accepting, Ordering::SeqCst);
    }

    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::SeqCst)
    }

    fn commands(&self, connection_id: &str) -> Result<mpsc::Sender<Box<Command>>, InvokeError> {
        self.shared
            .lock()
            .conns
            .get(connection_id)
            .map(|c| c.commands.clone())
            .ok_or(InvokeError::NotConnected)
    }

    /// Invokes a client method and waits for its Completion (callers add their own timeout).
    pub async fn invoke(
        &self,
        connection_id: &str,
        target: &str,
        args: Vec<Value>,
    ) -> Result<Value, InvokeError> {
        let tx = self.commands(connection_id)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Box::new(Command::Invoke(InvokeRequest {
            target: target.to_owned(),
            args,
            reply: Some(Reply::Single(reply)),
        })))
        .await
        .map_err(|_| InvokeError::NotConnected)?;
        rx.await.map_err(|_| InvokeError::ConnectionClosed)?
    }

    /// Invokes a client method that answers with StreamItems followed by a Completion
    /// (how a relay returns directory pages). `buffer` bounds the items held for the consumer.
    pub async fn invoke_stream(
        &self,
        connection_id: &str,
        target: &str,
        args: Vec<Value>,
        buffer: usize,
    ) -> Result<InvocationStream, InvokeError> {
        let tx = self.commands(connection_id)?;
        let (items, rx) = mpsc::channel(buffer.max(1));
        tx.send(Box::new(Command::Invoke(InvokeRequest {
            target: target.to_owned(),
            args,
            reply: Some(Reply::Stream(items)),
        })))
        .await
        .map_err(|_| InvokeError::NotConnected)?;
        Ok(InvocationStream { rx, done: false })
    }

    /// Fire-and-forget invocation of a client method.
    pub async fn send(
        &self,
        connection_id: &str,
        target: &str,
        args: Vec<Value>,
    ) -> Result<(), InvokeError> {
        let tx = self.commands(connection_id)?;
        tx.send(Box::new(Command::Invoke(InvokeRequest {
            target: target.to_owned(),
            args,
            reply: None,
        })))
        .await
        .map_err(|_| InvokeError::NotConnected)
    }
}

struct HubState<B> {
    backend: Arc<B>,
    config: Arc<HubConfig>,
    shared: Arc<Shared>,
}

impl<B> Clone for HubState<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}

/// Builds the hub's routes (`POST <path>/negotiate`, `GET <path>` WebSocket) and its handle.
/// The router has its state applied, so it merges into a router of any state type.
pub fn router<B: HubBackend, S: Clone + Send + Sync + 'static>(
    backend: Arc<B>,
    config: HubConfig,
) -> (Router<S>, HubHandle) {
    let shared = Arc::new(Shared {
        registry: Mutex::new(Registry::default()),
        accepting: AtomicBool::new(true),
        auth_failures: Mutex::new(AuthFailures::new(
            config.auth_failure_limit,
            config.auth_failure_window,
            // Bounded: a flood from many addresses costs at most this many entries.
            16_384,
        )),
    });
    let path = config.path.trim_end_matches('/').to_owned();
    let state = HubState {
        backend,
        config: Arc::new(config),
        shared: shared.clone(),
    };
    let router = Router::new()
        .route(&format!("{path}/negotiate"), post(negotiate::<B>))
        .route(&path, get(connect::<B>))
        .with_state(state);
    (router, HubHandle { shared })
}

#[derive(Deserialize)]
struct HubQuery {
    id: Option<String>,
    access_token: Option<String>,
    #[serde(rename = "negotiateVersion")]
    negotiate_version: Option<u32>,
}

fn bearer(headers: &HeaderMap, query: &HubQuery) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim().to_owned());
        }
    }
    query.access_token.clone().filter(|t| !t.is_empty())
}

fn plain(status: StatusCode, msg: &str) -> Response {
    (status, msg.to_owned()).into_response()
}

async fn authenticate<B: HubBackend>(
    st: &HubState<B>,
    headers: &HeaderMap,
    query: &HubQuery,
    peer: Option<IpAddr>,
) -> Result<RelayIdentity, Response> {
    let failures = || {
        st.shared
            .auth_failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    };
    if let Some(wait) = peer.and_then(|ip| failures().blocked(ip, Instant::now())) {
        let secs = wait.as_secs().max(1).to_string();
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs)],
            "too many failed relay authentications from this address; retry later",
        )
            .into_response());
    }
    let r = check_credential(st, headers, query).await;
    if let Some(ip) = peer {
        match &r {
            Ok(_) => failures().succeeded(ip),
            // A database outage is not the client's failure.
            Err(resp) if resp.status() == StatusCode::SERVICE_UNAVAILABLE => {}
            Err(_) => failures().failed(ip, Instant::now()),
        }
    }
    r
}

async fn check_credential<B: HubBackend>(
    st: &HubState<B>,
    headers: &HeaderMap,
    query: &HubQuery,
) -> Result<RelayIdentity, Response> {
    let Some(token) = bearer(headers, query) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing relay credential: send Authorization: Bearer <token>",
        )
            .into_response());
    };
    match st.backend.authenticate(&token).await {
        Ok(id) => Ok(id),
        Err(AuthError::Invalid(m)) => {
            tracing::warn!(error = %m, "relay hub: rejected credential");
            Err((
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
                "invalid relay credential",
            )
                .into_response())
        }
        Err(AuthError::Revoked(m)) => {
            tracing::warn!(error = %m, "relay hub: revoked credential");
            Err(plain(StatusCode::FORBIDDEN, "relay credential revoked"))
        }
        Err(AuthError::Unavailable(m)) => {
            tracing::warn!(error = %m, "relay hub: authentication unavailable");
            Err(plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "authentication unavailable, retry later",
            ))
        }
    }
}

fn random_token() -> String {
    let mut b = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

async fn negotiate<B: HubBackend>(
    State(st): State<HubState<B>>,
    Query(query): Query<HubQuery>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    let peer = peer.map(|c| c.0 .0.ip());
    if !st.shared.accepting.load(Ordering::SeqCst) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub is not accepting relays (standby)",
        );
    }
    if query.negotiate_version.unwrap_or(0) < 1 {
        // Version 0 has no separate connectionToken; we only speak version 1.
        return plain(StatusCode::BAD_REQUEST, "negotiateVersion=1 is required");
    }
    let relay = match authenticate(&st, &headers, &query, peer).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let connection_id = uuid::Uuid::new_v4().simple().to_string();
    let token = random_token();
    {
        let mut reg = st.shared.lock();
        let now = Instant::now();
        // Sweep expired tokens at most once a second so a storm of negotiates stays O(n).
        if reg
            .last_sweep
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            let ttl = st.config.negotiate_token_ttl;
            reg.tokens
                .retain(|_, t| t.connected || now.duration_since(t.created) < ttl);
            reg.last_sweep = Some(now);
        }
        reg.tokens.insert(
            token.clone(),
            TokenEntry {
                connection_id: connection_id.clone(),
                relay,
                created: now,
                connected: false,
            },
        );
    }
    Json(NegotiateResponse::websockets_text(connection_id, token)).into_response()
}

async fn connect<B: HubBackend>(
    State(st): State<HubState<B>>,
    Query(query): Query<HubQuery>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let peer = peer.map(|c| c.0 .0.ip());
    if !st.shared.accepting.load(Ordering::SeqCst) {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub is not accepting relays (standby)",
        );
    }
    // Check the token before authenticating so an unknown id is a cheap 404.
    let negotiated = match &query.id {
        Some(id) => {
            let reg = st.shared.lock();
            match reg.tokens.get(id) {
                None => return plain(StatusCode::NOT_FOUND, "no such connection"),
                Some(t) if t.connected => {
                    return plain(StatusCode::CONFLICT, "connection already has a transport")
                }
                Some(t) if t.created.elapsed() >= st.config.negotiate_token_ttl => {
                    return plain(StatusCode::NOT_FOUND, "connection token expired")
                }
                Some(t) => Some((t.connection_id.clone(), t.relay.clone())),
            }
        }
        None => None,
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(_) => {
            return plain(
                StatusCode::BAD_REQUEST,
                "only the WebSockets transport is supported",
            )
        }
    };
    // A revocation after this instant must still reach this connection (see revoked_at).
    let auth_started = Instant::now();
    let relay = match authenticate(&st, &headers, &query, peer).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (connection_id, token) = match negotiated {
        Some((cid, negotiated_relay)) => {
            if negotiated_relay.relay_id != relay.relay_id {
                return plain(
                    StatusCode::FORBIDDEN,
                    "credential does not match the negotiated connection",
                );
            }
            let token = query.id.clone().unwrap_or_default();
            let mut reg = st.shared.lock();
            match reg.tokens.get_mut(&token) {
                // Re-check under the lock: two sockets may race past the first check.
                Some(t) if !t.connected => t.connected = true,
                Some(_) => {
                    return plain(StatusCode::CONFLICT, "connection already has a transport")
                }
                None => return plain(StatusCode::NOT_FOUND, "no such connection"),
            }
            (cid, Some(token))
        }
        // skipNegotiation clients connect directly; they get a fresh id.
        None => (uuid::Uuid::new_v4().simple().to_string(), None),
    };
    let user_agent = headers
        .get("x-signalr-user-agent")
        .or_else(|| headers.get(header::USER_AGENT))
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(200).collect());
    let meta = Arc::new(ConnMeta {
        connection_id,
        relay,
        connected_at: SystemTime::now(),
        last_seen_ms: AtomicU64::new(now_ms()),
        user_agent,
    });
    let cfg = st.config.clone();
    let max_msg = cfg.max_frame_size.saturating_add(1024);
    // If the upgrade itself fails, run_connection never runs: release the token here.
    let (failed_shared, failed_token) = (st.shared.clone(), token.clone());
    ws.read_buffer_size(cfg.ws_read_buffer_size)
        .write_buffer_size(0)
        .max_message_size(max_msg)
        .max_frame_size(max_msg)
        .on_failed_upgrade(move |e| {
            tracing::warn!(error = %e, "relay hub: WebSocket upgrade failed");
            if let Some(t) = failed_token {
                failed_shared.lock().tokens.remove(&t);
            }
        })
        .on_upgrade(move |socket| run_connection(st, socket, meta, token, auth_started))
}

/// Owns one WebSocket from upgrade to close, then unregisters it.
async fn run_connection<B: HubBackend>(
    st: HubState<B>,
    socket: WebSocket,
    meta: Arc<ConnMeta>,
    token: Option<String>,
    auth_started: Instant,
) {
    let (cmd_tx, cmd_rx) = mpsc::channel(16);
    let (close_tx, close_rx) = oneshot::channel();
    let mut conn = Conn {
        socket,
        cfg: st.config.clone(),
        meta: meta.clone(),
        splitter: FrameSplitter::new(st.config.max_frame_size),
        last_sent: Instant::now(),
        last_recv: Instant::now(),
        pending: HashMap::new(),
        next_invocation: 0,
        running: Arc::new(AtomicU64::new(0)),
    };
    let mut registered = false;
    let reason = match Box::pin(conn.handshake()).await {
        Err(reason) => reason,
        Ok(leftover) => {
            let revoked = {
                let mut reg = st.shared.lock();
                // A revocation or close_all may have happened during the handshake.
                let revoked = reg
                    .revoked_at
                    .get(&meta.relay.relay_id)
                    .is_some_and(|t| *t >= auth_started);
                let token_valid = token.as_ref().is_none_or(|t| reg.tokens.contains_key(t));
                if !revoked && token_valid && st.shared.accepting.load(Ordering::SeqCst) {
                    reg.conns.insert(
                        meta.connection_id.clone(),
                        ConnEntry {
                            meta: meta.clone(),
                            commands: cmd_tx.clone(),
                            close: Some(close_tx),
                        },
                    );
                    registered = true;
                }
                revoked
            };
            if registered {
                tracing::info!(connection = %meta.connection_id, relay = %meta.relay.relay_id, "relay connected");
                Box::pin(st.backend.on_connected(&meta.info())).await;
                conn.serve(&st, leftover, cmd_tx, cmd_rx, close_rx).await
            } else {
                let (error, allow_reconnect) = if revoked {
                    ("credential revoked", false)
                } else {
                    ("the hub is closing", true)
                };
                conn.close(Some(error.into()), allow_reconnect).await;
                format!("rejected after handshake: {error}")
            }
        }
    };
    {
        let mut reg = st.shared.lock();
        reg.conns.remove(&meta.connection_id);
        if let Some(t) = &token {
            reg.tokens.remove(t);
        }
    }
    if registered {
        tracing::info!(connection = %meta.connection_id, relay = %meta.relay.relay_id, %reason, "relay disconnected");
        Box::pin(st.backend.on_disconnected(&meta.info(), &reason)).await;
    } else {
        tracing::info!(connection = %meta.connection_id, relay = %meta.relay.relay_id, %reason, "relay connection ended before the handshake");
    }
}

struct Conn {
    socket: WebSocket,
    cfg: Arc<HubConfig>,
    meta: Arc<ConnMeta>,
    splitter: FrameSplitter,
    last_sent: Instant,
    last_recv: Instant,
    /// Server→client invocations waiting for their Completion.
    pending: HashMap<u64, Reply>,
    next_invocation: u64,
    /// Client→server invocations running now.
    running: Arc<AtomicU64>,
}

enum Flow {
    Continue,
    Stop(String),
}

enum Event {
    Close(CloseRequest),
    Socket(Option<Result<Message, axum::Error>>),
    Command(Box<Command>),
    Timer { timed_out: bool },
}

impl Conn {
    async fn send_text(&mut self, frame: String) -> Result<(), String> {
        self.last_sent = Instant::now();
        self.socket
            .send(Message::Text(frame.into()))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    /// Sends the hub Close message and a WebSocket close frame; errors are irrelevant now.
    async fn close(&mut self, error: Option<String>, allow_reconnect: bool) {
        let _ = self
            .send_text(
                HubMessage::Close {
                    error,
                    allow_reconnect,
                }
                .to_frame(),
            )
            .await;
        let _ = self
            .socket
            .send(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "".into(),
            })))
            .await;
    }

    async fn protocol_error(&mut self, err: ProtocolError) -> String {
        tracing::warn!(connection = %self.meta.connection_id, relay = %self.meta.relay.relay_id, error = %err, "relay hub: protocol error, closing connection");
        self.close(
            Some(format!("Connection closed with an error: {err}")),
            false,
        )
        .await;
        format!("protocol error: {err}")
    }

    /// Waits for the handshake; returns frames that followed it in the same read.
    async fn handshake(&mut self) -> Result<Vec<String>, String> {
        let deadline = tokio::time::Instant::now() + self.cfg.handshake_timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.socket.recv()).await {
                Err(_) => {
                    tracing::warn!(connection = %self.meta.connection_id, "relay hub: handshake timeout");
                    let _ = self
                        .send_text(
                            HandshakeResponse {
                                error: Some(ProtocolError::HandshakeTimeout.to_string()),
                            }
                            .to_frame(),
                        )
                        .await;
                    return Err("handshake timeout".into());
                }
                Ok(None) | Ok(Some(Err(_))) => return Err("closed during handshake".into()),
                Ok(Some(Ok(m))) => m,
            };
            let data = match msg {
                Message::Text(t) => t,
                Message::Binary(_) => {
                    return Err(self.handshake_error(ProtocolError::BinaryFrame).await)
                }
                Message::Close(_) => return Err("closed during handshake".into()),
                Message::Ping(_) | Message::Pong(_) => continue,
            };
            let frames = match self.splitter.push_collect(data.as_bytes()) {
                Ok(f) => f,
                Err(e) => return Err(self.handshake_error(e).await),
            };
            let mut it = frames.into_iter();
            let Some(first) = it.next() else { continue };
            if let Err(e) = HandshakeRequest::parse_and_check(first.as_bytes()) {
                return Err(self.handshake_error(e).await);
            }
            self.send_text(HandshakeResponse::default().to_frame())
                .await?;
            self.last_recv = Instant::now();
            return Ok(it.collect());
        }
    }

    async fn handshake_error(&mut self, err: ProtocolError) -> String {
        tracing::warn!(connection = %self.meta.connection_id, error = %err, "relay hub: handshake failed");
        let _ = self
            .send_text(
                HandshakeResponse {
                    error: Some(err.to_string()),
                }
                .to_frame(),
            )
            .await;
        let _ = self.socket.send(Message::Close(None)).await;
        format!("handshake failed: {err}")
    }

    async fn serve<B: HubBackend>(
        &mut self,
        st: &HubState<B>,
        leftover: Vec<String>,
        cmd_tx: mpsc::Sender<Box<Command>>,
        mut cmd_rx: mpsc::Receiver<Box<Command>>,
        mut close_rx: oneshot::Receiver<CloseRequest>,
    ) -> String {
        for frame in leftover {
            if let Flow::Stop(r) = Box::pin(self.on_frame(st, frame.as_bytes(), &cmd_tx)).await {
                return r;
            }
        }
        loop {
            let ping_at = self.last_sent + self.cfg.keep_alive_interval;
            let timeout_at = self.last_recv + self.cfg.client_timeout;
            let wake = tokio::time::Instant::from_std(ping_at.min(timeout_at));
            // Only the waiting happens inline; handling is boxed so the idle task stays small.
            let event = tokio::select! {
                biased;
                req = &mut close_rx => Event::Close(req.unwrap_or(CloseRequest { error: None, allow_reconnect: true })),
                msg = self.socket.recv() => Event::Socket(msg),
                Some(cmd) = cmd_rx.recv() => Event::Command(cmd),
                _ = tokio::time::sleep_until(wake) => Event::Timer { timed_out: Instant::now() >= timeout_at },
            };
            if let Flow::Stop(r) = Box::pin(self.on_event(st, event, &cmd_tx)).await {
                return r;
            }
        }
    }

    async fn on_event<B: HubBackend>(
        &mut self,
        st: &HubState<B>,
        event: Event,
        cmd_tx: &mpsc::Sender<Box<Command>>,
    ) -> Flow {
        match event {
            Event::Close(req) => {
                let reason = req
                    .error
                    .clone()
                    .unwrap_or_else(|| "closed by server".into());
                self.close(req.error, req.allow_reconnect).await;
                Flow::Stop(reason)
            }
            Event::Socket(msg) => {
                let msg = match msg {
                    None => return Flow::Stop("connection closed by client".into()),
                    Some(Err(e)) => return Flow::Stop(format!("transport error: {e}")),
                    Some(Ok(m)) => m,
                };
                self.last_recv = Instant::now();
                self.meta.touch();
                match msg {
                    Message::Text(t) => self.on_text(st, t.as_bytes(), cmd_tx).await,
                    Message::Binary(_) => {
                        Flow::Stop(self.protocol_error(ProtocolError::BinaryFrame).await)
                    }
                    Message::Close(_) => Flow::Stop("connection closed by client".into()),
                    Message::Ping(_) | Message::Pong(_) => Flow::Continue,
                }
            }
            Event::Command(cmd) => match self.on_command(cmd).await {
                Ok(()) => Flow::Continue,
                Err(r) => Flow::Stop(r),
            },
            Event::Timer { timed_out: true } => {
                tracing::warn!(connection = %self.meta.connection_id, relay = %self.meta.relay.relay_id, "relay hub: client timeout, closing connection");
                self.close(
                    Some(
                        "Server timeout elapsed without receiving a message from the client."
                            .into(),
                    ),
                    true,
                )
                .await;
                Flow::Stop("client timeout".into())
            }
            Event::Timer { timed_out: false } => {
                match self.send_text(HubMessage::Ping.to_frame()).await {
                    Ok(()) => Flow::Continue,
                    Err(r) => Flow::Stop(r),
                }
            }
        }
    }

    async fn on_text<B: HubBackend>(
        &mut self,
        st: &HubState<B>,
        data: &[u8],
        cmd_tx: &mpsc::Sender<Box<Command>>,
    ) -> Flow {
        // Split first (cheap, borrows data), then act: acting needs &mut self.
        let mut frames = Vec::new();
        if let Err(e) = self.splitter.push(data, |f| {
            frames.push(f.to_vec());
            Ok(())
        }) {
            return Flow::Stop(self.protocol_error(e).await);
        }
        for f in frames {
            if let Flow::Stop(r) = self.on_frame(st, &f, cmd_tx).await {
                return Flow::Stop(r);
            }
        }
        Flow::Continue
    }

    async fn on_command(&mut self, cmd: Box<Command>) -> Result<(), String> {
        match *cmd {
            Command::Frame(f) => self.send_text(f).await,
            Command::Invoke(req) => {
                let InvokeRequest {
                    target,
                    args,
                    reply,
                } = req;
                let invocation_id = match reply {
                    Some(r) => {
                        self.next_invocation += 1;
                        self.pending.insert(self.next_invocation, r);
                        Some(self.next_invocation.to_string())
                    }
                    None => None,
                };
                self.send_text(
                    HubMessage::Invocation {
                        invocation_id,
                        target,
                        arguments: args,
                        stream_ids: Vec::new(),
                        headers: Default::default(),
                    }
                    .to_frame(),
                )
                .await
            }
        }
    }

    /// Delivers a stream event to a bounded consumer. While it waits, keep-alive pings still go
    /// out so the relay does not time us out because our consumer is slow.
    async fn deliver(
        &mut self,
        tx: &mpsc::Sender<Result<StreamEvent, InvokeError>>,
        ev: Result<StreamEvent, InvokeError>,
    ) -> Result<(), String> {
        let send = tx.send(ev);
        tokio::pin!(send);
        loop {
            let ping_at =
                tokio::time::Instant::from_std(self.last_sent + self.cfg.keep_alive_interval);
            tokio::select! {
                r = &mut send => return r.map_err(|_| "consumer gone".into()),
                _ = tokio::time::sleep_until(ping_at) => {
                    self.send_text(HubMessage::Ping.to_frame()).await?;
                }
            }
        }
    }

    async fn on_frame<B: HubBackend>(
        &mut self,
        st: &HubState<B>,
        frame: &[u8],
        cmd_tx: &mpsc::Sender<Box<Command>>,
    ) -> Flow {
        let msg = match HubMessage::parse(frame) {
            Ok(m) => m,
            Err(e) => return Flow::Stop(self.protocol_error(e).await),
        };
        match msg {
            HubMessage::Ping => {}
            HubMessage::Close { error, .. } => {
                return Flow::Stop(match error {
                    Some(e) => format!("client closed with error: {e}"),
                    None => "client closed".into(),
                })
            }
            HubMessage::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
                ..
            } => {
                if !stream_ids.is_empty() {
                    if let Some(id) = invocation_id {
                        let f = completion_error(
                            id,
                            "client-to-server streams are not supported by this hub",
                        );
                        if let Err(r) = self.send_text(f).await {
                            return Flow::Stop(r);
                        }
                    }
                    return Flow::Continue;
                }
                if self.running.load(Ordering::Relaxed)
                    >= self.cfg.max_concurrent_invocations as u64
                {
                    if let Some(id) = invocation_id {
                        let f = completion_error(id, "too many concurrent invocations");
                        if let Err(r) = self.send_text(f).await {
                            return Flow::Stop(r);
                        }
                    }
                    return Flow::Continue;
                }
                self.running.fetch_add(1, Ordering::Relaxed);
                let running = self.running.clone();
                let backend = st.backend.clone();
                let ctx = InvocationContext {
                    connection_id: self.meta.connection_id.clone(),
                    relay: self.meta.relay.clone(),
                    invocation_id: invocation_id.clone(),
                };
                let tx = cmd_tx.clone();
                // Hub methods run on their own task so a slow method never stalls pings.
                tokio::spawn(async move {
                    let result = backend.handle_invocation(ctx, target, arguments).await;
                    running.fetch_sub(1, Ordering::Relaxed);
                    if let Some(id) = invocation_id {
                        let frame = HubMessage::Completion {
                            invocation_id: id,
                            result: match result {
                                Ok(v) => CompletionResult::Value(v),
                                Err(e) => CompletionResult::Error(e),
                            },
                        }
                        .to_frame();
                        let _ = tx.send(Box::new(Command::Frame(frame))).await;
                    }
                });
            }
            HubMessage::StreamInvocation { invocation_id, .. } => {
                let f = completion_error(
                    invocation_id,
                    "streaming hub methods are not supported by this hub",
                );
                if let Err(r) = self.send_text(f).await {
                    return Flow::Stop(r);
                }
            }
            HubMessage::CancelInvocation { .. } => {
                // Nothing streams from this hub to clients, so there is nothing to cancel.
            }
            HubMessage::StreamItem {
                invocation_id,
                item,
            } => {
                let key = invocation_id.parse::<u64>().ok();
                let tx = match key.and_then(|k| self.pending.get(&k)) {
                    Some(Reply::Stream(tx)) => tx.clone(),
                    Some(Reply::Single(_)) | None => {
                        tracing::debug!(connection = %self.meta.connection_id, %invocation_id, "relay hub: stream item for unknown invocation ignored");
                        return Flow::Continue;
                    }
                };
                if self
                    .deliver(&tx, Ok(StreamEvent::Item(item)))
                    .await
                    .is_err()
                {
                    // The consumer went away: drop the rest of this stream and tell the client
                    // to stop producing it.
                    if let Some(k) = key {
                        self.pending.remove(&k);
                    }
                    let cancel = HubMessage::CancelInvocation { invocation_id }.to_frame();
                    if let Err(r) = self.send_text(cancel).await {
                        return Flow::Stop(r);
                    }
                }
            }
            HubMessage::Completion {
                invocation_id,
                result,
            } => {
                let Some(reply) = invocation_id
                    .parse::<u64>()
                    .ok()
                    .and_then(|k| self.pending.remove(&k))
                else {
                    tracing::debug!(connection = %self.meta.connection_id, %invocation_id, "relay hub: completion for unknown invocation ignored");
                    return Flow::Continue;
                };
                match reply {
                    Reply::Single(tx) => {
                        let _ = tx.send(match result {
                            CompletionResult::Void => Ok(Value::Null),
                            CompletionResult::Value(v) => Ok(v),
                            CompletionResult::Error(e) => Err(InvokeError::Remote(e)),
                        });
                    }
                    Reply::Stream(tx) => {
                        let ev = match result {
                            CompletionResult::Void => Ok(StreamEvent::Completed(Value::Null)),
                            CompletionResult::Value(v) => Ok(StreamEvent::Completed(v)),
                            CompletionResult::Error(e) => Err(InvokeError::Remote(e)),
                        };
                        let _ = self.deliver(&tx, ev).await;
                    }
                }
            }
        }
        Flow::Continue
    }
}

fn completion_error(invocation_id: String, error: &str) -> String {
    HubMessage::Completion {
        invocation_id,
        result: CompletionResult::Error(error.to_owned()),
    }
    .to_frame()
}

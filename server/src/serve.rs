//! The accept loop shared by both listeners: TLS handshake (optionally requiring a client
//! certificate), HTTP/1.1 and HTTP/2 with upgrades (the hub's WebSockets), graceful shutdown,
//! and the limits that keep slow or idle clients from holding the server's connections.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::api::PeerName;
use crate::config::HttpLimits;
use crate::tls::TlsState;

#[derive(Clone)]
pub enum Transport {
    /// Development only (`tls.insecure_http`).
    Plain,
    Tls(Arc<TlsState>),
    /// TLS with a client certificate from the cluster CA required.
    MutualTls(Arc<TlsState>),
}

/// Serves until `shutdown` turns true, then lets open requests finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    limits: HttpLimits,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections as usize));
    let app = with_request_timeout(app, Duration::from_millis(limits.request_timeout_ms));
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let header_read = Duration::from_millis(limits.header_read_timeout_ms);
    loop {
        // At the cap, wait for a connection to end; new ones queue in the kernel meanwhile.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let transport = transport.clone();
        // The peer address, for the relay hub's per-address limit on failed authentications.
        let app = app
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read);
            builder.http2().timer(TokioTimer::new());
            let activity = Activity::new();
            match transport {
                Transport::Plain => {
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(Tracked::new(tcp, activity.clone())),
                        TowerToHyperService::new(app),
                    );
                    until_idle(watcher.watch(conn.into_owned()), &activity, idle).await;
                }
                Transport::Tls(_) | Transport::MutualTls(_) => {
                    let cfg = match &transport {
                        Transport::MutualTls(state) => state.internal(),
                        Transport::Tls(state) => Some(state.public()),
                        Transport::Plain => None,
                    };
                    let Some(cfg) = cfg else {
                        tracing::warn!("internal listener has no client CA; refusing connection");
                        return;
                    };
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    let tcp = Tracked::new(tcp, activity.clone());
                    let stream =
                        // The handshake, like a request's headers, within the header-read bound.
                        match tokio::time::timeout(header_read, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    let app = match peer_name(&stream) {
                        Some(name) => app.layer(axum::Extension(PeerName(name))),
                        None => app,
                    };
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        TowerToHyperService::new(app),
                    );
                    until_idle(watcher.watch(conn.into_owned()), &activity, idle).await;
                }
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period; closing them");
    }
}

/// Answers 503 when the handler has not produced a response head within `limit`.
fn with_request_timeout(app: Router, limit: Duration) -> Router {
    app.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| async move {
            match tokio::time::timeout(limit, next.run(req)).await {
                Ok(r) => r,
                Err(_) => crate::problem::Problem::unavailable(format!(
                    "the request took longer than http.request_timeout_ms ({} ms); retry",
                    limit.as_millis()
                ))
                .into_response(),
            }
        },
    ))
}

/// Runs the connection until it ends or moves no byte for `idle`. Once a connection is upgraded
/// (a WebSocket) hyper's future ends and the socket belongs to the hub, which has its own
/// keep-alive and timeout.
async fn until_idle(conn: impl std::future::Future, activity: &Activity, idle: Duration) {
    tokio::select! {
        _ = conn => {}
        _ = activity.idle_for(idle) => {
            tracing::debug!(idle_ms = idle.as_millis() as u64, "closing an idle connection");
        }
    }
}

/// When a connection last moved a byte.
#[derive(Clone)]
struct Activity {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// A socket that records its activity.
struct Tracked<T> {
    inner: T,
    activity: Activity,
}

impl<T> Tracked<T> {
    fn new(inner: T, activity: Activity) -> Self {
        activity.touch();
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The verified client certificate's common name, for the audit trail.
fn peer_name<T>(stream: &tokio_rustls::server::TlsStream<T>) -> Option<String> {
    let der = stream.get_ref().1.peer_certificates()?.first()?.clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

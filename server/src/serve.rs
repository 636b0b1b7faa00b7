//! The accept loop shared by both listeners: TLS handshake (optionally requiring a client
//! certificate), HTTP/1.1 and HTTP/2 with upgrades (the hub's WebSockets), graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::PeerName;
use crate::tls::TlsState;

#[derive(Clone)]
pub enum Transport {
    /// Development only (`tls.insecure_http`).
    Plain,
    Tls(Arc<TlsState>),
    /// TLS with a client certificate from the cluster CA required.
    MutualTls(Arc<TlsState>),
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `shutdown` turns true, then lets open requests finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    loop {
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
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let builder = Builder::new(TokioExecutor::new());
            match transport {
                Transport::Plain => {
                    let conn = builder.serve_connection_with_upgrades(
                        TokioIo::new(tcp),
                        TowerToHyperService::new(app),
                    );
                    let _ = watcher.watch(conn.into_owned()).await;
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
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
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
                    let _ = watcher.watch(conn.into_owned()).await;
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

/// The verified client certificate's common name, for the audit trail.
fn peer_name(stream: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Option<String> {
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

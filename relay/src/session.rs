//! One connected session: keep-alive, server timeout, dispatching server invocations.

use crate::connect::{Connected, MaybeTls};
use crate::handlers::{HandlerRegistry, ItemSink};
use futures::{SinkExt as _, StreamExt as _};
use identitymesh_signalr::protocol::{CompletionResult, FrameSplitter, HubMessage};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How a session ended; decides the next delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// We were asked to stop.
    Shutdown,
    /// The server sent Close.
    ServerClosed {
        error: Option<String>,
        allow_reconnect: bool,
    },
    /// Nothing from the server for the timeout.
    ServerTimeout,
    /// The socket failed or the server broke the protocol.
    Lost(String),
}

/// Outbound frames queued by handlers; bounded so streaming waits for the socket.
const OUTBOUND_QUEUE: usize = 32;

pub struct Session<'a> {
    pub handlers: &'a HandlerRegistry,
    pub keep_alive: Duration,
    pub server_timeout: Duration,
}

impl Session<'_> {
    pub async fn run(&self, conn: Connected, shutdown: &mut watch::Receiver<bool>) -> SessionEnd {
        let Connected {
            mut ws,
            leftover,
            mut splitter,
            ..
        } = conn;
        let (out_tx, mut out_rx) = mpsc::channel::<String>(OUTBOUND_QUEUE);
        // Handlers die with the session: their results could not be delivered anyway.
        let mut tasks = JoinSet::new();
        // Invocations the server may cancel (it stopped reading a stream): id → task.
        let mut running: HashMap<String, AbortHandle> = HashMap::new();
        let mut last_sent = Instant::now();
        let mut last_recv = Instant::now();
        for f in leftover {
            if let Some(end) = self.on_frame(f.as_bytes(), &out_tx, &mut tasks, &mut running) {
                return end;
            }
        }
        loop {
            let ping_at = last_sent + self.keep_alive;
            let timeout_at = last_recv + self.server_timeout;
            let wake = tokio::time::Instant::from_std(ping_at.min(timeout_at));
            tokio::select! {
                biased;
                _ = shutdown.changed() => {
                    let _ = send(&mut ws, HubMessage::Close { error: None, allow_reconnect: false }.to_frame()).await;
                    let _ = ws.close(None).await;
                    return SessionEnd::Shutdown;
                }
                Some(frame) = out_rx.recv() => {
                    if let Err(e) = send(&mut ws, frame).await {
                        return SessionEnd::Lost(e);
                    }
                    last_sent = Instant::now();
                }
                msg = ws.next() => {
                    let msg = match msg {
                        None => return SessionEnd::Lost("connection closed by server".into()),
                        Some(Err(e)) => return SessionEnd::Lost(format!("transport error: {e}")),
                        Some(Ok(m)) => m,
                    };
                    last_recv = Instant::now();
                    match msg {
                        Message::Text(t) => {
                            if let Some(end) = self.on_text(&mut splitter, t.as_bytes(), &out_tx, &mut tasks, &mut running) {
                                let _ = ws.close(None).await;
                                return end;
                            }
                        }
                        Message::Binary(_) => return SessionEnd::Lost("server sent a binary frame on the json protocol".into()),
                        Message::Close(_) => return SessionEnd::Lost("WebSocket closed by server".into()),
                        _ => {}
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::time::sleep_until(wake) => {
                    if Instant::now() >= timeout_at {
                        return SessionEnd::ServerTimeout;
                    }
                    if let Err(e) = send(&mut ws, HubMessage::Ping.to_frame()).await {
                        return SessionEnd::Lost(e);
                    }
                    last_sent = Instant::now();
                }
            }
        }
    }

    fn on_text(
        &self,
        splitter: &mut FrameSplitter,
        data: &[u8],
        out: &mpsc::Sender<String>,
        tasks: &mut JoinSet<()>,
        running: &mut HashMap<String, AbortHandle>,
    ) -> Option<SessionEnd> {
        let mut frames = Vec::new();
        if let Err(e) = splitter.push(data, |f| {
            frames.push(f.to_vec());
            Ok(())
        }) {
            return Some(SessionEnd::Lost(format!("protocol error from server: {e}")));
        }
        frames
            .iter()
            .find_map(|f| self.on_frame(f, out, tasks, running))
    }

    fn on_frame(
        &self,
        frame: &[u8],
        out: &mpsc::Sender<String>,
        tasks: &mut JoinSet<()>,
        running: &mut HashMap<String, AbortHandle>,
    ) -> Option<SessionEnd> {
        let msg = match HubMessage::parse(frame) {
            Ok(m) => m,
            Err(e) => return Some(SessionEnd::Lost(format!("protocol error from server: {e}"))),
        };
        match msg {
            HubMessage::Ping => None,
            HubMessage::Close {
                error,
                allow_reconnect,
            } => Some(SessionEnd::ServerClosed {
                error,
                allow_reconnect,
            }),
            HubMessage::Invocation {
                invocation_id,
                target,
                arguments,
                ..
            } => {
                let out = out.clone();
                let handler = self.handlers.get(&target);
                let id = invocation_id.clone();
                let handle = tasks.spawn(async move {
                    let result = match handler {
                        Some(h) => {
                            let sink = ItemSink::new(invocation_id.clone(), out.clone());
                            h.invoke(arguments, sink).await
                        }
                        None => Err(format!(
                            "method '{target}' is not implemented by this relay"
                        )),
                    };
                    if let Some(id) = invocation_id {
                        let frame = HubMessage::Completion {
                            invocation_id: id,
                            result: match result {
                                Ok(v) => CompletionResult::Value(v),
                                Err(e) => CompletionResult::Error(e),
                            },
                        }
                        .to_frame();
                        let _ = out.send(frame).await;
                    }
                });
                if let Some(id) = id {
                    running.retain(|_, h| !h.is_finished());
                    running.insert(id, handle);
                }
                None
            }
            // The server stopped reading this invocation's stream (its run failed or was
            // cancelled): stop the handler, so a directory read does not go on for nothing.
            HubMessage::CancelInvocation { invocation_id } => {
                if let Some(h) = running.remove(&invocation_id) {
                    tracing::info!(%invocation_id, "invocation cancelled by the server");
                    h.abort();
                }
                None
            }
            // The relay does not call streaming hub methods; nothing else needs an answer.
            HubMessage::StreamItem { .. }
            | HubMessage::Completion { .. }
            | HubMessage::StreamInvocation { .. } => None,
        }
    }
}

async fn send(ws: &mut WebSocketStream<MaybeTls>, frame: String) -> Result<(), String> {
    ws.send(Message::text(frame))
        .await
        .map_err(|e| format!("send failed: {e}"))
}

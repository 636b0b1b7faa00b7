//! Server→relay methods. The server invokes a target by name; the relay answers with optional
//! StreamItems (chunks) and one Completion. Directory reads register here as well.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;

pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;

/// A method the server can invoke on the relay.
pub trait InvocationHandler: Send + Sync + 'static {
    /// `sink` streams chunks back; the returned value becomes the Completion result.
    fn invoke(&self, args: Vec<Value>, sink: ItemSink) -> HandlerFuture;
}

impl<F, Fut> InvocationHandler for F
where
    F: Fn(Vec<Value>, ItemSink) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, String>> + Send + 'static,
{
    fn invoke(&self, args: Vec<Value>, sink: ItemSink) -> HandlerFuture {
        Box::pin(self(args, sink))
    }
}

/// The connection went away while a handler was streaming.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the hub connection closed")]
pub struct SinkClosed;

/// Streams items of one invocation back to the server. `send` waits while the connection's
/// outbound queue is full, so a slow hub slows the producer instead of growing memory.
pub struct ItemSink {
    invocation_id: Option<String>,
    out: mpsc::Sender<String>,
    sent: u64,
}

impl ItemSink {
    pub(crate) fn new(invocation_id: Option<String>, out: mpsc::Sender<String>) -> Self {
        Self {
            invocation_id,
            out,
            sent: 0,
        }
    }

    pub async fn send(&mut self, item: Value) -> Result<(), SinkClosed> {
        let Some(id) = &self.invocation_id else {
            // Fire-and-forget invocation: nobody to stream to.
            return Ok(());
        };
        let frame = identitymesh_signalr::protocol::HubMessage::StreamItem {
            invocation_id: id.clone(),
            item,
        }
        .to_frame();
        self.out.send(frame).await.map_err(|_| SinkClosed)?;
        self.sent += 1;
        Ok(())
    }

    pub fn items_sent(&self) -> u64 {
        self.sent
    }
}

/// Target name → handler.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    map: HashMap<String, Arc<dyn InvocationHandler>>,
}

impl HandlerRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registry with the diagnostics methods (`Ping`, `Echo`, `StreamTest`).
    pub fn with_diagnostics() -> Self {
        let mut r = Self::new();
        r.register("Ping", |_args: Vec<Value>, _sink: ItemSink| async move {
            Ok(json!({
                "pong": true,
                "relayVersion": env!("CARGO_PKG_VERSION"),
                "os": std::env::consts::OS,
            }))
        });
        r.register("Echo", |args: Vec<Value>, _sink: ItemSink| async move {
            Ok(match args.len() {
                0 => Value::Null,
                1 => args.into_iter().next().unwrap_or(Value::Null),
                _ => Value::Array(args),
            })
        });
        r.register("StreamTest", stream_test);
        r
    }

    pub fn register(&mut self, target: &str, handler: impl InvocationHandler) {
        self.map.insert(target.to_owned(), Arc::new(handler));
    }

    pub fn get(&self, target: &str) -> Option<Arc<dyn InvocationHandler>> {
        self.map.get(target).cloned()
    }
}

/// `StreamTest(count, chunkBytes)`: streams `count` chunks, the same path LDAP pages take.
async fn stream_test(args: Vec<Value>, mut sink: ItemSink) -> Result<Value, String> {
    const MAX_COUNT: u64 = 100_000;
    const MAX_CHUNK: u64 = 256 * 1024;
    let count = args.first().and_then(Value::as_u64).unwrap_or(10);
    let chunk = args.get(1).and_then(Value::as_u64).unwrap_or(16);
    if count > MAX_COUNT || chunk > MAX_CHUNK {
        return Err(format!(
            "StreamTest limits: count <= {MAX_COUNT}, chunkBytes <= {MAX_CHUNK}"
        ));
    }
    let data = "x".repeat(chunk as usize);
    for seq in 0..count {
        sink.send(json!({ "seq": seq, "data": data }))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(json!({ "items": count }))
}

//! The ASP.NET Core SignalR JSON hub protocol (protocol "json", version 1).
//!
//! Every message is a JSON object terminated by the record separator 0x1E. Parsing is strict
//! about what we rely on (types, required fields) and lenient about what the spec says to
//! ignore (unknown properties), so newer clients keep working.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Terminates every handshake and hub message on text transports.
pub const RECORD_SEPARATOR: u8 = 0x1E;
/// Default cap on one frame; a directory chunk is far smaller, anything larger is abuse.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 1024 * 1024;

/// Why a frame or message was rejected. `Display` is what goes into the Close message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame exceeds the maximum size of {max} bytes")]
    FrameTooLarge { max: usize },
    #[error("frame is not valid UTF-8")]
    InvalidUtf8,
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("message is not a JSON object")]
    NotAnObject,
    #[error("message has no 'type' property")]
    MissingType,
    #[error("unknown message type {0}")]
    UnknownMessageType(u64),
    #[error("{message} message is missing required property '{field}'")]
    MissingField {
        message: &'static str,
        field: &'static str,
    },
    #[error("property '{field}' must be {expected}")]
    InvalidField {
        field: &'static str,
        expected: &'static str,
    },
    #[error("binary frames are not supported by the json protocol")]
    BinaryFrame,
    #[error("a hub message arrived before the handshake completed")]
    MessageBeforeHandshake,
    #[error(
        "the handshake must be the first frame; expected {{\"protocol\":\"json\",\"version\":1}}"
    )]
    InvalidHandshake,
    #[error("protocol '{protocol}' version {version} is not supported; use json version 1")]
    UnsupportedProtocol { protocol: String, version: u64 },
    #[error("handshake was not received in time")]
    HandshakeTimeout,
    #[error("server rejected the handshake: {0}")]
    HandshakeRejected(String),
}

/// Splits a byte stream into 0x1E-terminated frames without ever holding more than
/// `max_frame_size` bytes of one incomplete frame. The buffer is only allocated while a frame
/// is split across reads, so an idle connection costs nothing here.
#[derive(Debug)]
pub struct FrameSplitter {
    partial: Vec<u8>,
    max_frame_size: usize,
}

impl FrameSplitter {
    pub fn new(max_frame_size: usize) -> Self {
        Self {
            partial: Vec::new(),
            max_frame_size,
        }
    }

    /// True if bytes of an unfinished frame are buffered.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// Feeds `data`, calling `on_frame` with each complete frame (without the separator).
    /// After an error the splitter must not be used again: the stream is out of sync.
    pub fn push(
        &mut self,
        data: &[u8],
        mut on_frame: impl FnMut(&[u8]) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        let mut rest = data;
        while let Some(pos) = rest.iter().position(|&b| b == RECORD_SEPARATOR) {
            let (head, tail) = rest.split_at(pos);
            rest = &tail[1..];
            if self.partial.is_empty() {
                if head.len() > self.max_frame_size {
                    return Err(ProtocolError::FrameTooLarge {
                        max: self.max_frame_size,
                    });
                }
                on_frame(head)?;
            } else {
                if self.partial.len() + head.len() > self.max_frame_size {
                    return Err(ProtocolError::FrameTooLarge {
                        max: self.max_frame_size,
                    });
                }
                self.partial.extend_from_slice(head);
                let frame = std::mem::take(&mut self.partial);
                on_frame(&frame)?;
            }
        }
        if !rest.is_empty() {
            if self.partial.len() + rest.len() > self.max_frame_size {
                return Err(ProtocolError::FrameTooLarge {
                    max: self.max_frame_size,
                });
            }
            self.partial.extend_from_slice(rest);
        }
        Ok(())
    }

    /// Convenience for callers that want owned, UTF-8 checked frames.
    pub fn push_collect(&mut self, data: &[u8]) -> Result<Vec<String>, ProtocolError> {
        let mut out = Vec::new();
        self.push(data, |f| {
            out.push(
                std::str::from_utf8(f)
                    .map_err(|_| ProtocolError::InvalidUtf8)?
                    .to_owned(),
            );
            Ok(())
        })?;
        Ok(out)
    }
}

/// `{"protocol":"json","version":1}` — the first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandshakeRequest {
    pub protocol: String,
    pub version: u64,
}

impl HandshakeRequest {
    pub fn json_v1() -> Self {
        Self {
            protocol: "json".into(),
            version: 1,
        }
    }

    /// Parses one handshake frame (without separator) and checks it asks for json v1.
    pub fn parse_and_check(frame: &[u8]) -> Result<Self, ProtocolError> {
        let text = std::str::from_utf8(frame).map_err(|_| ProtocolError::InvalidUtf8)?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
        let obj = value.as_object().ok_or(ProtocolError::NotAnObject)?;
        if obj.contains_key("type") {
            // A hub message where the handshake should be: the client skipped the handshake.
            return Err(ProtocolError::MessageBeforeHandshake);
        }
        let protocol = obj
            .get("protocol")
            .and_then(Value::as_str)
            .ok_or(ProtocolError::InvalidHandshake)?
            .to_owned();
        let version = obj
            .get("version")
            .and_then(Value::as_u64)
            .ok_or(ProtocolError::InvalidHandshake)?;
        if protocol != "json" || version != 1 {
            return Err(ProtocolError::UnsupportedProtocol { protocol, version });
        }
        Ok(Self { protocol, version })
    }

    pub fn to_frame(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push(RECORD_SEPARATOR as char);
        s
    }
}

/// `{}` on success, `{"error":"..."}` on failure.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HandshakeResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HandshakeResponse {
    pub fn to_frame(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push(RECORD_SEPARATOR as char);
        s
    }

    pub fn parse(frame: &[u8]) -> Result<Self, ProtocolError> {
        let text = std::str::from_utf8(frame).map_err(|_| ProtocolError::InvalidUtf8)?;
        let value: Value =
            serde_json::from_str(text).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
        let obj = value.as_object().ok_or(ProtocolError::NotAnObject)?;
        match obj.get("error") {
            None | Some(Value::Null) => Ok(Self { error: None }),
            Some(Value::String(e)) => Ok(Self {
                error: Some(e.clone()),
            }),
            Some(_) => Err(ProtocolError::InvalidField {
                field: "error",
                expected: "a string",
            }),
        }
    }
}

/// Outcome carried by a Completion message.
#[derive(Debug, Clone, PartialEq)]
pub enum CompletionResult {
    /// No `result` property: a void method or the end of a stream.
    Void,
    Value(Value),
    Error(String),
}

/// One hub message. Field names follow HubProtocol.md.
#[derive(Debug, Clone, PartialEq)]
pub enum HubMessage {
    Invocation {
        /// None for fire-and-forget ("send") invocations.
        invocation_id: Option<String>,
        target: String,
        arguments: Vec<Value>,
        stream_ids: Vec<String>,
        headers: BTreeMap<String, String>,
    },
    StreamItem {
        invocation_id: String,
        item: Value,
    },
    Completion {
        invocation_id: String,
        result: CompletionResult,
    },
    StreamInvocation {
        invocation_id: String,
        target: String,
        arguments: Vec<Value>,
        stream_ids: Vec<String>,
    },
    CancelInvocation {
        invocation_id: String,
    },
    Ping,
    Close {
        error: Option<String>,
        allow_reconnect: bool,
    },
}

pub const TYPE_INVOCATION: u64 = 1;
pub const TYPE_STREAM_ITEM: u64 = 2;
pub const TYPE_COMPLETION: u64 = 3;
pub const TYPE_STREAM_INVOCATION: u64 = 4;
pub const TYPE_CANCEL_INVOCATION: u64 = 5;
pub const TYPE_PING: u64 = 6;
pub const TYPE_CLOSE: u64 = 7;

fn req_str(
    obj: &Map<String, Value>,
    message: &'static str,
    field: &'static str,
) -> Result<String, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(ProtocolError::MissingField { message, field }),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ProtocolError::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

fn opt_str(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, ProtocolError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ProtocolError::InvalidField {
            field,
            expected: "a string",
        }),
    }
}

fn req_args(obj: &Map<String, Value>, message: &'static str) -> Result<Vec<Value>, ProtocolError> {
    match obj.get("arguments") {
        None | Some(Value::Null) => Err(ProtocolError::MissingField {
            message,
            field: "arguments",
        }),
        Some(Value::Array(a)) => Ok(a.clone()),
        Some(_) => Err(ProtocolError::InvalidField {
            field: "arguments",
            expected: "an array",
        }),
    }
}

fn opt_stream_ids(obj: &Map<String, Value>) -> Result<Vec<String>, ProtocolError> {
    match obj.get("streamIds") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or(ProtocolError::InvalidField {
                        field: "streamIds",
                        expected: "an array of strings",
                    })
            })
            .collect(),
        Some(_) => Err(ProtocolError::InvalidField {
            field: "streamIds",
            expected: "an array of strings",
        }),
    }
}

fn opt_headers(obj: &Map<String, Value>) -> Result<BTreeMap<String, String>, ProtocolError> {
    const BAD: ProtocolError = ProtocolError::InvalidField {
        field: "headers",
        expected: "an object of strings",
    };
    match obj.get("headers") {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_str().ok_or(BAD)?.to_owned())))
            .collect(),
        Some(_) => Err(BAD),
    }
}

impl HubMessage {
    /// Parses one frame (without the separator).
    pub fn parse(frame: &[u8]) -> Result<Self, ProtocolError> {
        let text = std::str::from_utf8(frame).map_err(|_| ProtocolError::InvalidUtf8)?;
        Self::parse_str(text)
    }

    pub fn parse_str(text: &str) -> Result<Self, ProtocolError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| ProtocolError::InvalidJson(e.to_string()))?;
        let Value::Object(obj) = value else {
            return Err(ProtocolError::NotAnObject);
        };
        let ty = match obj.get("type") {
            None | Some(Value::Null) => return Err(ProtocolError::MissingType),
            Some(v) => v.as_u64().ok_or(ProtocolError::InvalidField {
                field: "type",
                expected: "a positive integer",
            })?,
        };
        Ok(match ty {
            TYPE_INVOCATION => HubMessage::Invocation {
                invocation_id: opt_str(&obj, "invocationId")?,
                target: req_str(&obj, "Invocation", "target")?,
                arguments: req_args(&obj, "Invocation")?,
                stream_ids: opt_stream_ids(&obj)?,
                headers: opt_headers(&obj)?,
            },
            TYPE_STREAM_ITEM => HubMessage::StreamItem {
                invocation_id: req_str(&obj, "StreamItem", "invocationId")?,
                item: match obj.get("item") {
                    Some(v) => v.clone(),
                    None => {
                        return Err(ProtocolError::MissingField {
                            message: "StreamItem",
                            field: "item",
                        })
                    }
                },
            },
            TYPE_COMPLETION => {
                let invocation_id = req_str(&obj, "Completion", "invocationId")?;
                let error = opt_str(&obj, "error")?;
                let result = match (error, obj.get("result")) {
                    (Some(_), Some(_)) => {
                        return Err(ProtocolError::InvalidField {
                            field: "result",
                            expected: "absent when 'error' is set",
                        })
                    }
                    (Some(e), None) => CompletionResult::Error(e),
                    (None, Some(v)) => CompletionResult::Value(v.clone()),
                    (None, None) => CompletionResult::Void,
                };
                HubMessage::Completion {
                    invocation_id,
                    result,
                }
            }
            TYPE_STREAM_INVOCATION => HubMessage::StreamInvocation {
                invocation_id: req_str(&obj, "StreamInvocation", "invocationId")?,
                target: req_str(&obj, "StreamInvocation", "target")?,
                arguments: req_args(&obj, "StreamInvocation")?,
                stream_ids: opt_stream_ids(&obj)?,
            },
            TYPE_CANCEL_INVOCATION => HubMessage::CancelInvocation {
                invocation_id: req_str(&obj, "CancelInvocation", "invocationId")?,
            },
            TYPE_PING => HubMessage::Ping,
            TYPE_CLOSE => HubMessage::Close {
                error: opt_str(&obj, "error")?,
                allow_reconnect: match obj.get("allowReconnect") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(ProtocolError::InvalidField {
                            field: "allowReconnect",
                            expected: "a boolean",
                        })
                    }
                },
            },
            other => return Err(ProtocolError::UnknownMessageType(other)),
        })
    }

    /// The JSON object for this message (no separator).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        match self {
            HubMessage::Invocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
                headers,
            } => {
                m.insert("type".into(), TYPE_INVOCATION.into());
                if !headers.is_empty() {
                    m.insert(
                        "headers".into(),
                        Value::Object(
                            headers
                                .iter()
                                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                                .collect(),
                        ),
                    );
                }
                if let Some(id) = invocation_id {
                    m.insert("invocationId".into(), id.clone().into());
                }
                m.insert("target".into(), target.clone().into());
                m.insert("arguments".into(), Value::Array(arguments.clone()));
                if !stream_ids.is_empty() {
                    m.insert("streamIds".into(), stream_ids.clone().into());
                }
            }
            HubMessage::StreamItem {
                invocation_id,
                item,
            } => {
                m.insert("type".into(), TYPE_STREAM_ITEM.into());
                m.insert("invocationId".into(), invocation_id.clone().into());
                m.insert("item".into(), item.clone());
            }
            HubMessage::Completion {
                invocation_id,
                result,
            } => {
                m.insert("type".into(), TYPE_COMPLETION.into());
                m.insert("invocationId".into(), invocation_id.clone().into());
                match result {
                    CompletionResult::Void => {}
                    CompletionResult::Value(v) => {
                        m.insert("result".into(), v.clone());
                    }
                    CompletionResult::Error(e) => {
                        m.insert("error".into(), e.clone().into());
                    }
                }
            }
            HubMessage::StreamInvocation {
                invocation_id,
                target,
                arguments,
                stream_ids,
            } => {
                m.insert("type".into(), TYPE_STREAM_INVOCATION.into());
                m.insert("invocationId".into(), invocation_id.clone().into());
                m.insert("target".into(), target.clone().into());
                m.insert("arguments".into(), Value::Array(arguments.clone()));
                if !stream_ids.is_empty() {
                    m.insert("streamIds".into(), stream_ids.clone().into());
                }
            }
            HubMessage::CancelInvocation { invocation_id } => {
                m.insert("type".into(), TYPE_CANCEL_INVOCATION.into());
                m.insert("invocationId".into(), invocation_id.clone().into());
            }
            HubMessage::Ping => {
                m.insert("type".into(), TYPE_PING.into());
            }
            HubMessage::Close {
                error,
                allow_reconnect,
            } => {
                m.insert("type".into(), TYPE_CLOSE.into());
                if let Some(e) = error {
                    m.insert("error".into(), e.clone().into());
                }
                if *allow_reconnect {
                    m.insert("allowReconnect".into(), true.into());
                }
            }
        }
        Value::Object(m)
    }

    /// The message as a 0x1E-terminated frame, ready for a text WebSocket message.
    pub fn to_frame(&self) -> String {
        let mut s = self.to_json().to_string();
        s.push(RECORD_SEPARATOR as char);
        s
    }
}

/// One transport offered by negotiate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AvailableTransport {
    pub transport: String,
    pub transfer_formats: Vec<String>,
}

/// Body of `POST <hub>/negotiate?negotiateVersion=1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NegotiateResponse {
    pub connection_id: String,
    /// Secret: it is what the WebSocket request presents as `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_token: Option<String>,
    pub negotiate_version: u32,
    pub available_transports: Vec<AvailableTransport>,
}

impl NegotiateResponse {
    /// Version 1 response offering only WebSockets with text frames (we speak json only).
    pub fn websockets_text(connection_id: String, connection_token: String) -> Self {
        Self {
            connection_id,
            connection_token: Some(connection_token),
            negotiate_version: 1,
            available_transports: vec![AvailableTransport {
                transport: "WebSockets".into(),
                transfer_formats: vec!["Text".into()],
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(s: &mut FrameSplitter, data: &[u8]) -> Result<Vec<String>, ProtocolError> {
        s.push_collect(data)
    }

    #[test]
    fn splitter_handles_multiple_and_partial_frames() {
        let mut s = FrameSplitter::new(100);
        assert_eq!(
            frames(&mut s, b"{\"a\":1}\x1e{\"b\"").unwrap(),
            vec!["{\"a\":1}"]
        );
        assert!(s.has_partial());
        assert_eq!(frames(&mut s, b":2}\x1e").unwrap(), vec!["{\"b\":2}"]);
        assert!(!s.has_partial());
        assert_eq!(
            s.partial.capacity(),
            0,
            "buffer released after a frame completes"
        );
        assert_eq!(frames(&mut s, b"\x1e").unwrap(), vec![""]);
    }

    #[test]
    fn splitter_rejects_oversized_frames_whole_or_split() {
        let mut s = FrameSplitter::new(4);
        assert_eq!(
            frames(&mut s, b"12345\x1e"),
            Err(ProtocolError::FrameTooLarge { max: 4 })
        );
        let mut s = FrameSplitter::new(4);
        assert!(frames(&mut s, b"123").unwrap().is_empty());
        assert_eq!(
            frames(&mut s, b"45"),
            Err(ProtocolError::FrameTooLarge { max: 4 })
        );
        let mut s = FrameSplitter::new(4);
        assert_eq!(frames(&mut s, b"1234\x1e").unwrap(), vec!["1234"]);
    }

    #[test]
    fn parses_all_message_types() {
        let cases = vec![
            (
                json!({"type":1,"invocationId":"1","target":"Add","arguments":[1,2]}),
                HubMessage::Invocation {
                    invocation_id: Some("1".into()),
                    target: "Add".into(),
                    arguments: vec![json!(1), json!(2)],
                    stream_ids: vec![],
                    headers: BTreeMap::new(),
                },
            ),
            (
                json!({"type":1,"target":"Send","arguments":[],"streamIds":["s1"],"headers":{"a":"b"}}),
                HubMessage::Invocation {
                    invocation_id: None,
                    target: "Send".into(),
                    arguments: vec![],
                    stream_ids: vec!["s1".into()],
                    headers: [("a".to_string(), "b".to_string())].into(),
                },
            ),
            (
                json!({"type":2,"invocationId":"1","item":null}),
                HubMessage::StreamItem {
                    invocation_id: "1".into(),
                    item: Value::Null,
                },
            ),
            (
                json!({"type":3,"invocationId":"1"}),
                HubMessage::Completion {
                    invocation_id: "1".into(),
                    result: CompletionResult::Void,
                },
            ),
            (
                json!({"type":3,"invocationId":"1","result":null}),
                HubMessage::Completion {
                    invocation_id: "1".into(),
                    result: CompletionResult::Value(Value::Null),
                },
            ),
            (
                json!({"type":3,"invocationId":"1","error":"boom"}),
                HubMessage::Completion {
                    invocation_id: "1".into(),
                    result: CompletionResult::Error("boom".into()),
                },
            ),
            (
                json!({"type":4,"invocationId":"2","target":"Counter","arguments":[5]}),
                HubMessage::StreamInvocation {
                    invocation_id: "2".into(),
                    target: "Counter".into(),
                    arguments: vec![json!(5)],
                    stream_ids: vec![],
                },
            ),
            (
                json!({"type":5,"invocationId":"2"}),
                HubMessage::CancelInvocation {
                    invocation_id: "2".into(),
                },
            ),
            (json!({"type":6}), HubMessage::Ping),
            (
                json!({"type":7,"error":"bye","allowReconnect":true}),
                HubMessage::Close {
                    error: Some("bye".into()),
                    allow_reconnect: true,
                },
            ),
            (
                json!({"type":7}),
                HubMessage::Close {
                    error: None,
                    allow_reconnect: false,
                },
            ),
        ];
        for (input, expected) in cases {
            let parsed = HubMessage::parse_str(&input.to_string()).unwrap();
            assert_eq!(parsed, expected, "{input}");
            // Round trip through our own serializer.
            let frame = parsed.to_frame();
            assert_eq!(frame.as_bytes().last(), Some(&RECORD_SEPARATOR));
            let again = HubMessage::parse_str(&frame[..frame.len() - 1]).unwrap();
            assert_eq!(again, expected);
        }
    }

    #[test]
    fn ignores_unknown_properties() {
        let m = HubMessage::parse_str(r#"{"type":6,"future":{"x":1}}"#).unwrap();
        assert_eq!(m, HubMessage::Ping);
    }

    #[test]
    fn typed_errors() {
        use ProtocolError::*;
        let cases: Vec<(&[u8], ProtocolError)> = vec![
            (b"{", InvalidJson(String::new())),
            (b"[1]", NotAnObject),
            (b"{}", MissingType),
            (
                br#"{"type":"1"}"#,
                InvalidField {
                    field: "type",
                    expected: "a positive integer",
                },
            ),
            (br#"{"type":99}"#, UnknownMessageType(99)),
            (
                br#"{"type":1,"arguments":[]}"#,
                MissingField {
                    message: "Invocation",
                    field: "target",
                },
            ),
            (
                br#"{"type":1,"target":"x"}"#,
                MissingField {
                    message: "Invocation",
                    field: "arguments",
                },
            ),
            (
                br#"{"type":1,"target":"x","arguments":{}}"#,
                InvalidField {
                    field: "arguments",
                    expected: "an array",
                },
            ),
            (
                br#"{"type":2,"invocationId":"1"}"#,
                MissingField {
                    message: "StreamItem",
                    field: "item",
                },
            ),
            (
                br#"{"type":3}"#,
                MissingField {
                    message: "Completion",
                    field: "invocationId",
                },
            ),
            (
                br#"{"type":3,"invocationId":"1","error":"e","result":1}"#,
                InvalidField {
                    field: "result",
                    expected: "absent when 'error' is set",
                },
            ),
            (
                br#"{"type":4,"target":"x","arguments":[]}"#,
                MissingField {
                    message: "StreamInvocation",
                    field: "invocationId",
                },
            ),
            (
                br#"{"type":7,"allowReconnect":"yes"}"#,
                InvalidField {
                    field: "allowReconnect",
                    expected: "a boolean",
                },
            ),
            (b"\xff\xfe", InvalidUtf8),
        ];
        for (input, expected) in cases {
            let err = HubMessage::parse(input).unwrap_err();
            match (&err, &expected) {
                (InvalidJson(_), InvalidJson(_)) => {}
                _ => assert_eq!(err, expected, "{}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[test]
    fn handshake() {
        let req = HandshakeRequest::parse_and_check(br#"{"protocol":"json","version":1}"#).unwrap();
        assert_eq!(req, HandshakeRequest::json_v1());
        assert_eq!(
            HandshakeRequest::parse_and_check(br#"{"protocol":"messagepack","version":1}"#),
            Err(ProtocolError::UnsupportedProtocol {
                protocol: "messagepack".into(),
                version: 1
            })
        );
        assert_eq!(
            HandshakeRequest::parse_and_check(br#"{"type":1,"target":"x","arguments":[]}"#),
            Err(ProtocolError::MessageBeforeHandshake)
        );
        assert_eq!(
            HandshakeRequest::parse_and_check(br#"{"protocol":"json"}"#),
            Err(ProtocolError::InvalidHandshake)
        );
        assert_eq!(HandshakeResponse::default().to_frame(), "{}\u{1e}");
        let err = HandshakeResponse {
            error: Some("nope".into()),
        };
        assert_eq!(err.to_frame(), "{\"error\":\"nope\"}\u{1e}");
        assert_eq!(
            HandshakeResponse::parse(b"{\"error\":\"nope\"}").unwrap(),
            err
        );
        assert_eq!(
            HandshakeResponse::parse(b"{}").unwrap(),
            HandshakeResponse::default()
        );
    }

    #[test]
    fn negotiate_response_shape() {
        let r = NegotiateResponse::websockets_text("cid".into(), "tok".into());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({
                "connectionId":"cid","connectionToken":"tok","negotiateVersion":1,
                "availableTransports":[{"transport":"WebSockets","transferFormats":["Text"]}]
            })
        );
    }
}

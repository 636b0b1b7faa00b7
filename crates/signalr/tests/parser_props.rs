//! Randomized tests of the frame splitter and message parser (run in `cargo test`).

use identitymesh_signalr::protocol::{
    CompletionResult, FrameSplitter, HandshakeRequest, HubMessage, ProtocolError,
};
use proptest::prelude::*;
use serde_json::{json, Value};

fn frames_of(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut all = Vec::new();
    for p in parts {
        all.extend_from_slice(p);
        all.push(0x1e);
    }
    all
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z\u{1f600}\"\\\\ ]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,5}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn hub_message() -> impl Strategy<Value = HubMessage> {
    let id = "[0-9a-z]{1,8}";
    prop_oneof![
        (
            proptest::option::of(id),
            "[A-Za-z]{1,10}",
            prop::collection::vec(json_value(), 0..4)
        )
            .prop_map(
                |(invocation_id, target, arguments)| HubMessage::Invocation {
                    invocation_id,
                    target,
                    arguments,
                    stream_ids: vec![],
                    headers: Default::default(),
                }
            ),
        (id, json_value()).prop_map(|(invocation_id, item)| HubMessage::StreamItem {
            invocation_id,
            item
        }),
        (id, json_value()).prop_map(|(invocation_id, v)| HubMessage::Completion {
            invocation_id,
            result: CompletionResult::Value(v)
        }),
        (id, "[ -~]{0,20}").prop_map(|(invocation_id, e)| HubMessage::Completion {
            invocation_id,
            result: CompletionResult::Error(e)
        }),
        id.prop_map(|invocation_id| HubMessage::CancelInvocation { invocation_id }),
        Just(HubMessage::Ping),
        (proptest::option::of("[ -~]{0,20}"), any::<bool>()).prop_map(
            |(error, allow_reconnect)| {
                HubMessage::Close {
                    error,
                    allow_reconnect,
                }
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// However a byte stream is cut into reads, the same frames come out in order.
    #[test]
    fn splitting_is_independent_of_read_boundaries(
        parts in prop::collection::vec(prop::collection::vec(any::<u8>().prop_filter("no RS", |b| *b != 0x1e), 0..40), 0..10),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let all = frames_of(&parts);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(all.len() + 1)).collect();
        points.push(0);
        points.push(all.len());
        points.sort_unstable();
        let mut s = FrameSplitter::new(64);
        let mut got = Vec::new();
        for w in points.windows(2) {
            s.push(&all[w[0]..w[1]], |f| { got.push(f.to_vec()); Ok(()) }).unwrap();
        }
        prop_assert_eq!(got, parts);
        prop_assert!(!s.has_partial());
    }

    /// Oversized frames are always rejected, never buffered past the limit.
    #[test]
    fn oversized_frames_are_rejected(max in 1usize..64, extra in 1usize..64, chunk in 1usize..16) {
        let data = vec![b'a'; max + extra];
        let mut s = FrameSplitter::new(max);
        let mut result = Ok(());
        for c in data.chunks(chunk) {
            result = s.push(c, |_| Ok(()));
            if result.is_err() { break; }
        }
        if result.is_ok() {
            result = s.push(&[0x1e], |_| Ok(()));
        }
        prop_assert_eq!(result, Err(ProtocolError::FrameTooLarge { max }));
    }

    /// Arbitrary bytes never panic: they parse or give a typed error.
    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut s = FrameSplitter::new(128);
        let _ = s.push(&data, |f| {
            let _ = HubMessage::parse(f);
            let _ = HandshakeRequest::parse_and_check(f);
            Ok(())
        });
    }

    /// Arbitrary JSON objects with a message type: typed result, never a panic.
    #[test]
    fn arbitrary_json_messages_never_panic(ty in 0u64..10, body in json_value()) {
        let mut v = match body { Value::Object(m) => m, other => { let mut m = serde_json::Map::new(); m.insert("x".into(), other); m } };
        v.insert("type".into(), json!(ty));
        let _ = HubMessage::parse_str(&Value::Object(v).to_string());
    }

    /// Serializing then parsing gives the same message.
    #[test]
    fn round_trip(msgs in prop::collection::vec(hub_message(), 1..6), chunk in 1usize..50) {
        let mut wire = String::new();
        for m in &msgs { wire.push_str(&m.to_frame()); }
        let mut s = FrameSplitter::new(1 << 20);
        let mut got = Vec::new();
        for c in wire.as_bytes().chunks(chunk) {
            s.push(c, |f| { got.push(HubMessage::parse(f)?); Ok(()) }).unwrap();
        }
        prop_assert_eq!(got, msgs);
    }
}

//! Feeds arbitrary bytes, cut into arbitrary reads, through the frame splitter, the handshake
//! parser and the hub message parser. Invariants: no panic; no frame longer than the limit;
//! every successfully parsed message survives a serialize → parse round trip.
#![no_main]

use identitymesh_signalr::protocol::{FrameSplitter, HandshakeRequest, HubMessage};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    // First byte picks the read size so the fuzzer explores split frames too.
    let (chunk, rest) = match data.split_first() {
        Some((c, r)) => ((*c as usize % 64) + 1, r),
        None => return,
    };
    let mut splitter = FrameSplitter::new(MAX);
    for piece in rest.chunks(chunk) {
        let result = splitter.push(piece, |frame| {
            assert!(frame.len() <= MAX);
            let _ = HandshakeRequest::parse_and_check(frame);
            if let Ok(msg) = HubMessage::parse(frame) {
                let wire = msg.to_frame();
                let again = HubMessage::parse(&wire.as_bytes()[..wire.len() - 1])
                    .expect("our own output parses");
                assert_eq!(again, msg);
            }
            Ok(())
        });
        if result.is_err() {
            break;
        }
    }
});

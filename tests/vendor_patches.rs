//! The changes made to the vendored crates (vendor/README.md), tested where the crates'
//! own test suites cannot run here: through their public API, or by compiling a
//! self-contained module of theirs, with its unit tests, into this test binary.

use socketioxide_core::packet::PacketData;
use socketioxide_core::parser::{Parse, ParseConfig, ParserState};
use socketioxide_core::{Str, Value};
use socketioxide_parser_common::CommonParser;

/// engineioxide's session buffer; its own unit tests run as part of this binary.
#[path = "../vendor/engineioxide/src/queue.rs"]
#[allow(dead_code)]
mod engineioxide_queue;

fn decode(packet: &str) -> socketioxide_core::packet::Packet {
    CommonParser
        .decode_str(
            &ParseConfig::default(),
            &ParserState::default(),
            Str::from(packet.to_string()),
        )
        .unwrap()
}

#[test]
fn a_namespace_query_in_a_connect_packet_is_not_part_of_the_namespace() {
    // socket.io-client 2.x, `io("/storage?client=follower")` or the `query` option.
    for packet in [
        "0/storage?client=follower,",
        "0/storage?client=follower",
        "0/storage?a=1&b=?x,",
    ] {
        let decoded = decode(packet);
        assert_eq!(decoded.ns, "/storage", "{packet}");
        assert!(matches!(decoded.inner, PacketData::Connect(None)), "{packet}");
    }
    // With a payload after the comma, and without a query at all.
    let decoded = decode(r#"0/storage?x=1,{"token":"abc"}"#);
    assert_eq!(decoded.ns, "/storage");
    assert!(
        matches!(&decoded.inner, PacketData::Connect(Some(Value::Str(s, None))) if s.as_str() == r#"{"token":"abc"}"#),
        "{:?}",
        decoded.inner
    );
    assert_eq!(decode("0/storage,").ns, "/storage");
    assert_eq!(decode("0").ns, "/");
}

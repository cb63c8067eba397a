//! Fuzz targets for every parser of untrusted input, run by `cargo test` on stable Rust
//! (see `support/fuzzer.rs` for the engine, `tests/fuzz/` for the corpus and the
//! regression cases). Each check must return, without a panic, in time proportional to
//! its input.

mod support;

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use engineioxide_core::payload;
use engineioxide_core::{Packet, ProtocolVersion};
use futures::Stream;
use http_body_util::StreamBody;
use hyper::body::Frame;
use mongodb::bson::{self, Bson, Document, doc, oid::ObjectId};
use nsbridge::auth::AuthSnapshot;
use nsbridge::channel::recovery::{Asked, asked};
use nsbridge::channel::replay::{ReplayLimits, check_since};
use nsbridge::channel::subscribe::{Ack, Decision, MAX_TOKEN_BYTES, Request, decide};
use nsbridge::channel::transport::session_id;
use nsbridge::collections::{Collection, CollectionNames};
use nsbridge::mapping::{Mapper, MappingRules, RelayMode};
use nsbridge::settings::Settings;
use serde_json::{Value, json};
use socketioxide_core::Str;
use socketioxide_core::packet::PacketData;
use socketioxide_core::parser::{Parse, ParseConfig, ParserState};
use socketioxide_parser_common::CommonParser;
use support::fuzzer::{Rng, chunkings, fuzz, text};

const MAX_PAYLOAD: u64 = 1_000_000;
const TEXT: &str = "text/plain;charset=UTF-8";
const BINARY: &str = "application/octet-stream";

/// Decodes a polling body, delivered in `chunks`, to its end or its first error. Every
/// chunk is ready at once, so the decoder must never wait.
fn decode_polling_body(chunks: Vec<Vec<u8>>, content_type: &'static str, protocol: ProtocolVersion) -> usize {
    let frames = chunks
        .into_iter()
        .filter(|c| !c.is_empty())
        .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c))));
    let body = StreamBody::new(futures::stream::iter(frames));
    let content_type = axum::http::HeaderValue::from_static(content_type);
    let packets = payload::decoder(body, Some(&content_type), protocol, MAX_PAYLOAD);
    let mut packets = std::pin::pin!(packets);
    let mut cx = Context::from_waker(Waker::noop());
    let mut decoded = 0;
    loop {
        match Pin::new(&mut packets).poll_next(&mut cx) {
            Poll::Ready(Some(Ok(_))) => decoded += 1,
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => return decoded,
            Poll::Pending => panic!("the decoder waits although the whole body is there"),
        }
    }
}

fn check_polling_body(input: &[u8], content_type: &'static str, protocol: ProtocolVersion) {
    for chunks in chunkings(input) {
        let decoded = decode_polling_body(chunks, content_type, protocol);
        // Every packet takes at least one byte of the body.
        assert!(
            decoded <= input.len(),
            "{decoded} packets from {} bytes",
            input.len()
        );
    }
}

/// A length that is right, a little off, or anything.
fn declared_length(rng: &mut Rng, actual: usize) -> String {
    match rng.u8(..8) {
        0..4 => actual.to_string(),
        4 => actual.saturating_sub(rng.usize(1..=3)).to_string(),
        5 => (actual + rng.usize(1..=3)).to_string(),
        6 => rng.u64(..).to_string(),
        _ => text(rng, 2..3),
    }
}

fn engine_io_packet(rng: &mut Rng) -> String {
    let kind = [
        "0",
        "1",
        "2",
        "3",
        "4",
        "5",
        "6",
        "2probe",
        "3probe",
        "b4",
        "40/storage,",
        "42/storage,0",
    ];
    let mut packet = kind[rng.usize(..kind.len())].to_string();
    packet.push_str(&text(rng, 0..24));
    packet
}

#[test]
fn eio3_string_payload() {
    fuzz(
        "eio3_string_payload",
        |rng| {
            let mut body = String::new();
            for _ in 0..rng.usize(1..=5) {
                let packet = engine_io_packet(rng);
                body.push_str(&declared_length(rng, packet.encode_utf16().count()));
                body.push(':');
                body.push_str(&packet);
            }
            body.into_bytes()
        },
        |input| check_polling_body(input, TEXT, ProtocolVersion::V3),
    );
}

#[test]
fn eio3_binary_payload() {
    fuzz(
        "eio3_binary_payload",
        |rng| {
            let mut body = Vec::new();
            for _ in 0..rng.usize(1..=5) {
                let binary = rng.bool();
                let data: Vec<u8> = if binary {
                    let mut data = vec![4u8];
                    let len = rng.usize(0..32);
                    data.extend(std::iter::repeat_with(|| rng.u8(..)).take(len));
                    data
                } else {
                    engine_io_packet(rng).into_bytes()
                };
                body.push(u8::from(binary));
                let length = declared_length(rng, data.len());
                // The length's decimal digits as byte values 0 to 9.
                body.extend(length.bytes().map(|b| b.wrapping_sub(b'0')));
                body.push(0xff);
                body.extend(data);
            }
            body
        },
        |input| check_polling_body(input, BINARY, ProtocolVersion::V3),
    );
}

#[test]
fn eio4_payload() {
    fuzz(
        "eio4_payload",
        |rng| {
            let packets: Vec<String> = (0..rng.usize(1..=5)).map(|_| engine_io_packet(rng)).collect();
            packets.join("\u{1e}").into_bytes()
        },
        |input| check_polling_body(input, TEXT, ProtocolVersion::V4),
    );
}

/// The Engine.IO packet of a WebSocket text frame, in both protocols.
#[test]
fn engineio_packet() {
    fuzz(
        "engineio_packet",
        |rng| engine_io_packet(rng).into_bytes(),
        |input| {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            for protocol in [ProtocolVersion::V3, ProtocolVersion::V4] {
                let _ = Packet::parse(protocol, text.to_string());
            }
        },
    );
}

fn json_value(rng: &mut Rng, depth: usize) -> Value {
    match rng.u8(..if depth > 3 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => json!(rng.bool()),
        2 => json!(rng.i64(..)),
        3 => json!(rng.f64() * 1e6),
        4 => json!(text(rng, 0..12)),
        5 | 6 => Value::Array((0..rng.usize(0..5)).map(|_| json_value(rng, depth + 1)).collect()),
        _ => {
            let keys = ["accessToken", "collections", "since", "a", ""];
            Value::Object(
                (0..rng.usize(0..5))
                    .map(|_| {
                        (
                            keys[rng.usize(..keys.len())].to_string(),
                            json_value(rng, depth + 1),
                        )
                    })
                    .collect(),
            )
        }
    }
}

/// A Socket.IO packet as a client sends it to `/storage`: the text after Engine.IO's `4`.
#[test]
fn socketio_packet() {
    fuzz(
        "socketio_packet",
        |rng| {
            let kinds = [
                "0",
                "1",
                "2",
                "3",
                "4",
                "5",
                "6",
                "2/storage,",
                "2/storage,12",
                "0/storage,",
                "5-",
            ];
            let mut packet = kinds[rng.usize(..kinds.len())].to_string();
            if rng.bool() {
                packet.push_str(&rng.u32(..).to_string());
            }
            let args: Vec<Value> = std::iter::once(json!("subscribe"))
                .chain((0..rng.usize(0..3)).map(|_| json_value(rng, 0)))
                .collect();
            packet.push_str(&Value::Array(args).to_string());
            packet.into_bytes()
        },
        |input| {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            // As the channel configures it: no binary attachments.
            let config = ParseConfig {
                max_incoming_binaries: 0,
                ..ParseConfig::default()
            };
            let state = ParserState::default();
            let Ok(mut packet) = CommonParser.decode_str(&config, &state, Str::from(text.to_string())) else {
                return;
            };
            if let PacketData::Event(value, _) | PacketData::EventAck(value, _) = &mut packet.inner {
                let _ = CommonParser.read_event(value);
                let _ = CommonParser.decode_value::<Value>(value, true);
            }
        },
    );
}

const SECRET: &str = "this is my long pass phrase";

fn auth_snapshot() -> AuthSnapshot {
    let subjects = [
        doc! { "_id": ObjectId::parse_str("5f1e4b2a9c8d7e6f5a4b3c2d").unwrap(), "name": "reader", "roles": ["readable"] },
        doc! { "_id": ObjectId::parse_str("5f1e4b2a9c8d7e6f5a4b3c2e").unwrap(), "name": "admin", "roles": ["admin"] },
    ];
    AuthSnapshot::build(SECRET, &subjects, &[], &["denied".to_string()]).0
}

/// The `subscribe` payload, as JSON text.
#[test]
fn subscribe_payload() {
    fuzz(
        "subscribe_payload",
        |rng| {
            let token = match rng.u8(..4) {
                0 => json!("reader-b4b4fa56d0c0a5b2"),
                1 => json!("x".repeat(rng.usize(1000..1100))),
                2 => json_value(rng, 2),
                _ => json!(text(rng, 0..30)),
            };
            let names = ["entries", "treatments", "settings", "foods", "", "devicestatus"];
            let collections: Vec<Value> = (0..rng.usize(0..80))
                .map(|_| {
                    if rng.u8(..4) == 0 {
                        json_value(rng, 3)
                    } else {
                        json!(names[rng.usize(..names.len())])
                    }
                })
                .collect();
            let mut payload = json!({"accessToken": token, "collections": collections});
            if rng.bool() {
                payload["since"] = json_value(rng, 3);
            }
            payload.to_string().into_bytes()
        },
        |input| {
            thread_local!(static SNAPSHOT: AuthSnapshot = auth_snapshot());
            let Ok(payload) = serde_json::from_slice::<Value>(input) else {
                return;
            };
            let request = Request::parse(&payload);
            let ack = SNAPSHOT.with(|snapshot| {
                let decision = decide(&request, snapshot);
                if let Decision::Granted { collections, .. } = &decision {
                    assert!(collections.iter().all(|c| request.collections.contains(c)));
                }
                Ack::for_decision(&decision)
            });
            if request.token.is_some_and(|t| t.len() > MAX_TOKEN_BYTES) {
                panic!("a token over {MAX_TOKEN_BYTES} bytes was read");
            }
            // Any since is answered: a time within the replay limits, or a reason.
            if let Some(since) = request.since {
                let now = 1_800_000_000_000;
                let limits = ReplayLimits::default();
                if let Ok(ms) = check_since(since, now, &limits) {
                    assert!(ms >= now - limits.max_since_age.as_millis() as i64 && ms <= now + 60_000);
                }
            }
            let ack = serde_json::to_value(&ack).unwrap();
            let shape_ok = match ack["success"] {
                Value::Bool(true) => ack["collections"].as_array().is_some_and(|c| {
                    !c.is_empty()
                        && c.iter()
                            .all(|n| n.as_str().and_then(Collection::from_name).is_some())
                }),
                Value::Bool(false) => ack["message"].is_string() && ack.as_object().unwrap().len() == 2,
                _ => false,
            };
            assert!(shape_ok, "{ack}");
        },
    );
}

/// The auth payload of a `/storage` CONNECT, as connection state recovery reads it.
#[test]
fn connect_auth() {
    fuzz(
        "connect_auth",
        |rng| {
            let mut auth = match rng.u8(..3) {
                0 => json!({"pid": text(rng, 0..80), "offset": text(rng, 0..25)}),
                1 => json!({"recovery": json_value(rng, 1), "pid": json_value(rng, 2)}),
                _ => json_value(rng, 3),
            };
            if rng.bool() && auth.is_object() {
                auth["offset"] = json_value(rng, 2);
            }
            auth.to_string().into_bytes()
        },
        |input| {
            let Ok(auth) = serde_json::from_slice::<Value>(input) else {
                return;
            };
            if let Asked::Recover { pid, .. } = asked(Some(&auth)) {
                assert!(!pid.is_empty() && pid.len() <= 64, "pid {pid:?}");
            }
        },
    );
}

/// The query string of a Socket.IO request, as the transport guard reads its session id.
#[test]
fn request_query() {
    fuzz(
        "request_query",
        |rng| {
            let keys = ["EIO", "transport", "sid", "t", "", "sid="];
            let pairs: Vec<String> = (0..rng.usize(0..6))
                .map(|_| format!("{}={}", keys[rng.usize(..keys.len())], text(rng, 0..20)))
                .collect();
            pairs.join("&").into_bytes()
        },
        |input| {
            let Ok(query) = std::str::from_utf8(input) else {
                return;
            };
            if let Some(sid) = session_id(query) {
                assert!(query.contains(&format!("sid={sid}")), "{sid} from {query:?}");
            }
        },
    );
}

fn toml_value(rng: &mut Rng) -> String {
    match rng.u8(..8) {
        0 => format!("\"{}\"", text(rng, 0..20).replace(['"', '\\'], "")),
        1 => rng.i64(..).to_string(),
        2 => rng.u64(..100).to_string(),
        3 => rng.bool().to_string(),
        4 => format!("{}", rng.f64() * 100.0),
        5 => "[1, \"a\"]".into(),
        6 => "{ a = 1 }".into(),
        _ => text(rng, 0..8),
    }
}

const SETTING_KEYS: &[&str] = &[
    "upstream",
    "listen",
    "relay",
    "replace_window_secs",
    "identifier_cache_size",
    "mongo.uri",
    "mongo.database",
    "mongo.pre_images",
    "collections.entries",
    "collections.settings",
    "auth.api_secret",
    "auth.default_roles",
    "auth.failure_delay_ms",
    "auth.max_pending_failures",
    "channel.max_events_in_flight",
    "channel.slow_client_timeout_secs",
    "state_dir",
    "state_collection",
    "history.max_age_secs",
    "history.max_events",
    "history.recovery_window_secs",
    "replay.max_since_age_days",
    "replay.max_documents",
    "connections.max",
    "connections.header_read_timeout_secs",
    "log.format",
    "log.level",
    "unknown",
    "mongo.unknown",
];

/// A settings file and `NSBRIDGE_*` variables.
#[test]
fn settings_file() {
    fuzz(
        "settings_file",
        |rng| {
            let mut file = String::new();
            for _ in 0..rng.usize(0..8) {
                let key = SETTING_KEYS[rng.usize(..SETTING_KEYS.len())];
                match key.split_once('.') {
                    Some((section, key)) => {
                        file.push_str(&format!("[{section}]\n{key} = {}\n", toml_value(rng)))
                    }
                    None => file.insert_str(0, &format!("{key} = {}\n", toml_value(rng))),
                }
            }
            file.into_bytes()
        },
        |input| {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("settings.toml");
            std::fs::write(&path, text).unwrap();
            let mut env = HashMap::from([
                ("MONGODB_URI".to_string(), "mongodb://localhost/ns".to_string()),
                ("API_SECRET".to_string(), SECRET.to_string()),
            ]);
            // The same text as an environment value too.
            let key = SETTING_KEYS[input.len() % SETTING_KEYS.len()];
            env.insert(
                format!("NSBRIDGE_{}", key.replace('.', "__").to_uppercase()),
                text.lines().next().unwrap_or("").to_string(),
            );
            for loaded in [
                Settings::load(Some(&path), &env).map(|_| String::new()),
                Settings::load_redacted(Some(&path), &env),
            ] {
                match loaded {
                    Ok(text) => assert!(!text.contains(SECRET), "{text}"),
                    Err(e) => assert!(!e.to_string().contains('\n'), "one line: {e}"),
                }
            }
        },
    );
}

fn bson_value(rng: &mut Rng, depth: usize) -> Bson {
    match rng.u8(..if depth > 3 { 12 } else { 15 }) {
        0 => Bson::Null,
        1 => Bson::Boolean(rng.bool()),
        2 => Bson::Int32(rng.i32(..)),
        3 => Bson::Int64(rng.i64(..)),
        4 => Bson::Double([f64::NAN, f64::INFINITY, -0.0, 1e21, 5e-324, rng.f64() * 1e12][rng.usize(..6)]),
        5 => Bson::String(text(rng, 0..12)),
        6 => Bson::ObjectId(ObjectId::from_bytes(
            rng.u128(..).to_be_bytes()[..12].try_into().unwrap(),
        )),
        7 => Bson::DateTime(bson::DateTime::from_millis(rng.i64(..))),
        8 => Bson::Timestamp(bson::Timestamp {
            time: rng.u32(..),
            increment: rng.u32(..),
        }),
        9 => Bson::Decimal128(bson::Decimal128::from_bytes(rng.u128(..).to_le_bytes())),
        10 => Bson::Binary(bson::Binary {
            subtype: bson::spec::BinarySubtype::Generic,
            bytes: vec![rng.u8(..); rng.usize(0..8)],
        }),
        11 => Bson::RegularExpression(bson::Regex {
            pattern: text(rng, 3..4),
            options: "i".into(),
        }),
        12 | 13 => Bson::Array((0..rng.usize(0..4)).map(|_| bson_value(rng, depth + 1)).collect()),
        _ => Bson::Document(document(rng, depth + 1)),
    }
}

fn document(rng: &mut Rng, depth: usize) -> Document {
    let keys = [
        "_id",
        "identifier",
        "srvModified",
        "srvCreated",
        "isValid",
        "date",
        "created_at",
        "x",
        "$weird",
        "",
    ];
    (0..rng.usize(0..6))
        .map(|_| (keys[rng.usize(..keys.len())].to_string(), bson_value(rng, depth)))
        .collect()
}

/// A change event as the change stream delivers it, shaped like MongoDB's or not: the
/// documents in it are whatever any writer to the database (APIv1 uploaders included)
/// stored.
#[test]
fn change_event() {
    fuzz(
        "change_event",
        |rng| {
            let ops = [
                "insert",
                "update",
                "replace",
                "delete",
                "drop",
                "invalidate",
                "other",
            ];
            let colls = ["entries", "treatments", "settings", "nope"];
            let mut event = doc! {
                "_id": { "_data": "nx:1" },
                "operationType": ops[rng.usize(..ops.len())],
                "ns": { "db": "ns", "coll": colls[rng.usize(..colls.len())] },
                "wallTime": bson::DateTime::from_millis(rng.i64(..)),
            };
            for key in ["fullDocument", "fullDocumentBeforeChange", "documentKey"] {
                if rng.bool() {
                    event.insert(key, document(rng, 0));
                }
            }
            if rng.bool() {
                event.insert(
                    "updateDescription",
                    doc! { "updatedFields": document(rng, 1), "removedFields": [] },
                );
            }
            if rng.u8(..8) == 0 {
                event.insert(text(rng, 3..4), bson_value(rng, 0));
            }
            bson::to_vec(&event).unwrap()
        },
        |input| {
            let Ok(event) = Document::from_reader(input) else {
                return;
            };
            for relay in [RelayMode::Apiv3, RelayMode::All] {
                let rules = MappingRules {
                    relay,
                    replace_window_ms: 60_000,
                    names: CollectionNames::default(),
                };
                let mut mapper = Mapper::new(rules, std::num::NonZeroUsize::new(16).unwrap());
                if let nsbridge::mapping::Decision::Relay(event) = mapper.map(&event) {
                    serde_json::from_str::<Value>(&event.payload_json()).expect("the payload is JSON");
                }
            }
        },
    );
}

/// Subjects and roles as the auth collections hold them (written by Nightscout's admin
/// UI, or by anyone with write access to the database).
#[test]
fn auth_documents() {
    fuzz(
        "auth_documents",
        |rng| {
            let mut docs = doc! {};
            for kind in ["subjects", "roles"] {
                let list: Vec<Bson> = (0..rng.usize(0..4))
                    .map(|_| {
                        let mut doc = document(rng, 1);
                        if rng.bool() {
                            doc.insert("name", bson_value(rng, 3));
                        }
                        let field = if kind == "roles" { "permissions" } else { "roles" };
                        if rng.bool() {
                            let names = [
                                "admin",
                                "readable",
                                "*",
                                "api:*:read",
                                "api:entries,treatments:read",
                                ":::",
                                "",
                            ];
                            let list: Vec<Bson> = (0..rng.usize(0..4))
                                .map(|_| Bson::String(names[rng.usize(..names.len())].into()))
                                .collect();
                            doc.insert(field, list);
                        }
                        Bson::Document(doc)
                    })
                    .collect();
                docs.insert(kind, list);
            }
            bson::to_vec(&docs).unwrap()
        },
        |input| {
            let Ok(docs) = Document::from_reader(input) else {
                return;
            };
            let list = |key: &str| -> Vec<Document> {
                docs.get_array(key)
                    .map(|a| a.iter().filter_map(|b| b.as_document().cloned()).collect())
                    .unwrap_or_default()
            };
            let (snapshot, _) =
                AuthSnapshot::build(SECRET, &list("subjects"), &list("roles"), &["readable".into()]);
            for token in ["reader-b4b4fa56d0c0a5b2", "x-0000000000000000", "-", ""] {
                let _ = snapshot.resolve(token);
            }
        },
    );
}

const TENANT_KEYS: &[&str] = &[
    "name",
    "hosts",
    "database",
    "api_secret",
    "api_secret_env",
    "api_secret_file",
    "mongodb_uri",
    "relay",
    "auth_default_roles",
    "upstream",
    "unknown",
];

fn tenant_value(rng: &mut Rng, key: &str) -> String {
    if rng.bool() {
        return toml_value(rng);
    }
    match key {
        "name" => format!("\"{}\"", ["alice", "bob", "", "Alice", "a b"][rng.usize(..5)]),
        "hosts" => [
            "[\"alice.example.org\"]",
            "[]",
            "[\"a.example.org:8080\", \"A.EXAMPLE.ORG\"]",
            "[\"x/y\"]",
        ][rng.usize(..4)]
        .into(),
        "database" => ["\"ns_alice\"", "\"ns.alice\"", "\"\"", "\"ns_bob\""][rng.usize(..4)].into(),
        "api_secret" => format!("\"{SECRET}\""),
        "api_secret_env" => ["\"ALICE_API_SECRET\"", "\"UNSET\"", "\"SHORT\""][rng.usize(..3)].into(),
        "api_secret_file" => ["\"/run/secrets/alice\"", "\"/missing\""][rng.usize(..2)].into(),
        "mongodb_uri" => {
            ["\"mongodb://db2/ns\"", "\"http://x\"", "\"mongodb://u:pw@h/\""][rng.usize(..3)].into()
        }
        "relay" => ["\"apiv3\"", "\"all\"", "\"some\""][rng.usize(..3)].into(),
        "upstream" => ["\"http://nightscout:1337\"", "\"ftp://x\"", "\"\""][rng.usize(..3)].into(),
        _ => toml_value(rng),
    }
}

/// A secret the file names but does not hold: no message may show it. (An error may quote
/// what the file itself says, as a bad host name: the operator wrote it.)
const SECRET_OUTSIDE_FILE: &str = "secret from the environment";

/// Secrets from a fixed table: the file system is not the fuzzer's to read.
struct FuzzSecrets;

impl nsbridge::tenants::SecretSource for FuzzSecrets {
    fn env(&self, name: &str) -> Option<String> {
        match name {
            "ALICE_API_SECRET" => Some(SECRET_OUTSIDE_FILE.into()),
            "SHORT" => Some("short".into()),
            _ => None,
        }
    }

    fn file(&self, path: &std::path::Path) -> std::io::Result<String> {
        if path == std::path::Path::new("/run/secrets/alice") {
            Ok(format!("{SECRET_OUTSIDE_FILE}\n"))
        } else {
            Err(std::io::ErrorKind::NotFound.into())
        }
    }
}

/// The tenants file: every problem is one line naming its tenant, and no secret shows.
#[test]
fn tenants_file() {
    static SETTINGS: std::sync::LazyLock<Settings> = std::sync::LazyLock::new(|| {
        let env = HashMap::from([
            ("MONGODB_URI".to_string(), "mongodb://localhost/ns".to_string()),
            ("API_SECRET".to_string(), SECRET.to_string()),
        ]);
        Settings::load(None, &env).unwrap()
    });
    fuzz(
        "tenants_file",
        |rng| {
            let mut file = String::new();
            for _ in 0..rng.usize(0..4) {
                file.push_str(if rng.u8(..16) == 0 {
                    "[tenant]\n"
                } else {
                    "[[tenant]]\n"
                });
                for _ in 0..rng.usize(0..9) {
                    let key = TENANT_KEYS[rng.usize(..TENANT_KEYS.len())];
                    file.push_str(&format!("{key} = {}\n", tenant_value(rng, key)));
                }
            }
            file.into_bytes()
        },
        |input| {
            let Ok(text) = std::str::from_utf8(input) else {
                return;
            };
            match nsbridge::tenants::parse(text, &SETTINGS, &FuzzSecrets) {
                Ok(tenants) => {
                    let shown = format!("{tenants:?}");
                    assert!(
                        !shown.contains(SECRET) && !shown.contains(SECRET_OUTSIDE_FILE),
                        "{shown}"
                    );
                    assert!(
                        !shown.contains(":pw@"),
                        "a password in mongodb_uri shows: {shown}"
                    );
                }
                Err(e) => {
                    let shown = e.to_string();
                    assert!(!shown.contains('\n'), "one line: {shown}");
                    assert!(!shown.contains(SECRET_OUTSIDE_FILE), "{shown}");
                }
            }
        },
    );
}

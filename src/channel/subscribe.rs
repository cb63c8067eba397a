//! The `subscribe` request and its three possible acks (spec §2); pure.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::auth::{AuthSnapshot, Subject};
use crate::collections::Collection;

pub const MISSING_OR_BAD_TOKEN: &str = "Missing or bad accessToken";
pub const UNAUTHORIZED_TO_ANY: &str = "Unauthorized to receive any collection";

/// Tokens longer than this are refused unread.
pub const MAX_TOKEN_BYTES: usize = 1024;
/// Only the first this many entries of `collections` are considered.
pub const MAX_REQUESTED_COLLECTIONS: usize = 64;

#[derive(Debug)]
pub enum Decision {
    BadToken,
    NothingReadable {
        subject: Arc<Subject>,
    },
    Granted {
        subject: Arc<Subject>,
        /// In request order, duplicates kept: what the ack lists.
        collections: Vec<Collection>,
    },
}

/// What the client asked for, read without trusting any of it.
pub struct Request<'a> {
    pub token: Option<&'a str>,
    pub collections: Vec<Collection>,
    /// `since`, when given: the largest `srvModified` the client has seen.
    pub since: Option<Since>,
}

/// A `since` as given: a time in ms, or why it is none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Since {
    Ms(i64),
    Invalid(&'static str),
}

impl Since {
    fn parse(value: &Value) -> Since {
        match value.as_f64() {
            Some(ms) if ms.is_finite() && ms >= 0.0 && ms <= i64::MAX as f64 => Since::Ms(ms as i64),
            Some(_) => Since::Invalid("since must not be negative"),
            None => Since::Invalid("since must be a number of milliseconds (a srvModified)"),
        }
    }
}

impl<'a> Request<'a> {
    pub fn parse(payload: &'a Value) -> Request<'a> {
        let Some(object) = payload.as_object() else {
            return Request {
                token: None,
                collections: Vec::new(),
                since: None,
            };
        };
        let token = object
            .get("accessToken")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TOKEN_BYTES);
        // Nightscout: `Array.isArray(message.collections) ? message.collections : all`.
        let collections = match object.get("collections") {
            Some(Value::Array(names)) => names
                .iter()
                .take(MAX_REQUESTED_COLLECTIONS)
                .filter_map(|n| n.as_str().and_then(Collection::from_name))
                .collect(),
            _ => Collection::ALL.to_vec(),
        };
        let since = object.get("since").map(Since::parse);
        Request {
            token,
            collections,
            since,
        }
    }
}

pub fn decide(request: &Request<'_>, snapshot: &AuthSnapshot) -> Decision {
    let Some(subject) = request.token.and_then(|t| snapshot.resolve(t)) else {
        return Decision::BadToken;
    };
    let collections: Vec<Collection> = request
        .collections
        .iter()
        .copied()
        .filter(|c| subject.may_read(*c))
        .collect();
    if collections.is_empty() {
        Decision::NothingReadable { subject }
    } else {
        Decision::Granted { subject, collections }
    }
}

/// The ack object, with Nightscout's field order; `replay` only when the client asked for
/// one with `since`.
#[derive(Debug, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Ack {
    Granted {
        success: bool,
        collections: Vec<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        replay: Option<ReplayInfo>,
    },
    Refused {
        success: bool,
        message: &'static str,
    },
}

impl Ack {
    pub fn for_decision(decision: &Decision) -> Ack {
        match decision {
            Decision::BadToken => Ack::Refused {
                success: false,
                message: MISSING_OR_BAD_TOKEN,
            },
            Decision::NothingReadable { .. } => Ack::Refused {
                success: false,
                message: UNAUTHORIZED_TO_ANY,
            },
            Decision::Granted { collections, .. } => Ack::Granted {
                success: true,
                collections: collections.iter().map(|c| c.name()).collect(),
                replay: None,
            },
        }
    }

    /// This ack with what the replay asked for with `since` will bring.
    pub fn with_replay(mut self, info: ReplayInfo) -> Ack {
        if let Ack::Granted { replay, .. } = &mut self {
            *replay = Some(info);
        }
        self
    }
}

/// What a replay brings, in the ack of a `subscribe` with `since`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReplayInfo {
    /// The `since` given.
    pub since: Value,
    /// Events replayed before the live ones.
    pub events: usize,
    /// Whether they are every event after `since`.
    pub complete: bool,
    /// `history` (the bridge's recent events), or `collections` (the documents
    /// modified after `since`: every state, but no permanent delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'static str>,
    /// Why the replay is incomplete, or why there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::{access_token, api_secret_hash, subject_digest};
    use bson::{doc, oid::ObjectId};
    use serde_json::json;

    const SECRET: &str = "this is my long pass phrase";
    const READER: &str = "5f1e4b2a9c8d7e6f5a4b3c2d";
    const ADMIN: &str = "65a1b2c3d4e5f60718293a4b";
    const UPLOADER: &str = "65a1b2c3d4e5f60718293a4c";

    fn token(id: &str, name: &str) -> String {
        access_token(name, &subject_digest(&api_secret_hash(SECRET), id))
    }

    fn snapshot() -> AuthSnapshot {
        let subjects = [
            doc! { "_id": ObjectId::parse_str(READER).unwrap(), "name": "reader", "roles": ["readable"] },
            doc! { "_id": ObjectId::parse_str(ADMIN).unwrap(), "name": "admin", "roles": ["admin"] },
            doc! { "_id": ObjectId::parse_str(UPLOADER).unwrap(), "name": "uploader", "roles": ["careportal"] },
        ];
        AuthSnapshot::build(SECRET, &subjects, &[], &[]).0
    }

    fn ack(payload: Value) -> Value {
        let snapshot = snapshot();
        serde_json::to_value(Ack::for_decision(&decide(&Request::parse(&payload), &snapshot))).unwrap()
    }

    fn bad() -> Value {
        json!({"success": false, "message": "Missing or bad accessToken"})
    }

    #[test]
    fn bad_or_missing_tokens() {
        for payload in [
            json!(null),
            json!("reader"),
            json!(42),
            json!([token(READER, "reader")]),
            json!({}),
            json!({"collections": ["entries"]}),
            json!({"accessToken": null}),
            json!({"accessToken": 12345678901234567890u64}),
            json!({"accessToken": {"token": token(READER, "reader")}}),
            json!({"accessToken": ""}),
            json!({"accessToken": "reader-0000000000000000"}),
            json!({"accessToken": "reader-5f1e"}),
            json!({"accessToken": format!("{}{}", "x".repeat(1100), token(READER, "reader"))}),
        ] {
            assert_eq!(ack(payload.clone()), bad(), "{payload}");
        }
    }

    #[test]
    fn default_collections_in_nightscout_order() {
        assert_eq!(
            ack(json!({"accessToken": token(ADMIN, "admin")})),
            json!({"success": true, "collections": ["devicestatus", "entries", "food", "profile", "settings", "treatments"]})
        );
        // Not an array: all collections, as Nightscout.
        assert_eq!(
            ack(json!({"accessToken": token(READER, "reader"), "collections": "entries"})),
            json!({"success": true, "collections": ["devicestatus", "entries", "food", "profile", "treatments"]})
        );
    }

    #[test]
    fn request_order_duplicates_and_unknown_names() {
        assert_eq!(
            ack(
                json!({"accessToken": token(READER, "reader"), "collections": ["treatments", "foods", "treatments"]})
            ),
            json!({"success": true, "collections": ["treatments", "treatments"]})
        );
        assert_eq!(
            ack(json!({
                "accessToken": token(READER, "reader"),
                "collections": ["devicestatus", "entries", "profile", "treatments", "foods", "settings"]
            })),
            json!({"success": true, "collections": ["devicestatus", "entries", "profile", "treatments"]})
        );
        assert_eq!(
            ack(
                json!({"accessToken": token(READER, "reader"), "collections": [1, null, {"a": 1}, "Entries", "entries"]})
            ),
            json!({"success": true, "collections": ["entries"]})
        );
    }

    #[test]
    fn nothing_readable() {
        let unauthorized = json!({"success": false, "message": "Unauthorized to receive any collection"});
        assert_eq!(
            ack(json!({"accessToken": token(READER, "reader"), "collections": ["settings"]})),
            unauthorized
        );
        assert_eq!(
            ack(json!({"accessToken": token(READER, "reader"), "collections": []})),
            unauthorized
        );
        assert_eq!(
            ack(json!({"accessToken": token(READER, "reader"), "collections": ["foods"]})),
            unauthorized
        );
        assert_eq!(
            ack(json!({"accessToken": token(UPLOADER, "uploader")})),
            unauthorized
        );
    }

    #[test]
    fn only_the_first_64_requested_names_count() {
        let mut names = vec![json!("foods"); 64];
        names.push(json!("entries"));
        assert_eq!(
            ack(json!({"accessToken": token(READER, "reader"), "collections": names})),
            json!({"success": false, "message": "Unauthorized to receive any collection"})
        );
    }

    #[test]
    fn ack_text_is_exact() {
        let refused = Ack::Refused {
            success: false,
            message: MISSING_OR_BAD_TOKEN,
        };
        assert_eq!(
            serde_json::to_string(&refused).unwrap(),
            r#"{"success":false,"message":"Missing or bad accessToken"}"#
        );
        let granted = Ack::Granted {
            success: true,
            collections: vec!["entries"],
            replay: None,
        };
        assert_eq!(
            serde_json::to_string(&granted).unwrap(),
            r#"{"success":true,"collections":["entries"]}"#
        );
        let replayed = granted.with_replay(ReplayInfo {
            since: json!(1700000000000u64),
            events: 3,
            complete: true,
            from: Some("history"),
            note: None,
        });
        assert_eq!(
            serde_json::to_string(&replayed).unwrap(),
            r#"{"success":true,"collections":["entries"],"replay":{"since":1700000000000,"events":3,"complete":true,"from":"history"}}"#
        );
    }

    #[test]
    fn since_is_read_without_trusting_it() {
        let since = |value: Value| Request::parse(&json!({"accessToken": "x", "since": value})).since;
        assert_eq!(since(json!(1700000000000u64)), Some(Since::Ms(1_700_000_000_000)));
        assert_eq!(since(json!(1.7e12)), Some(Since::Ms(1_700_000_000_000)));
        assert_eq!(since(json!(0)), Some(Since::Ms(0)));
        assert!(matches!(since(json!(-1)), Some(Since::Invalid(_))));
        assert!(matches!(since(json!("1700000000000")), Some(Since::Invalid(_))));
        assert!(matches!(since(json!(null)), Some(Since::Invalid(_))));
        assert!(matches!(since(json!(1e300)), Some(Since::Invalid(_))));
        assert_eq!(Request::parse(&json!({"accessToken": "x"})).since, None);
    }
}

//! Change events below are shaped as MongoDB documents them ("Change Events" in the
//! server manual): `_id` resume token, `operationType`, `clusterTime`, `wallTime`, `ns`,
//! `documentKey`, and per type `fullDocument`, `updateDescription`,
//! `fullDocumentBeforeChange`.

use super::*;
use bson::{DateTime, Timestamp, doc, oid::ObjectId};

const OID: &str = "65a1b2c3d4e5f60718293a4b";
/// The write's server time: 2023-11-14T22:13:21.000Z.
const WALL_MS: i64 = 1_700_000_001_000;

fn oid() -> ObjectId {
    ObjectId::parse_str(OID).unwrap()
}

fn mapper(relay: RelayMode) -> Mapper {
    Mapper::new(
        MappingRules {
            relay,
            replace_window_ms: 60_000,
            names: CollectionNames::default(),
        },
        NonZeroUsize::new(16).unwrap(),
    )
}

fn envelope(op: &str, coll: &str) -> Document {
    doc! {
        "_id": { "_data": "8265A1B2C3000000012B022C0100296E5A1004" },
        "operationType": op,
        "clusterTime": Timestamp { time: (WALL_MS / 1000) as u32, increment: 1 },
        "wallTime": DateTime::from_millis(WALL_MS),
        "ns": { "db": "nightscout", "coll": coll },
        "documentKey": { "_id": oid() },
    }
}

/// A treatment as APIv3 stores it on create.
fn apiv3_treatment() -> Document {
    doc! {
        "_id": oid(),
        "identifier": "abc",
        "date": 1_700_000_000_000_i64,
        "utcOffset": 0,
        "app": "AAPS",
        "eventType": "Note",
        "created_at": "2023-11-14T22:13:20.000Z",
        "srvModified": WALL_MS as f64,
        "srvCreated": WALL_MS as f64,
        "subject": "apiAll",
    }
}

/// A treatment as APIv1 or the careportal stores it: no `srv*` fields, no `identifier`.
fn apiv1_treatment() -> Document {
    doc! {
        "_id": oid(),
        "eventType": "Note",
        "created_at": "2023-11-14T22:13:20.000Z",
        "notes": "from the web UI",
    }
}

fn insert(coll: &str, doc: Document) -> Document {
    let mut e = envelope("insert", coll);
    e.insert("fullDocument", doc);
    e
}

fn update(coll: &str, updated: Document, after: Option<Document>) -> Document {
    let mut e = envelope("update", coll);
    e.insert(
        "updateDescription",
        doc! { "updatedFields": updated, "removedFields": [], "truncatedArrays": [] },
    );
    e.insert("fullDocument", after.map(Bson::Document).unwrap_or(Bson::Null));
    e
}

fn replace(coll: &str, after: Document, before: Option<Document>) -> Document {
    let mut e = envelope("replace", coll);
    e.insert("fullDocument", after);
    if let Some(before) = before {
        e.insert("fullDocumentBeforeChange", before);
    }
    e
}

fn delete(coll: &str, before: Option<Document>) -> Document {
    let mut e = envelope("delete", coll);
    if let Some(before) = before {
        e.insert("fullDocumentBeforeChange", before);
    }
    e
}

fn relayed(decision: Decision) -> BridgeEvent {
    match decision {
        Decision::Relay(event) => event,
        other => panic!("expected a relayed event, got {other:?}"),
    }
}

/// The event the mapper makes: `modified_ms` is the document's `srvModified` (for a delete,
/// set it where the test expects one).
fn event(collection: Collection, kind: EventKind, body: EventBody) -> BridgeEvent {
    let modified_ms = match &body {
        EventBody::Doc(doc) => number(doc.get("srvModified")).map(|ms| ms as i64),
        EventBody::Identifier(_) => None,
    };
    BridgeEvent {
        collection,
        kind,
        body,
        wall_time_ms: Some(WALL_MS),
        modified_ms,
    }
}

fn not_apiv3(collection: Collection) -> Decision {
    Decision::Skip {
        reason: SkipReason::NotApiv3,
        collection: Some(collection),
    }
}

fn with(mut doc: Document, key: &str, value: impl Into<Bson>) -> Document {
    doc.insert(key, value);
    doc
}

/// `created_at` of the test documents, 2023-11-14T22:13:20.000Z, in ms.
const CREATED_AT_MS: i64 = 1_700_000_000_000;

/// `doc` as APIv3 normalises it: `identifier` from `_id`, `srvCreated` as given, and
/// `srvModified` from the write's time.
fn normalised(doc: Document, srv_created: i64) -> Document {
    with(
        with(with(doc, "identifier", OID), "srvCreated", srv_created),
        "srvModified",
        WALL_MS,
    )
}

// Spec §4, row "create (new)": insertOne with srvCreated = srvModified = now.
#[test]
fn apiv3_create_is_create_in_both_modes() {
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(mode).map(&insert("treatments", apiv3_treatment())));
        assert_eq!(
            e,
            event(
                Collection::Treatments,
                EventKind::Create,
                EventBody::Doc(apiv3_treatment())
            )
        );
        assert_eq!(
            e.payload_json(),
            r#"{"colName":"treatments","doc":{"identifier":"abc","date":1700000000000,"utcOffset":0,"app":"AAPS","eventType":"Note","created_at":"2023-11-14T22:13:20.000Z","srvModified":1700000001000,"srvCreated":1700000001000,"subject":"apiAll"}}"#
        );
    }
}

// Row "create matching an existing doc, or update (PUT)": replaceOne keeps _id, fresh
// srvModified; without pre-images the wall-time window decides.
#[test]
fn apiv3_replace_without_pre_image_is_update_in_both_modes() {
    let after = with(apiv3_treatment(), "notes", "edited");
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(mode).map(&replace("treatments", after.clone(), None)));
        assert_eq!(
            e,
            event(
                Collection::Treatments,
                EventKind::Update,
                EventBody::Doc(after.clone())
            )
        );
    }
}

#[test]
fn apiv3_replace_with_pre_image_is_update_when_srv_modified_changed() {
    let before = with(apiv3_treatment(), "srvModified", (WALL_MS - 3_600_000) as f64);
    let after = with(apiv3_treatment(), "notes", "edited");
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(mode).map(&replace("treatments", after.clone(), Some(before.clone()))));
        assert_eq!(e.kind, EventKind::Update);
        assert_eq!(e.body, EventBody::Doc(after.clone()));
    }
}

// Row "update (PUT) of a missing doc": the upsert inserts.
#[test]
fn apiv3_upsert_insert_is_create() {
    let doc = with(apiv3_treatment(), "identifier", "put-new");
    let e = relayed(mapper(RelayMode::Apiv3).map(&insert("treatments", doc.clone())));
    assert_eq!(
        e,
        event(Collection::Treatments, EventKind::Create, EventBody::Doc(doc))
    );
}

// Row "patch": $set of fields plus srvModified and modifiedBy; the post-image is sent.
#[test]
fn apiv3_patch_is_update_with_post_image() {
    let after = with(
        with(apiv3_treatment(), "notes", "patched"),
        "modifiedBy",
        "apiAll",
    );
    let updated = doc! { "notes": "patched", "srvModified": WALL_MS as f64, "modifiedBy": "apiAll" };
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(mode).map(&update("treatments", updated.clone(), Some(after.clone()))));
        assert_eq!(
            e,
            event(
                Collection::Treatments,
                EventKind::Update,
                EventBody::Doc(after.clone())
            )
        );
    }
}

// Row "soft delete": $set isValid false.
#[test]
fn apiv3_soft_delete_is_delete_with_identifier() {
    let after = with(apiv3_treatment(), "isValid", false);
    let updated = doc! { "isValid": false, "srvModified": WALL_MS as f64, "modifiedBy": "apiAll" };
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(mode).map(&update("treatments", updated.clone(), Some(after.clone()))));
        let mut expected = event(
            Collection::Treatments,
            EventKind::Delete,
            EventBody::Identifier("abc".into()),
        );
        // The srvModified the soft delete set: what a reconnecting client's `since` is
        // compared with.
        expected.modified_ms = Some(WALL_MS);
        assert_eq!(e, expected);
        assert_eq!(e.payload_json(), r#"{"colName":"treatments","identifier":"abc"}"#);
    }
}

#[test]
fn soft_delete_of_a_document_already_gone_uses_remembered_identifier() {
    let mut m = mapper(RelayMode::Apiv3);
    relayed(m.map(&insert("treatments", apiv3_treatment())));
    let updated = doc! { "isValid": false, "srvModified": WALL_MS as f64 };
    let e = relayed(m.map(&update("treatments", updated, None)));
    assert_eq!(e.body, EventBody::Identifier("abc".into()));
}

// Row "permanent delete": deleteOne. The identifier comes from the pre-image, else the
// cache, else the _id.
#[test]
fn permanent_delete_with_pre_image() {
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(mode).map(&delete("treatments", Some(apiv3_treatment()))));
        assert_eq!(
            e,
            event(
                Collection::Treatments,
                EventKind::Delete,
                EventBody::Identifier("abc".into())
            )
        );
    }
}

#[test]
fn permanent_delete_without_pre_image_uses_cache_then_id() {
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        let mut m = mapper(mode);
        // Unknown _id: its string.
        let e = relayed(m.map(&delete("treatments", None)));
        assert_eq!(e.body, EventBody::Identifier(OID.into()));
        // Seen before (even on a write that was not relayed): its identifier, once.
        let mut v1 = apiv1_treatment();
        v1.insert("identifier", "seen-id");
        m.map(&insert("treatments", v1));
        let e = relayed(m.map(&delete("treatments", None)));
        assert_eq!(e.body, EventBody::Identifier("seen-id".into()));
        let e = relayed(m.map(&delete("treatments", None)));
        assert_eq!(e.body, EventBody::Identifier(OID.into()));
    }
}

#[test]
fn identifier_cache_is_per_collection_and_bounded() {
    let mut m = Mapper::new(
        MappingRules {
            relay: RelayMode::Apiv3,
            replace_window_ms: 60_000,
            names: CollectionNames::default(),
        },
        NonZeroUsize::new(1).unwrap(),
    );
    m.map(&insert("treatments", apiv3_treatment()));
    let e = relayed(m.map(&delete("entries", None)));
    assert_eq!(
        e.body,
        EventBody::Identifier(OID.into()),
        "another collection's cache entry"
    );
    m.map(&insert("treatments", apiv3_treatment()));
    let mut other = apiv3_treatment();
    other.insert("_id", ObjectId::new());
    let mut ins = insert("treatments", other.clone());
    ins.insert("documentKey", doc! { "_id": other.get_object_id("_id").unwrap() });
    m.map(&ins);
    let e = relayed(m.map(&delete("treatments", None)));
    assert_eq!(
        e.body,
        EventBody::Identifier(OID.into()),
        "evicted by the newer entry"
    );
}

#[test]
fn document_without_identifier_is_named_by_its_id() {
    let mut doc = apiv3_treatment();
    doc.remove("identifier");
    let e = relayed(mapper(RelayMode::Apiv3).map(&delete("treatments", Some(doc))));
    assert_eq!(e.body, EventBody::Identifier(OID.into()));
}

// Negatives in mode apiv3, and what mode all makes of them.
#[test]
fn apiv1_insert_without_srv_modified() {
    let ev = insert("treatments", apiv1_treatment());
    assert_eq!(
        mapper(RelayMode::Apiv3).map(&ev),
        not_apiv3(Collection::Treatments)
    );
    let e = relayed(mapper(RelayMode::All).map(&ev));
    let expected = normalised(apiv1_treatment(), CREATED_AT_MS);
    assert_eq!(
        e,
        event(
            Collection::Treatments,
            EventKind::Create,
            EventBody::Doc(expected)
        )
    );
    assert_eq!(
        e.payload_json(),
        format!(
            r#"{{"colName":"treatments","doc":{{"eventType":"Note","created_at":"2023-11-14T22:13:20.000Z","notes":"from the web UI","identifier":"{OID}","srvCreated":{CREATED_AT_MS},"srvModified":{WALL_MS}}}}}"#
        )
    );
}

#[test]
fn insert_with_srv_modified_but_no_srv_created_is_not_apiv3() {
    let doc = with(apiv1_treatment(), "srvModified", WALL_MS);
    assert_eq!(
        mapper(RelayMode::Apiv3).map(&insert("treatments", doc)),
        not_apiv3(Collection::Treatments)
    );
}

#[test]
fn insert_with_string_srv_fields_is_not_apiv3() {
    let doc = with(
        with(apiv1_treatment(), "srvModified", "1700000001000"),
        "srvCreated",
        "x",
    );
    assert_eq!(
        mapper(RelayMode::Apiv3).map(&insert("treatments", doc)),
        not_apiv3(Collection::Treatments)
    );
}

#[test]
fn set_without_srv_modified() {
    let after = with(apiv1_treatment(), "notes", "v1 edit");
    let ev = update("treatments", doc! { "notes": "v1 edit" }, Some(after.clone()));
    assert_eq!(
        mapper(RelayMode::Apiv3).map(&ev),
        not_apiv3(Collection::Treatments)
    );
    let e = relayed(mapper(RelayMode::All).map(&ev));
    let expected = normalised(after, CREATED_AT_MS);
    assert_eq!(
        e,
        event(
            Collection::Treatments,
            EventKind::Update,
            EventBody::Doc(expected)
        )
    );
}

#[test]
fn set_is_valid_false_without_srv_modified_is_delete_only_in_mode_all() {
    let after = with(apiv1_treatment(), "isValid", false);
    let ev = update("treatments", doc! { "isValid": false }, Some(after));
    assert_eq!(
        mapper(RelayMode::Apiv3).map(&ev),
        not_apiv3(Collection::Treatments)
    );
    let e = relayed(mapper(RelayMode::All).map(&ev));
    assert_eq!(
        e,
        event(
            Collection::Treatments,
            EventKind::Delete,
            EventBody::Identifier(OID.into())
        )
    );
}

#[test]
fn set_is_valid_true_is_an_update() {
    let after = with(apiv3_treatment(), "isValid", true);
    let ev = update(
        "treatments",
        doc! { "isValid": true, "srvModified": WALL_MS },
        Some(after.clone()),
    );
    let e = relayed(mapper(RelayMode::Apiv3).map(&ev));
    assert_eq!(
        e,
        event(Collection::Treatments, EventKind::Update, EventBody::Doc(after))
    );
}

#[test]
fn replace_keeping_a_stale_srv_modified() {
    // APIv1 read the document an hour ago and writes it back whole.
    let stale = with(apiv3_treatment(), "srvModified", (WALL_MS - 3_600_000) as f64);
    let after = with(stale.clone(), "notes", "v1 edit");
    let without_pre_image = replace("treatments", after.clone(), None);
    let with_pre_image = replace("treatments", after.clone(), Some(stale));
    for ev in [&without_pre_image, &with_pre_image] {
        assert_eq!(
            mapper(RelayMode::Apiv3).map(ev),
            not_apiv3(Collection::Treatments)
        );
        let e = relayed(mapper(RelayMode::All).map(ev));
        assert_eq!(
            e,
            event(
                Collection::Treatments,
                EventKind::Update,
                EventBody::Doc(after.clone())
            )
        );
    }
}

#[test]
fn replace_window_edges() {
    for (offset, relayed_expected) in [(-60_000, true), (60_000, true), (60_001, false), (-60_001, false)] {
        let after = with(apiv3_treatment(), "srvModified", WALL_MS + offset);
        let d = mapper(RelayMode::Apiv3).map(&replace("treatments", after, None));
        assert_eq!(
            matches!(d, Decision::Relay(_)),
            relayed_expected,
            "offset {offset}"
        );
    }
}

#[test]
fn replace_window_falls_back_to_cluster_time_before_mongodb_6() {
    let mut ev = replace("treatments", apiv3_treatment(), None);
    ev.remove("wallTime");
    let e = relayed(mapper(RelayMode::Apiv3).map(&ev));
    assert_eq!(e.wall_time_ms, Some(WALL_MS));
}

#[test]
fn replace_without_srv_modified_is_not_apiv3() {
    let ev = replace("treatments", apiv1_treatment(), None);
    assert_eq!(
        mapper(RelayMode::Apiv3).map(&ev),
        not_apiv3(Collection::Treatments)
    );
    let e = relayed(mapper(RelayMode::All).map(&ev));
    assert_eq!(e.kind, EventKind::Update);
}

#[test]
fn update_of_a_document_gone_before_lookup_is_dropped() {
    let ev = update("treatments", doc! { "notes": "x", "srvModified": WALL_MS }, None);
    for mode in [RelayMode::Apiv3, RelayMode::All] {
        assert_eq!(
            mapper(mode).map(&ev),
            Decision::Skip {
                reason: SkipReason::DocumentGone,
                collection: Some(Collection::Treatments)
            }
        );
    }
}

#[test]
fn stream_control_events_reopen() {
    let mut m = mapper(RelayMode::Apiv3);
    let mut rename = envelope("rename", "treatments");
    rename.insert("to", doc! { "db": "nightscout", "coll": "treatments_old" });
    rename.remove("documentKey");
    let mut drop = envelope("drop", "treatments");
    drop.remove("documentKey");
    let drop_db = doc! {
        "_id": { "_data": "82" }, "operationType": "dropDatabase",
        "clusterTime": Timestamp { time: 1, increment: 1 }, "ns": { "db": "nightscout" },
    };
    let invalidate = doc! {
        "_id": { "_data": "82" }, "operationType": "invalidate",
        "clusterTime": Timestamp { time: 1, increment: 1 },
    };
    assert_eq!(m.map(&drop), Decision::Reopen(ReopenReason::Drop));
    assert_eq!(m.map(&rename), Decision::Reopen(ReopenReason::Rename));
    assert_eq!(m.map(&drop_db), Decision::Reopen(ReopenReason::DropDatabase));
    assert_eq!(m.map(&invalidate), Decision::Reopen(ReopenReason::Invalidate));
}

#[test]
fn colname_is_logical_whatever_the_mongo_name() {
    let mut m = Mapper::new(
        MappingRules {
            relay: RelayMode::Apiv3,
            replace_window_ms: 60_000,
            names: CollectionNames {
                entries: "sgv_data".into(),
                ..Default::default()
            },
        },
        NonZeroUsize::new(4).unwrap(),
    );
    let entry = doc! {
        "_id": oid(), "identifier": "e1", "type": "sgv", "sgv": 120, "date": 1_700_000_000_000_i64,
        "dateString": "2023-11-14T22:13:20.000Z", "srvModified": WALL_MS, "srvCreated": WALL_MS,
    };
    let e = relayed(m.map(&insert("sgv_data", entry)));
    assert_eq!(e.collection, Collection::Entries);
    assert!(
        e.payload_json()
            .starts_with(r#"{"colName":"entries","doc":{"identifier":"e1""#)
    );
    assert_eq!(
        m.map(&insert("entries", apiv3_treatment())),
        Decision::Skip {
            reason: SkipReason::Unwatched,
            collection: None
        }
    );
}

#[test]
fn unsupported_and_malformed_events_are_skipped() {
    let mut m = mapper(RelayMode::All);
    assert_eq!(
        m.map(&envelope("createIndexes", "treatments")),
        Decision::Skip {
            reason: SkipReason::Unsupported,
            collection: Some(Collection::Treatments)
        }
    );
    assert_eq!(
        m.map(&doc! {}),
        Decision::Skip {
            reason: SkipReason::Malformed,
            collection: None
        }
    );
    let mut no_key = insert("treatments", apiv3_treatment());
    no_key.remove("documentKey");
    assert_eq!(
        m.map(&no_key),
        Decision::Skip {
            reason: SkipReason::Malformed,
            collection: Some(Collection::Treatments)
        }
    );
    let mut no_doc = envelope("insert", "treatments");
    no_doc.insert("fullDocument", Bson::Null);
    assert!(matches!(
        m.map(&no_doc),
        Decision::Skip {
            reason: SkipReason::Malformed,
            ..
        }
    ));
    let no_desc = envelope("update", "treatments");
    assert!(matches!(
        m.map(&no_desc),
        Decision::Skip {
            reason: SkipReason::Malformed,
            ..
        }
    ));
}

#[test]
fn falsy_identifier_falls_back_to_id() {
    let doc = with(apiv3_treatment(), "identifier", "");
    let e = relayed(mapper(RelayMode::All).map(&delete("treatments", Some(doc))));
    assert_eq!(e.body, EventBody::Identifier(OID.into()));
}

// Spec §3: every document sent is normalised as APIv3 normalises what it reads.
#[test]
fn an_apiv3_patch_of_an_apiv1_document_carries_identifier_and_srv_created() {
    // The exact sequence of the issue: APIv1 insert, then APIv3's $set of srvModified by _id.
    let after = with(
        with(apiv1_treatment(), "notes", "patched"),
        "srvModified",
        WALL_MS,
    );
    let ev = update(
        "treatments",
        doc! { "notes": "patched", "srvModified": WALL_MS, "modifiedBy": "apiAll" },
        Some(after.clone()),
    );
    for relay in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(relay).map(&ev));
        let expected = with(
            with(after.clone(), "identifier", OID),
            "srvCreated",
            CREATED_AT_MS,
        );
        assert_eq!(
            e,
            event(
                Collection::Treatments,
                EventKind::Update,
                EventBody::Doc(expected)
            ),
            "{relay:?}"
        );
    }
}

#[test]
fn srv_created_comes_from_each_collections_date_field() {
    let cases: [(&str, Document, Option<i64>); 7] = [
        (
            "entries",
            doc! { "_id": oid(), "sgv": 120, "date": CREATED_AT_MS, "dateString": "x" },
            Some(CREATED_AT_MS),
        ),
        (
            "entries",
            doc! { "_id": oid(), "sgv": 120, "date": CREATED_AT_MS as f64 },
            Some(CREATED_AT_MS),
        ),
        (
            "devicestatus",
            doc! { "_id": oid(), "created_at": "2023-11-14T23:13:20.000+01:00" },
            Some(CREATED_AT_MS),
        ),
        (
            "food",
            doc! { "_id": oid(), "created_at": "2023-11-14T22:13:20Z" },
            Some(CREATED_AT_MS),
        ),
        (
            "profile",
            doc! { "_id": oid(), "created_at": bson::DateTime::from_millis(CREATED_AT_MS) },
            Some(CREATED_AT_MS),
        ),
        (
            "treatments",
            doc! { "_id": oid(), "created_at": "not a date" },
            None,
        ),
        (
            "settings",
            doc! { "_id": oid(), "created_at": "2023-11-14T22:13:20Z", "date": 1 },
            None,
        ),
    ];
    for (coll, doc, srv_created) in cases {
        let e = relayed(mapper(RelayMode::All).map(&insert(coll, doc.clone())));
        let EventBody::Doc(sent) = e.body else {
            panic!("{coll}: not a document")
        };
        assert_eq!(sent.get_str("identifier").unwrap(), OID, "{coll}");
        assert_eq!(sent.get_i64("srvModified").unwrap(), WALL_MS, "{coll}");
        assert_eq!(sent.get_i64("srvCreated").ok(), srv_created, "{coll} {doc}");
    }
}

#[test]
fn srv_created_is_the_srv_modified_from_before_the_write_when_there_was_one() {
    let stored = with(apiv1_treatment(), "srvModified", (WALL_MS - 60_000) as f64);
    let after = with(with(stored.clone(), "notes", "patched"), "srvModified", WALL_MS);
    // With a pre-image.
    let mut ev = update(
        "treatments",
        doc! { "notes": "patched", "srvModified": WALL_MS },
        Some(after.clone()),
    );
    ev.insert("fullDocumentBeforeChange", stored.clone());
    let EventBody::Doc(sent) = relayed(mapper(RelayMode::Apiv3).map(&ev)).body else {
        panic!()
    };
    assert_eq!(sent.get_i64("srvCreated").unwrap(), WALL_MS - 60_000);
    // An update in mode all that left srvModified alone: the stored one.
    let ev = update(
        "treatments",
        doc! { "notes": "v1" },
        Some(with(stored, "notes", "v1")),
    );
    let EventBody::Doc(sent) = relayed(mapper(RelayMode::All).map(&ev)).body else {
        panic!()
    };
    assert_eq!(sent.get_i64("srvCreated").unwrap(), WALL_MS - 60_000);
    assert_eq!(sent.get_f64("srvModified").unwrap(), (WALL_MS - 60_000) as f64);
}

#[test]
fn what_a_document_has_is_never_replaced() {
    // APIv3's own documents go out as stored, field for field.
    for relay in [RelayMode::Apiv3, RelayMode::All] {
        let e = relayed(mapper(relay).map(&insert("treatments", apiv3_treatment())));
        assert_eq!(e.body, EventBody::Doc(apiv3_treatment()));
    }
    // A falsy identifier counts as none, as in `doc.identifier || doc._id`.
    let doc = with(apiv3_treatment(), "identifier", "");
    let EventBody::Doc(sent) = relayed(mapper(RelayMode::Apiv3).map(&insert("treatments", doc))).body else {
        panic!()
    };
    assert_eq!(sent.get_str("identifier").unwrap(), OID);
    assert_eq!(sent.get_f64("srvCreated").unwrap(), WALL_MS as f64);
}

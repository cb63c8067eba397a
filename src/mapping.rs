//! From one MongoDB change event to at most one bridge event (spec §4).
//!
//! Pure: no I/O. The only state is the bounded cache of identifiers seen per `_id`, which
//! names the document of a `delete` event when MongoDB gives no pre-image.

use std::fmt;
use std::num::NonZeroUsize;

use bson::{Bson, Document};
use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::collections::{Collection, CollectionNames};
use crate::json_form::{JsonDoc, id_string};

/// Which writes reach clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// Only writes carrying APIv3's signature, as Nightscout's own channel does.
    Apiv3,
    /// Every insert, update, replace and delete on the watched collections.
    All,
}

impl fmt::Display for RelayMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RelayMode::Apiv3 => "apiv3",
            RelayMode::All => "all",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Create,
    Update,
    Delete,
}

impl EventKind {
    /// The Socket.IO event name.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Create => "create",
            EventKind::Update => "update",
            EventKind::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    /// The stored document after the write (still with its `_id`; the wire form drops it).
    Doc(Document),
    Identifier(String),
}

/// What clients of a collection's room are told about one write.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeEvent {
    pub collection: Collection,
    pub kind: EventKind,
    pub body: EventBody,
    /// The write's wall-clock time in ms, when MongoDB reports one (for lag metrics).
    pub wall_time_ms: Option<i64>,
    /// The document's `srvModified` after the write (a soft delete's too), what a client's
    /// `since` is compared with; `None` for a permanent delete.
    pub modified_ms: Option<i64>,
}

impl BridgeEvent {
    /// The event's payload, serialisable to `{"colName":..,"doc":..}` or
    /// `{"colName":..,"identifier":..}` in Nightscout's field order.
    pub fn payload(&self) -> Payload<'_> {
        let col_name = self.collection.name();
        match &self.body {
            EventBody::Doc(doc) => Payload::Doc {
                col_name,
                doc: JsonDoc::without_id(doc),
            },
            EventBody::Identifier(identifier) => Payload::Delete { col_name, identifier },
        }
    }

    /// The payload as JSON text.
    pub fn payload_json(&self) -> String {
        serde_json::to_string(&self.payload()).expect("JSON form of BSON always serialises")
    }
}

/// The wire form of a [`BridgeEvent`]'s payload.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Payload<'a> {
    Doc {
        #[serde(rename = "colName")]
        col_name: &'static str,
        doc: JsonDoc<'a>,
    },
    Delete {
        #[serde(rename = "colName")]
        col_name: &'static str,
        identifier: &'a str,
    },
}

/// Why a change event produced no client event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// Mode `apiv3` and the write lacks APIv3's signature (APIv1, plugins, direct writes).
    NotApiv3,
    /// An update whose document was deleted before MongoDB looked it up.
    DocumentGone,
    /// A collection this bridge does not relay.
    Unwatched,
    /// An operation type with no client event (e.g. `createIndexes`).
    Unsupported,
    /// The change event lacks a field MongoDB always sends.
    Malformed,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotApiv3 => "not_apiv3",
            SkipReason::DocumentGone => "document_gone",
            SkipReason::Unwatched => "unwatched",
            SkipReason::Unsupported => "unsupported",
            SkipReason::Malformed => "malformed",
        }
    }
}

/// Events after which the change stream must be opened again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReopenReason {
    Drop,
    Rename,
    DropDatabase,
    Invalidate,
}

impl fmt::Display for ReopenReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReopenReason::Drop => "drop",
            ReopenReason::Rename => "rename",
            ReopenReason::DropDatabase => "dropDatabase",
            ReopenReason::Invalidate => "invalidate",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Relay(BridgeEvent),
    Skip {
        reason: SkipReason,
        /// The logical collection, when the event named a watched one.
        collection: Option<Collection>,
    },
    Reopen(ReopenReason),
}

#[derive(Debug, Clone)]
pub struct MappingRules {
    pub relay: RelayMode,
    /// How far (ms) a replace's `srvModified` may be from the event's wall time and still
    /// count as APIv3's, when no pre-image tells.
    pub replace_window_ms: i64,
    pub names: CollectionNames,
}

pub struct Mapper {
    rules: MappingRules,
    identifiers: LruCache<(Collection, String), String>,
}

impl Mapper {
    pub fn new(rules: MappingRules, identifier_cache_size: NonZeroUsize) -> Self {
        // Grown as identifiers come, not reserved whole: a bridge of many sites has one
        // mapper per site, most of them nearly idle.
        let mut identifiers = LruCache::unbounded();
        identifiers.resize(identifier_cache_size);
        Mapper { rules, identifiers }
    }

    pub fn rules(&self) -> &MappingRules {
        &self.rules
    }

    pub fn map(&mut self, event: &Document) -> Decision {
        let Ok(op) = event.get_str("operationType") else {
            return skip(SkipReason::Malformed, None);
        };
        match op {
            "drop" => return Decision::Reopen(ReopenReason::Drop),
            "rename" => return Decision::Reopen(ReopenReason::Rename),
            "dropDatabase" => return Decision::Reopen(ReopenReason::DropDatabase),
            "invalidate" => return Decision::Reopen(ReopenReason::Invalidate),
            _ => {}
        }
        let Some(coll_name) = event
            .get_document("ns")
            .ok()
            .and_then(|ns| ns.get_str("coll").ok())
        else {
            return skip(SkipReason::Malformed, None);
        };
        let Some(collection) = self.rules.names.logical(coll_name) else {
            return skip(SkipReason::Unwatched, None);
        };
        let Some(id) = event.get_document("documentKey").ok().and_then(|k| k.get("_id")) else {
            return skip(SkipReason::Malformed, Some(collection));
        };
        let id = id_string(id);
        let ctx = EventContext {
            collection,
            id,
            wall_time_ms: wall_time_ms(event),
            full_document: event.get_document("fullDocument").ok(),
            pre_image: event.get_document("fullDocumentBeforeChange").ok(),
            updated_fields: event
                .get_document("updateDescription")
                .ok()
                .and_then(|d| d.get_document("updatedFields").ok()),
        };
        match op {
            "insert" => self.insert(ctx),
            "update" => self.update(ctx, event.get_document("updateDescription").ok()),
            "replace" => self.replace(ctx),
            "delete" => self.delete(ctx),
            _ => skip(SkipReason::Unsupported, Some(collection)),
        }
    }

    fn insert(&mut self, ctx: EventContext<'_>) -> Decision {
        let Some(doc) = ctx.full_document else {
            return skip(SkipReason::Malformed, Some(ctx.collection));
        };
        self.remember(&ctx, doc);
        if self.rules.relay == RelayMode::Apiv3
            && !(is_number(doc.get("srvModified")) && is_number(doc.get("srvCreated")))
        {
            return skip(SkipReason::NotApiv3, Some(ctx.collection));
        }
        ctx.relay(EventKind::Create, self.document_body(&ctx, doc))
    }

    fn update(&mut self, ctx: EventContext<'_>, description: Option<&Document>) -> Decision {
        let Some(updated) = description.and_then(|d| d.get_document("updatedFields").ok()) else {
            return skip(SkipReason::Malformed, Some(ctx.collection));
        };
        if let Some(doc) = ctx.full_document {
            self.remember(&ctx, doc);
        }
        if self.rules.relay == RelayMode::Apiv3 && !updated.contains_key("srvModified") {
            return skip(SkipReason::NotApiv3, Some(ctx.collection));
        }
        if updated.get("isValid") == Some(&Bson::Boolean(false)) {
            let identifier = match ctx.full_document.or(ctx.pre_image) {
                Some(doc) => identifier_of(doc, &ctx.id),
                None => self.remembered(&ctx),
            };
            return ctx.relay(EventKind::Delete, EventBody::Identifier(identifier));
        }
        match ctx.full_document {
            Some(doc) => ctx.relay(EventKind::Update, self.document_body(&ctx, doc)),
            None => skip(SkipReason::DocumentGone, Some(ctx.collection)),
        }
    }

    fn replace(&mut self, ctx: EventContext<'_>) -> Decision {
        let Some(doc) = ctx.full_document else {
            return skip(SkipReason::Malformed, Some(ctx.collection));
        };
        self.remember(&ctx, doc);
        if self.rules.relay == RelayMode::Apiv3 && !self.replace_is_apiv3(&ctx, doc) {
            return skip(SkipReason::NotApiv3, Some(ctx.collection));
        }
        ctx.relay(EventKind::Update, self.document_body(&ctx, doc))
    }

    /// APIv3 stamps a fresh `srvModified` on every replace; APIv1 writes back whatever it
    /// read earlier, so a stale value gives it away.
    fn replace_is_apiv3(&self, ctx: &EventContext<'_>, doc: &Document) -> bool {
        let Some(modified) = number(doc.get("srvModified")) else {
            return false;
        };
        match (ctx.pre_image, ctx.wall_time_ms) {
            (Some(before), _) => number(before.get("srvModified")) != Some(modified),
            (None, Some(wall)) => (modified - wall as f64).abs() <= self.rules.replace_window_ms as f64,
            (None, None) => false,
        }
    }

    fn delete(&mut self, ctx: EventContext<'_>) -> Decision {
        let identifier = match ctx.pre_image {
            Some(before) => {
                self.identifiers.pop(&(ctx.collection, ctx.id.clone()));
                identifier_of(before, &ctx.id)
            }
            None => self
                .identifiers
                .pop(&(ctx.collection, ctx.id.clone()))
                .unwrap_or_else(|| ctx.id.clone()),
        };
        ctx.relay(EventKind::Delete, EventBody::Identifier(identifier))
    }

    fn remember(&mut self, ctx: &EventContext<'_>, doc: &Document) {
        let identifier = identifier_of(doc, &ctx.id);
        self.identifiers.put((ctx.collection, ctx.id.clone()), identifier);
    }

    fn remembered(&mut self, ctx: &EventContext<'_>) -> String {
        self.identifiers
            .get(&(ctx.collection, ctx.id.clone()))
            .cloned()
            .unwrap_or_else(|| ctx.id.clone())
    }

    /// The document as APIv3 normalises every document it reads (spec §3), in both modes:
    /// one written some other way (APIv1, the web UI) and then changed through APIv3 has
    /// no `identifier` or `srvCreated` of its own, and AndroidAPS keys its records by the
    /// one and reads the other.
    fn document_body(&self, ctx: &EventContext<'_>, doc: &Document) -> EventBody {
        EventBody::Doc(normalise(
            ctx.collection,
            doc,
            &ctx.id,
            previous_srv_modified(ctx, doc),
            ctx.wall_time_ms,
        ))
    }
}

/// A stored document as an event carries it (spec §3): with its `identifier` (else its
/// `_id`), its `srvCreated` (else `previous_srv_modified`, its `srvModified` before this
/// write, else its collection's date field) and its `srvModified` (else the write's time).
pub fn normalise(
    collection: Collection,
    doc: &Document,
    id: &str,
    previous_srv_modified: Option<i64>,
    wall_time_ms: Option<i64>,
) -> Document {
    let mut doc = doc.clone();
    if !has_identifier(&doc) {
        doc.insert("identifier", id.to_string());
    }
    if is_absent(doc.get("srvCreated"))
        && let Some(created) = previous_srv_modified.or_else(|| date_field(collection, &doc))
    {
        doc.insert("srvCreated", created);
    }
    if is_absent(doc.get("srvModified"))
        && let Some(wall) = wall_time_ms
    {
        doc.insert("srvModified", wall);
    }
    doc
}

/// The document's `srvModified` before this write, if it had one.
fn previous_srv_modified(ctx: &EventContext<'_>, doc: &Document) -> Option<i64> {
    let before = match (ctx.pre_image, ctx.updated_fields) {
        (Some(before), _) => number(before.get("srvModified")),
        // An update that left `srvModified` alone: the document still has the old one.
        (None, Some(updated)) if !updated.contains_key("srvModified") => number(doc.get("srvModified")),
        _ => None,
    };
    before.map(|ms| ms as i64)
}

/// `entries`: `date` (ms); `settings`: none; the others: `created_at` (ISO-8601).
fn date_field(collection: Collection, doc: &Document) -> Option<i64> {
    let (field, value) = match collection {
        Collection::Entries => ("date", doc.get("date")?),
        Collection::Settings => return None,
        _ => ("created_at", doc.get("created_at")?),
    };
    match value {
        Bson::DateTime(dt) => Some(dt.timestamp_millis()),
        Bson::String(text) if field == "created_at" => bson::DateTime::parse_rfc3339_str(text)
            .ok()
            .map(|dt| dt.timestamp_millis()),
        other => number(Some(other)).map(|ms| ms as i64),
    }
}

/// Missing, or null: what JavaScript's `!doc.field` treats as unset for these fields.
fn is_absent(value: Option<&Bson>) -> bool {
    matches!(value, None | Some(Bson::Null | Bson::Undefined))
}

struct EventContext<'a> {
    collection: Collection,
    /// `documentKey._id` as a string.
    id: String,
    wall_time_ms: Option<i64>,
    full_document: Option<&'a Document>,
    pre_image: Option<&'a Document>,
    /// An update's `updateDescription.updatedFields`.
    updated_fields: Option<&'a Document>,
}

impl EventContext<'_> {
    fn relay(&self, kind: EventKind, body: EventBody) -> Decision {
        let modified = match &body {
            EventBody::Doc(doc) => number(doc.get("srvModified")),
            // A soft delete: the `srvModified` it set.
            EventBody::Identifier(_) => self
                .updated_fields
                .and_then(|u| number(u.get("srvModified")))
                .or_else(|| self.full_document.and_then(|d| number(d.get("srvModified")))),
        };
        Decision::Relay(BridgeEvent {
            collection: self.collection,
            kind,
            body,
            wall_time_ms: self.wall_time_ms,
            modified_ms: modified.map(|ms| ms as i64),
        })
    }
}

fn skip(reason: SkipReason, collection: Option<Collection>) -> Decision {
    Decision::Skip { reason, collection }
}

/// `wallTime` (MongoDB 6.0+), else the seconds of `clusterTime`.
fn wall_time_ms(event: &Document) -> Option<i64> {
    match (event.get("wallTime"), event.get("clusterTime")) {
        (Some(Bson::DateTime(dt)), _) => Some(dt.timestamp_millis()),
        (_, Some(Bson::Timestamp(ts))) => Some(i64::from(ts.time) * 1000),
        _ => None,
    }
}

fn number(value: Option<&Bson>) -> Option<f64> {
    match value? {
        Bson::Int32(i) => Some(f64::from(*i)),
        Bson::Int64(i) => Some(*i as f64),
        Bson::Double(f) if f.is_finite() => Some(*f),
        _ => None,
    }
}

fn is_number(value: Option<&Bson>) -> bool {
    number(value).is_some()
}

/// A truthy `identifier` field, as Nightscout's `doc.identifier || doc._id.toString()`.
fn has_identifier(doc: &Document) -> bool {
    match doc.get("identifier") {
        None | Some(Bson::Null | Bson::Undefined) => false,
        Some(Bson::String(s)) => !s.is_empty(),
        Some(Bson::Boolean(b)) => *b,
        Some(Bson::Int32(0) | Bson::Int64(0)) => false,
        Some(Bson::Double(f)) => *f != 0.0 && !f.is_nan(),
        Some(_) => true,
    }
}

fn identifier_of(doc: &Document, id: &str) -> String {
    match doc.get("identifier") {
        Some(value) if has_identifier(doc) => id_string(value),
        _ => id.to_string(),
    }
}

#[cfg(test)]
mod tests;

//! What a client that reconnects missed, given back before it goes live: after a
//! `subscribe` with `since`, or a connection state recovery. The events come from the
//! history (or, for a `since` older than the history, from the collections first), in
//! pages paced by the client's buffer; the socket joins its rooms under the same lock as
//! the last page is taken, so that every later event reaches it live: no gap, no
//! duplicate across the switch.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{Bson, Document, doc};
use futures::TryStreamExt;
use mongodb::Database;
use serde_json::Value;
use socketioxide::SocketError;
use socketioxide_core::Str;

use super::recovery::Grants;
use super::site::{SiteChannel, note_joined};
use super::subscribe::{ReplayInfo, Since};
use super::{NAMESPACE, Subscriber};
use crate::collections::{Collection, CollectionNames};
use crate::delivery::{packet_text, with_offset};
use crate::history::{Coverage, Sent};
use crate::mapping::{BridgeEvent, EventBody, EventKind, normalise};
use crate::telemetry::metric;

/// Events queued to a replaying client at once; the next page waits until its buffer has
/// room for half as many.
const PAGE: usize = 64;
/// A `since` this far in the future is a client's clock gone wrong.
const FUTURE_SLACK: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    /// A `since` older than this is refused: too far back to replay.
    pub max_since_age: Duration,
    /// At most this many documents are replayed from the collections.
    pub max_documents: usize,
}

impl Default for ReplayLimits {
    fn default() -> Self {
        ReplayLimits {
            max_since_age: Duration::from_secs(7 * 24 * 3600),
            max_documents: 5000,
        }
    }
}

/// The collections, for a `since` older than the history.
#[derive(Clone)]
pub struct Catalog {
    pub db: Database,
    pub names: CollectionNames,
}

/// A document read from the collections, as the event that tells its present state.
pub struct Found {
    pub modified_ms: i64,
    pub collection: Collection,
    pub identifier: String,
    /// The event's packet text.
    pub packet: Vec<u8>,
}

/// What a replay from the collections found, within its bounds.
pub struct Findings {
    pub found: Vec<Found>,
    /// Bounds reached: later documents were left out.
    pub cut_short: bool,
}

impl Catalog {
    /// The documents of `collections` modified after `since`, oldest first across the
    /// collections (a merge of one sorted cursor per collection), at most `limit` of
    /// them and [`MAX_REPLAY_BYTES`] of packets.
    async fn modified_after(
        &self,
        collections: &[Collection],
        since: i64,
        limit: usize,
    ) -> mongodb::error::Result<Findings> {
        let mut cursors = Vec::with_capacity(collections.len());
        for &collection in collections {
            let mut cursor = self
                .db
                .collection::<Document>(self.names.mongo_name(collection))
                .find(doc! { "srvModified": { "$gt": since } })
                .sort(doc! { "srvModified": 1 })
                .limit(limit as i64 + 1)
                .batch_size(PAGE as u32)
                .max_time(READ_TIME_LIMIT)
                .await?;
            let head = next_found(&mut cursor, collection, since).await?;
            cursors.push((cursor, collection, head));
        }
        let mut found = Vec::new();
        let mut bytes = 0;
        loop {
            // The oldest head; on a tie, the collection listed first.
            let Some(oldest) = (0..cursors.len())
                .filter(|&i| cursors[i].2.is_some())
                .min_by_key(|&i| cursors[i].2.as_ref().map(|f| f.modified_ms))
            else {
                return Ok(Findings {
                    found,
                    cut_short: false,
                });
            };
            if found.len() == limit || bytes >= MAX_REPLAY_BYTES {
                return Ok(Findings {
                    found,
                    cut_short: true,
                });
            }
            let (cursor, collection, head) = &mut cursors[oldest];
            let next = next_found(cursor, *collection, since).await?;
            let taken = std::mem::replace(head, next).expect("the oldest head is some");
            bytes += taken.packet.len();
            found.push(taken);
        }
    }
}

/// How long MongoDB may take over one batch of a replay's read.
const READ_TIME_LIMIT: Duration = Duration::from_secs(10);

/// A replay from the collections holds at most this much of packets at once.
const MAX_REPLAY_BYTES: usize = 16 << 20;

async fn next_found(
    cursor: &mut mongodb::Cursor<Document>,
    collection: Collection,
    since: i64,
) -> mongodb::error::Result<Option<Found>> {
    while let Some(stored) = cursor.try_next().await? {
        if let Some((modified_ms, event)) = present_state(collection, &stored, since) {
            let identifier = match &event.body {
                EventBody::Doc(doc) => doc.get_str("identifier").unwrap_or_default().to_string(),
                EventBody::Identifier(identifier) => identifier.clone(),
            };
            return Ok(Some(Found {
                modified_ms,
                collection,
                identifier,
                packet: packet_text(NAMESPACE, &event),
            }));
        }
    }
    Ok(None)
}

/// The event that tells a client the present state of a stored document, modified after
/// `since`: a delete if it is soft-deleted, a create if it was created after `since`,
/// else an update.
fn present_state(collection: Collection, stored: &Document, since: i64) -> Option<(i64, BridgeEvent)> {
    let id = stored.get("_id").map(crate::json_form::id_string)?;
    let document = normalise(collection, stored, &id, None, None);
    let modified = as_ms(document.get("srvModified"))?;
    let (kind, body) = if stored.get("isValid") == Some(&Bson::Boolean(false)) {
        let identifier = document.get_str("identifier").map_or(id, str::to_string);
        (EventKind::Delete, EventBody::Identifier(identifier))
    } else if as_ms(document.get("srvCreated")).is_some_and(|created| created > since) {
        (EventKind::Create, EventBody::Doc(document))
    } else {
        (EventKind::Update, EventBody::Doc(document))
    };
    Some((
        modified,
        BridgeEvent {
            collection,
            kind,
            body,
            wall_time_ms: None,
            modified_ms: Some(modified),
        },
    ))
}

fn as_ms(value: Option<&Bson>) -> Option<i64> {
    match value? {
        Bson::Int32(i) => Some(i64::from(*i)),
        Bson::Int64(i) => Some(*i),
        Bson::Double(f) if f.is_finite() => Some(*f as i64),
        _ => None,
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Why a replay stopped before its end.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The client did not read its replay in time.
    TooSlow,
    /// The history forgot events before they could be replayed.
    Forgotten,
    /// The client went away.
    Gone,
}

/// Documents already replayed from the collections: their history events up to the same
/// `srvModified` are not sent again.
type Replayed = HashMap<(Collection, String), i64>;

/// A replay as planned when the ack goes out.
pub enum Plan {
    /// Nothing to replay (no `since`), or a `since` refused: join at once.
    None(Option<ReplayInfo>),
    History {
        after_seq: u64,
        since: i64,
        info: ReplayInfo,
    },
    Collections {
        after_seq: u64,
        since: i64,
        found: Vec<Found>,
        info: ReplayInfo,
    },
}

impl Plan {
    pub fn info(&self) -> Option<&ReplayInfo> {
        match self {
            Plan::None(info) => info.as_ref(),
            Plan::History { info, .. } | Plan::Collections { info, .. } => Some(info),
        }
    }
}

/// Refuses a `since` that cannot be replayed sensibly, with the reason.
pub fn check_since(since: Since, now_ms: i64, limits: &ReplayLimits) -> Result<i64, &'static str> {
    match since {
        Since::Invalid(why) => Err(why),
        Since::Ms(ms) if ms > now_ms + FUTURE_SLACK.as_millis() as i64 => Err("since is in the future"),
        Since::Ms(ms) if ms < now_ms - limits.max_since_age.as_millis() as i64 => Err(
            "since is older than the replay limit (replay.max_since_age_days): load older data through the REST API",
        ),
        Since::Ms(ms) => Ok(ms),
    }
}

impl SiteChannel {
    /// What a `subscribe` with `since` will replay of `collections`.
    pub(super) async fn plan(
        &self,
        since: Option<Since>,
        raw_since: Option<&Value>,
        collections: &[Collection],
    ) -> Plan {
        let Some(since) = since else {
            return Plan::None(None);
        };
        let given = raw_since.cloned().unwrap_or(Value::Null);
        let refused = |why: &str| {
            Plan::None(Some(ReplayInfo {
                since: given.clone(),
                events: 0,
                complete: false,
                from: None,
                note: Some(why.to_string()),
            }))
        };
        let since = match check_since(since, now_ms(), &self.replay) {
            Ok(since) => since,
            Err(why) => return refused(why),
        };
        let coverage = self.history.lock().unwrap().coverage(since);
        match coverage {
            Coverage::History { after_seq } => {
                let events = self
                    .history
                    .lock()
                    .unwrap()
                    .count_after(after_seq, collections, since);
                Plan::History {
                    after_seq,
                    since,
                    info: ReplayInfo {
                        since: given,
                        events,
                        complete: true,
                        from: Some("history"),
                        note: None,
                    },
                }
            }
            Coverage::Collections { after_seq } => {
                let Some(catalog) = &self.catalog else {
                    return refused("since is older than the bridge's history");
                };
                let limit = self.replay.max_documents;
                let findings = {
                    // A few at a time: each reads up to `limit` documents.
                    let _turn = self.collection_reads.acquire().await;
                    catalog.modified_after(collections, since, limit).await
                };
                let Findings { found, cut_short } = match findings {
                    Ok(findings) => findings,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the collections to replay from");
                        return refused("the collections cannot be read now; try again");
                    }
                };
                let mut note = String::from("permanent deletes after since cannot be replayed");
                if let (true, Some(last)) = (cut_short, found.last()) {
                    note.push_str(&format!(
                        "; only the {} oldest changed documents (replay.max_documents) are replayed, through \
                         srvModified {}: load later ones through the REST API",
                        found.len(),
                        last.modified_ms
                    ));
                }
                Plan::Collections {
                    after_seq,
                    since,
                    info: ReplayInfo {
                        since: given,
                        events: found.len(),
                        complete: false,
                        from: Some("collections"),
                        note: Some(note),
                    },
                    found,
                }
            }
        }
    }

    /// Carries out `plan` for `subscriber`, then joins it to `grants`; counted and logged.
    /// A client that could not take its replay has its connection closed, so that it
    /// reconnects and asks again.
    pub(super) async fn replay_then_join(&self, subscriber: &Subscriber, grants: &Grants, plan: Plan) {
        let started = Instant::now();
        let (from, result) = match plan {
            Plan::None(refused) => (
                if refused.is_some() { "refused" } else { "none" },
                self.history_then_join(subscriber, grants, None, &Replayed::new())
                    .await,
            ),
            Plan::History { after_seq, since, .. } => (
                "history",
                self.history_then_join(
                    subscriber,
                    grants,
                    Some((after_seq, Some(since))),
                    &Replayed::new(),
                )
                .await,
            ),
            Plan::Collections {
                after_seq,
                since,
                found,
                ..
            } => {
                let replayed = self.send_documents(subscriber, after_seq, found).await;
                match replayed {
                    Ok((sent, replayed)) => {
                        let rest = self
                            .history_then_join(subscriber, grants, Some((after_seq, Some(since))), &replayed)
                            .await;
                        ("collections", rest.map(|n| n + sent))
                    }
                    Err(e) => ("collections", Err(e)),
                }
            }
        };
        self.finish(subscriber, from, started, result);
    }

    /// Restores a recovered socket: the events after `offset`, then its rooms.
    pub(super) async fn recover_then_join(&self, subscriber: &Subscriber, grants: &Grants, offset: u64) {
        let started = Instant::now();
        let result = self
            .history_then_join(subscriber, grants, Some((offset, None)), &Replayed::new())
            .await;
        self.finish(subscriber, "recovery", started, result);
    }

    fn finish(
        &self,
        subscriber: &Subscriber,
        from: &'static str,
        started: Instant,
        result: Result<usize, Stopped>,
    ) {
        let socket = &subscriber.socket;
        match result {
            Ok(_) if from == "none" => {}
            Ok(_) if from == "refused" => {
                metrics::counter!(metric::REPLAYS_INCOMPLETE).increment(1);
            }
            Ok(events) => {
                metrics::counter!(metric::REPLAYS, "from" => from).increment(1);
                metrics::counter!(metric::REPLAYED_EVENTS).increment(events as u64);
                if from == "collections" {
                    metrics::counter!(metric::REPLAYS_INCOMPLETE).increment(1);
                }
                tracing::info!(sid = %socket.id, from, events, ms = started.elapsed().as_millis() as u64, "replayed, then live");
            }
            Err(Stopped::Gone) => {}
            Err(why) => {
                metrics::counter!(metric::REPLAYS_INCOMPLETE).increment(1);
                tracing::warn!(sid = %socket.id, from, ?why, "replay stopped: closing the connection so that the client asks again");
                socket.close_connection();
            }
        }
    }

    /// Sends the present state of documents read from the collections, in pages.
    async fn send_documents(
        &self,
        subscriber: &Subscriber,
        offset: u64,
        found: Vec<Found>,
    ) -> Result<(usize, Replayed), Stopped> {
        let mut replayed = Replayed::new();
        let count = found.len();
        for (i, document) in found.into_iter().enumerate() {
            emit(subscriber, &document.packet, offset)?;
            replayed.insert((document.collection, document.identifier), document.modified_ms);
            if (i + 1) % PAGE == 0 {
                self.wait_for_room(subscriber).await?;
            }
        }
        Ok((count, replayed))
    }

    /// Replays the history after `from.0` (events modified after `from.1` only, when
    /// given, and none already `replayed`), then joins `grants` under the lock that keeps
    /// the fan-out out, so that the next event is live.
    async fn history_then_join(
        &self,
        subscriber: &Subscriber,
        grants: &Grants,
        from: Option<(u64, Option<i64>)>,
        replayed: &Replayed,
    ) -> Result<usize, Stopped> {
        let collections: Vec<Collection> = grants.iter().map(|(c, _)| *c).collect();
        let mut sent = 0;
        let mut cursor = from.map(|(seq, _)| seq);
        let since = from.and_then(|(_, since)| since);
        loop {
            let page: Vec<Sent> = {
                let mut rooms = self.rooms.write().unwrap();
                let history = self.history.lock().unwrap();
                let page = match cursor {
                    None => Vec::new(),
                    Some(seq) if !history.holds_after(seq) => return Err(Stopped::Forgotten),
                    Some(seq) => history.after(seq, &collections, PAGE),
                };
                if page.is_empty() {
                    let socket = subscriber.socket.id;
                    note_joined(&subscriber.socket, history.last_seq());
                    for (collection, subject) in grants {
                        rooms.join(socket, subscriber, subject, &[*collection]);
                    }
                    drop((rooms, history));
                    self.update_room_gauges();
                    return Ok(sent);
                }
                let seq = cursor.expect("a page comes from a cursor");
                cursor = Some(history.position_after(seq, &collections, page.len()));
                page
            };
            for event in page {
                let already = replayed
                    .get(&(event.collection, event.identifier.clone()))
                    .is_some_and(|&modified| event.modified_ms <= modified);
                if already || since.is_some_and(|since| event.modified_ms <= since) {
                    continue;
                }
                emit(subscriber, event.packet.as_bytes(), event.seq)?;
                sent += 1;
            }
            self.wait_for_room(subscriber).await?;
        }
    }

    async fn wait_for_room(&self, subscriber: &Subscriber) -> Result<(), Stopped> {
        let deadline = Instant::now() + self.slow_clients.timeout;
        while subscriber.socket.buffered() >= PAGE / 2 {
            if Instant::now() > deadline {
                return Err(Stopped::TooSlow);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }
}

/// Queues one replayed event: with its offset for a client with connection state recovery.
fn emit(subscriber: &Subscriber, text: &[u8], offset: u64) -> Result<(), Stopped> {
    let text = if subscriber.recovers {
        with_offset(text, offset)
    } else {
        text.to_vec()
    };
    let packet = Str::from(String::from_utf8(text).expect("packets are UTF-8"));
    match subscriber
        .socket
        .emit_encoded(socketioxide_core::Value::Str(packet, None))
    {
        Ok(()) => Ok(()),
        Err(SocketError::Closed) => Err(Stopped::Gone),
        Err(SocketError::InternalChannelFull) => Err(Stopped::TooSlow),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn since_values_that_cannot_be_replayed_are_refused_with_a_reason() {
        let limits = ReplayLimits::default();
        assert_eq!(check_since(Since::Ms(NOW - 1000), NOW, &limits), Ok(NOW - 1000));
        assert_eq!(
            check_since(Since::Ms(NOW + 30_000), NOW, &limits),
            Ok(NOW + 30_000)
        );
        assert_eq!(
            check_since(Since::Ms(NOW + 61_000), NOW, &limits),
            Err("since is in the future")
        );
        let week = 7 * 24 * 3600 * 1000;
        assert!(check_since(Since::Ms(NOW - week), NOW, &limits).is_ok());
        assert!(
            check_since(Since::Ms(NOW - week - 1), NOW, &limits)
                .unwrap_err()
                .contains("older than")
        );
        assert!(check_since(Since::Ms(0), NOW, &limits).is_err());
        assert_eq!(
            check_since(Since::Invalid("since must not be negative"), NOW, &limits),
            Err("since must not be negative")
        );
    }

    #[test]
    fn a_stored_document_becomes_the_event_of_its_present_state() {
        let since = NOW - 60_000;
        let created_after =
            doc! { "_id": 1, "identifier": "a", "srvCreated": NOW - 1000, "srvModified": NOW - 1000 };
        let (modified, event) = present_state(Collection::Treatments, &created_after, since).unwrap();
        assert_eq!((modified, event.kind), (NOW - 1000, EventKind::Create));
        let changed =
            doc! { "_id": 1, "identifier": "a", "srvCreated": NOW - 3_600_000, "srvModified": NOW - 1000 };
        assert_eq!(
            present_state(Collection::Treatments, &changed, since)
                .unwrap()
                .1
                .kind,
            EventKind::Update
        );
        let deleted = doc! { "_id": 1, "identifier": "a", "srvModified": NOW - 1000, "isValid": false };
        let (_, event) = present_state(Collection::Treatments, &deleted, since).unwrap();
        assert_eq!(event.body, EventBody::Identifier("a".into()));
        // An APIv1 document patched through APIv3: named by its _id, created at created_at.
        let oid = bson::oid::ObjectId::new();
        let v1 = doc! { "_id": oid, "created_at": "2027-01-15T08:00:00.000Z", "srvModified": NOW - 1000 };
        let (_, event) = present_state(Collection::Treatments, &v1, since).unwrap();
        let EventBody::Doc(doc) = event.body else { panic!() };
        assert_eq!(doc.get_str("identifier").unwrap(), oid.to_hex());
        assert!(doc.get_i64("srvCreated").is_ok());
    }
}

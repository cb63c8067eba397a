//! The recent history of the events the bridge has sent: what a client that reconnects can
//! be given back. Bounded by age and by count; each event keeps its position in the
//! stream (a sequence number, which is also the offset of Socket.IO's connection state
//! recovery), the `srvModified` a client compares with its `since`, and its encoded packet,
//! whose bytes the live delivery shares. Pure: time is passed in, as wall-clock ms, so
//! that a history refilled from the stream after a restart ages as the one it replaces.
//!
//! It also keeps, every [`CHECKPOINT_EVERY`] events, the change stream's resume token
//! after an event: the [`Checkpoint`] from which a restarted bridge reads the stream
//! again to refill its history.

use std::collections::VecDeque;
use std::time::Duration;

use bson::Bson;
use socketioxide_core::Str;

use crate::collections::Collection;
use crate::mapping::{BridgeEvent, EventBody, EventKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    pub max_age: Duration,
    pub max_events: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_age: Duration::from_secs(15 * 60),
            max_events: 10_000,
        }
    }
}

/// One event as sent.
#[derive(Debug, Clone)]
pub struct Sent {
    pub seq: u64,
    pub collection: Collection,
    pub kind: EventKind,
    /// The document's or delete's identifier.
    pub identifier: String,
    /// The document's `srvModified`, else the write's time (a permanent delete has no
    /// document): what `since` is compared with.
    pub modified_ms: i64,
    /// `2/storage,["<event>",<payload>]`.
    pub packet: Str,
    /// When it was written (the change's wall time), else sent: what ages it.
    at_ms: i64,
}

/// Events between two resume tokens kept.
pub const CHECKPOINT_EVERY: u64 = 100;

/// Where a restarted bridge reads the change stream again from: the resume token after
/// the event `seq`. Every event modified after `complete_after_ms` and not before the
/// checkpoint is read again from there, so that the history it refills holds what the
/// one it replaces held.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub token: Bson,
    pub seq: u64,
    /// The resume token after the last event sent: the events up to it were sent before
    /// the restart, and go back into the history only.
    pub sent_token: Bson,
    pub complete_after_ms: i64,
}

/// An event's place in its change stream, from its resume token: MongoDB's tokens are
/// hex-encoded KeyStrings, which sort as their events do. `None` for a token of another
/// shape, which is then never taken as already sent.
pub fn position(token: &Bson) -> Option<&str> {
    match token {
        Bson::Document(token) => token.get_str("_data").ok(),
        _ => None,
    }
}

/// Where a replay of events after a client's `since` comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Coverage {
    /// The history holds every event after `since`: replay it from this position.
    History { after_seq: u64 },
    /// `since` is older than what the history holds: replay from the collections, then the
    /// history's events after `after_seq` (all of it).
    Collections { after_seq: u64 },
}

#[derive(Debug)]
pub struct History {
    limits: HistoryLimits,
    events: VecDeque<Sent>,
    next_seq: u64,
    /// Every event modified after this (ms) is in the history: the time the history
    /// starts from (the bridge's start, or the newest event it has forgotten).
    complete_after_ms: i64,
    /// Resume tokens after some of the events, oldest first; the first is at or before
    /// the oldest event held.
    checkpoints: VecDeque<(u64, Bson)>,
    /// The resume token after the newest event.
    last_token: Option<Bson>,
}

impl History {
    /// An empty history, complete for events modified after `started_ms`.
    pub fn new(limits: HistoryLimits, started_ms: i64) -> History {
        History::resumed(limits, 0, started_ms)
    }

    /// An empty history that carries on after event `seq`, refilled from a checkpoint.
    pub fn resumed(limits: HistoryLimits, seq: u64, complete_after_ms: i64) -> History {
        History {
            limits,
            events: VecDeque::new(),
            next_seq: seq + 1,
            complete_after_ms,
            checkpoints: VecDeque::new(),
            last_token: None,
        }
    }

    /// Records an event sent at `now_ms`, with the resume token after it, and forgets
    /// what is too old or too many. Returns its sequence number.
    pub fn push(&mut self, event: &BridgeEvent, packet: Str, token: Option<Bson>, now_ms: i64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (identifier, modified_ms) = describe(event);
        self.events.push_back(Sent {
            seq,
            collection: event.collection,
            kind: event.kind,
            identifier,
            modified_ms,
            packet,
            at_ms: event.wall_time_ms.unwrap_or(now_ms),
        });
        if let Some(token) = token {
            if self
                .checkpoints
                .back()
                .is_none_or(|(last, _)| seq >= last + CHECKPOINT_EVERY)
            {
                self.checkpoints.push_back((seq, token.clone()));
            }
            self.last_token = Some(token);
        }
        self.forget_old(now_ms);
        seq
    }

    /// Forgets the events older than the age limit, and the oldest beyond the count limit.
    pub fn forget_old(&mut self, now_ms: i64) {
        let max_age = self.limits.max_age.as_millis() as i64;
        while let Some(oldest) = self.events.front() {
            let too_old = now_ms.saturating_sub(oldest.at_ms) > max_age;
            if !(too_old || self.events.len() > self.limits.max_events) {
                break;
            }
            let forgotten = self.events.pop_front().expect("non-empty");
            self.complete_after_ms = self.complete_after_ms.max(forgotten.modified_ms);
        }
        // The newest checkpoint at or before the oldest event held is the one to keep.
        let oldest = self.events.front().map_or(self.next_seq, |e| e.seq);
        while self.checkpoints.get(1).is_some_and(|(seq, _)| *seq <= oldest) {
            self.checkpoints.pop_front();
        }
    }

    /// Where a restarted bridge reads the stream again from, if any event was recorded
    /// with a token.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        let (seq, token) = self.checkpoints.front()?;
        // The events up to the checkpoint are not read again: the refilled history starts
        // complete after them.
        let complete_after_ms = self
            .events
            .iter()
            .take_while(|e| e.seq <= *seq)
            .map(|e| e.modified_ms)
            .fold(self.complete_after_ms, i64::max);
        Some(Checkpoint {
            token: token.clone(),
            seq: *seq,
            sent_token: self.last_token.clone().unwrap_or_else(|| token.clone()),
            complete_after_ms,
        })
    }

    /// Events written while the change stream could not be read may have been missed: the
    /// history is complete only after `gap_end_ms`.
    pub fn gap(&mut self, gap_end_ms: i64) {
        self.complete_after_ms = self.complete_after_ms.max(gap_end_ms);
    }

    /// The sequence number of the newest event, 0 before the first.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Where the events modified after `since_ms` are to be found.
    pub fn coverage(&self, since_ms: i64) -> Coverage {
        if since_ms >= self.complete_after_ms {
            // The first event modified after `since`, and everything after it: events
            // arrive in stream order, not always in `srvModified` order, so the position
            // is the first one past `since`, and later ones are filtered again.
            let after_seq = self
                .events
                .iter()
                .find(|e| e.modified_ms > since_ms)
                .map_or(self.last_seq(), |e| e.seq - 1);
            Coverage::History { after_seq }
        } else {
            Coverage::Collections {
                after_seq: self.events.front().map_or(self.last_seq(), |e| e.seq - 1),
            }
        }
    }

    /// Whether the history still holds every event after `seq`.
    pub fn holds_after(&self, seq: u64) -> bool {
        self.events.front().is_none_or(|e| e.seq <= seq + 1)
    }

    /// Up to `limit` events after position `seq`, of `collections`, oldest first.
    pub fn after(&self, seq: u64, collections: &[Collection], limit: usize) -> Vec<Sent> {
        let start = self.events.partition_point(|e| e.seq <= seq);
        self.events
            .range(start..)
            .filter(|e| collections.contains(&e.collection))
            .take(limit)
            .cloned()
            .collect()
    }

    /// How many events after position `seq`, of `collections`, were modified after
    /// `since_ms`: what a replay from there sends.
    pub fn count_after(&self, seq: u64, collections: &[Collection], since_ms: i64) -> usize {
        let start = self.events.partition_point(|e| e.seq <= seq);
        self.events
            .range(start..)
            .filter(|e| collections.contains(&e.collection) && e.modified_ms > since_ms)
            .count()
    }

    /// The position of the last event up to which `after(seq, ..)` has looked when it
    /// returned `taken`: the next page starts there.
    pub fn position_after(&self, seq: u64, collections: &[Collection], taken: usize) -> u64 {
        let start = self.events.partition_point(|e| e.seq <= seq);
        self.events
            .range(start..)
            .filter(|e| collections.contains(&e.collection))
            .nth(taken.saturating_sub(1))
            .map_or(self.last_seq(), |e| e.seq)
    }
}

fn describe(event: &BridgeEvent) -> (String, i64) {
    let identifier = match &event.body {
        EventBody::Doc(doc) => doc.get_str("identifier").map(str::to_string).unwrap_or_default(),
        EventBody::Identifier(identifier) => identifier.clone(),
    };
    let modified = event.modified_ms.or(event.wall_time_ms).unwrap_or_default();
    (identifier, modified)
}

#[cfg(test)]
mod tests;

//! The MongoDB change feed: one database-level change stream over the watched collections,
//! turned into bridge events by [`Mapper`], resumed from the last handled event after any
//! error or outage.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{Bson, Document, doc};
use futures::StreamExt;
use mongodb::Database;
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::delivery::{DeliveryWindow, Slot};
use crate::mapping::{BridgeEvent, Decision, Mapper, ReopenReason};
use crate::telemetry::metric;

/// The operation types the bridge acts on; anything else is filtered out by MongoDB.
const OPERATION_TYPES: [&str; 6] = ["insert", "update", "replace", "delete", "drop", "rename"];

/// Server error codes after which resuming from our token can never succeed.
const CHANGE_STREAM_FATAL: i32 = 280;
const CHANGE_STREAM_HISTORY_LOST: i32 = 286;

/// A bridge event, when its change event arrived (for the bridge's own latency), its
/// place in the delivery window, and its place in the stream.
#[derive(Debug)]
pub struct FeedEvent {
    pub event: BridgeEvent,
    pub received: Instant,
    pub slot: Slot,
    /// The resume token after this event.
    pub token: Option<Bson>,
    /// Read again after a restart to refill the history: it was sent before.
    pub sent_before: bool,
    /// The stream could not be resumed and started from the present at this time (ms):
    /// events written before may have been missed.
    pub gap_end_ms: Option<i64>,
}

/// Where a restarted bridge reads the stream again from, as saved by the last run.
#[derive(Debug, Clone)]
pub struct ResumePoint {
    pub token: ResumeToken,
    /// Events the last run sent after the token: read again, for the history only.
    pub sent_after: u64,
}

/// Whether the change stream is delivering, for readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedStatus {
    Starting,
    Open,
    Down { reason: String },
}

#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(10),
        }
    }
}

/// Where the next stream starts.
#[derive(Debug, Clone)]
enum Start {
    Now,
    Resume(ResumeToken),
    /// After an event that ends a stream (drop, rename, invalidate): `resumeAfter` refuses those.
    After(ResumeToken),
}

pub struct Feed {
    db: Database,
    mapper: Mapper,
    pre_images: bool,
    backoff: Backoff,
    status: watch::Sender<FeedStatus>,
    start: Start,
    /// Events still to be read again that were sent before a restart.
    sent_before: u64,
    /// When the stream had to start from the present, until the next event says so.
    gap_end_ms: Option<i64>,
}

impl Feed {
    pub fn new(db: Database, mapper: Mapper, pre_images: bool) -> Self {
        Feed {
            db,
            mapper,
            pre_images,
            backoff: Backoff::default(),
            status: watch::Sender::new(FeedStatus::Starting),
            start: Start::Now,
            sent_before: 0,
            gap_end_ms: None,
        }
    }

    /// Starts where a previous run stopped instead of at the present.
    pub fn resuming_at(mut self, point: ResumePoint) -> Self {
        self.start = Start::Resume(point.token);
        self.sent_before = point.sent_after;
        self
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    pub fn status(&self) -> watch::Receiver<FeedStatus> {
        self.status.subscribe()
    }

    /// Delivers bridge events in change-stream order until `shutdown` fires or the
    /// receiver is gone, reading the stream no faster than `window` admits events. Errors
    /// are retried forever with capped exponential backoff.
    pub async fn run(
        mut self,
        events: mpsc::Sender<FeedEvent>,
        window: DeliveryWindow,
        shutdown: CancellationToken,
    ) {
        let mut delay = self.backoff.initial;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                opened = self.open() => opened,
            };
            let stream = match opened {
                Ok(stream) => {
                    tracing::info!(
                        database = self.db.name(),
                        start = self.start_label(),
                        "change stream open"
                    );
                    self.status.send_replace(FeedStatus::Open);
                    delay = self.backoff.initial;
                    stream
                }
                Err(e) => {
                    self.on_error("opening the change stream", &e);
                    if !sleep_or_shutdown(&shutdown, &mut delay, self.backoff.max).await {
                        return;
                    }
                    continue;
                }
            };
            match self.drain(stream, &events, &window, &shutdown).await {
                StreamEnd::Shutdown => return,
                StreamEnd::Reopen => {
                    metrics::counter!(metric::STREAM_RESTARTS, "reason" => "reopen").increment(1);
                }
                StreamEnd::Error(e) => {
                    metrics::counter!(metric::STREAM_RESTARTS, "reason" => "error").increment(1);
                    self.on_error("reading the change stream", &e);
                    if !sleep_or_shutdown(&shutdown, &mut delay, self.backoff.max).await {
                        return;
                    }
                }
            }
        }
    }

    async fn open(&self) -> Result<ChangeStream<Document>, MongoError> {
        let names = self.mapper.rules().names.mongo_names();
        let pipeline = [doc! {
            "$match": {
                "ns.coll": { "$in": names },
                "operationType": { "$in": OPERATION_TYPES.to_vec() },
            }
        }];
        let mut watch = self
            .db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup);
        if self.pre_images {
            watch = watch.full_document_before_change(FullDocumentBeforeChangeType::WhenAvailable);
        }
        watch = match &self.start {
            Start::Now => watch,
            Start::Resume(token) => watch.resume_after(token.clone()),
            Start::After(token) => watch.start_after(token.clone()),
        };
        Ok(watch.await?.with_type::<Document>())
    }

    async fn drain(
        &mut self,
        mut stream: ChangeStream<Document>,
        events: &mpsc::Sender<FeedEvent>,
        window: &DeliveryWindow,
        shutdown: &CancellationToken,
    ) -> StreamEnd {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return StreamEnd::Shutdown,
                next = stream.next() => next,
            };
            let change = match next {
                Some(Ok(change)) => change,
                Some(Err(e)) => return StreamEnd::Error(e),
                None => {
                    // The server closed the stream (an invalidate): carry on after it.
                    if let Some(token) = stream.resume_token() {
                        self.start = Start::After(token);
                    }
                    tracing::info!("change stream ended by the server; reopening");
                    return StreamEnd::Reopen;
                }
            };
            match self.mapper.map(&change) {
                Decision::Relay(event) => {
                    let received = Instant::now();
                    if let Some(wall) = event.wall_time_ms {
                        metrics::histogram!(metric::CHANGE_STREAM_LAG).record(lag_seconds(wall));
                    }
                    // While the window is full the stream is not read: MongoDB holds the
                    // backlog, and the resume token still points before it.
                    let slot = tokio::select! {
                        _ = shutdown.cancelled() => return StreamEnd::Shutdown,
                        slot = window.admit() => slot,
                    };
                    let sent_before = self.sent_before > 0;
                    self.sent_before = self.sent_before.saturating_sub(1);
                    let feed_event = FeedEvent {
                        event,
                        received,
                        slot,
                        token: change.get("_id").cloned(),
                        sent_before,
                        gap_end_ms: self.gap_end_ms.take(),
                    };
                    if events.send(feed_event).await.is_err() {
                        return StreamEnd::Shutdown;
                    }
                }
                Decision::Skip { reason, collection } => {
                    let collection = collection.map_or("unknown", |c| c.name());
                    metrics::counter!(metric::WRITES_SKIPPED, "collection" => collection, "reason" => reason.as_str())
                        .increment(1);
                    tracing::trace!(collection, reason = reason.as_str(), "write skipped");
                }
                Decision::Reopen(reason) => {
                    if let Some(token) = stream.resume_token() {
                        self.start = Start::After(token);
                    }
                    log_reopen(reason);
                    return StreamEnd::Reopen;
                }
            }
            if let Some(token) = stream.resume_token() {
                self.start = Start::Resume(token);
            }
        }
    }

    fn on_error(&mut self, doing: &str, e: &MongoError) {
        let reason = format!("{doing}: {e}");
        if resume_impossible(e) && !matches!(self.start, Start::Now) {
            metrics::counter!(metric::RESUME_FAILURES).increment(1);
            tracing::error!(
                error = %e,
                "cannot resume the change stream from the last handled event; starting from \
                 the present: events written in between may have been missed"
            );
            self.start = Start::Now;
            self.sent_before = 0;
            self.gap_end_ms = Some(now_ms());
        } else {
            tracing::warn!(error = %e, "{doing} failed; retrying");
        }
        self.status.send_replace(FeedStatus::Down { reason });
    }

    fn start_label(&self) -> &'static str {
        match self.start {
            Start::Now => "now",
            Start::Resume(_) => "resume",
            Start::After(_) => "start_after",
        }
    }
}

enum StreamEnd {
    Shutdown,
    Reopen,
    Error(MongoError),
}

fn log_reopen(reason: ReopenReason) {
    tracing::info!(%reason, "change stream event ends the stream; reopening");
}

/// Now minus the write's wall time, in seconds (never negative: clocks differ).
fn lag_seconds(wall_time_ms: i64) -> f64 {
    (now_ms() - wall_time_ms).max(0) as f64 / 1000.0
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn resume_impossible(e: &MongoError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => {
            c.code == CHANGE_STREAM_HISTORY_LOST
                || c.code == CHANGE_STREAM_FATAL
                || e.contains_label("NonResumableChangeStreamError")
        }
        _ => false,
    }
}

/// Sleeps for `delay` (doubled for next time, up to `max`); false when shut down meanwhile.
async fn sleep_or_shutdown(shutdown: &CancellationToken, delay: &mut Duration, max: Duration) -> bool {
    let this = *delay;
    *delay = (*delay * 2).min(max);
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(this) => true,
    }
}

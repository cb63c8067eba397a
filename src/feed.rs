//! The MongoDB change feed: one change stream over the watched collections (and the auth
//! collections) of one database, or of every database a deployment's sites use, turned
//! into bridge events by a [`Mapper`] per database and routed by database name to its
//! site; resumed from the last handled event after any error or outage.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bson::{Bson, Document, doc};
use futures::StreamExt;
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::ResumeToken;
use mongodb::error::{Error as MongoError, ErrorKind};
use mongodb::options::{FullDocumentBeforeChangeType, FullDocumentType};
use mongodb::{Client, Database};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::delivery::{DeliveryWindow, Slot};
use crate::mapping::{BridgeEvent, Decision, Mapper, MappingRules, ReopenReason};
use crate::telemetry::metric;

/// The operation types the bridge acts on; anything else is filtered out by MongoDB.
const OPERATION_TYPES: [&str; 6] = ["insert", "update", "replace", "delete", "drop", "rename"];

/// Server error codes after which resuming from our token can never succeed.
const CHANGE_STREAM_FATAL: i32 = 280;
const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
/// Server error codes of a deployment that will not give this user a deployment-level
/// stream: Unauthorized, CommandNotSupported, AtlasError ("not allowed to do action").
const DEPLOYMENT_STREAM_REFUSED: [i32; 3] = [13, 115, 8000];

/// A bridge event, when its change event arrived (for the bridge's own latency), its
/// place in the delivery window, and its place in the stream.
#[derive(Debug)]
pub struct FeedEvent {
    /// The site whose database it was written to.
    pub tenant: Arc<str>,
    pub event: BridgeEvent,
    pub received: Instant,
    pub slot: Slot,
    /// The resume token after this event.
    pub token: Option<Bson>,
    /// The stream could not be resumed and started from the present at this time (ms):
    /// events written before may have been missed.
    pub gap_end_ms: Option<i64>,
}

/// What the feed needs of the site a database belongs to.
#[derive(Clone)]
pub struct Route {
    pub tenant: Arc<str>,
    pub rules: MappingRules,
    /// The site's auth collections (`<prefix>subjects`, `<prefix>roles`).
    pub auth_collections: [String; 2],
    /// Told of every write to them, and whenever the stream (re)opens.
    pub auth_changed: Arc<Notify>,
}

/// The databases a feed serves, by name.
pub type Routes = Arc<HashMap<String, Route>>;

/// What a feed watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One database.
    Database(String),
    /// Every database of the routes, in one deployment-level stream.
    Deployment,
}

/// Why a feed stopped.
#[derive(Debug)]
pub enum FeedEnd {
    Shutdown,
    /// The deployment refused a deployment-level stream: one per database is needed.
    DeploymentRefused(MongoError),
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
    client: Client,
    scope: Scope,
    routes: watch::Receiver<Routes>,
    /// Per database: its site and the mapper of its writes.
    mappers: HashMap<String, (Arc<str>, Mapper)>,
    identifier_cache_size: NonZeroUsize,
    pre_images: bool,
    backoff: Backoff,
    status: watch::Sender<FeedStatus>,
    start: Start,
    /// When the stream had to start from the present, until the next event says so.
    gap_end_ms: Option<i64>,
    /// The routes can no longer change.
    routes_fixed: bool,
}

impl Feed {
    /// A feed of the databases of `routes`, in `scope`.
    pub fn new(
        client: Client,
        scope: Scope,
        routes: watch::Receiver<Routes>,
        identifier_cache_size: NonZeroUsize,
        pre_images: bool,
    ) -> Self {
        let mut feed = Feed {
            client,
            scope,
            routes,
            mappers: HashMap::new(),
            identifier_cache_size,
            pre_images,
            backoff: Backoff::default(),
            status: watch::Sender::new(FeedStatus::Starting),
            start: Start::Now,
            gap_end_ms: None,
            routes_fixed: false,
        };
        feed.follow_routes();
        feed
    }

    /// A feed of one database, its events named after it, with `mapper`.
    pub fn for_database(db: &Database, mapper: Mapper, pre_images: bool) -> Self {
        let tenant: Arc<str> = Arc::from(db.name());
        let route = Route {
            tenant: tenant.clone(),
            rules: mapper.rules().clone(),
            auth_collections: ["auth_subjects".into(), "auth_roles".into()],
            auth_changed: Arc::new(Notify::new()),
        };
        let routes = Arc::new(HashMap::from([(db.name().to_string(), route)]));
        let mut feed = Feed::new(
            db.client().clone(),
            Scope::Database(db.name().to_string()),
            watch::channel(routes).1,
            NonZeroUsize::MIN,
            pre_images,
        );
        feed.mappers.insert(db.name().to_string(), (tenant, mapper));
        feed
    }

    /// Starts after `token` (saved by a previous run) instead of at the present.
    pub fn resuming_after(mut self, token: ResumeToken) -> Self {
        self.start = Start::Resume(token);
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
    /// are retried forever with capped exponential backoff; a deployment that refuses a
    /// deployment-level stream ends the feed, for its owner to fall back to one per
    /// database.
    pub async fn run(
        mut self,
        events: mpsc::Sender<FeedEvent>,
        window: DeliveryWindow,
        shutdown: CancellationToken,
    ) -> FeedEnd {
        let mut delay = self.backoff.initial;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return FeedEnd::Shutdown,
                opened = self.open() => opened,
            };
            let stream = match opened {
                Ok(stream) => {
                    // Where this stream began, should it be reopened before its first event.
                    if let (Start::Now, Some(token)) = (&self.start, stream.resume_token()) {
                        self.start = Start::Resume(token);
                    }
                    tracing::info!(
                        scope = %self.describe(),
                        databases = self.mappers.len(),
                        start = self.start_label(),
                        "change stream open"
                    );
                    self.status.send_replace(FeedStatus::Open);
                    delay = self.backoff.initial;
                    // Whatever changed in the auth collections before the stream opened.
                    for route in self.routes.borrow().values() {
                        route.auth_changed.notify_one();
                    }
                    stream
                }
                Err(e) if self.scope == Scope::Deployment && deployment_refused(&e) => {
                    self.status.send_replace(FeedStatus::Down {
                        reason: format!("deployment-level change stream refused: {e}"),
                    });
                    return FeedEnd::DeploymentRefused(e);
                }
                Err(e) => {
                    self.on_error("opening the change stream", &e);
                    if !sleep_or_shutdown(&shutdown, &mut delay, self.backoff.max).await {
                        return FeedEnd::Shutdown;
                    }
                    continue;
                }
            };
            match self.drain(stream, &events, &window, &shutdown).await {
                StreamEnd::Shutdown => return FeedEnd::Shutdown,
                StreamEnd::Reopen => {
                    metrics::counter!(metric::STREAM_RESTARTS, "reason" => "reopen").increment(1);
                }
                StreamEnd::Error(e) => {
                    metrics::counter!(metric::STREAM_RESTARTS, "reason" => "error").increment(1);
                    self.on_error("reading the change stream", &e);
                    if !sleep_or_shutdown(&shutdown, &mut delay, self.backoff.max).await {
                        return FeedEnd::Shutdown;
                    }
                }
            }
        }
    }

    fn describe(&self) -> String {
        match &self.scope {
            Scope::Database(name) => format!("database {name}"),
            Scope::Deployment => "deployment".into(),
        }
    }

    /// Takes the routes as they are now: a mapper for each new database, none for a
    /// database gone. A site replaced gets a new mapper (its rules may have changed).
    fn follow_routes(&mut self) {
        let routes = self.routes.borrow_and_update().clone();
        self.mappers
            .retain(|db, (tenant, _)| routes.get(db).is_some_and(|r| Arc::ptr_eq(&r.tenant, tenant)));
        for (db, route) in routes.iter() {
            self.mappers.entry(db.clone()).or_insert_with(|| {
                (
                    route.tenant.clone(),
                    Mapper::new(route.rules.clone(), self.identifier_cache_size),
                )
            });
        }
    }

    async fn open(&self) -> Result<ChangeStream<Document>, MongoError> {
        let routes = self.routes.borrow().clone();
        let mut collections: Vec<String> = Vec::new();
        for route in routes.values() {
            for name in route
                .rules
                .names
                .mongo_names()
                .into_iter()
                .chain(route.auth_collections.iter().map(String::as_str))
            {
                if !collections.iter().any(|c| c == name) {
                    collections.push(name.to_string());
                }
            }
        }
        let mut filter = doc! {
            "ns.coll": { "$in": collections },
            "operationType": { "$in": OPERATION_TYPES.to_vec() },
        };
        let database;
        let watch = match &self.scope {
            Scope::Database(name) => {
                database = self.client.database(name);
                database.watch()
            }
            Scope::Deployment => {
                let mut databases: Vec<&String> = routes.keys().collect();
                databases.sort();
                filter.insert("ns.db", doc! { "$in": databases });
                self.client.watch()
            }
        };
        let mut watch = watch
            .pipeline([doc! { "$match": filter }])
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
            // Routes no one can change any more are not watched (a closed watch would win
            // every select).
            if self.routes.has_changed().is_err() {
                self.routes_fixed = true;
            }
            let next = tokio::select! {
                _ = shutdown.cancelled() => return StreamEnd::Shutdown,
                _ = self.routes.changed(), if !self.routes_fixed => {
                    // A read cut short leaves the driver's stream unusable: reopen it where
                    // the last event left it, with the databases and mappers as they are now.
                    self.follow_routes();
                    tracing::info!(databases = self.mappers.len(), "sites changed; reopening the change stream for them");
                    return StreamEnd::Reopen;
                }
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
            let database = change
                .get_document("ns")
                .ok()
                .and_then(|ns| ns.get_str("db").ok())
                .unwrap_or_default();
            let collection = change
                .get_document("ns")
                .ok()
                .and_then(|ns| ns.get_str("coll").ok())
                .unwrap_or_default();
            if let Some(route) = self.routes.borrow().get(database)
                && route.auth_collections.iter().any(|c| c == collection)
            {
                route.auth_changed.notify_one();
            }
            let Some((tenant, mapper)) = self.mappers.get_mut(database) else {
                // A database no site uses (any more), or an auth collection's write.
                if let Some(token) = stream.resume_token() {
                    self.start = Start::Resume(token);
                }
                continue;
            };
            let tenant = tenant.clone();
            match mapper.map(&change) {
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
                    let feed_event = FeedEvent {
                        tenant,
                        event,
                        received,
                        slot,
                        token: change.get("_id").cloned(),
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

fn deployment_refused(e: &MongoError) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Command(c) if DEPLOYMENT_STREAM_REFUSED.contains(&c.code))
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

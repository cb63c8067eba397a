//! One MongoDB deployment and the change streams that serve its sites: one
//! deployment-level stream for all of them (a single site: a database-level one), or, when
//! the deployment refuses a deployment-level stream to this user, one stream per database.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use mongodb::Client;
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::delivery::DeliveryWindow;
use crate::feed::{Feed, FeedEnd, FeedEvent, FeedStatus, Route, Routes, Scope};
use crate::telemetry::metric;

/// The status of every change stream of the bridge, for readiness.
#[derive(Default)]
pub struct StreamStatuses {
    streams: Mutex<Vec<(u64, watch::Receiver<FeedStatus>)>>,
}

impl StreamStatuses {
    fn add(&self, id: u64, status: watch::Receiver<FeedStatus>) {
        self.streams.lock().unwrap().push((id, status));
    }

    fn remove(&self, id: u64) {
        self.streams.lock().unwrap().retain(|(i, _)| *i != id);
    }

    /// Open when every stream is; else the first that is down, or starting.
    pub fn overall(&self) -> FeedStatus {
        let streams = self.streams.lock().unwrap();
        if streams.is_empty() {
            return FeedStatus::Starting;
        }
        let mut overall = FeedStatus::Open;
        for (_, status) in streams.iter() {
            match &*status.borrow() {
                FeedStatus::Open => {}
                down @ FeedStatus::Down { .. } => return down.clone(),
                FeedStatus::Starting => overall = FeedStatus::Starting,
            }
        }
        overall
    }
}

/// What every stream of a deployment shares.
#[derive(Clone)]
pub struct StreamSetup {
    pub identifier_cache_size: NonZeroUsize,
    pub pre_images: bool,
    pub window_size: usize,
    pub events: mpsc::Sender<FeedEvent>,
    pub statuses: Arc<StreamStatuses>,
}

/// A deployment's sites, by database: what its streams route to.
pub struct Deployment {
    client: Client,
    routes: watch::Sender<Routes>,
}

impl Deployment {
    pub fn new(client: Client) -> Deployment {
        Deployment {
            client,
            routes: watch::Sender::new(Routes::default()),
        }
    }

    /// Starts the streams of the deployment, for the databases routed so far and those
    /// to come; `single`: it serves one database for good (the single-site bridge), in a
    /// database-level stream. `start`: where the last run's sites' histories began, per
    /// database.
    pub fn start(
        &self,
        single: bool,
        start: HashMap<String, ResumeToken>,
        setup: StreamSetup,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let receiver = self.routes.subscribe();
        tokio::spawn(supervise(
            self.client.clone(),
            single,
            receiver,
            start,
            setup,
            shutdown,
        ))
    }

    pub fn add(&self, database: &str, route: Route) {
        self.routes.send_modify(|routes| {
            Arc::make_mut(routes).insert(database.to_string(), route);
        });
    }

    pub fn remove(&self, database: &str) {
        self.routes.send_modify(|routes| {
            Arc::make_mut(routes).remove(database);
        });
    }
}

static NEXT_STREAM: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Runs `feed` until it ends, its status counted among the bridge's.
async fn run_feed(feed: Feed, setup: &StreamSetup, shutdown: CancellationToken) -> FeedEnd {
    let id = NEXT_STREAM.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    setup.statuses.add(id, feed.status());
    metrics::gauge!(metric::CHANGE_STREAMS).increment(1.0);
    let window = DeliveryWindow::new(setup.window_size);
    let end = feed.run(setup.events.clone(), window, shutdown).await;
    metrics::gauge!(metric::CHANGE_STREAMS).decrement(1.0);
    setup.statuses.remove(id);
    end
}

async fn supervise(
    client: Client,
    single: bool,
    mut routes: watch::Receiver<Routes>,
    start: HashMap<String, ResumeToken>,
    setup: StreamSetup,
    shutdown: CancellationToken,
) {
    if single {
        // The one database is routed before the deployment starts.
        let Some(database) = routes.borrow().keys().next().cloned() else {
            return;
        };
        let mut feed = Feed::new(
            client,
            Scope::Database(database.clone()),
            routes.clone(),
            setup.identifier_cache_size,
            setup.pre_images,
        );
        if let Some(token) = start.get(&database) {
            feed = feed.resuming_after(token.clone());
        }
        run_feed(feed, &setup, shutdown).await;
        return;
    }
    let mut feed = Feed::new(
        client.clone(),
        Scope::Deployment,
        routes.clone(),
        setup.identifier_cache_size,
        setup.pre_images,
    );
    // The oldest position of any site's history: each site skips what is not its own.
    let oldest = start
        .values()
        .filter_map(|token| {
            let position = crate::history::position(&bson::to_bson(token).ok()?)?.to_string();
            Some((position, token))
        })
        .min_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, token)| token.clone());
    if let Some(token) = oldest {
        feed = feed.resuming_after(token);
    }
    let refused = match run_feed(feed, &setup, shutdown.clone()).await {
        FeedEnd::Shutdown => return,
        FeedEnd::DeploymentRefused(e) => e,
    };
    metrics::counter!(metric::STREAM_FALLBACKS).increment(1);
    tracing::warn!(
        error = %refused,
        "the deployment refuses a deployment-level change stream to this user: one change \
         stream per database instead (grant changeStream and find on the cluster to use one)"
    );
    per_database(client, &mut routes, start, setup, shutdown).await;
}

/// One stream per routed database, started and stopped as sites come and go.
async fn per_database(
    client: Client,
    routes: &mut watch::Receiver<Routes>,
    start: HashMap<String, ResumeToken>,
    setup: StreamSetup,
    shutdown: CancellationToken,
) {
    struct Stream {
        routes: watch::Sender<Routes>,
        stop: CancellationToken,
    }
    let mut streams: HashMap<String, Stream> = HashMap::new();
    loop {
        let current = routes.borrow_and_update().clone();
        streams.retain(|database, stream| {
            let kept = current.contains_key(database);
            if !kept {
                stream.stop.cancel();
            }
            kept
        });
        for (database, route) in current.iter() {
            let only = || -> Routes { Arc::new(HashMap::from([(database.clone(), route.clone())])) };
            if let Some(stream) = streams.get(database) {
                stream.routes.send_if_modified(|r| {
                    let changed = r
                        .get(database)
                        .is_none_or(|old| !Arc::ptr_eq(&old.tenant, &route.tenant));
                    if changed {
                        *r = only();
                    }
                    changed
                });
                continue;
            }
            let (sender, receiver) = watch::channel(only());
            let stop = shutdown.child_token();
            let mut feed = Feed::new(
                client.clone(),
                Scope::Database(database.clone()),
                receiver,
                setup.identifier_cache_size,
                setup.pre_images,
            );
            if let Some(token) = start.get(database) {
                feed = feed.resuming_after(token.clone());
            }
            let (setup, stop_feed) = (setup.clone(), stop.clone());
            tokio::spawn(async move { run_feed(feed, &setup, stop_feed).await });
            streams.insert(database.clone(), Stream { routes: sender, stop });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = routes.changed() => if changed.is_err() { return },
        }
    }
}

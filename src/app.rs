//! Wiring: MongoDB client, auth store, change feed, channel, HTTP server, and shutdown
//! on SIGTERM / SIGINT.

use std::time::{Duration, Instant};

use anyhow::Context;
use axum::middleware::from_fn_with_state;
use nsbridge::auth::store::AuthStore;
use nsbridge::channel::{Channel, ChannelConfig, transport};
use nsbridge::feed::{Feed, FeedEvent};
use nsbridge::http::{self, HttpState};
use nsbridge::mapping::{Mapper, MappingRules};
use nsbridge::net::{ConnectionInfo, TrackedListener};
use nsbridge::settings::{Settings, redact_uri};
use nsbridge::telemetry::metric;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Events between the change stream and the fan-out; the feed waits when it is full.
const FEED_QUEUE: usize = 1024;
/// Clients and tasks get this long after SIGTERM; the MongoDB client a little more. The
/// whole shutdown stays within 5 s.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(3500);
const CLIENT_SHUTDOWN_GRACE: Duration = Duration::from_millis(1000);

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let metrics = nsbridge::telemetry::init_metrics().context("installing the metrics recorder")?;
    let (client, mongo_reachable) = nsbridge::mongo::connect(&settings.mongo.uri)
        .await
        .with_context(|| format!("MongoDB URI {}", redact_uri(&settings.mongo.uri)))?;
    let db = client.database(&settings.mongo.database);
    let shutdown = CancellationToken::new();

    let auth_store = AuthStore::new(
        db.clone(),
        &settings.auth.collections_prefix,
        settings.auth.api_secret.clone(),
        settings.auth.default_roles.clone(),
    );
    let auth = auth_store.snapshots();
    let rules = MappingRules {
        relay: settings.relay,
        replace_window_ms: settings.replace_window.as_millis() as i64,
        names: settings.collections.clone(),
    };
    let feed = Feed::new(
        db,
        Mapper::new(rules, settings.identifier_cache_size),
        settings.mongo.pre_images,
    );
    let feed_status = feed.status();
    let (channel, socket_layer) = Channel::new(
        ChannelConfig {
            trusted_proxy: settings.auth.trusted_proxy,
            queue_size: settings.channel.queue_size,
            throttle: settings.auth.throttle.clone(),
            ..ChannelConfig::default()
        },
        auth.clone(),
    );

    let (events_tx, events) = mpsc::channel(FEED_QUEUE);
    let tasks = [
        tokio::spawn(auth_store.run(shutdown.clone())),
        tokio::spawn(feed.run(events_tx, shutdown.clone())),
        tokio::spawn(channel.clone().follow_auth(shutdown.clone())),
        tokio::spawn(fan_out(channel.clone(), events)),
    ];

    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = http::router(HttpState {
        feed: feed_status,
        auth,
        mongo_reachable,
        metrics: Some(metrics),
    })
    .layer(socket_layer)
    .layer(from_fn_with_state(channel.sessions(), transport::guard));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(
        listen = %local,
        uri = %redact_uri(&settings.mongo.uri),
        database = %settings.mongo.database,
        relay = %settings.relay,
        version = env!("CARGO_PKG_VERSION"),
        "nsbridge listening"
    );

    let stopping = shutdown.clone();
    let server_channel = channel.clone();
    let server = axum::serve(
        TrackedListener::new(listener),
        app.into_make_service_with_connect_info::<ConnectionInfo>(),
    )
    .with_graceful_shutdown(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: disconnecting clients, closing the change stream");
        stopping.cancel();
        server_channel.close().await;
    });
    let mut serve = tokio::spawn(async move { server.await });
    tokio::select! {
        _ = shutdown.cancelled() => {}
        served = &mut serve => {
            // The server stopped on its own: that is an error, and everything else stops too.
            shutdown.cancel();
            if let Ok(Err(e)) = served {
                tracing::error!(error = %e, "the HTTP server stopped");
            }
        }
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    if !serve.is_finished() && tokio::time::timeout_at(deadline.into(), serve).await.is_err() {
        tracing::warn!("connections still open at the shutdown deadline; closing them");
    }
    for task in tasks {
        let _ = tokio::time::timeout_at(deadline.into(), task).await;
    }
    // Let the driver kill the change streams' cursors and close its connections before
    // the runtime goes away under it.
    let _ = tokio::time::timeout(CLIENT_SHUTDOWN_GRACE, client.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn fan_out(channel: Channel, mut events: mpsc::Receiver<FeedEvent>) {
    while let Some(FeedEvent { event, received }) = events.recv().await {
        channel.publish(&event);
        metrics::histogram!(metric::FANOUT_DURATION).record(received.elapsed().as_secs_f64());
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

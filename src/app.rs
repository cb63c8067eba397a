//! Wiring: MongoDB client, auth store, change feed, channel, HTTP server, and shutdown
//! on SIGTERM / SIGINT.

use std::time::{Duration, Instant};

use anyhow::Context;
use axum::middleware::from_fn_with_state;
use nsbridge::auth::store::AuthStore;
use nsbridge::channel::replay::Catalog;
use nsbridge::channel::{Channel, ChannelConfig, transport};
use nsbridge::delivery::DeliveryWindow;
use nsbridge::feed::{Feed, FeedEvent};
use nsbridge::http::{self, HttpState};
use nsbridge::mapping::{Mapper, MappingRules};
use nsbridge::net::Connections;
use nsbridge::settings::{Settings, redact_uri};
use nsbridge::state::{StateStore, resume_point};
use nsbridge::upstream::Upstream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Events handed from the change stream to the fan-out and not yet taken; the delivery
/// window bounds what is in flight as a whole.
const FEED_QUEUE: usize = 16;
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
    let (answering_tx, mongo_answering) = watch::channel(false);

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
    let state = StateStore::new(&settings.state, &db);
    state
        .prepare()
        .context("state_dir (NSBRIDGE_STATE_DIR) must be a writable directory")?;
    let resumed = match state.load().await {
        Ok(saved) => saved,
        Err(e) => {
            metrics::counter!(nsbridge::telemetry::metric::RESUME_FAILURES).increment(1);
            tracing::error!(error = %e, "cannot use the saved resume position; starting from the present");
            None
        }
    };
    let mut feed = Feed::new(
        db.clone(),
        Mapper::new(rules, settings.identifier_cache_size),
        settings.mongo.pre_images,
    );
    if let Some(point) = resumed.as_ref().and_then(resume_point) {
        tracing::info!(
            state = %state.describe(),
            events_to_read_again = point.sent_after,
            "resuming the change stream where the last run's history started"
        );
        feed = feed.resuming_at(point);
    }
    let feed_status = feed.status();
    let window = DeliveryWindow::new(settings.channel.max_events_in_flight);
    let upstream = settings
        .upstream
        .as_ref()
        .map(|url| Upstream::new(url, settings.auth.trusted_proxy));
    let (channel, socket_layer) = Channel::new(
        ChannelConfig {
            trusted_proxy: settings.auth.trusted_proxy,
            window: window.clone(),
            slow_client_timeout: settings.channel.slow_client_timeout,
            throttle: settings.auth.throttle.clone(),
            upstream: upstream.clone(),
            history: settings.history.limits,
            resumed,
            recovery_window: settings.history.recovery_window,
            replay: settings.history.replay,
            catalog: Some(Catalog {
                db,
                names: settings.collections.clone(),
            }),
            ..ChannelConfig::default()
        },
        auth.clone(),
    );

    let (events_tx, events) = mpsc::channel(FEED_QUEUE);
    let connections = Connections::new(connection_limits(&settings));
    if let Some(upstream) = &upstream {
        tokio::spawn(
            upstream
                .clone()
                .watch_reachable(nsbridge::upstream::PROBE_INTERVAL, shutdown.clone()),
        );
    }
    let tasks = [
        tokio::spawn(nsbridge::mongo::watch_answering(
            client.clone(),
            nsbridge::mongo::PING_INTERVAL,
            nsbridge::mongo::PING_TIMEOUT,
            answering_tx,
            shutdown.clone(),
        )),
        tokio::spawn(connections.clone().run_reaper(shutdown.clone())),
        tokio::spawn(auth_store.run(shutdown.clone())),
        tokio::spawn(feed.run(events_tx, window, shutdown.clone())),
        tokio::spawn(channel.clone().follow_auth(shutdown.clone())),
        tokio::spawn(channel.clone().watch_slow_clients(shutdown.clone())),
        tokio::spawn(fan_out(channel.clone(), events)),
        tokio::spawn(nsbridge::state::keep_saving(
            state.clone(),
            channel.clone(),
            shutdown.clone(),
        )),
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
        mongo_answering,
        metrics: Some(metrics),
        upstream: upstream.clone(),
    })
    .layer(socket_layer)
    .layer(from_fn_with_state(upstream.clone(), transport::guard));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(
        listen = %local,
        uri = %redact_uri(&settings.mongo.uri),
        database = %settings.mongo.database,
        relay = %settings.relay,
        upstream = %settings.upstream.as_ref().map_or(String::from("none"), |u| u.to_string()),
        max_connections = connections.limits().max_connections,
        version = env!("CARGO_PKG_VERSION"),
        "nsbridge listening"
    );

    let stop_serving = CancellationToken::new();
    let mut serve = tokio::spawn(nsbridge::server::serve(
        listener,
        connections,
        app,
        stop_serving.clone(),
    ));
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down: disconnecting clients, closing the change stream");
            stop_serving.cancel();
            shutdown.cancel();
            channel.close().await;
        }
        _ = &mut serve => {
            // The server stopped on its own: that is an error, and everything else stops too.
            tracing::error!("the HTTP server stopped");
            shutdown.cancel();
        }
    }
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    if !serve.is_finished() && tokio::time::timeout_at(deadline.into(), serve).await.is_err() {
        tracing::warn!("connections still open at the shutdown deadline; closing them");
    }
    for task in tasks {
        let _ = tokio::time::timeout_at(deadline.into(), task).await;
    }
    // The feed has stopped: where the next run reads the stream again from.
    if let Some(checkpoint) = channel.checkpoint() {
        match tokio::time::timeout_at(deadline.into(), state.save(&checkpoint)).await {
            Ok(Ok(())) => {
                tracing::info!(state = %state.describe(), last_event = checkpoint.sent_seq, "resume position saved")
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot save the resume position"),
            Err(_) => tracing::error!("saving the resume position timed out"),
        }
    }
    // Let the driver kill the change streams' cursors and close its connections before
    // the runtime goes away under it.
    let _ = tokio::time::timeout(CLIENT_SHUTDOWN_GRACE, client.shutdown()).await;
    tracing::info!("stopped");
    Ok(())
}

/// The configured connection limits, within what the open-files limit allows (raised to
/// its hard limit first).
fn connection_limits(settings: &Settings) -> nsbridge::net::ConnectionLimits {
    let configured = settings.connections.clone();
    let open_files = match nsbridge::net::raise_open_files_limit() {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-files limit; assuming 1024");
            1024
        }
    };
    let limits = configured.clone().within_open_files(open_files);
    if limits.max_connections < configured.max_connections {
        tracing::warn!(
            configured = configured.max_connections,
            limit = limits.max_connections,
            open_files,
            "connection limit lowered to fit the open-files limit"
        );
    }
    limits
}

async fn fan_out(channel: Channel, mut events: mpsc::Receiver<FeedEvent>) {
    while let Some(event) = events.recv().await {
        channel.publish(event);
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

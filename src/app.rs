//! Wiring: the sites (one, or the tenants file's), the MongoDB client, the channel, the
//! HTTP server, and shutdown on SIGTERM / SIGINT.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::middleware::from_fn_with_state;
use nsbridge::channel::transport::SiteResolver;
use nsbridge::channel::{Channel, ChannelConfig, transport};
use nsbridge::deployment::{StreamSetup, StreamStatuses};
use nsbridge::http::{self, HttpState};
use nsbridge::net::Connections;
use nsbridge::settings::{Settings, redact_uri};
use nsbridge::sites::Sites;
use nsbridge::tenants::TenantSpec;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Events handed from the change stream to the fan-out and not yet taken; the delivery
/// window bounds what is in flight as a whole.
const FEED_QUEUE: usize = 16;
/// Clients and tasks get this long after SIGTERM; the MongoDB client a little more. The
/// whole shutdown stays within 5 s.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(3500);
const CLIENT_SHUTDOWN_GRACE: Duration = Duration::from_millis(1000);

pub async fn run(
    settings: Settings,
    specs: Vec<TenantSpec>,
    env: HashMap<String, String>,
) -> anyhow::Result<()> {
    let metrics = nsbridge::telemetry::init_metrics().context("installing the metrics recorder")?;
    let (client, mongo_reachable) = nsbridge::mongo::connect(&settings.mongo.uri)
        .await
        .with_context(|| format!("MongoDB URI {}", redact_uri(&settings.mongo.uri)))?;
    let shutdown = CancellationToken::new();
    let (answering_tx, mongo_answering) = watch::channel(false);

    let channel_config = ChannelConfig {
        trusted_proxy: settings.auth.trusted_proxy,
        window_size: settings.channel.max_events_in_flight,
        slow_client_timeout: settings.channel.slow_client_timeout,
        throttle: settings.auth.throttle.clone(),
        history: settings.history.limits,
        recovery_window: settings.history.recovery_window,
        replay: settings.history.replay,
        ..ChannelConfig::default()
    };
    let (channel, socket_layer) = Channel::new(&channel_config);
    let (events_tx, events) = mpsc::channel(FEED_QUEUE);
    let statuses = Arc::new(StreamStatuses::default());
    let streams = StreamSetup {
        identifier_cache_size: settings.identifier_cache_size,
        pre_images: settings.mongo.pre_images,
        window_size: settings.channel.max_events_in_flight,
        events: events_tx,
        statuses: statuses.clone(),
    };
    let settings = Arc::new(settings);
    let sites = Sites::new(
        settings.clone(),
        channel_config,
        channel.clone(),
        streams,
        client.clone(),
        shutdown.clone(),
    );
    sites.start(specs).await?;

    let connections = Connections::new(connection_limits(&settings));
    let mut tasks = vec![
        tokio::spawn(nsbridge::mongo::watch_answering(
            client.clone(),
            nsbridge::mongo::PING_INTERVAL,
            nsbridge::mongo::PING_TIMEOUT,
            answering_tx,
            shutdown.clone(),
        )),
        tokio::spawn(connections.clone().run_reaper(shutdown.clone())),
        tokio::spawn(sites.clone().fan_out(events)),
    ];
    if let Some(path) = &settings.tenants {
        tasks.push(tokio::spawn(sites.clone().follow_file(path.clone(), env)));
    }

    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let resolver: Arc<dyn SiteResolver> = sites.clone();
    let app = http::router(HttpState {
        streams: statuses,
        sites: sites.clone(),
        mongo_reachable,
        mongo_answering,
        metrics: Some(metrics),
    })
    .layer(socket_layer)
    .layer(from_fn_with_state(resolver, transport::guard));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(
        listen = %local,
        uri = %redact_uri(&settings.mongo.uri),
        database = %settings.mongo.database,
        tenants = sites.len(),
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
    tasks.extend(sites.take_tasks());
    for task in tasks {
        let _ = tokio::time::timeout_at(deadline.into(), task).await;
    }
    // The streams have stopped: where the next run reads them again from.
    if tokio::time::timeout_at(deadline.into(), sites.save_all())
        .await
        .is_err()
    {
        tracing::error!("saving the resume positions timed out");
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

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

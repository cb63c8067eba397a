//! Wiring: MongoDB client, change feed, and shutdown on SIGTERM / SIGINT.

use anyhow::Context;
use mongodb::options::ClientOptions;
use mongodb::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use nsbridge::feed::Feed;
use nsbridge::mapping::{Mapper, MappingRules};
use nsbridge::settings::{redact_uri, Settings};

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let client = mongo_client(&settings).await?;
    let db = client.database(&settings.mongo.database);
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
    let shutdown = CancellationToken::new();
    let (events_tx, mut events) = mpsc::channel(1024);
    let feed_task = tokio::spawn(feed.run(events_tx, shutdown.clone()));
    tracing::info!(
        uri = %redact_uri(&settings.mongo.uri),
        database = %settings.mongo.database,
        relay = ?settings.relay,
        "nsbridge started"
    );
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = &mut signal => break,
            event = events.recv() => match event {
                Some(event) => tracing::info!(collection = %event.collection, kind = event.kind.name(), "event"),
                None => break,
            },
        }
    }
    shutdown.cancel();
    let _ = feed_task.await;
    Ok(())
}

async fn mongo_client(settings: &Settings) -> anyhow::Result<Client> {
    let mut options = ClientOptions::parse(&settings.mongo.uri)
        .await
        .with_context(|| format!("MongoDB URI {}", redact_uri(&settings.mongo.uri)))?;
    options.app_name.get_or_insert_with(|| "nsbridge".into());
    Client::with_options(options).context("creating the MongoDB client")
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

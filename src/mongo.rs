//! The MongoDB client, and whether the deployment is reachable (from the driver's own
//! server monitoring, so that an outage shows at once rather than at the next query) and
//! answering (a server that accepts connections but hangs shows in no monitoring event:
//! a ping with a deadline tells).

use std::time::Duration;

use bson::doc;
use mongodb::Client;
use mongodb::event::EventHandler;
use mongodb::event::sdam::SdamEvent;
use mongodb::options::ClientOptions;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::telemetry::metric;

pub async fn connect(uri: &str) -> mongodb::error::Result<(Client, watch::Receiver<bool>)> {
    let mut options = ClientOptions::parse(uri).await?;
    options.app_name.get_or_insert_with(|| "nsbridge".into());
    let (reachable_tx, reachable) = watch::channel(false);
    metrics::gauge!(metric::MONGO_REACHABLE).set(0.0);
    options.sdam_event_handler = Some(EventHandler::callback(move |event| {
        if let SdamEvent::TopologyDescriptionChanged(change) = event {
            let now = change.new_description.has_readable_server(None);
            let before = reachable_tx.send_replace(now);
            // Nobody watching any more: the bridge is shutting down and closed the client.
            if now != before && !reachable_tx.is_closed() {
                metrics::gauge!(metric::MONGO_REACHABLE).set(if now { 1.0 } else { 0.0 });
                if now {
                    tracing::info!("MongoDB reachable");
                } else {
                    tracing::warn!("MongoDB unreachable");
                }
            }
        }
    }));
    Ok((Client::with_options(options)?, reachable))
}

/// How often the deployment is pinged, and how long a ping may take before the
/// deployment counts as not answering: together within readiness's 10 s budget.
pub const PING_INTERVAL: Duration = Duration::from_secs(2);
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Pings the deployment every `interval` until `shutdown`, publishing whether the last
/// ping was answered within `timeout` (false until the first is).
pub async fn watch_answering(
    client: Client,
    interval: Duration,
    timeout: Duration,
    answering: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let admin = client.database("admin");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ping = tokio::select! {
            _ = shutdown.cancelled() => return,
            ping = tokio::time::timeout(timeout, admin.run_command(doc! { "ping": 1 })) => ping,
        };
        let problem = match ping {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer to a ping within {timeout:?}")),
        };
        let now = problem.is_none();
        let before = answering.send_replace(now);
        if now != before {
            match problem {
                None => tracing::info!("MongoDB answering"),
                Some(problem) => tracing::warn!(%problem, "MongoDB not answering"),
            }
        }
    }
}

//! The MongoDB client, and whether the deployment is reachable (from the driver's own
//! server monitoring, so that an outage shows at once rather than at the next query).

use mongodb::Client;
use mongodb::event::EventHandler;
use mongodb::event::sdam::SdamEvent;
use mongodb::options::ClientOptions;
use tokio::sync::watch;

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

//! Logs and metrics: the `tracing` subscriber, the Prometheus recorder, and the names of
//! every metric the bridge records.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Metric names, in one place so that code and the reference in docs/metrics.md agree.
pub mod metric {
    pub const BUILD_INFO: &str = "nsbridge_build_info";
    pub const WRITES_SKIPPED: &str = "nsbridge_writes_skipped_total";
    pub const STREAM_RESTARTS: &str = "nsbridge_stream_restarts_total";
    pub const RESUME_FAILURES: &str = "nsbridge_resume_failures_total";
    pub const CHANGE_STREAM_LAG: &str = "nsbridge_change_stream_lag_seconds";
    pub const FANOUT_DURATION: &str = "nsbridge_fanout_duration_seconds";
    pub const DELIVERY_DURATION: &str = "nsbridge_delivery_duration_seconds";
    pub const SOCKETS_CONNECTED: &str = "nsbridge_sockets_connected";
    pub const SUBSCRIPTIONS: &str = "nsbridge_subscriptions";
    pub const EVENTS_SENT: &str = "nsbridge_events_sent_total";
    pub const MESSAGES_DELIVERED: &str = "nsbridge_messages_delivered_total";
    pub const AUTH_FAILURES: &str = "nsbridge_auth_failures_total";
    pub const AUTH_THROTTLED: &str = "nsbridge_auth_throttled_total";
    pub const SLOW_CLIENT_DISCONNECTS: &str = "nsbridge_slow_client_disconnects_total";
    pub const MONGO_REACHABLE: &str = "nsbridge_mongodb_reachable";
    pub const EVENTS_IN_FLIGHT: &str = "nsbridge_events_in_flight";
    pub const DELIVERY_WAIT: &str = "nsbridge_delivery_wait_seconds";
    pub const UPSTREAM_REACHABLE: &str = "nsbridge_upstream_reachable";
    pub const UPSTREAM_ERRORS: &str = "nsbridge_upstream_errors_total";
    pub const RELAY_LINKS: &str = "nsbridge_relay_connections";
    pub const RELAYED_SOCKETS: &str = "nsbridge_relayed_sockets";
    pub const RELAYED_MESSAGES: &str = "nsbridge_relayed_messages_total";
    pub const CONNECTIONS_OPEN: &str = "nsbridge_connections_open";
    pub const CONNECTION_LIMIT: &str = "nsbridge_connection_limit";
    pub const CONNECTIONS_REFUSED: &str = "nsbridge_connections_refused_total";
    pub const CONNECTIONS_CLOSED: &str = "nsbridge_connections_closed_total";
    pub const REPLAYS: &str = "nsbridge_replays_total";
    pub const REPLAYED_EVENTS: &str = "nsbridge_replayed_events_total";
    pub const REPLAYS_INCOMPLETE: &str = "nsbridge_replays_incomplete_total";
    pub const RECOVERIES: &str = "nsbridge_recoveries_total";
    pub const HISTORY_EVENTS: &str = "nsbridge_history_events";
    pub const STATE_SAVE_FAILURES: &str = "nsbridge_state_save_failures_total";
    pub const CHANGE_STREAMS: &str = "nsbridge_change_streams";
    pub const STREAM_FALLBACKS: &str = "nsbridge_change_stream_fallbacks_total";
    pub const TENANTS: &str = "nsbridge_tenants";
    pub const TENANTS_RELOADS: &str = "nsbridge_tenants_reloads_total";
    pub const UNKNOWN_HOSTS: &str = "nsbridge_unknown_host_requests_total";
}

/// Distinct `tenant` label values at most: the sites past them share `other`, so that a
/// bridge of thousands of sites keeps its metrics few.
pub const MAX_TENANT_LABELS: usize = 250;

/// The `tenant` label of site `name`: its name while fewer than [`MAX_TENANT_LABELS`]
/// sites have one, else `other`. Stable for the process's life.
pub fn tenant_label(name: &str) -> &'static str {
    static LABELS: std::sync::Mutex<Option<std::collections::HashMap<String, &'static str>>> =
        std::sync::Mutex::new(None);
    let mut labels = LABELS.lock().unwrap();
    let labels = labels.get_or_insert_with(Default::default);
    if let Some(label) = labels.get(name) {
        return label;
    }
    if labels.len() >= MAX_TENANT_LABELS {
        return "other";
    }
    // Leaked once per distinct name, at most MAX_TENANT_LABELS of them.
    let label: &'static str = Box::leak(name.to_string().into_boxed_str());
    labels.insert(name.to_string(), label);
    label
}

/// Installs the global log subscriber: `RUST_LOG` when set, else the configured level.
pub fn init_logging(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match settings.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Installs the global Prometheus recorder and describes every metric.
pub fn init_metrics() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    use metric::*;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(CHANGE_STREAM_LAG.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(FANOUT_DURATION.into()),
            &[
                0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.00125, 0.0015, 0.00175, 0.002, 0.0025, 0.003,
                0.004, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(DELIVERY_DURATION.into()),
            &[
                0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(DELIVERY_WAIT.into()),
            &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
        )?
        .install_recorder()?;
    describe_gauge!(BUILD_INFO, "Always 1; the version label tells which build runs.");
    describe_counter!(
        WRITES_SKIPPED,
        "Change events that produced no client event, by collection and reason (not_apiv3, ...)."
    );
    describe_counter!(
        STREAM_RESTARTS,
        "Change stream reopenings, by reason (error, reopen)."
    );
    describe_counter!(
        RESUME_FAILURES,
        "Times the change stream could not resume and restarted from the present (events may be missed)."
    );
    describe_histogram!(
        CHANGE_STREAM_LAG,
        Unit::Seconds,
        "Time from a write (its wall time in MongoDB) to its change event reaching the bridge."
    );
    describe_histogram!(
        FANOUT_DURATION,
        Unit::Seconds,
        "Time from a change event reaching the bridge to its queueing to the last socket of its room, writers woken."
    );
    describe_gauge!(
        SOCKETS_CONNECTED,
        "Connected Socket.IO sockets, by namespace and Engine.IO protocol."
    );
    describe_gauge!(SUBSCRIPTIONS, "Sockets in each collection's room.");
    describe_counter!(
        EVENTS_SENT,
        "Events sent to a collection's room, by collection and type."
    );
    describe_counter!(
        MESSAGES_DELIVERED,
        "Event messages queued to sockets, by collection."
    );
    describe_counter!(AUTH_FAILURES, "Subscribes with a missing or bad access token.");
    describe_counter!(
        AUTH_THROTTLED,
        "Failed subscribes, by outcome: delayed (answered after a wait) or refused (too many waiting)."
    );
    describe_counter!(
        REPLAYS,
        "Replays served to clients that reconnected, by source: history, collections (a since older than the history) or recovery (Socket.IO connection state recovery)."
    );
    describe_counter!(REPLAYED_EVENTS, "Events sent in replays.");
    describe_counter!(
        REPLAYS_INCOMPLETE,
        "Replays that could not give every missed event: from the collections (no permanent deletes), cut short, or refused."
    );
    describe_counter!(
        RECOVERIES,
        "Socket.IO connection state recoveries asked for, by outcome: recovered, or too_late."
    );
    describe_gauge!(
        HISTORY_EVENTS,
        "Events held in the history for clients that reconnect."
    );
    describe_counter!(
        STATE_SAVE_FAILURES,
        "Times the resume position could not be saved to the state directory or collection."
    );
    describe_counter!(
        SLOW_CLIENT_DISCONNECTS,
        "Clients disconnected because they stayed behind while others kept up."
    );
    describe_gauge!(
        MONGO_REACHABLE,
        "1 while the MongoDB deployment is reachable, else 0."
    );
    describe_gauge!(
        CONNECTIONS_OPEN,
        "Open TCP connections (HTTP, polling, WebSocket)."
    );
    describe_gauge!(
        CONNECTION_LIMIT,
        "Connections allowed open at once (the setting, or less under the open-files limit)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "New connections closed at once: at the limit with nothing idle to close, or out of descriptors."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections the bridge closed, by reason: header_timeout, keep_alive_timeout, body_timeout, evicted."
    );
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

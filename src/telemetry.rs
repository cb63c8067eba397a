//! Logs and metrics: the `tracing` subscriber, the Prometheus recorder, and the names of
//! every metric the bridge records.

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Metric names, in one place so that code and the README's reference agree.
pub mod metric {
    pub const WRITES_SKIPPED: &str = "nsbridge_writes_skipped_total";
    pub const STREAM_RESTARTS: &str = "nsbridge_stream_restarts_total";
    pub const RESUME_FAILURES: &str = "nsbridge_resume_failures_total";
    pub const CHANGE_STREAM_LAG: &str = "nsbridge_change_stream_lag_seconds";
    pub const FANOUT_DURATION: &str = "nsbridge_fanout_duration_seconds";
    pub const SOCKETS_CONNECTED: &str = "nsbridge_sockets_connected";
    pub const SUBSCRIPTIONS: &str = "nsbridge_subscriptions";
    pub const EVENTS_SENT: &str = "nsbridge_events_sent_total";
    pub const MESSAGES_DELIVERED: &str = "nsbridge_messages_delivered_total";
    pub const AUTH_FAILURES: &str = "nsbridge_auth_failures_total";
    pub const AUTH_THROTTLED: &str = "nsbridge_auth_throttled_total";
    pub const SLOW_CLIENT_DISCONNECTS: &str = "nsbridge_slow_client_disconnects_total";
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

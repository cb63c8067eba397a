//! Logs and metrics: the `tracing` subscriber, the Prometheus recorder, and the names of
//! every metric the bridge records.

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Metric names, in one place so that code and the README's reference agree.
pub mod metric {
    pub const WRITES_SKIPPED: &str = "nsbridge_writes_skipped_total";
    pub const STREAM_RESTARTS: &str = "nsbridge_stream_restarts_total";
    pub const RESUME_FAILURES: &str = "nsbridge_resume_failures_total";
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

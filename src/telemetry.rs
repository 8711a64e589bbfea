//! Logging on standard error: human-readable lines, or JSON lines with
//! `NOTIFIER_LOG_FORMAT=json`; the level from `RUST_LOG`, else
//! `NOTIFIER_LOG_LEVEL`, else info.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// The level used when `RUST_LOG` is unset or invalid.
const DEFAULT_FILTER: &str = "info";

pub fn init(format: LogFormat, level: Option<&str>) {
    // An empty RUST_LOG (as `RUST_LOG=${RUST_LOG:-}` in compose leaves it)
    // counts as unset.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.trim().is_empty())
        .and_then(|value| EnvFilter::try_new(value).ok())
        .unwrap_or_else(|| EnvFilter::new(level.unwrap_or(DEFAULT_FILTER)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        // Colour only on a terminal: container logs and files get plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
    };
}

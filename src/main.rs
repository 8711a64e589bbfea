#![forbid(unsafe_code)]

use std::process::ExitCode;

use keycloak_notifier::config::{self, Config};
use keycloak_notifier::{daemon, health, telemetry};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Exit code for a configuration that cannot work.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a fatal error while running.
const EXIT_FAILURE: u8 = 1;

const USAGE: &str = "\
keycloak-notifier: mails administrators about new Keycloak events.

Usage: keycloak-notifier [run]       run the notifier (the default)
       keycloak-notifier healthcheck   exit 0 if the running notifier is alive
       keycloak-notifier --help | --version

All configuration comes from environment variables (KEYCLOAK_URL,
KEYCLOAK_REALM, KEYCLOAK_CLIENT_ID, KEYCLOAK_CLIENT_SECRET, SMTP_HOST,
SMTP_SENDER, SMTP_RECEIVER, NOTIFIER_EVENT_TYPES, ...); the README lists
them all with their defaults.";

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None | Some("run") => {}
        Some("healthcheck") => return healthcheck(),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some("--version" | "-V") => {
            println!("keycloak-notifier {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("unknown argument {other:?}\n\n{USAGE}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprint!("keycloak-notifier: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            error!(error = %err, "cannot start the async runtime");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    runtime.block_on(async {
        info!(
            version = env!("CARGO_PKG_VERSION"),
            "keycloak-notifier starting"
        );
        tracing::debug!(config = %config.redacted_summary(), "configuration");
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match daemon::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                error!(error = %err, "stopping");
                ExitCode::from(EXIT_FAILURE)
            }
        }
    })
}

/// Reads the running daemon's heartbeat in the state directory.
fn healthcheck() -> ExitCode {
    let state_dir = std::env::var_os("NOTIFIER_STATE_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(
            || std::path::PathBuf::from(config::DEFAULT_STATE_DIR),
            Into::into,
        );
    match health::check(&state_dir, chrono::Utc::now().timestamp_millis()) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(line) => {
            println!("{line}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM (docker stop, Kubernetes) and SIGINT (Ctrl-C) stop the loop after
/// the mail in flight. As PID 1 in a container, nothing else would.
async fn cancel_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received; stopping"),
        () = terminate => info!("SIGTERM received; stopping"),
    }
    shutdown.cancel();
}

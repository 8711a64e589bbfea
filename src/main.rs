#![forbid(unsafe_code)]

use std::process::ExitCode;

use keycloak_notifier::config::{self, Config};
use keycloak_notifier::templates::Templates;
use keycloak_notifier::{check, daemon, health, mail, telemetry};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Exit code for a configuration that cannot work.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure while running.
const EXIT_FAILURE: u8 = 1;

const USAGE: &str = "\
keycloak-notifier: mails administrators about new Keycloak events.

Usage: keycloak-notifier [COMMAND]

Commands:
  run               run the notifier until SIGTERM/SIGINT (the default)
  once              poll once, mail what is new, save the cursor, exit
                    (for cron and Kubernetes CronJobs; exit 0 on success)
  check             check the configuration, the Keycloak login and roles,
                    the realm's event settings and the SMTP login, without
                    mailing anything; exit 0 only if every check passes
  send-test-email   send one test mail to the recipients, show the reply
  healthcheck       exit 0 if the running notifier is alive (HEALTHCHECK)
  --help, --version

All configuration comes from environment variables (KEYCLOAK_URL,
KEYCLOAK_REALM, KEYCLOAK_CLIENT_ID, KEYCLOAK_CLIENT_SECRET, SMTP_HOST,
SMTP_SENDER, SMTP_RECEIVER, NOTIFIER_EVENT_TYPES, ...); the README lists
them all with their defaults.";

#[derive(Clone, Copy)]
enum Command {
    Run,
    Once,
    Check,
    SendTestEmail,
}

fn main() -> ExitCode {
    let command = match std::env::args().nth(1).as_deref() {
        None | Some("run") => Command::Run,
        Some("once") => Command::Once,
        Some("check") => Command::Check,
        Some("send-test-email") => Command::SendTestEmail,
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
    };
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprint!("keycloak-notifier: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let templates = match Templates::load(config.template_dir.as_deref()) {
        Ok(templates) => std::sync::Arc::new(templates),
        Err(err) => {
            eprintln!(
                "keycloak-notifier: invalid configuration (1 problem):\n  NOTIFIER_TEMPLATE_DIR: {err}"
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    telemetry::init(config.log_format, config.log_level.as_deref());
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
    runtime.block_on(async move {
        // `check` reports them itself, as failures.
        let unknown = if matches!(command, Command::Check) {
            &[][..]
        } else {
            &config.unknown_vars[..]
        };
        for (name, meant) in unknown {
            match meant {
                Some(meant) => {
                    warn!(variable = %name, did_you_mean = %meant, "unknown variable, ignored")
                }
                None => warn!(variable = %name, "unknown variable, ignored"),
            }
        }
        tracing::debug!(config = %config.redacted_summary(), "configuration");
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match command {
            Command::Run => {
                info!(
                    version = env!("CARGO_PKG_VERSION"),
                    "keycloak-notifier starting"
                );
                exit(daemon::run(config, templates, shutdown).await)
            }
            Command::Once => exit(daemon::run_once(config, templates, shutdown).await.map(
                |summary| {
                    info!(
                        mailed = summary.mailed,
                        dead_lettered = summary.dead_lettered,
                        fetched = summary.fetched,
                        "once: done"
                    );
                },
            )),
            Command::Check => {
                let lines = check::run(&config).await;
                for line in &lines {
                    println!("{line}");
                }
                if lines.iter().all(|l| l.passed) {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(EXIT_FAILURE)
                }
            }
            Command::SendTestEmail => send_test_email(&config).await,
        }
    })
}

fn exit<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            error!(error = %err, "stopping");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn send_test_email(config: &Config) -> ExitCode {
    let sent = async {
        let mailer = keycloak_notifier::smtp::SmtpMailer::new(&config.smtp)?;
        let message = mail::build_message(
            mail::test_mail(config),
            &config.smtp,
            &config.smtp.recipients,
        )?;
        mailer.send_with_reply(message).await
    };
    match sent.await {
        Ok(reply) => {
            println!(
                "sent to {} recipient(s); the server answered: {reply}",
                config.smtp.recipients.len()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            println!("not sent: {}", err.detail());
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Asks the running daemon: `GET /healthz` when `NOTIFIER_HTTP_ADDR` is
/// set, otherwise its heartbeat file in the state directory.
fn healthcheck() -> ExitCode {
    let http_addr = std::env::var("NOTIFIER_HTTP_ADDR")
        .ok()
        .and_then(|addr| addr.trim().parse::<std::net::SocketAddr>().ok());
    if let Some(addr) = http_addr {
        return report(keycloak_notifier::http::probe(addr));
    }
    let state_dir = std::env::var_os("NOTIFIER_STATE_DIR")
        .filter(|dir| !dir.is_empty())
        .map_or_else(
            || std::path::PathBuf::from(config::DEFAULT_STATE_DIR),
            Into::into,
        );
    report(health::check(
        &state_dir,
        chrono::Utc::now().timestamp_millis(),
    ))
}

fn report(verdict: Result<String, String>) -> ExitCode {
    match verdict {
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

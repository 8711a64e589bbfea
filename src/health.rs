//! Liveness for `keycloak-notifier healthcheck` (the image's HEALTHCHECK).
//!
//! A `FROM scratch` image has no curl, so the check is the binary itself: the
//! running daemon rewrites `health.json` in the state directory every few
//! seconds, and `healthcheck` reads it. A fresh file means the process is
//! alive and its runtime is not wedged; the file also tells how the last
//! poll went.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How often the daemon rewrites the file.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// A file older than this means the daemon is gone or stuck.
pub const HEARTBEAT_STALE: Duration = Duration::from_secs(60);
const FILE_NAME: &str = "health.json";

/// What the daemon reports about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Epoch ms of this heartbeat.
    pub updated: i64,
    /// Epoch ms of the last poll that succeeded.
    pub last_poll_ok: Option<i64>,
    /// The error of the last poll, if it failed.
    pub last_poll_error: Option<String>,
}

/// The daemon's side: shared status, written out by [`Heartbeat::run`].
#[derive(Debug, Clone)]
pub struct Heartbeat {
    path: PathBuf,
    status: Arc<Mutex<Status>>,
}

impl Heartbeat {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(FILE_NAME),
            status: Arc::default(),
        }
    }

    pub fn poll_succeeded(&self) {
        self.update(|status| {
            status.last_poll_ok = Some(status.updated);
            status.last_poll_error = None;
        });
    }

    pub fn poll_failed(&self, error: &str) {
        self.update(|status| status.last_poll_error = Some(error.to_owned()));
    }

    /// Changes the status and writes it out at once (a failed write is only
    /// warned about by [`Heartbeat::run`]: health must never stop the work).
    fn update(&self, change: impl FnOnce(&mut Status)) {
        if let Ok(mut status) = self.status.lock() {
            status.updated = Utc::now().timestamp_millis();
            change(&mut status);
            let _ = write(&self.path, &status);
        }
    }

    /// Rewrites the file every [`HEARTBEAT_EVERY`] until `shutdown`, then
    /// removes it so a stopped daemon is not taken for a live one.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut warned = false;
        loop {
            let status = match self.status.lock() {
                Ok(mut status) => {
                    status.updated = Utc::now().timestamp_millis();
                    status.clone()
                }
                Err(_) => return,
            };
            match write(&self.path, &status) {
                Ok(()) => warned = false,
                Err(err) if !warned => {
                    warned = true;
                    warn!(path = %self.path.display(), error = %err, "cannot write the health file");
                }
                Err(_) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
                () = shutdown.cancelled() => {
                    let _ = fs::remove_file(&self.path);
                    return;
                }
            }
        }
    }
}

fn write(path: &Path, status: &Status) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec(status).map_err(io::Error::other)?)?;
    fs::rename(&tmp, path)
}

/// The verdict of `healthcheck`: `Ok` with a line to print when the daemon is
/// alive, `Err` with the reason when not.
pub fn check(state_dir: &Path, now_ms: i64) -> Result<String, String> {
    let path = state_dir.join(FILE_NAME);
    let bytes = fs::read(&path).map_err(|err| {
        format!(
            "unhealthy: no heartbeat at {} ({err}); is the daemon running?",
            path.display()
        )
    })?;
    let status: Status = serde_json::from_slice(&bytes)
        .map_err(|err| format!("unhealthy: unreadable heartbeat {}: {err}", path.display()))?;
    let age = Duration::from_millis(u64::try_from(now_ms - status.updated).unwrap_or(0));
    if age > HEARTBEAT_STALE {
        return Err(format!(
            "unhealthy: the last heartbeat is {} old (limit {})",
            humantime::format_duration(age),
            humantime::format_duration(HEARTBEAT_STALE)
        ));
    }
    let last_ok = match status.last_poll_ok {
        Some(ms) => format!(
            "last successful poll {} ago",
            humantime::format_duration(Duration::from_secs(
                u64::try_from((now_ms - ms) / 1000).unwrap_or(0)
            ))
        ),
        None => "no successful poll yet".to_owned(),
    };
    Ok(match status.last_poll_error {
        Some(error) => format!("alive; {last_ok}; the last poll failed: {error}"),
        None => format!("alive; {last_ok}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_running_heartbeat_is_healthy_and_a_stopped_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let heartbeat = Heartbeat::new(dir.path());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(heartbeat.clone().run(shutdown.clone()));
        while !dir.path().join(FILE_NAME).exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let now = Utc::now().timestamp_millis();
        assert_eq!(
            check(dir.path(), now).unwrap(),
            "alive; no successful poll yet"
        );
        heartbeat.poll_succeeded();
        let line = check(dir.path(), now).unwrap();
        assert!(line.starts_with("alive; last successful poll"), "{line}");
        let stale = check(dir.path(), now + 61_000).unwrap_err();
        assert!(stale.contains("old"), "{stale}");
        shutdown.cancel();
        task.await.unwrap();
        let gone = check(dir.path(), now).unwrap_err();
        assert!(gone.contains("is the daemon running?"), "{gone}");
    }

    #[test]
    fn a_failed_poll_is_reported_but_the_process_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let status = Status {
            updated: 1_000,
            last_poll_ok: None,
            last_poll_error: Some("cannot reach Keycloak".into()),
        };
        write(&dir.path().join(FILE_NAME), &status).unwrap();
        assert_eq!(
            check(dir.path(), 2_000).unwrap(),
            "alive; no successful poll yet; the last poll failed: cannot reach Keycloak"
        );
    }
}

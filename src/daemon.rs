//! The notifier loop: wait for Keycloak, then poll on the interval and mail
//! every new event, moving the cursor only after each mail is accepted.

use chrono::Utc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::cursor::{Cursor, CursorError, CursorStore};
use crate::health::Heartbeat;
use crate::keycloak::{KeycloakClient, KeycloakError};
use crate::mail::{self, MailError, Mailer};
use crate::poller::{is_last_page, next_offset, select_new};
use crate::smtp::SmtpMailer;

/// Why the notifier stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error(transparent)]
    Keycloak(#[from] KeycloakError),
    #[error(transparent)]
    Mail(#[from] MailError),
}

/// Why one poll ended early. The cursor stays where the last accepted mail
/// put it, so the next poll takes up exactly there.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error(transparent)]
    Keycloak(#[from] KeycloakError),
    #[error(transparent)]
    Mail(#[from] MailError),
    /// The state cannot be saved: fatal, the notifier must not go on
    /// mailing what it could not record.
    #[error(transparent)]
    Cursor(#[from] CursorError),
}

/// What one poll did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollSummary {
    pub fetched: usize,
    pub mailed: usize,
    pub pages: usize,
}

/// One watched realm: its client, its cursor and where the cursor is kept.
pub struct Notifier<M> {
    config: Config,
    keycloak: KeycloakClient,
    mailer: M,
    store: CursorStore,
    cursor: Cursor,
    heartbeat: Option<Heartbeat>,
}

/// Loads the cursor, or on the first run makes one from
/// `NOTIFIER_START_FROM` and saves it at once, so that a restart before the
/// first event does not move the starting point. Saving also proves that the
/// state directory is writable before anything is mailed.
pub fn open_cursor(config: &Config) -> Result<(CursorStore, Cursor), CursorError> {
    let store = CursorStore::new(&config.state_dir, &config.keycloak.realm);
    store.ensure_dir()?;
    let cursor = match store.load()? {
        Some(cursor) => {
            info!(
                path = %store.path().display(),
                time = %format_ms(cursor.time),
                "resuming from the saved cursor"
            );
            cursor
        }
        None => {
            let cursor = Cursor::starting_at(config.start_from.resolve(Utc::now()));
            info!(
                path = %store.path().display(),
                from = %format_ms(cursor.time),
                "no cursor yet: first run, starting from NOTIFIER_START_FROM"
            );
            cursor
        }
    };
    store.save(&cursor)?;
    Ok((store, cursor))
}

/// Runs until `shutdown` is cancelled (returns `Ok`) or a fatal error.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let (store, cursor) = open_cursor(&config)?;
    let heartbeat = Heartbeat::new(&config.state_dir);
    tokio::spawn(heartbeat.clone().run(shutdown.clone()));
    let mailer = SmtpMailer::new(&config.smtp)?;
    let mut keycloak = KeycloakClient::new(&config.keycloak)?;
    match keycloak.wait_until_ready(&shutdown).await {
        Err(KeycloakError::Cancelled) => return Ok(()),
        other => other?,
    }
    Notifier::new(config, keycloak, mailer, store, cursor)
        .with_heartbeat(heartbeat)
        .run(&shutdown)
        .await
}

impl<M: Mailer> Notifier<M> {
    pub fn new(
        config: Config,
        keycloak: KeycloakClient,
        mailer: M,
        store: CursorStore,
        cursor: Cursor,
    ) -> Self {
        Self {
            config,
            keycloak,
            mailer,
            store,
            cursor,
            heartbeat: None,
        }
    }

    /// Reports each poll's outcome to `heartbeat` (for `healthcheck`).
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Polls on the interval until `shutdown`; a failed poll is logged and
    /// tried again at the next tick, except a cursor that cannot be saved.
    pub async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), RunError> {
        let mut ticker = tokio::time::interval(self.config.poll_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(
            realm = %self.config.keycloak.realm,
            types = %self.config.event_types.join(","),
            every = %humantime::format_duration(self.config.poll_interval),
            "watching for events"
        );
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                () = shutdown.cancelled() => break,
            }
            let result = self.poll(shutdown).await;
            if let Some(heartbeat) = &self.heartbeat {
                match &result {
                    Ok(_) => heartbeat.poll_succeeded(),
                    Err(err) => heartbeat.poll_failed(&err.to_string()),
                }
            }
            match result {
                Ok(summary) if summary.mailed > 0 => info!(
                    mailed = summary.mailed,
                    fetched = summary.fetched,
                    pages = summary.pages,
                    "poll done"
                ),
                Ok(summary) => debug!(
                    fetched = summary.fetched,
                    pages = summary.pages,
                    "poll done"
                ),
                Err(PollError::Cursor(err)) => return Err(err.into()),
                Err(PollError::Keycloak(err)) if !err.is_retryable() => {
                    error!(error = %err, "poll failed; trying again at the next interval");
                }
                Err(err) => warn!(error = %err, "poll failed; trying again at the next interval"),
            }
        }
        info!(cursor = %format_ms(self.cursor.time), "stopped");
        Ok(())
    }

    /// Fetches every new event, page by page, and mails each in order.
    pub async fn poll(&mut self, shutdown: &CancellationToken) -> Result<PollSummary, PollError> {
        let types = &self.config.event_types;
        let max = self.config.page_size;
        let realm = &self.config.keycloak.realm;
        let domain = self.config.smtp.sender.email.domain().to_owned();
        // The query's start stays fixed during the poll so that the offsets
        // of the pages stay consistent with each other.
        let from = self.cursor.time;
        let mut first = 0;
        let mut summary = PollSummary::default();
        loop {
            let page = self.keycloak.events_page(types, from, first, max).await?;
            let len = page.len();
            summary.pages += 1;
            summary.fetched += len;
            for event in select_new(&self.cursor, page) {
                if shutdown.is_cancelled() {
                    return Ok(summary);
                }
                let message =
                    mail::build_message(mail::render(&event, realm, &domain), &self.config.smtp)?;
                self.mailer.send(message).await?;
                self.cursor.advance_past(&event);
                self.store.save(&self.cursor)?;
                summary.mailed += 1;
                info!(
                    realm = %realm,
                    r#type = %event.kind,
                    event_id = event.id.as_deref().unwrap_or("-"),
                    time = %format_ms(event.time),
                    recipients = self.config.smtp.recipients.len(),
                    "mailed"
                );
            }
            if is_last_page(len, max) {
                return Ok(summary);
            }
            first = next_offset(first, max);
        }
    }
}

fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::sync::{Arc, Mutex};

    use lettre::Message;
    use serde_json::{Value, json};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

    use super::*;

    /// Serves a fixed list of events like Keycloak's events endpoint:
    /// `dateFrom` inclusive, ascending, `first`/`max` paging.
    struct EventStore(Vec<Value>);

    impl Respond for EventStore {
        fn respond(&self, request: &Request) -> ResponseTemplate {
            let param = |name: &str| {
                request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.parse::<i64>().unwrap())
            };
            let (from, first, max) = (
                param("dateFrom").unwrap(),
                param("first").unwrap(),
                param("max").unwrap(),
            );
            let page: Vec<&Value> = self
                .0
                .iter()
                .filter(|e| e["time"].as_i64().unwrap() >= from)
                .skip(first as usize)
                .take(max as usize)
                .collect();
            ResponseTemplate::new(200).set_body_json(page)
        }
    }

    /// Records subjects; refuses every mail after the first `accept` ones.
    #[derive(Clone)]
    struct Recorder {
        subjects: Arc<Mutex<Vec<String>>>,
        accept: usize,
    }

    impl Mailer for Recorder {
        async fn send(&self, message: Message) -> Result<(), MailError> {
            let mut subjects = self.subjects.lock().unwrap();
            if subjects.len() == self.accept {
                return Err(MailError::Transient("451 try again later".into()));
            }
            let raw = String::from_utf8(message.formatted()).unwrap();
            let subject = raw
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap();
            subjects.push(subject.to_owned());
            Ok(())
        }
    }

    async fn keycloak_with(events: Vec<Value>) -> MockServer {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"access_token": "t", "expires_in": 300})),
            )
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/admin/realms/test/events"))
            .respond_with(EventStore(events))
            .mount(&server)
            .await;
        server
    }

    fn config(server: &MockServer, state: &std::path::Path) -> Config {
        let vars = [
            ("KEYCLOAK_URL", server.uri()),
            ("KEYCLOAK_REALM", "test".into()),
            ("KEYCLOAK_CLIENT_ID", "notifier".into()),
            ("KEYCLOAK_CLIENT_SECRET", "s".into()),
            ("SMTP_HOST", "localhost".into()),
            ("SMTP_SENDER", "kc@example.com".into()),
            ("SMTP_RECEIVER", "admin@example.com".into()),
            ("NOTIFIER_PAGE_SIZE", "4".into()),
            ("NOTIFIER_START_FROM", "beginning".into()),
            ("NOTIFIER_STATE_DIR", state.display().to_string()),
        ];
        Config::from_vars(
            vars.into_iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .unwrap()
    }

    /// Ten events, three of them in one millisecond across a page boundary.
    fn events() -> Vec<Value> {
        let times = [10, 20, 30, 40, 40, 40, 50, 60, 70, 80];
        times
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"id": format!("e{i}"), "time": t, "type": "LOGIN_ERROR", "details": {"username": format!("u{i}")}}))
            .collect()
    }

    fn notifier(config: Config, accept: usize) -> (Notifier<Recorder>, Arc<Mutex<Vec<String>>>) {
        let (store, cursor) = open_cursor(&config).unwrap();
        let keycloak = KeycloakClient::new(&config.keycloak).unwrap();
        let subjects = Arc::new(Mutex::new(Vec::new()));
        let mailer = Recorder {
            subjects: subjects.clone(),
            accept,
        };
        (
            Notifier::new(config, keycloak, mailer, store, cursor),
            subjects,
        )
    }

    #[tokio::test]
    async fn a_poll_mails_every_page_in_order_and_saves_the_cursor() {
        let server = keycloak_with(events()).await;
        let state = tempfile::tempdir().unwrap();
        let (mut notifier, subjects) = notifier(config(&server, state.path()), usize::MAX);
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        assert_eq!(
            summary,
            PollSummary {
                fetched: 10,
                mailed: 10,
                pages: 3
            }
        );
        let expected: Vec<String> = (0..10)
            .map(|i| format!("[Keycloak test] LOGIN_ERROR: u{i}"))
            .collect();
        assert_eq!(*subjects.lock().unwrap(), expected);
        let saved = CursorStore::new(state.path(), "test")
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(saved.time, 80);
        // The next poll finds nothing new.
        assert_eq!(
            notifier
                .poll(&CancellationToken::new())
                .await
                .unwrap()
                .mailed,
            0
        );
        assert_eq!(subjects.lock().unwrap().len(), 10);
    }

    #[tokio::test]
    async fn a_refused_mail_leaves_the_cursor_on_the_last_accepted_one() {
        let server = keycloak_with(events()).await;
        let state = tempfile::tempdir().unwrap();
        let config = config(&server, state.path());
        // Accepts four mails (e0..e3, the first of the three at time 40).
        let (mut failing, _) = notifier(config.clone(), 4);
        let err = failing.poll(&CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, PollError::Mail(_)), "{err}");
        let saved = CursorStore::new(state.path(), "test")
            .load()
            .unwrap()
            .unwrap();
        assert_eq!((saved.time, saved.keys_at_time.len()), (40, 1));

        // A new process picks up exactly after it: e4..e9, nothing twice.
        let (mut next, subjects) = notifier(config, usize::MAX);
        assert_eq!(
            next.poll(&CancellationToken::new()).await.unwrap().mailed,
            6
        );
        let expected: Vec<String> = (4..10)
            .map(|i| format!("[Keycloak test] LOGIN_ERROR: u{i}"))
            .collect();
        assert_eq!(*subjects.lock().unwrap(), expected);
    }

    #[tokio::test]
    async fn a_first_run_saves_its_starting_point_at_once() {
        let state = tempfile::tempdir().unwrap();
        let server = MockServer::start().await;
        let mut config = config(&server, &state.path().join("new-dir"));
        config.start_from = crate::config::StartFrom::At("2026-01-01T00:00:00Z".parse().unwrap());
        let (store, cursor) = open_cursor(&config).unwrap();
        assert_eq!(cursor.time, 1_767_225_600_000);
        assert_eq!(store.load().unwrap(), Some(cursor));
        // A later start ignores NOTIFIER_START_FROM.
        config.start_from = crate::config::StartFrom::Now;
        assert_eq!(open_cursor(&config).unwrap().1.time, 1_767_225_600_000);
    }
}

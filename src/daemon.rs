//! The notifier loop: wait for Keycloak, then poll on the interval and mail
//! every new event, moving the cursor only after each mail is accepted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use lettre::Message;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::config::Config;
use crate::cursor::{Cursor, CursorError, CursorStore};
use crate::deadletter::{DeadLetterError, DeadLetters};
use crate::event::Event;
use crate::health::Heartbeat;
use crate::http::{self, BindError};
use crate::keycloak::{KeycloakClient, KeycloakError, UserInfo};
use crate::mail::{self, MailError, Mailer};
use crate::metrics::Metrics;
use crate::poller::{is_last_page, next_page, select_new};
use crate::retry;
use crate::smtp::SmtpMailer;
use crate::templates::Templates;

/// At most this many new events are held before they are mailed (or put in
/// a digest): a long backlog is handled in batches of this size.
const BATCH_MAX: usize = 1000;
/// The window of `NOTIFIER_RATE_LIMIT`.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// After SIGTERM, the mail in flight may take this much longer; the process
/// still ends within Docker's and Kubernetes' default 10 s grace.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(7);

/// Why the notifier stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error(transparent)]
    Keycloak(#[from] KeycloakError),
    #[error(transparent)]
    Mail(#[from] MailError),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error(transparent)]
    Http(#[from] BindError),
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
    /// A refused mail cannot be recorded: fatal, for the same reason.
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
}

/// What one poll did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollSummary {
    pub fetched: usize,
    pub mailed: usize,
    pub dead_lettered: usize,
    /// New events of clients that NOTIFIER_INCLUDE/EXCLUDE_CLIENTS leave out.
    pub filtered: usize,
    /// Digest mails sent (their events count as mailed).
    pub digests: usize,
    pub pages: usize,
}

/// The two event streams of a realm, each with its own cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    User,
    Admin,
}

/// How the delivery of one event ended.
enum Delivery {
    Mailed,
    DeadLettered,
    Stopped,
}

/// One watched realm: its client, its cursor and where the cursor is kept.
pub struct Notifier<M> {
    config: Config,
    keycloak: KeycloakClient,
    mailer: M,
    store: CursorStore,
    cursor: Cursor,
    dead_letters: DeadLetters,
    heartbeat: Option<Heartbeat>,
    /// The admin events' cursor, when `NOTIFIER_ADMIN_EVENTS` names some.
    admin: Option<(CursorStore, Cursor)>,
    /// The notifier's own user id (its token's subject), learnt once.
    own_user_id: Option<String>,
    /// When the mails of the last minute were sent (for the rate limit).
    sent: std::collections::VecDeque<Instant>,
    metrics: Arc<Metrics>,
    /// `None`: the built-in templates.
    templates: Option<Arc<Templates>>,
    /// Cleared when Keycloak refuses user look-ups (no `view-users`).
    look_up_users: bool,
    /// Retry a transient SMTP failure until it works (the daemon), or give
    /// up the poll at once (`once`, whose caller reports the failure).
    retry_mail: bool,
}

/// Loads the cursor, or on the first run makes one from
/// `NOTIFIER_START_FROM` and saves it at once, so that a restart before the
/// first event does not move the starting point. Saving also proves that the
/// state directory is writable before anything is mailed.
pub fn open_cursor(config: &Config) -> Result<(CursorStore, Cursor), CursorError> {
    open_store(
        config,
        CursorStore::new(&config.state_dir, &config.keycloak.realm),
    )
}

/// [`open_cursor`] for the realm's admin events, if any are watched.
pub fn open_admin_cursor(config: &Config) -> Result<Option<(CursorStore, Cursor)>, CursorError> {
    if config.admin_events.is_empty() {
        return Ok(None);
    }
    let store = CursorStore::for_admin_events(&config.state_dir, &config.keycloak.realm);
    open_store(config, store).map(Some)
}

fn open_store(config: &Config, store: CursorStore) -> Result<(CursorStore, Cursor), CursorError> {
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

/// Runs until `shutdown` is cancelled. Each watched realm polls on its own;
/// a realm that stops (its state cannot be recorded) does not stop the
/// others, but the process then ends with that error once they are done.
pub async fn run(
    config: Config,
    templates: Arc<Templates>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    // Every realm's cursor first: an unreadable one stops start-up.
    let mut realms = Vec::new();
    for realm in &config.keycloak.realms {
        let realm_config = config.for_realm(realm);
        let (store, cursor) = open_cursor(&realm_config)?;
        let admin = open_admin_cursor(&realm_config)?;
        realms.push((realm_config, store, cursor, admin));
    }
    let heartbeat = Heartbeat::new(&config.state_dir);
    tokio::spawn(heartbeat.clone().run(shutdown.clone()));
    let metrics = Arc::new(Metrics::default());
    if let Some(addr) = config.http_addr {
        let listener = http::bind(addr).await?;
        tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            config.keycloak.realms.clone(),
            config.poll_interval,
            shutdown.clone(),
        ));
    }
    let mailer = Arc::new(SmtpMailer::new(&config.smtp)?);
    let mut keycloak = KeycloakClient::new(&config.keycloak)?;
    match keycloak.wait_until_ready(&shutdown).await {
        Err(KeycloakError::Cancelled) => return Ok(()),
        other => other?,
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (realm_config, store, cursor, admin) in realms {
        let mut client = keycloak.for_realm(&realm_config.keycloak.realm);
        let span = tracing::info_span!("realm", realm = %realm_config.keycloak.realm);
        let (mailer, heartbeat, metrics, templates, shutdown) = (
            mailer.clone(),
            heartbeat.clone(),
            metrics.clone(),
            templates.clone(),
            shutdown.clone(),
        );
        tasks.spawn(
            async move {
                check_event_settings(&mut client, &realm_config, &cursor).await;
                let mut notifier = Notifier::new(realm_config, client, mailer, store, cursor)
                    .with_heartbeat(heartbeat)
                    .with_metrics(metrics)
                    .with_templates(templates);
                if let Some((store, cursor)) = admin {
                    notifier = notifier.with_admin_events(store, cursor);
                }
                notifier.run(&shutdown).await
            }
            .instrument(span),
        );
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                error!(error = %err, "a realm stopped; the others go on");
                first_error.get_or_insert(err);
            }
            Err(panicked) => error!(error = %panicked, "a realm's task ended"),
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// One poll of every realm and exit, for cron and Kubernetes CronJobs: no
/// waiting for Keycloak and no retrying of mail; each cursor keeps what was
/// accepted. A realm that fails does not stop the others; the first error
/// is returned at the end.
pub async fn run_once(
    config: Config,
    templates: Arc<Templates>,
    shutdown: CancellationToken,
) -> Result<PollSummary, RunError> {
    let mut stores = Vec::new();
    for realm in &config.keycloak.realms {
        let realm_config = config.for_realm(realm);
        let (store, cursor) = open_cursor(&realm_config)?;
        let admin = open_admin_cursor(&realm_config)?;
        stores.push((realm_config, store, cursor, admin));
    }
    let mailer = Arc::new(SmtpMailer::new(&config.smtp)?);
    let mut keycloak = KeycloakClient::new(&config.keycloak)?;
    keycloak.connect().await?;
    let mut total = PollSummary::default();
    let mut first_error = None;
    for (realm_config, store, cursor, admin) in stores {
        let realm = realm_config.keycloak.realm.clone();
        let mut client = keycloak.for_realm(&realm);
        check_event_settings(&mut client, &realm_config, &cursor).await;
        let mut notifier = Notifier::new(realm_config, client, mailer.clone(), store, cursor)
            .with_templates(templates.clone())
            .without_mail_retries();
        if let Some((store, cursor)) = admin {
            notifier = notifier.with_admin_events(store, cursor);
        }
        match notifier.poll(&shutdown).await {
            Ok(summary) => {
                total.fetched += summary.fetched;
                total.mailed += summary.mailed;
                total.dead_lettered += summary.dead_lettered;
                total.pages += summary.pages;
            }
            Err(err) => {
                error!(realm = %realm, error = %err, "poll failed");
                first_error.get_or_insert(match err {
                    PollError::Keycloak(err) => RunError::Keycloak(err),
                    PollError::Mail(err) => RunError::Mail(err),
                    PollError::Cursor(err) => RunError::Cursor(err),
                    PollError::DeadLetter(err) => RunError::DeadLetter(err),
                });
            }
        }
    }
    first_error.map_or(Ok(total), Err)
}

impl<M: Mailer> Notifier<M> {
    pub fn new(
        config: Config,
        keycloak: KeycloakClient,
        mailer: M,
        store: CursorStore,
        cursor: Cursor,
    ) -> Self {
        let dead_letters = DeadLetters::new(&config.state_dir, &config.keycloak.realm);
        Self {
            config,
            keycloak,
            mailer,
            store,
            cursor,
            dead_letters,
            heartbeat: None,
            admin: None,
            own_user_id: None,
            sent: std::collections::VecDeque::new(),
            metrics: Arc::default(),
            templates: None,
            look_up_users: true,
            retry_mail: true,
        }
    }

    /// Also watches admin events, with their own cursor.
    pub fn with_admin_events(mut self, store: CursorStore, cursor: Cursor) -> Self {
        self.admin = Some((store, cursor));
        self
    }

    /// Renders mails with `templates` instead of the built-in ones.
    pub fn with_templates(mut self, templates: Arc<Templates>) -> Self {
        self.templates = Some(templates);
        self
    }

    /// Records what it does in `metrics` (served on /metrics).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Gives up a poll at the first transient SMTP failure instead of
    /// retrying (the cursor stays on the last accepted mail).
    pub fn without_mail_retries(mut self) -> Self {
        self.retry_mail = false;
        self
    }

    /// Reports each poll's outcome to `heartbeat` (for `healthcheck`).
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Self {
        self.heartbeat = Some(heartbeat);
        self
    }

    pub fn cursor(&self) -> &Cursor {
        &self.cursor
    }

    /// Polls on the interval until `shutdown`. A failed poll is logged and
    /// tried again from the same cursor, after the interval or, when polls
    /// keep failing (Keycloak down), after a growing backoff up to a minute;
    /// only a state that cannot be recorded stops the loop.
    pub async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), RunError> {
        let interval = self.config.poll_interval;
        info!(
            realm = %self.config.keycloak.realm,
            types = %self.config.event_types.join(","),
            every = %humantime::format_duration(interval),
            "watching for events"
        );
        let mut backoff = retry::backoff();
        loop {
            let result = self.poll(shutdown).await;
            let realm = &self.config.keycloak.realm;
            self.metrics
                .poll(realm, result.is_ok(), Utc::now().timestamp_millis());
            let (auth_realm, tokens) = self.keycloak.tokens_fetched().await;
            self.metrics.token_fetches(&auth_realm, tokens);
            if let Some(heartbeat) = &self.heartbeat {
                match &result {
                    Ok(_) => heartbeat.poll_succeeded(),
                    Err(err) => heartbeat.poll_failed(&err.to_string()),
                }
            }
            let wait = match result {
                Ok(summary) => {
                    if summary.mailed + summary.dead_lettered > 0 {
                        info!(
                            mailed = summary.mailed,
                            dead_lettered = summary.dead_lettered,
                            fetched = summary.fetched,
                            pages = summary.pages,
                            "poll done"
                        );
                    } else {
                        debug!(
                            fetched = summary.fetched,
                            pages = summary.pages,
                            "poll done"
                        );
                    }
                    backoff = retry::backoff();
                    interval
                }
                Err(PollError::Cursor(err)) => return Err(err.into()),
                Err(PollError::DeadLetter(err)) => return Err(err.into()),
                Err(err) => {
                    let wait = interval.max(backoff.next().unwrap_or(retry::MAX_DELAY));
                    let retry_in = retry::show(wait);
                    match &err {
                        PollError::Keycloak(e) if !e.is_retryable() => {
                            error!(error = %err, %retry_in, "poll failed");
                        }
                        _ => warn!(error = %err, %retry_in, "poll failed"),
                    }
                    wait
                }
            };
            if !retry::sleep_or_stop(wait, shutdown).await {
                break;
            }
        }
        info!(cursor = %format_ms(self.cursor.time), "stopped");
        Ok(())
    }

    /// Fetches every new user event (and admin event, if watched), page by
    /// page, and mails each in order.
    pub async fn poll(&mut self, shutdown: &CancellationToken) -> Result<PollSummary, PollError> {
        let mut summary = self.poll_stream(Stream::User, shutdown).await?;
        if self.admin.is_some() && !shutdown.is_cancelled() {
            let admin = self.poll_stream(Stream::Admin, shutdown).await?;
            summary.fetched += admin.fetched;
            summary.mailed += admin.mailed;
            summary.dead_lettered += admin.dead_lettered;
            summary.filtered += admin.filtered;
            summary.digests += admin.digests;
            summary.pages += admin.pages;
        }
        Ok(summary)
    }

    fn cursor_of(&self, stream: Stream) -> &Cursor {
        match (stream, &self.admin) {
            (Stream::Admin, Some((_, cursor))) => cursor,
            _ => &self.cursor,
        }
    }

    /// Whether `event` is one to mail, by client (user events) or by
    /// resource and operation, never the notifier's own (admin events).
    async fn wanted(&mut self, stream: Stream, event: &Event) -> bool {
        match stream {
            Stream::User => self.config.wants_client(event.client_id.as_deref()),
            Stream::Admin => {
                let resource = event
                    .details
                    .get("resource_type")
                    .map_or("", String::as_str);
                let operation = event.details.get("operation").map_or("", String::as_str);
                if !self
                    .config
                    .admin_events
                    .iter()
                    .any(|p| p.matches(resource, operation))
                {
                    return false;
                }
                if self.own_user_id.is_none() {
                    self.own_user_id = Some(self.keycloak.own_user_id().await.unwrap_or_default());
                }
                let own = self.own_user_id.as_deref().unwrap_or_default();
                own.is_empty()
                    || event
                        .details
                        .get("admin_user_id")
                        .is_none_or(|id| id != own)
            }
        }
    }

    async fn poll_stream(
        &mut self,
        stream: Stream,
        shutdown: &CancellationToken,
    ) -> Result<PollSummary, PollError> {
        let page_size = self.config.page_size;
        let (mut from, mut max) = (self.cursor_of(stream).since, page_size);
        let mut summary = PollSummary::default();
        let mut pending = Vec::new();
        let mut held = std::collections::HashSet::new();
        loop {
            let page = match stream {
                Stream::User => {
                    self.keycloak
                        .events_page(&self.config.event_types, from, 0, max)
                        .await?
                }
                Stream::Admin => {
                    self.keycloak
                        .admin_events_page(&self.config.admin_events, from, 0, max)
                        .await?
                }
            };
            let len = page.len();
            let last_time = page.last().map(|event| event.time);
            summary.pages += 1;
            summary.fetched += len;
            for event in select_new(self.cursor_of(stream), page) {
                if shutdown.is_cancelled() {
                    break;
                }
                // Pages overlap at their edges; events held for this batch
                // are not in the cursor yet.
                if !held.insert(event.dedupe_key()) {
                    continue;
                }
                self.metrics
                    .event_seen(&self.config.keycloak.realm, &event.kind, event.time);
                let wanted = self.wanted(stream, &event).await;
                if !wanted {
                    debug!(
                        event_id = event.id.as_deref().unwrap_or("-"),
                        r#type = %event.kind,
                        client = event.client_id.as_deref().unwrap_or("-"),
                        "filtered out; not mailed"
                    );
                    summary.filtered += 1;
                }
                pending.push((event, wanted));
                if pending.len() >= BATCH_MAX
                    && !self
                        .flush(stream, &mut pending, &mut summary, shutdown)
                        .await?
                {
                    return Ok(summary);
                }
            }
            let done = shutdown.is_cancelled() || last_time.is_none() || is_last_page(len, max);
            if done {
                self.flush(stream, &mut pending, &mut summary, shutdown)
                    .await?;
                return Ok(summary);
            }
            if let Some(last) = last_time {
                (from, max) = next_page(from, max, page_size, last);
            }
        }
    }

    /// Mails the new events gathered so far, in time order, and moves the
    /// cursor past each once its mail is accepted. Too many for one poll
    /// (`NOTIFIER_DIGEST_THRESHOLD`), or more than the rate limit allows, go
    /// into one digest per group of recipients instead; the cursor moves
    /// past those only when every digest is accepted. `false` if a shutdown
    /// stopped it.
    async fn flush(
        &mut self,
        stream: Stream,
        pending: &mut Vec<(Event, bool)>,
        summary: &mut PollSummary,
        shutdown: &CancellationToken,
    ) -> Result<bool, PollError> {
        let items = std::mem::take(pending);
        let wanted_count = items.iter().filter(|(_, wanted)| *wanted).count();
        let threshold = self.config.digest_threshold;
        let mut digest_from = (threshold > 0 && wanted_count > threshold).then_some(0);
        if digest_from.is_none() {
            for (index, (event, wanted)) in items.iter().enumerate() {
                if *wanted {
                    if self.rate_limited() {
                        digest_from = Some(index);
                        break;
                    }
                    match self.mail_one(event, shutdown).await? {
                        Delivery::Mailed => summary.mailed += 1,
                        Delivery::DeadLettered => summary.dead_lettered += 1,
                        Delivery::Stopped => return Ok(false),
                    }
                }
                self.advance(stream, event, shutdown).await?;
            }
        }
        let Some(start) = digest_from else {
            return Ok(true);
        };
        let rest = &items[start..];
        let events: Vec<&Event> = rest.iter().filter(|(_, w)| *w).map(|(e, _)| e).collect();
        // One digest per set of recipients (routes may differ by type).
        let mut groups: Vec<(&[lettre::message::Mailbox], Vec<&Event>)> = Vec::new();
        for event in events {
            let recipients = self.config.recipients_for(&event.kind);
            match groups.iter_mut().find(|(r, _)| *r == recipients) {
                Some((_, group)) => group.push(event),
                None => groups.push((recipients, vec![event])),
            }
        }
        let context = mail::Context {
            realm: &self.config.keycloak.realm,
            domain: self.config.smtp.sender.email.domain(),
            time_zone: self.config.time_zone,
            user: None,
            console: Some(self.keycloak.base_url().as_str()),
            templates: self.templates.as_deref(),
        };
        let mut messages = Vec::new();
        for (recipients, group) in &groups {
            let rendered = mail::render_digest(group, &context);
            let message = mail::build_message(rendered, &self.config.smtp, recipients)?;
            messages.push((
                message,
                group.iter().map(|e| (*e).clone()).collect::<Vec<_>>(),
            ));
        }
        for (message, group) in messages {
            match self.deliver(&group, message, shutdown).await? {
                Delivery::Mailed => summary.mailed += group.len(),
                Delivery::DeadLettered => summary.dead_lettered += group.len(),
                Delivery::Stopped => return Ok(false),
            }
            summary.digests += 1;
        }
        for (event, _) in rest {
            match (stream, &mut self.admin) {
                (Stream::Admin, Some((_, cursor))) => cursor.advance_past(event),
                _ => self.cursor.advance_past(event),
            }
        }
        self.persist(stream, shutdown).await?;
        Ok(true)
    }

    /// Renders and sends one event's own mail.
    async fn mail_one(
        &mut self,
        event: &Event,
        shutdown: &CancellationToken,
    ) -> Result<Delivery, PollError> {
        let user = if event.kind.ends_with("_DELETE") {
            None
        } else {
            self.look_up_user(event).await
        };
        let rendered = mail::render_with(
            event,
            &mail::Context {
                realm: &self.config.keycloak.realm,
                domain: self.config.smtp.sender.email.domain(),
                time_zone: self.config.time_zone,
                user: user.as_ref(),
                console: Some(self.keycloak.base_url().as_str()),
                templates: self.templates.as_deref(),
            },
        );
        let message = mail::build_message(
            rendered,
            &self.config.smtp,
            self.config.recipients_for(&event.kind),
        )?;
        let delivery = self
            .deliver(std::slice::from_ref(event), message, shutdown)
            .await?;
        if matches!(delivery, Delivery::Mailed) {
            self.sent.push_back(Instant::now());
        }
        Ok(delivery)
    }

    /// Whether one more mail now would exceed `NOTIFIER_RATE_LIMIT` (mails
    /// in the last minute).
    fn rate_limited(&mut self) -> bool {
        let limit = self.config.rate_limit;
        while self.sent.front().is_some_and(|t| t.elapsed() > RATE_WINDOW) {
            self.sent.pop_front();
        }
        limit > 0 && self.sent.len() >= limit
    }

    /// Moves the stream's cursor past `event` and saves it.
    async fn advance(
        &mut self,
        stream: Stream,
        event: &Event,
        shutdown: &CancellationToken,
    ) -> Result<(), CursorError> {
        match (stream, &mut self.admin) {
            (Stream::Admin, Some((_, cursor))) => cursor.advance_past(event),
            _ => self.cursor.advance_past(event),
        }
        self.persist(stream, shutdown).await
    }

    /// The event's user as Keycloak knows them now, for the mail. Never
    /// holds a mail back: a user deleted since, a missing `view-users` role
    /// or an error costs only the details (and one warning).
    async fn look_up_user(&mut self, event: &Event) -> Option<UserInfo> {
        let id = event.user_id.as_deref()?;
        if !self.look_up_users {
            return None;
        }
        match self.keycloak.user(id).await {
            Ok(Some(user)) => Some(user),
            Ok(None) => {
                warn!(user_id = %id, "the event's user no longer exists; mailing the event without user details");
                None
            }
            Err(err @ KeycloakError::Forbidden { .. }) => {
                warn!(error = %err, "cannot look users up; mails go out without the user's details from now on");
                self.look_up_users = false;
                None
            }
            Err(err) => {
                warn!(user_id = %id, error = %err, "cannot look the user up; mailing the event without user details");
                None
            }
        }
    }

    /// Sends one mail, retrying a transient failure with backoff for as long
    /// as it takes; a permanent refusal goes to the dead-letter file.
    async fn deliver(
        &self,
        events: &[Event],
        message: Message,
        shutdown: &CancellationToken,
    ) -> Result<Delivery, PollError> {
        let realm = &self.config.keycloak.realm;
        let Some(event) = events.first() else {
            return Ok(Delivery::Mailed);
        };
        let event_id = if events.len() == 1 {
            event.id.as_deref().unwrap_or("-").to_owned()
        } else {
            format!("digest of {} events", events.len())
        };
        let event_id = event_id.as_str();
        let mut delays = retry::backoff();
        for attempt in 1u64.. {
            let started = Instant::now();
            let sent = tokio::select! {
                sent = self.mailer.send(message.clone()) => sent,
                () = grace_expired(shutdown) => return Ok(Delivery::Stopped),
            };
            let took = started.elapsed();
            match sent {
                Ok(()) => {
                    for event in events {
                        self.metrics.mailed(realm, &event.kind, took);
                    }
                    info!(
                        realm = %realm,
                        r#type = %event.kind,
                        event_id,
                        time = %format_ms(event.time),
                        recipients = self.config.recipients_for(&event.kind).len(),
                        "mailed"
                    );
                    return Ok(Delivery::Mailed);
                }
                Err(MailError::Permanent(reply)) => {
                    for event in events {
                        self.dead_letters.append(event, &reply)?;
                        self.metrics.dead_lettered(realm, &event.kind, took);
                    }
                    error!(
                        realm = %realm,
                        r#type = %event.kind,
                        event_id,
                        error = %reply,
                        file = %self.dead_letters.path().display(),
                        "the SMTP server refused the mail for good; event written to the dead-letter file"
                    );
                    return Ok(Delivery::DeadLettered);
                }
                Err(err) if err.is_transient() && !self.retry_mail => {
                    self.metrics.mail_failed(realm, &event.kind, took);
                    return Err(err.into());
                }
                Err(err) if err.is_transient() => {
                    self.metrics.mail_failed(realm, &event.kind, took);
                    let delay = delays.next().unwrap_or(retry::MAX_DELAY);
                    warn!(
                        realm = %realm,
                        event_id,
                        attempt,
                        retry_in = %retry::show(delay),
                        error = %err,
                        "mail not sent; retrying"
                    );
                    if !retry::sleep_or_stop(delay, shutdown).await {
                        return Ok(Delivery::Stopped);
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
        unreachable!("the attempt counter does not run out")
    }

    /// Saves the cursor. If the state directory refuses (full, read-only),
    /// nothing more is mailed until it works again, and a shutdown meanwhile
    /// is an error: the mail just accepted would be sent again on restart.
    async fn persist(
        &self,
        stream: Stream,
        shutdown: &CancellationToken,
    ) -> Result<(), CursorError> {
        let (store, cursor) = match (stream, &self.admin) {
            (Stream::Admin, Some((store, cursor))) => (store, cursor),
            _ => (&self.store, &self.cursor),
        };
        let mut delays = retry::backoff();
        loop {
            let err = match store.save(cursor) {
                Ok(()) => return Ok(()),
                Err(err) => err,
            };
            let delay = delays.next().unwrap_or(retry::MAX_DELAY);
            error!(
                error = %err,
                retry_in = %retry::show(delay),
                "cannot save the cursor; no more mails until it is saved"
            );
            if !retry::sleep_or_stop(delay, shutdown).await {
                return Err(err);
            }
        }
    }
}

/// Resolves [`SHUTDOWN_GRACE`] after `shutdown`.
async fn grace_expired(shutdown: &CancellationToken) {
    shutdown.cancelled().await;
    tokio::time::sleep(SHUTDOWN_GRACE).await;
}

/// Warns about realm event settings that would make mails go missing:
/// events not stored, a watched type not stored, or events expired while
/// the notifier was away. Only reads the settings; a failure is a warning.
async fn check_event_settings(keycloak: &mut KeycloakClient, config: &Config, cursor: &Cursor) {
    let settings = match keycloak.events_config().await {
        Ok(settings) => settings,
        Err(err) => {
            warn!(error = %err, "cannot read the realm's event settings");
            return;
        }
    };
    let admin = crate::keycloak::admin_events_warning(&settings, !config.admin_events.is_empty());
    for warning in admin
        .into_iter()
        .chain(crate::keycloak::event_settings_warnings(
            &settings,
            &config.event_types,
            cursor.since,
            Utc::now().timestamp_millis(),
        ))
    {
        warn!(realm = %config.keycloak.realm, "{warning}");
    }
}

fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
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

    /// Like [`EventStore`], but as Keycloak really sorts: by time only, so
    /// events that share a millisecond come in a different order from one
    /// request to the next (here: reversed on every other request).
    struct UnstableTies {
        events: Vec<Value>,
        requests: std::sync::atomic::AtomicUsize,
    }

    impl Respond for UnstableTies {
        fn respond(&self, request: &Request) -> ResponseTemplate {
            let n = self
                .requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut events = self.events.clone();
            if n % 2 == 1 {
                events.reverse();
                events.sort_by_key(|e| e["time"].as_i64().unwrap());
            }
            EventStore(events).respond(request)
        }
    }

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

    /// Records subjects; the script says how the next sends end (`None`
    /// accepts; an empty script accepts everything).
    #[derive(Clone, Default)]
    struct Recorder {
        subjects: Arc<Mutex<Vec<String>>>,
        raw: Arc<Mutex<Vec<String>>>,
        script: Arc<Mutex<VecDeque<Option<MailError>>>>,
        /// Cancelled at the first failure, to end a test's retry loop.
        stop_on_failure: Option<CancellationToken>,
    }

    impl Mailer for Recorder {
        async fn send(&self, message: Message) -> Result<(), MailError> {
            if let Some(err) = self.script.lock().unwrap().pop_front().flatten() {
                if let Some(stop) = &self.stop_on_failure {
                    stop.cancel();
                }
                return Err(err);
            }
            let raw = String::from_utf8(message.formatted()).unwrap();
            let subject = raw
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap();
            self.subjects.lock().unwrap().push(subject.to_owned());
            self.raw.lock().unwrap().push(raw.clone());
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

    fn notifier(config: Config, mailer: Recorder) -> Notifier<Recorder> {
        let (store, cursor) = open_cursor(&config).unwrap();
        let keycloak = KeycloakClient::new(&config.keycloak).unwrap();
        Notifier::new(config, keycloak, mailer, store, cursor)
    }

    fn subjects(range: std::ops::Range<usize>) -> Vec<String> {
        range
            .map(|i| format!("[Keycloak test] LOGIN_ERROR: u{i}"))
            .collect()
    }

    #[tokio::test]
    async fn a_poll_mails_every_page_in_order_and_saves_the_cursor() {
        let server = keycloak_with(events()).await;
        let state = tempfile::tempdir().unwrap();
        let mailer = Recorder::default();
        let mut notifier = notifier(config(&server, state.path()), mailer.clone());
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        // Pages from 0 (10..40), from 40 (40, 40, 40, 50), from 50 (50..80),
        // from 80 (80, short): each starts at the last time of the one before.
        let expected = PollSummary {
            fetched: 13,
            mailed: 10,
            dead_lettered: 0,
            filtered: 0,
            digests: 0,
            pages: 4,
        };
        assert_eq!(summary, expected);
        assert_eq!(*mailer.subjects.lock().unwrap(), subjects(0..10));
        let saved = CursorStore::new(state.path(), "test")
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(saved.time, 80);
        // The next poll asks again from the overlap window and mails nothing.
        assert_eq!(
            notifier
                .poll(&CancellationToken::new())
                .await
                .unwrap()
                .mailed,
            0
        );
        assert_eq!(mailer.subjects.lock().unwrap().len(), 10);
    }

    #[tokio::test]
    async fn events_sharing_a_millisecond_across_a_page_boundary_are_all_mailed() {
        // Three events at 40 straddle the boundary of the first page (4).
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
            .respond_with(UnstableTies {
                events: events(),
                requests: Default::default(),
            })
            .mount(&server)
            .await;
        let state = tempfile::tempdir().unwrap();
        let mailer = Recorder::default();
        let mut notifier = notifier(config(&server, state.path()), mailer.clone());
        notifier.poll(&CancellationToken::new()).await.unwrap();
        let mut mailed = mailer.subjects.lock().unwrap().clone();
        mailed.sort();
        let mut expected = subjects(0..10);
        expected.sort();
        assert_eq!(mailed, expected, "each event exactly once");
    }

    #[tokio::test]
    async fn a_shutdown_while_smtp_is_down_leaves_the_cursor_on_the_last_accepted_mail() {
        let server = keycloak_with(events()).await;
        let state = tempfile::tempdir().unwrap();
        let config = config(&server, state.path());
        let stop = CancellationToken::new();
        // Accepts four mails (e0..e3, the first of the three at time 40),
        // then the server is down; the shutdown ends the retrying.
        let failing = Recorder {
            script: Arc::new(Mutex::new(VecDeque::from([
                None,
                None,
                None,
                None,
                Some(MailError::Transient("421 closing".into())),
            ]))),
            stop_on_failure: Some(stop.clone()),
            ..Recorder::default()
        };
        let summary = notifier(config.clone(), failing).poll(&stop).await.unwrap();
        assert_eq!(summary.mailed, 4);
        let saved = CursorStore::new(state.path(), "test")
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(saved.time, 40);
        assert!(saved.recent.contains_key("e3") && !saved.recent.contains_key("e4"));

        // A new process picks up exactly after it: e4..e9, nothing twice.
        let next = Recorder::default();
        let summary = notifier(config, next.clone())
            .poll(&CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(summary.mailed, 6);
        assert_eq!(*next.subjects.lock().unwrap(), subjects(4..10));
    }

    #[tokio::test]
    async fn a_transient_failure_is_retried_until_the_mail_is_accepted() {
        let server = keycloak_with(events()[..2].to_vec()).await;
        let state = tempfile::tempdir().unwrap();
        let mailer = Recorder {
            script: Arc::new(Mutex::new(VecDeque::from([Some(MailError::Transient(
                "451 4.3.0 try again".into(),
            ))]))),
            ..Recorder::default()
        };
        let mut notifier = notifier(config(&server, state.path()), mailer.clone());
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        assert_eq!((summary.mailed, summary.dead_lettered), (2, 0));
        assert_eq!(*mailer.subjects.lock().unwrap(), subjects(0..2));
    }

    #[tokio::test]
    async fn a_permanently_refused_mail_is_dead_lettered_and_the_rest_go_on() {
        let server = keycloak_with(events()).await;
        let state = tempfile::tempdir().unwrap();
        let mailer = Recorder {
            script: Arc::new(Mutex::new(VecDeque::from([
                None,
                Some(MailError::Permanent(
                    "RCPT TO failed: 550 5.1.1 no such user".into(),
                )),
            ]))),
            ..Recorder::default()
        };
        let mut notifier = notifier(config(&server, state.path()), mailer.clone());
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        assert_eq!((summary.mailed, summary.dead_lettered), (9, 1));
        let mut expected = subjects(0..10);
        expected.remove(1);
        assert_eq!(*mailer.subjects.lock().unwrap(), expected);
        let letters = std::fs::read_to_string(state.path().join("dead-letter-test.jsonl")).unwrap();
        let entry: Value = serde_json::from_str(letters.lines().next().unwrap()).unwrap();
        assert_eq!(entry["event"]["id"], "e1");
        assert_eq!(entry["error"], "RCPT TO failed: 550 5.1.1 no such user");
        assert_eq!(letters.lines().count(), 1);
    }

    #[tokio::test]
    async fn a_cursor_that_cannot_be_saved_holds_back_the_next_mail_until_it_can() {
        let server = keycloak_with(events()[..3].to_vec()).await;
        let state = tempfile::tempdir().unwrap();
        let state_dir = state.path().join("state");
        let mailer = Recorder::default();
        let mut notifier = notifier(config(&server, &state_dir), mailer.clone());
        // The state directory vanishes (as a full or unmounted disk would
        // refuse writes), and comes back a little later.
        std::fs::remove_dir_all(&state_dir).unwrap();
        let restore = {
            let state_dir = state_dir.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                std::fs::create_dir(&state_dir).unwrap();
            })
        };
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        restore.await.unwrap();
        assert_eq!(summary.mailed, 3);
        assert_eq!(
            mailer.subjects.lock().unwrap().len(),
            3,
            "each mail sent once"
        );
        let saved = CursorStore::new(&state_dir, "test")
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(saved.time, 30);
    }

    #[tokio::test]
    async fn mails_carry_the_user_from_keycloak_and_a_missing_one_costs_only_the_details() {
        let events = vec![
            json!({"id": "e1", "time": 10, "type": "LOGIN_ERROR", "userId": "u-1", "details": {"username": "alice"}}),
            json!({"id": "e2", "time": 20, "type": "LOGIN_ERROR", "userId": "u-gone", "details": {"username": "bob"}}),
        ];
        let server = keycloak_with(events).await;
        Mock::given(method("GET"))
            .and(path("/admin/realms/test/users/u-1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "id": "u-1", "username": "alice", "firstName": "Alice", "lastName": "Liddell",
                "email": "alice@example.test", "enabled": true, "createdTimestamp": 5
            })))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/admin/realms/test/users/u-gone"))
            .respond_with(
                ResponseTemplate::new(404).set_body_json(json!({"error": "User not found"})),
            )
            .mount(&server)
            .await;
        let state = tempfile::tempdir().unwrap();
        let mailer = Recorder::default();
        let mut notifier = notifier(config(&server, state.path()), mailer.clone());
        assert_eq!(
            notifier
                .poll(&CancellationToken::new())
                .await
                .unwrap()
                .mailed,
            2
        );
        let raw = mailer.raw.lock().unwrap();
        assert!(raw[0].contains("Name:       Alice Liddell"), "{}", raw[0]);
        assert!(!raw[1].contains("The user in Keycloak now"), "{}", raw[1]);
    }

    #[tokio::test]
    async fn without_view_users_mails_go_out_without_user_details() {
        let events = vec![
            json!({"id": "e1", "time": 10, "type": "LOGIN_ERROR", "userId": "u-1"}),
            json!({"id": "e2", "time": 20, "type": "LOGIN_ERROR", "userId": "u-2"}),
        ];
        let server = keycloak_with(events).await;
        Mock::given(method("GET"))
            .and(wiremock::matchers::path_regex(
                "^/admin/realms/test/users/.*",
            ))
            .respond_with(ResponseTemplate::new(403))
            .expect(1)
            .mount(&server)
            .await;
        let state = tempfile::tempdir().unwrap();
        let mailer = Recorder::default();
        let mut notifier = notifier(config(&server, state.path()), mailer.clone());
        assert_eq!(
            notifier
                .poll(&CancellationToken::new())
                .await
                .unwrap()
                .mailed,
            2
        );
        // One refused look-up, then no more tries (the mock expects one).
    }

    #[tokio::test]
    async fn excluded_clients_are_skipped_and_routes_pick_the_recipients() {
        let events = vec![
            json!({"id": "e1", "time": 10, "type": "LOGIN_ERROR", "clientId": "ci-bot", "details": {"username": "bot"}}),
            json!({"id": "e2", "time": 20, "type": "LOGIN_ERROR", "clientId": "web", "details": {"username": "bob"}}),
        ];
        let server = keycloak_with(events).await;
        let state = tempfile::tempdir().unwrap();
        let mut config = config(&server, state.path());
        config.exclude_clients = vec!["ci-bot".into()];
        config.routes = vec![crate::config::Route {
            types: vec!["LOGIN_ERROR".into()],
            recipients: vec!["security@example.com".parse().unwrap()],
        }];
        let mailer = Recorder::default();
        let mut notifier = notifier(config, mailer.clone());
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        assert_eq!((summary.mailed, summary.filtered), (1, 1));
        assert_eq!(
            *mailer.subjects.lock().unwrap(),
            ["[Keycloak test] LOGIN_ERROR: bob"]
        );
        let raw = &mailer.raw.lock().unwrap()[0];
        assert!(raw.contains("To: security@example.com"), "{raw}");
        // The skipped event is behind the cursor too.
        assert_eq!(
            CursorStore::new(state.path(), "test")
                .load()
                .unwrap()
                .unwrap()
                .time,
            20
        );
    }

    #[tokio::test]
    async fn a_burst_over_the_threshold_becomes_one_digest_listing_every_event() {
        let server = keycloak_with(events()).await;
        let state = tempfile::tempdir().unwrap();
        let mut config = config(&server, state.path());
        config.digest_threshold = 5;
        let mailer = Recorder::default();
        let mut notifier = notifier(config, mailer.clone());
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        assert_eq!((summary.mailed, summary.digests), (10, 1));
        assert_eq!(
            *mailer.subjects.lock().unwrap(),
            ["[Keycloak test] 10 events: LOGIN_ERROR"]
        );
        let raw = mailer.raw.lock().unwrap()[0].clone();
        for i in 0..10 {
            assert!(
                raw.contains(&format!("LOGIN_ERROR  u{i}")),
                "u{i} missing:\n{raw}"
            );
        }
        assert!(
            raw.contains("Message-ID: <kn-digest.test.e0.10@example.com>"),
            "{raw}"
        );
        let saved = CursorStore::new(state.path(), "test")
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(saved.time, 80, "the cursor moves past every digested event");
        assert_eq!(
            notifier
                .poll(&CancellationToken::new())
                .await
                .unwrap()
                .mailed,
            0
        );
    }

    #[tokio::test]
    async fn over_the_rate_limit_the_rest_of_a_poll_goes_into_a_digest() {
        let server = keycloak_with(events()).await;
        let state = tempfile::tempdir().unwrap();
        let mut config = config(&server, state.path());
        config.rate_limit = 3;
        let mailer = Recorder::default();
        let mut notifier = notifier(config, mailer.clone());
        let summary = notifier.poll(&CancellationToken::new()).await.unwrap();
        assert_eq!((summary.mailed, summary.digests), (10, 1));
        let sent = mailer.subjects.lock().unwrap().clone();
        let mut expected = subjects(0..3);
        expected.push("[Keycloak test] 7 events: LOGIN_ERROR".into());
        assert_eq!(sent, expected);
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

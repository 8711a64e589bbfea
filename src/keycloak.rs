//! The Keycloak admin REST API: the token, readiness and the events pages.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{StatusCode, Url};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Credentials, KeycloakConfig};
use crate::event::{Event, EventDecodeError};
use crate::{retry, tls};

/// Connecting to Keycloak gives up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request (a page of events included) gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A token is renewed this long before it expires (at most half its life).
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(30);
/// At most this much of an error body is quoted in a message.
const MAX_QUOTED_BODY: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum KeycloakError {
    #[error("cannot reach Keycloak at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("Keycloak answered {status} for {url}: {body}")]
    Server {
        status: StatusCode,
        url: String,
        body: String,
    },
    #[error(
        "not found (404) at {url}: {body} (is KEYCLOAK_REALM right, and does the realm exist?)"
    )]
    NotFound { url: String, body: String },
    #[error(
        "Keycloak rejected the credentials of {who} in realm {realm:?} ({status}): {body}; \
         check KEYCLOAK_CLIENT_ID/KEYCLOAK_CLIENT_SECRET or KEYCLOAK_USERNAME/KEYCLOAK_PASSWORD \
         and KEYCLOAK_AUTH_REALM"
    )]
    Rejected {
        who: String,
        realm: String,
        status: StatusCode,
        body: String,
    },
    #[error(
        "Keycloak refused access to {url} (403): the account needs the realm-management \
         role(s) {roles} in realm {realm:?}"
    )]
    Forbidden {
        url: String,
        realm: String,
        roles: &'static str,
    },
    #[error("Keycloak still answered 401 for {url} with a new token: {body}")]
    Unauthorized { url: String, body: String },
    #[error("Keycloak refused the request {url} ({status}): {body}")]
    Refused {
        status: StatusCode,
        url: String,
        body: String,
    },
    #[error("Keycloak sent an unreadable response from {url}: {reason}")]
    Decode { url: String, reason: String },
    #[error("stopped while waiting for Keycloak")]
    Cancelled,
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
}

impl KeycloakError {
    /// Whether trying again later may succeed without anyone changing
    /// anything (an outage, a restart, a realm not imported yet).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KeycloakError::Unreachable { .. }
                | KeycloakError::Server { .. }
                | KeycloakError::NotFound { .. }
                | KeycloakError::Decode { .. }
        )
    }
}

#[derive(Debug)]
struct AccessToken {
    value: String,
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The login, shared by the clients of every watched realm: with a
/// master-realm admin, one token serves them all.
#[derive(Debug)]
struct Auth {
    auth_realm: String,
    credentials: Credentials,
    token: Option<AccessToken>,
    tokens_fetched: u64,
}

/// A client for one Keycloak server and one watched realm.
#[derive(Debug)]
pub struct KeycloakClient {
    http: reqwest::Client,
    base: Url,
    realm: String,
    auth: Arc<Mutex<Auth>>,
}

impl KeycloakClient {
    pub fn new(config: &KeycloakConfig) -> Result<Self, KeycloakError> {
        let setup = |err: &dyn std::error::Error| KeycloakError::Setup(error_chain(err));
        let tls = tls::client_config(&config.extra_roots).map_err(|err| setup(&err))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("keycloak-notifier/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| setup(&err))?;
        Ok(Self {
            http,
            base: config.base_url.clone(),
            realm: config.realm.clone(),
            auth: Arc::new(Mutex::new(Auth {
                auth_realm: config.auth_realm.clone(),
                credentials: config.credentials.clone(),
                token: None,
                tokens_fetched: 0,
            })),
        })
    }

    /// A client for another realm of the same server, sharing this one's
    /// connection pool, base URL and login (its token).
    pub fn for_realm(&self, realm: &str) -> Self {
        Self {
            http: self.http.clone(),
            base: self.base.clone(),
            realm: realm.to_owned(),
            auth: Arc::clone(&self.auth),
        }
    }

    /// The base URL in use (it may have lost or gained a legacy `/auth`).
    pub fn base_url(&self) -> &Url {
        &self.base
    }

    /// Waits until Keycloak hands out a token, with exponential backoff and
    /// jitter and no cap on the tries. Credentials that Keycloak rejects end
    /// the wait with an error: waiting would not fix them.
    pub async fn wait_until_ready(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<(), KeycloakError> {
        let mut delays = retry::backoff();
        for attempt in 1u64.. {
            match self.login_trying_legacy_path().await {
                Ok(()) => {
                    info!(url = %self.base, realm = %self.realm, attempt, "Keycloak is ready");
                    return Ok(());
                }
                Err(err) if err.is_retryable() => {
                    let delay = delays.next().unwrap_or(retry::MAX_DELAY);
                    warn!(
                        attempt,
                        retry_in = %retry::show(delay),
                        error = %err,
                        "Keycloak is not ready yet"
                    );
                    if !retry::sleep_or_stop(delay, shutdown).await {
                        return Err(KeycloakError::Cancelled);
                    }
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the attempt counter does not run out")
    }

    /// Logs in at the configured URL; if that is a 404 and the URL has (or
    /// lacks) the legacy `/auth` path, tries the other form and keeps the
    /// one that works.
    async fn login_trying_legacy_path(&mut self) -> Result<(), KeycloakError> {
        match self.login().await {
            Err(KeycloakError::NotFound { url, body }) => {
                let configured = self.base.clone();
                self.base = toggle_legacy_auth_path(&configured);
                match self.login().await {
                    Ok(()) => {
                        warn!(
                            configured = %configured,
                            using = %self.base,
                            "KEYCLOAK_URL does not match where Keycloak serves its API; \
                             using the other form (set KEYCLOAK_URL to it to silence this)"
                        );
                        Ok(())
                    }
                    Err(_) => {
                        self.base = configured;
                        Err(KeycloakError::NotFound { url, body })
                    }
                }
            }
            other => other,
        }
    }

    /// One login attempt (with the legacy-path fallback), no waiting: for
    /// `once` and `check`.
    pub async fn connect(&mut self) -> Result<(), KeycloakError> {
        self.login_trying_legacy_path().await
    }

    async fn login(&mut self) -> Result<(), KeycloakError> {
        let mut auth = self.auth.lock().await;
        auth.token = Some(self.request_token(&auth).await?);
        auth.tokens_fetched += 1;
        Ok(())
    }

    /// How many access tokens the (shared) login has fetched in all, and
    /// the realm it logs in to.
    pub async fn tokens_fetched(&self) -> (String, u64) {
        let auth = self.auth.lock().await;
        (auth.auth_realm.clone(), auth.tokens_fetched)
    }

    async fn request_token(&self, auth: &Auth) -> Result<AccessToken, KeycloakError> {
        let url = self.url(&[
            "realms",
            &auth.auth_realm,
            "protocol",
            "openid-connect",
            "token",
        ]);
        // Everything goes in the form body, which reqwest URL-encodes, so
        // secrets with `/ = ? + &` arrive intact.
        let form: Vec<(&str, &str)> = match &auth.credentials {
            Credentials::ClientSecret { client_id, secret } => vec![
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret.expose()),
            ],
            Credentials::Password {
                client_id,
                username,
                password,
            } => vec![
                ("grant_type", "password"),
                ("client_id", client_id),
                ("username", username),
                ("password", password.expose()),
            ],
        };
        let started = Instant::now();
        let response = self
            .http
            .post(url.clone())
            .form(&form)
            .send()
            .await
            .map_err(|err| unreachable_error(&url, &err))?;
        let status = response.status();
        if status.is_success() {
            let token: TokenResponse =
                response.json().await.map_err(|err| KeycloakError::Decode {
                    url: url.to_string(),
                    reason: error_chain(&err),
                })?;
            let lifetime = Duration::from_secs(token.expires_in.unwrap_or(60));
            let margin = TOKEN_RENEW_MARGIN.min(lifetime / 2);
            debug!(lifetime_s = lifetime.as_secs(), "got a new access token");
            return Ok(AccessToken {
                value: token.access_token,
                renew_at: started + lifetime - margin,
            });
        }
        let body = quoted_body(response).await;
        Err(match status {
            StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED => KeycloakError::Rejected {
                who: match &auth.credentials {
                    Credentials::ClientSecret { client_id, .. } => format!("client {client_id:?}"),
                    Credentials::Password { username, .. } => format!("user {username:?}"),
                },
                realm: auth.auth_realm.clone(),
                status,
                body,
            },
            other => status_error(other, &url, body, &self.realm, ""),
        })
    }

    /// A valid access token, renewed when it is about to expire.
    async fn token(&self) -> Result<String, KeycloakError> {
        let mut auth = self.auth.lock().await;
        if let Some(token) = &auth.token
            && Instant::now() < token.renew_at
        {
            return Ok(token.value.clone());
        }
        let token = self.request_token(&auth).await?;
        let value = token.value.clone();
        auth.token = Some(token);
        auth.tokens_fetched += 1;
        Ok(value)
    }

    /// Forgets the token if it is still `rejected` (another realm's client
    /// may have renewed it already).
    async fn drop_token(&self, rejected: &str) {
        let mut auth = self.auth.lock().await;
        if auth.token.as_ref().is_some_and(|t| t.value == rejected) {
            auth.token = None;
        }
    }

    /// One page of the realm's events of the given types, oldest first, from
    /// `date_from` (epoch ms, inclusive).
    pub async fn events_page(
        &mut self,
        types: &[String],
        date_from: i64,
        first: u32,
        max: u32,
    ) -> Result<Vec<Event>, KeycloakError> {
        let query = types.iter().map(|t| ("type", t.clone())).collect();
        self.page("events", query, date_from, first, max, Event::parse_page)
            .await
    }

    /// GETs `admin/realms/{realm}/{endpoint}` oldest first from `date_from`,
    /// `first`/`max` apart, and parses the page with `parse`.
    async fn page(
        &mut self,
        endpoint: &str,
        mut query: Vec<(&'static str, String)>,
        date_from: i64,
        first: u32,
        max: u32,
        parse: fn(&serde_json::Value) -> Result<Vec<Event>, EventDecodeError>,
    ) -> Result<Vec<Event>, KeycloakError> {
        let url = self.url(&["admin", "realms", &self.realm, endpoint]);
        query.extend([
            ("direction", "asc".to_owned()),
            ("dateFrom", date_from.to_string()),
            ("first", first.to_string()),
            ("max", max.to_string()),
        ]);
        let body = self.get_json(&url, &query, "view-events").await?;
        parse(&body).map_err(|err| KeycloakError::Decode {
            url: url.to_string(),
            reason: err.to_string(),
        })
    }

    /// One page of the realm's admin events matching `patterns`, oldest
    /// first, from `date_from` (epoch ms, inclusive). The query asks for
    /// the patterns' operations and resources; `first`/`max` page through
    /// what the server returns, and the caller keeps the exact pairs.
    pub async fn admin_events_page(
        &mut self,
        patterns: &[crate::config::AdminEventPattern],
        date_from: i64,
        first: u32,
        max: u32,
    ) -> Result<Vec<Event>, KeycloakError> {
        let mut query: Vec<(&'static str, String)> = Vec::new();
        if patterns.iter().all(|p| p.operation.is_some()) {
            let mut ops: Vec<&String> = patterns
                .iter()
                .filter_map(|p| p.operation.as_ref())
                .collect();
            ops.sort();
            ops.dedup();
            query.extend(ops.into_iter().map(|o| ("operationTypes", o.clone())));
        }
        if patterns.iter().all(|p| p.resource.is_some()) {
            let mut resources: Vec<&String> = patterns
                .iter()
                .filter_map(|p| p.resource.as_ref())
                .collect();
            resources.sort();
            resources.dedup();
            query.extend(resources.into_iter().map(|r| ("resourceTypes", r.clone())));
        }
        self.page(
            "admin-events",
            query,
            date_from,
            first,
            max,
            Event::parse_admin_page,
        )
        .await
    }

    /// The subject (`sub`) of the current access token: the notifier's own
    /// user (its service account), so that its own admin events are not
    /// mailed back. Read from the token's payload, which needs no check
    /// here: Keycloak just issued it over this connection.
    pub async fn own_user_id(&self) -> Option<String> {
        let token = self.token().await.ok()?;
        let payload = token.split('.').nth(1)?;
        let json = base64_url_decode(payload)?;
        let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
        claims.get("sub")?.as_str().map(str::to_owned)
    }

    /// The user with this id as Keycloak holds it now; `None` if it no
    /// longer exists (deleted since the event).
    pub async fn user(&mut self, id: &str) -> Result<Option<UserInfo>, KeycloakError> {
        let url = self.url(&["admin", "realms", &self.realm, "users", id]);
        match self.get_json(&url, &[], "view-users").await {
            Ok(body) => Ok(Some(UserInfo::from_json(&body))),
            Err(KeycloakError::NotFound { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Proves the `view-users` role: asks for one user of the realm.
    pub async fn users_probe(&mut self) -> Result<(), KeycloakError> {
        let url = self.url(&["admin", "realms", &self.realm, "users"]);
        let query = [
            ("max", "1".to_owned()),
            ("briefRepresentation", "true".to_owned()),
        ];
        self.get_json(&url, &query, "view-users").await.map(|_| ())
    }

    /// The realm's event settings (`GET …/events/config`; read only).
    pub async fn events_config(&mut self) -> Result<EventsConfig, KeycloakError> {
        let url = self.url(&["admin", "realms", &self.realm, "events", "config"]);
        let body = self.get_json(&url, &[], "view-events").await?;
        serde_json::from_value(body).map_err(|err| KeycloakError::Decode {
            url: url.to_string(),
            reason: err.to_string(),
        })
    }

    /// GET with the bearer token; on a 401 the token is renewed once.
    async fn get_json(
        &mut self,
        url: &Url,
        query: &[(&str, String)],
        roles: &'static str,
    ) -> Result<serde_json::Value, KeycloakError> {
        let mut renewed = false;
        loop {
            let token = self.token().await?;
            let response = self
                .http
                .get(url.clone())
                .query(query)
                .bearer_auth(&token)
                .send()
                .await
                .map_err(|err| unreachable_error(url, &err))?;
            let status = response.status();
            if status.is_success() {
                return response.json().await.map_err(|err| KeycloakError::Decode {
                    url: url.to_string(),
                    reason: error_chain(&err),
                });
            }
            let body = quoted_body(response).await;
            if status == StatusCode::UNAUTHORIZED {
                if !renewed {
                    debug!(%url, "401 from Keycloak; renewing the token once");
                    self.drop_token(&token).await;
                    renewed = true;
                    continue;
                }
                return Err(KeycloakError::Unauthorized {
                    url: url.to_string(),
                    body,
                });
            }
            return Err(status_error(status, url, body, &self.realm, roles));
        }
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }
}

/// The parts of a `UserRepresentation` a mail shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub username: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    /// Epoch ms (`createdTimestamp`).
    pub created: Option<i64>,
    pub enabled: Option<bool>,
    pub attributes: std::collections::BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    /// Reads a user leniently: any field may be missing or odd.
    pub fn from_json(value: &serde_json::Value) -> Self {
        let text = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        let attributes = value
            .get("attributes")
            .and_then(|a| a.as_object())
            .map(|map| {
                map.iter()
                    .map(|(key, values)| {
                        let values = match values {
                            serde_json::Value::Array(items) => items
                                .iter()
                                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                                .collect(),
                            other => vec![other.to_string()],
                        };
                        (key.clone(), values)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            username: text("username"),
            first_name: text("firstName"),
            last_name: text("lastName"),
            email: text("email"),
            created: value.get("createdTimestamp").and_then(|v| v.as_i64()),
            enabled: value.get("enabled").and_then(|v| v.as_bool()),
            attributes,
        }
    }
}

/// The parts of `RealmEventsConfigRepresentation` the notifier looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EventsConfig {
    #[serde(default)]
    pub events_enabled: bool,
    /// Seconds; absent or 0 means events never expire.
    #[serde(default)]
    pub events_expiration: Option<i64>,
    #[serde(default)]
    pub enabled_event_types: Vec<String>,
    #[serde(default)]
    pub admin_events_enabled: bool,
}

/// The warning when admin events are watched but the realm saves none.
pub fn admin_events_warning(settings: &EventsConfig, watched: bool) -> Option<String> {
    (watched && !settings.admin_events_enabled).then(|| {
        "the realm does not save admin events (Realm settings → Events → Admin events \
         settings), so NOTIFIER_ADMIN_EVENTS never sees any"
            .to_owned()
    })
}

/// What in the realm's event settings would make mails go missing.
pub fn event_settings_warnings(
    settings: &EventsConfig,
    watched: &[String],
    cursor_since_ms: i64,
    now_ms: i64,
) -> Vec<String> {
    let mut warnings = Vec::new();
    if !settings.events_enabled {
        warnings.push(
            "the realm does not save events (Realm settings → Events → User events settings → \
             Save events is off): no new event will be seen"
                .to_owned(),
        );
    }
    // Keycloak fills an empty list with every type it saves by default.
    let not_saved: Vec<&str> = watched
        .iter()
        .filter(|t| {
            !settings.enabled_event_types.is_empty() && !settings.enabled_event_types.contains(t)
        })
        .map(String::as_str)
        .collect();
    if !not_saved.is_empty() {
        warnings.push(format!(
            "the realm does not save these watched event types, so they are never mailed: {}",
            not_saved.join(", ")
        ));
    }
    if let Some(expiration) = settings
        .events_expiration
        .filter(|s| (1..86_400).contains(s))
    {
        warnings.push(format!(
            "the realm deletes events after {}, less than a day: if the notifier is down \
             longer, events expire unseen",
            humantime::format_duration(Duration::from_secs(expiration.unsigned_abs()))
        ));
    }
    if let Some(expiration) = settings.events_expiration.filter(|s| *s > 0) {
        let behind_ms = now_ms.saturating_sub(cursor_since_ms);
        if behind_ms > expiration.saturating_mul(1000) {
            warnings.push(format!(
                "the realm deletes events after {}, and the notifier's cursor is {} behind: \
                 events may have expired unseen",
                humantime::format_duration(Duration::from_secs(expiration.unsigned_abs())),
                humantime::format_duration(Duration::from_secs((behind_ms / 1000).unsigned_abs()))
            ));
        }
    }
    warnings
}

fn status_error(
    status: StatusCode,
    url: &Url,
    body: String,
    realm: &str,
    roles: &'static str,
) -> KeycloakError {
    let url = url.to_string();
    match status {
        StatusCode::NOT_FOUND => KeycloakError::NotFound { url, body },
        StatusCode::FORBIDDEN => KeycloakError::Forbidden {
            url,
            realm: realm.to_owned(),
            roles,
        },
        s if s.is_server_error() => KeycloakError::Server { status, url, body },
        _ => KeycloakError::Refused { status, url, body },
    }
}

fn unreachable_error(url: &Url, err: &reqwest::Error) -> KeycloakError {
    KeycloakError::Unreachable {
        url: url.to_string(),
        reason: error_chain(err),
    }
}

/// An error and its causes on one line ("error sending request: … :
/// Connection refused").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// The start of an error response's body, on one line.
async fn quoted_body(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    let mut line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_QUOTED_BODY)
        .collect();
    if text.chars().count() > MAX_QUOTED_BODY {
        line.push('…');
    }
    if line.trim().is_empty() {
        "(empty body)".into()
    } else {
        line
    }
}

/// Decodes unpadded base64url (a JWT part).
fn base64_url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut buffer = 0u32;
    let mut bits = 0;
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            b'=' => continue,
            _ => return None,
        };
        buffer = (buffer << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buffer >> bits) as u8);
        }
    }
    Some(out)
}

/// `https://kc/auth` ↔ `https://kc`: Keycloak 17+ serves at the root unless
/// its `http-relative-path` says otherwise; older ones served under `/auth`.
pub fn toggle_legacy_auth_path(base: &Url) -> Url {
    let mut other = base.clone();
    let path = base.path().trim_end_matches('/');
    match path.strip_suffix("/auth") {
        Some(rest) => other.set_path(rest),
        None => other.set_path(&format!("{path}/auth")),
    }
    other
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use wiremock::matchers::{body_string_contains, header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    fn config(base: &str, credentials: Credentials) -> KeycloakConfig {
        KeycloakConfig {
            base_url: crate::config::parse_base_url(base).unwrap(),
            realm: "test".into(),
            realms: vec!["test".into()],
            auth_realm: "test".into(),
            credentials,
            extra_roots: Vec::new(),
        }
    }

    fn client_secret(secret: &str) -> Credentials {
        Credentials::ClientSecret {
            client_id: "notifier".into(),
            secret: Secret::new(secret),
        }
    }

    fn token_ok(token: &str) -> ResponseTemplate {
        ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({"access_token": token, "expires_in": 300}))
    }

    #[test]
    fn watched_admin_events_need_the_realm_to_save_them() {
        let off = EventsConfig::default();
        assert!(
            admin_events_warning(&off, true)
                .unwrap()
                .contains("does not save admin events")
        );
        assert_eq!(admin_events_warning(&off, false), None);
        let on = EventsConfig {
            admin_events_enabled: true,
            ..EventsConfig::default()
        };
        assert_eq!(admin_events_warning(&on, true), None);
    }

    #[test]
    fn event_settings_that_lose_mails_are_warned_about() {
        let watched = vec!["REGISTER".to_owned(), "LOGIN_ERROR".to_owned()];
        let fine = EventsConfig {
            events_enabled: true,
            events_expiration: None,
            enabled_event_types: vec!["REGISTER".into(), "LOGIN_ERROR".into(), "LOGIN".into()],
            admin_events_enabled: false,
        };
        assert!(event_settings_warnings(&fine, &watched, 0, 10_000_000).is_empty());
        let default_types = EventsConfig {
            enabled_event_types: Vec::new(),
            ..fine.clone()
        };
        assert!(event_settings_warnings(&default_types, &watched, 0, 1).is_empty());

        let off = EventsConfig {
            events_enabled: false,
            ..fine.clone()
        };
        assert!(event_settings_warnings(&off, &watched, 0, 1)[0].contains("does not save events"));
        let missing = EventsConfig {
            enabled_event_types: vec!["REGISTER".into()],
            ..fine.clone()
        };
        assert!(event_settings_warnings(&missing, &watched, 0, 1)[0].ends_with(": LOGIN_ERROR"));

        let one_day = EventsConfig {
            events_expiration: Some(86_400),
            ..fine
        };
        let now = 10 * 86_400_000;
        assert!(event_settings_warnings(&one_day, &watched, now - 3_600_000, now).is_empty());
        let one_hour = EventsConfig {
            events_expiration: Some(3_600),
            ..one_day.clone()
        };
        let short = event_settings_warnings(&one_hour, &watched, now, now);
        assert!(short[0].contains("less than a day"), "{short:?}");
        let late = event_settings_warnings(&one_day, &watched, now - 2 * 86_400_000, now);
        assert_eq!(late.len(), 1);
        assert!(
            late[0].contains("1day") && late[0].contains("2days"),
            "{}",
            late[0]
        );
        assert!(late[0].contains("expired unseen"), "{}", late[0]);
    }

    #[test]
    fn jwt_parts_decode() {
        // {"sub":"a-b"} in base64url without padding.
        assert_eq!(
            base64_url_decode("eyJzdWIiOiJhLWIifQ").unwrap(),
            br#"{"sub":"a-b"}"#
        );
        assert_eq!(base64_url_decode("not*base64"), None);
    }

    #[test]
    fn the_legacy_auth_path_toggles_both_ways() {
        let with = Url::parse("https://kc.example.com/auth").unwrap();
        let without = Url::parse("https://kc.example.com/").unwrap();
        assert_eq!(
            toggle_legacy_auth_path(&with).as_str(),
            "https://kc.example.com/"
        );
        assert_eq!(
            toggle_legacy_auth_path(&without).as_str(),
            "https://kc.example.com/auth"
        );
        let nested = Url::parse("https://example.com/sso").unwrap();
        assert_eq!(
            toggle_legacy_auth_path(&nested).as_str(),
            "https://example.com/sso/auth"
        );
    }

    #[tokio::test]
    async fn the_client_secret_is_form_encoded_and_events_are_asked_for_in_order() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/realms/test/protocol/openid-connect/token"))
            .and(body_string_contains("grant_type=client_credentials"))
            .and(body_string_contains("client_secret=a%2Fb%3Dc%3Fd%2Be%26f"))
            .respond_with(token_ok("tok-1"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/admin/realms/test/events"))
            .and(header("authorization", "Bearer tok-1"))
            .and(query_param("direction", "asc"))
            .and(query_param("dateFrom", "1234"))
            .and(query_param("first", "200"))
            .and(query_param("max", "100"))
            .and(query_param("type", "LOGIN_ERROR"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!([
                {"id": "e1", "time": 1234, "type": "REGISTER"}
            ])))
            .expect(1)
            .mount(&server)
            .await;
        let mut client =
            KeycloakClient::new(&config(&server.uri(), client_secret("a/b=c?d+e&f"))).unwrap();
        let page = client
            .events_page(&["REGISTER".into(), "LOGIN_ERROR".into()], 1234, 200, 100)
            .await
            .unwrap();
        assert_eq!(page[0].id.as_deref(), Some("e1"));
        let requests = server.received_requests().await.unwrap();
        let query = requests[1].url.query().unwrap();
        assert!(query.contains("type=REGISTER&type=LOGIN_ERROR"), "{query}");
    }

    #[tokio::test]
    async fn a_401_renews_the_token_once_then_retries() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(token_ok("tok"))
            .expect(2)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(401))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!([])))
            .mount(&server)
            .await;
        let mut client = KeycloakClient::new(&config(&server.uri(), client_secret("s"))).unwrap();
        assert!(
            client
                .events_page(&["REGISTER".into()], 0, 0, 10)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn a_403_names_the_missing_role() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(token_ok("tok"))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(403))
            .mount(&server)
            .await;
        let mut client = KeycloakClient::new(&config(&server.uri(), client_secret("s"))).unwrap();
        let err = client
            .events_page(&["REGISTER".into()], 0, 0, 10)
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("view-events"), "{err}");
    }

    #[tokio::test]
    async fn a_400_is_a_clear_error_quoting_keycloak() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(token_ok("tok"))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(400).set_body_json(serde_json::json!({
                "error": "Invalid value for sortDirection, expected value is asc or desc"
            })))
            .mount(&server)
            .await;
        let mut client = KeycloakClient::new(&config(&server.uri(), client_secret("s"))).unwrap();
        let err = client
            .events_page(&["REGISTER".into()], 0, 0, 10)
            .await
            .unwrap_err();
        assert!(!err.is_retryable());
        let text = err.to_string();
        assert!(text.starts_with("Keycloak refused the request"), "{text}");
        assert!(text.contains("(400 Bad Request)"), "{text}");
        assert!(text.contains("expected value is asc or desc"), "{text}");
    }

    #[tokio::test]
    async fn rejected_credentials_stop_the_wait_without_showing_the_secret() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
                "error": "unauthorized_client",
                "error_description": "Invalid client or Invalid client credentials"
            })))
            .mount(&server)
            .await;
        let mut client =
            KeycloakClient::new(&config(&server.uri(), client_secret("hunter2"))).unwrap();
        let err = client
            .wait_until_ready(&CancellationToken::new())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("Invalid client credentials"), "{text}");
        assert!(text.contains("KEYCLOAK_CLIENT_SECRET"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[tokio::test]
    async fn a_legacy_auth_path_is_dropped_when_keycloak_serves_at_the_root() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/realms/test/protocol/openid-connect/token"))
            .respond_with(token_ok("tok"))
            .mount(&server)
            .await;
        let mut client = KeycloakClient::new(&config(
            &format!("{}/auth/", server.uri()),
            client_secret("s"),
        ))
        .unwrap();
        client
            .wait_until_ready(&CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(client.base_url().path(), "/");
    }

    #[tokio::test]
    async fn the_password_grant_uses_admin_cli_like_the_original_script() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(body_string_contains("grant_type=password"))
            .and(body_string_contains("client_id=admin-cli"))
            .and(body_string_contains("username=admin"))
            .and(body_string_contains("password=p%26w"))
            .respond_with(token_ok("tok"))
            .expect(1)
            .mount(&server)
            .await;
        let mut client = KeycloakClient::new(&config(
            &server.uri(),
            Credentials::Password {
                client_id: "admin-cli".into(),
                username: "admin".into(),
                password: Secret::new("p&w"),
            },
        ))
        .unwrap();
        client
            .wait_until_ready(&CancellationToken::new())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_server_error_while_starting_is_retried_until_it_answers() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(token_ok("tok"))
            .mount(&server)
            .await;
        let mut client = KeycloakClient::new(&config(&server.uri(), client_secret("s"))).unwrap();
        client
            .wait_until_ready(&CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(server.received_requests().await.unwrap().len(), 2);
    }
}

//! Configuration: environment variables read with envy, then validated.
//!
//! Every variable is read as an optional string so that one bad value never
//! hides the others: [`Config::from_vars`] collects every problem and reports
//! them together, each naming its variable.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use lettre::message::Mailbox;
use reqwest::Url;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::event_types::KNOWN_EVENT_TYPES;

/// The prefixes of the variables this program reads.
pub const VAR_PREFIXES: [&str; 3] = ["KEYCLOAK_", "SMTP_", "NOTIFIER_"];

const DEFAULT_EVENT_TYPES: &str = "REGISTER";
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(30);
const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);
pub const DEFAULT_STATE_DIR: &str = "/data";
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// The public client Keycloak creates in every realm for admin tools; the
/// password grant uses it unless told otherwise, as the original script did.
const DEFAULT_PASSWORD_CLIENT: &str = "admin-cli";

/// A secret value. Its `Debug` and `Display` never show the value, so a
/// secret cannot reach a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the notifier logs in to Keycloak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// OAuth client credentials of a confidential client with a service
    /// account (recommended).
    ClientSecret { client_id: String, secret: Secret },
    /// The resource-owner password grant of a user, as the original script did.
    Password {
        client_id: String,
        username: String,
        password: Secret,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeycloakConfig {
    /// The server's base URL without a trailing slash, as given (a legacy
    /// `/auth` suffix is kept; the client tries without it if needed).
    pub base_url: Url,
    /// The realm whose events are watched (the first of `realms`; see
    /// [`Config::for_realm`]).
    pub realm: String,
    /// Every watched realm (`KEYCLOAK_REALM`, a comma list).
    pub realms: Vec<String>,
    /// The realm the credentials belong to.
    pub auth_realm: String,
    pub credentials: Credentials,
    /// Extra trusted CAs (`KEYCLOAK_CA_FILE`), beside the bundled roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain connection upgraded with STARTTLS, which must succeed.
    StartTls,
    /// TLS from the first byte (SMTPS, usually port 465).
    Tls,
    /// No encryption at all.
    None,
}

impl fmt::Display for SmtpSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SmtpSecurity::StartTls => "starttls",
            SmtpSecurity::Tls => "tls",
            SmtpSecurity::None => "none",
        })
    }
}

impl fmt::Display for StartFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartFrom::Now => f.write_str("now"),
            StartFrom::Beginning => f.write_str("beginning"),
            StartFrom::At(at) => write!(
                f,
                "{}",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            StartFrom::Ago(ago) => write!(f, "{} ago", humantime::format_duration(*ago)),
        }
    }
}

impl SmtpSecurity {
    pub fn default_port(self) -> u16 {
        match self {
            SmtpSecurity::StartTls => 587,
            SmtpSecurity::Tls => 465,
            SmtpSecurity::None => 25,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpCredentials {
    pub username: String,
    pub password: Secret,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub sender: Mailbox,
    pub recipients: Vec<Mailbox>,
    /// `None` when no password is set: then no AUTH is attempted.
    pub credentials: Option<SmtpCredentials>,
    /// Extra trusted CAs (`SMTP_CA_FILE`), beside the bundled roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

/// Where the first run starts reading events, when there is no cursor yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// Only events that happen after the first start.
    Now,
    /// Every event Keycloak still stores.
    Beginning,
    /// Events from this moment on.
    At(DateTime<Utc>),
    /// Events from this long before the first start.
    Ago(Duration),
}

impl StartFrom {
    /// The cursor time (epoch milliseconds) this setting means at `now`.
    pub fn resolve(self, now: DateTime<Utc>) -> i64 {
        match self {
            StartFrom::Now => now.timestamp_millis(),
            StartFrom::Beginning => 0,
            StartFrom::At(at) => at.timestamp_millis(),
            StartFrom::Ago(ago) => {
                let ago_ms = i64::try_from(ago.as_millis()).unwrap_or(i64::MAX);
                now.timestamp_millis().saturating_sub(ago_ms).max(0)
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub keycloak: KeycloakConfig,
    pub smtp: SmtpConfig,
    /// Keycloak event type names, upper case, without duplicates.
    pub event_types: Vec<String>,
    pub poll_interval: Duration,
    pub state_dir: PathBuf,
    pub start_from: StartFrom,
    pub page_size: u32,
    /// `NOTIFIER_DIGEST_THRESHOLD`: more new events than this in one poll go
    /// into one digest (0: never).
    pub digest_threshold: usize,
    /// `NOTIFIER_RATE_LIMIT`: at most this many mails a minute, the rest in a
    /// digest (0: no limit).
    pub rate_limit: usize,
    /// `NOTIFIER_ADMIN_EVENTS`: which admin events are mailed (none if empty).
    pub admin_events: Vec<AdminEventPattern>,
    /// `NOTIFIER_ROUTES`: recipients per event type, before `SMTP_RECEIVER`.
    pub routes: Vec<Route>,
    /// `NOTIFIER_INCLUDE_CLIENTS`: if not empty, only events of these clients.
    pub include_clients: Vec<String>,
    /// `NOTIFIER_EXCLUDE_CLIENTS`: never events of these clients.
    pub exclude_clients: Vec<String>,
    /// `NOTIFIER_TEMPLATE_DIR`: mail templates that replace the built-in ones.
    pub template_dir: Option<PathBuf>,
    /// `NOTIFIER_TIME_ZONE`: mails show times in this zone, UTC beside them.
    pub time_zone: chrono_tz::Tz,
    /// `NOTIFIER_HTTP_ADDR`: where /healthz, /readyz and /metrics are served.
    pub http_addr: Option<std::net::SocketAddr>,
    pub log_format: LogFormat,
    /// `NOTIFIER_LOG_LEVEL`; `RUST_LOG`, when set, wins.
    pub log_level: Option<String>,
    /// Variables with one of our prefixes that the notifier does not know
    /// (typos, mostly), each with the known name it probably meant.
    pub unknown_vars: Vec<(String, Option<&'static str>)>,
}

/// `RESOURCE:OPERATION` of admin events to mail; `None` matches any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminEventPattern {
    pub resource: Option<String>,
    pub operation: Option<String>,
}

impl AdminEventPattern {
    pub fn matches(&self, resource: &str, operation: &str) -> bool {
        self.resource.as_deref().is_none_or(|r| r == resource)
            && self.operation.as_deref().is_none_or(|o| o == operation)
    }
}

/// Keycloak's admin event operation types.
pub const ADMIN_OPERATIONS: [&str; 4] = ["CREATE", "UPDATE", "DELETE", "ACTION"];

/// Mails of these event types go to these recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub types: Vec<String>,
    pub recipients: Vec<Mailbox>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// One configuration problem, naming the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub var: String,
    pub message: String,
}

/// Every problem found in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(f, "  {}: {}", problem.var, problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every variable the notifier reads (besides `RUST_LOG`).
pub const KNOWN_VARS: &[&str] = &[
    "KEYCLOAK_URL",
    "KEYCLOAK_REALM",
    "KEYCLOAK_AUTH_REALM",
    "KEYCLOAK_CLIENT_ID",
    "KEYCLOAK_CLIENT_SECRET",
    "KEYCLOAK_CLIENT_SECRET_FILE",
    "KEYCLOAK_USERNAME",
    "KEYCLOAK_PASSWORD",
    "KEYCLOAK_PASSWORD_FILE",
    "KEYCLOAK_CA_FILE",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_SECURITY",
    "SMTP_SENDER",
    "SMTP_RECEIVER",
    "SMTP_USERNAME",
    "SMTP_PASSWORD",
    "SMTP_PASSWORD_FILE",
    "SMTP_CA_FILE",
    "NOTIFIER_EVENT_TYPES",
    "NOTIFIER_POLL_INTERVAL",
    "NOTIFIER_STATE_DIR",
    "NOTIFIER_START_FROM",
    "NOTIFIER_PAGE_SIZE",
    "NOTIFIER_LOG_FORMAT",
    "NOTIFIER_LOG_LEVEL",
    "NOTIFIER_HTTP_ADDR",
    "NOTIFIER_TIME_ZONE",
    "NOTIFIER_TEMPLATE_DIR",
    "NOTIFIER_ROUTES",
    "NOTIFIER_INCLUDE_CLIENTS",
    "NOTIFIER_EXCLUDE_CLIENTS",
    "NOTIFIER_ADMIN_EVENTS",
    "NOTIFIER_DIGEST_THRESHOLD",
    "NOTIFIER_RATE_LIMIT",
];

/// The variables as envy reads them: all optional strings, validated later.
#[derive(Debug, Default, Deserialize, Serialize)]
struct RawEnv {
    keycloak_url: Option<String>,
    keycloak_realm: Option<String>,
    keycloak_auth_realm: Option<String>,
    keycloak_client_id: Option<String>,
    keycloak_client_secret: Option<String>,
    keycloak_client_secret_file: Option<String>,
    keycloak_username: Option<String>,
    keycloak_password: Option<String>,
    keycloak_password_file: Option<String>,
    keycloak_ca_file: Option<String>,
    smtp_host: Option<String>,
    smtp_port: Option<String>,
    smtp_security: Option<String>,
    smtp_sender: Option<String>,
    smtp_receiver: Option<String>,
    smtp_username: Option<String>,
    smtp_password: Option<String>,
    smtp_password_file: Option<String>,
    smtp_ca_file: Option<String>,
    notifier_event_types: Option<String>,
    notifier_poll_interval: Option<String>,
    notifier_state_dir: Option<String>,
    notifier_start_from: Option<String>,
    notifier_page_size: Option<String>,
    notifier_log_format: Option<String>,
    notifier_log_level: Option<String>,
    notifier_http_addr: Option<String>,
    notifier_time_zone: Option<String>,
    notifier_template_dir: Option<String>,
    notifier_routes: Option<String>,
    notifier_include_clients: Option<String>,
    notifier_exclude_clients: Option<String>,
    notifier_admin_events: Option<String>,
    notifier_digest_threshold: Option<String>,
    notifier_rate_limit: Option<String>,
}

impl Config {
    /// Reads and validates the process environment.
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_vars(std::env::vars_os())
    }

    /// Reads and validates the given variables (the environment, in tests).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let mut unknown = Vec::new();
        let mut ours = BTreeMap::new();
        for (key, value) in vars {
            let Some(key) = key.to_str().map(str::to_owned) else {
                continue;
            };
            if !VAR_PREFIXES.iter().any(|p| key.starts_with(p)) {
                continue;
            }
            if !KNOWN_VARS.contains(&key.as_str()) {
                unknown.push((key.clone(), closest_known(&key)));
            }
            match value.into_string() {
                // An empty value counts as unset, as `VAR=` in an env file means.
                Ok(value) if value.trim().is_empty() => {}
                Ok(value) => {
                    ours.insert(key, value);
                }
                Err(_) => problems.push(Problem {
                    var: key,
                    message: "is not valid UTF-8".into(),
                }),
            }
        }
        let raw: RawEnv = match envy::from_iter(ours) {
            Ok(raw) => raw,
            // Every field is an optional string, so this cannot happen; report
            // it rather than panic if it ever does.
            Err(err) => {
                problems.push(Problem {
                    var: "environment".into(),
                    message: err.to_string(),
                });
                RawEnv::default()
            }
        };
        let mut v = Validator { problems };
        let config = v.config(raw);
        match config {
            Some(mut config) if v.problems.is_empty() => {
                unknown.sort();
                config.unknown_vars = unknown;
                Ok(config)
            }
            _ => Err(ConfigError {
                problems: v
                    .problems
                    .into_iter()
                    .chain(unknown.into_iter().map(|(var, meant)| Problem {
                        message: match meant {
                            Some(meant) => {
                                format!("is not a setting of the notifier; did you mean {meant}?")
                            }
                            None => "is not a setting of the notifier".into(),
                        },
                        var,
                    }))
                    .collect(),
            }),
        }
    }

    /// Who gets the mail of an event of `event_type`: the first route that
    /// names the type, else `SMTP_RECEIVER`.
    pub fn recipients_for(&self, event_type: &str) -> &[Mailbox] {
        self.routes
            .iter()
            .find(|route| route.types.iter().any(|t| t == event_type))
            .map_or(&self.smtp.recipients[..], |route| &route.recipients[..])
    }

    /// Whether events of `client` (Keycloak's clientId) are mailed.
    pub fn wants_client(&self, client: Option<&str>) -> bool {
        let included = self.include_clients.is_empty()
            || client.is_some_and(|c| self.include_clients.iter().any(|i| i == c));
        let excluded = client.is_some_and(|c| self.exclude_clients.iter().any(|e| e == c));
        included && !excluded
    }

    /// This configuration for one of its watched realms.
    pub fn for_realm(&self, realm: &str) -> Config {
        let mut config = self.clone();
        config.keycloak.realm = realm.to_owned();
        config.keycloak.realms = vec![realm.to_owned()];
        config
    }

    /// The configuration as a readable list, secrets redacted.
    pub fn redacted_summary(&self) -> String {
        let auth = match &self.keycloak.credentials {
            Credentials::ClientSecret { client_id, .. } => {
                format!("client credentials of client {client_id:?} (secret redacted)")
            }
            Credentials::Password {
                client_id,
                username,
                ..
            } => format!(
                "password of user {username:?} via client {client_id:?} (password redacted)"
            ),
        };
        let smtp_auth = match &self.smtp.credentials {
            Some(c) => format!("as {:?} (password redacted)", c.username),
            None => "none".into(),
        };
        format!(
            "keycloak={} realms={} auth_realm={} auth=[{}] event_types={} poll_interval={} \
             state_dir={} start_from={} page_size={} time_zone={} http={} smtp={}:{} security={} \
             smtp_auth={} sender={} recipients={}",
            self.keycloak.base_url,
            self.keycloak.realms.join(","),
            self.keycloak.auth_realm,
            auth,
            self.event_types.join(","),
            humantime::format_duration(self.poll_interval),
            self.state_dir.display(),
            self.start_from,
            self.page_size,
            self.time_zone,
            self.http_addr
                .map_or_else(|| "off".to_owned(), |a| a.to_string()),
            self.smtp.host,
            self.smtp.port,
            self.smtp.security,
            smtp_auth,
            self.smtp.sender,
            self.smtp
                .recipients
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        )
    }
}

struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn problem(&mut self, var: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            var: var.to_owned(),
            message: message.into(),
        });
    }

    fn required(&mut self, var: &'static str, value: Option<String>) -> Option<String> {
        let value = value.map(|v| v.trim().to_owned());
        if value.is_none() {
            self.problem(var, "must be set");
        }
        value
    }

    fn config(&mut self, mut raw: RawEnv) -> Option<Config> {
        raw.keycloak_client_secret = self.secret(
            "KEYCLOAK_CLIENT_SECRET",
            raw.keycloak_client_secret.take(),
            raw.keycloak_client_secret_file.as_deref(),
        );
        raw.keycloak_password = self.secret(
            "KEYCLOAK_PASSWORD",
            raw.keycloak_password.take(),
            raw.keycloak_password_file.as_deref(),
        );
        raw.smtp_password = self.secret(
            "SMTP_PASSWORD",
            raw.smtp_password.take(),
            raw.smtp_password_file.as_deref(),
        );
        let keycloak = self.keycloak(&raw);
        let smtp = self.smtp(&raw);
        let event_types = self.event_types(raw.notifier_event_types.as_deref());
        let poll_interval = self.poll_interval(raw.notifier_poll_interval.as_deref());
        let state_dir = PathBuf::from(
            raw.notifier_state_dir
                .as_deref()
                .map(str::trim)
                .unwrap_or(DEFAULT_STATE_DIR),
        );
        let start_from = self.start_from(raw.notifier_start_from.as_deref());
        let page_size = self.page_size(raw.notifier_page_size.as_deref());
        let routes = self.routes(raw.notifier_routes.as_deref());
        let admin_events = self.admin_events(raw.notifier_admin_events.as_deref());
        let digest_threshold = self.count(
            "NOTIFIER_DIGEST_THRESHOLD",
            raw.notifier_digest_threshold.as_deref(),
        );
        let rate_limit = self.count("NOTIFIER_RATE_LIMIT", raw.notifier_rate_limit.as_deref());
        let list = |value: &Option<String>| -> Vec<String> {
            value
                .as_deref()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let include_clients = list(&raw.notifier_include_clients);
        let exclude_clients = list(&raw.notifier_exclude_clients);
        let time_zone = match raw.notifier_time_zone.as_deref().map(str::trim) {
            None => Some(chrono_tz::Tz::UTC),
            Some(zone) => match zone.parse::<chrono_tz::Tz>() {
                Ok(zone) => Some(zone),
                Err(_) => {
                    self.problem(
                        "NOTIFIER_TIME_ZONE",
                        format!("{zone:?} is not an IANA time zone such as Europe/Berlin or UTC"),
                    );
                    None
                }
            },
        };
        let http_addr = match raw.notifier_http_addr.as_deref().map(str::trim) {
            None => Some(None),
            Some(addr) => match addr.parse::<std::net::SocketAddr>() {
                Ok(addr) => Some(Some(addr)),
                Err(_) => {
                    self.problem(
                        "NOTIFIER_HTTP_ADDR",
                        format!("{addr:?} is not an address and port such as 0.0.0.0:8080"),
                    );
                    None
                }
            },
        };
        let log_format = match raw.notifier_log_format.as_deref().map(str::trim) {
            None => Some(LogFormat::Text),
            Some(f) if f.eq_ignore_ascii_case("text") => Some(LogFormat::Text),
            Some(f) if f.eq_ignore_ascii_case("json") => Some(LogFormat::Json),
            Some(f) => {
                self.problem("NOTIFIER_LOG_FORMAT", format!("{f:?} is not text or json"));
                None
            }
        };
        let log_level = match raw.notifier_log_level.as_deref().map(str::trim) {
            None => Some(None),
            Some(l) if LOG_LEVELS.contains(&l.to_ascii_lowercase().as_str()) => {
                Some(Some(l.to_ascii_lowercase()))
            }
            Some(l) => {
                self.problem(
                    "NOTIFIER_LOG_LEVEL",
                    format!("{l:?} is not one of {}", LOG_LEVELS.join(", ")),
                );
                None
            }
        };
        Some(Config {
            keycloak: keycloak?,
            smtp: smtp?,
            event_types: event_types?,
            poll_interval: poll_interval?,
            state_dir,
            start_from: start_from?,
            page_size: page_size?,
            digest_threshold: digest_threshold?,
            rate_limit: rate_limit?,
            admin_events: admin_events?,
            routes: routes?,
            include_clients,
            exclude_clients,
            template_dir: raw
                .notifier_template_dir
                .as_deref()
                .map(|dir| PathBuf::from(dir.trim())),
            time_zone: time_zone?,
            http_addr: http_addr?,
            log_format: log_format?,
            log_level: log_level?,
            unknown_vars: Vec::new(),
        })
    }

    /// A secret from `VAR` or from the file named by `VAR_FILE` (one trailing
    /// newline trimmed, as editors and `echo` leave one), never both.
    fn secret(&mut self, var: &str, value: Option<String>, file: Option<&str>) -> Option<String> {
        let Some(file) = file else {
            return value;
        };
        let file_var = format!("{var}_FILE");
        if value.is_some() {
            self.problem(
                &file_var,
                format!("is set together with {var}; set only one of them"),
            );
            return None;
        }
        match std::fs::read_to_string(file.trim()) {
            Ok(text) => {
                let text = text.strip_suffix('\n').unwrap_or(&text);
                let text = text.strip_suffix('\r').unwrap_or(text);
                if text.is_empty() {
                    self.problem(&file_var, format!("the file {file:?} is empty"));
                    return None;
                }
                Some(text.to_owned())
            }
            Err(err) => {
                self.problem(&file_var, format!("cannot read {file:?}: {err}"));
                None
            }
        }
    }

    /// The certificates of a PEM bundle named by `var`.
    fn ca_file(&mut self, var: &str, file: Option<&str>) -> Option<Vec<CertificateDer<'static>>> {
        let Some(file) = file.map(str::trim) else {
            return Some(Vec::new());
        };
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(err) => {
                self.problem(var, format!("cannot read {file:?}: {err}"));
                return None;
            }
        };
        match CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>() {
            Ok(certs) if !certs.is_empty() => Some(certs),
            Ok(_) => {
                self.problem(var, format!("{file:?} holds no PEM certificate"));
                None
            }
            Err(err) => {
                self.problem(
                    var,
                    format!("{file:?} is not a PEM certificate bundle: {err}"),
                );
                None
            }
        }
    }

    fn keycloak(&mut self, raw: &RawEnv) -> Option<KeycloakConfig> {
        let base_url = self
            .required("KEYCLOAK_URL", raw.keycloak_url.clone())
            .and_then(|url| match parse_base_url(&url) {
                Ok(url) => Some(url),
                Err(message) => {
                    self.problem("KEYCLOAK_URL", message);
                    None
                }
            });
        let realms = self
            .required("KEYCLOAK_REALM", raw.keycloak_realm.clone())
            .and_then(|list| {
                let mut realms: Vec<String> = Vec::new();
                let mut ok = true;
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    match self.realm_name("KEYCLOAK_REALM", name.to_owned()) {
                        Some(name) if !realms.contains(&name) => realms.push(name),
                        Some(_) => {}
                        None => ok = false,
                    }
                }
                if ok && realms.is_empty() {
                    self.problem("KEYCLOAK_REALM", "lists no realm");
                }
                (ok && !realms.is_empty()).then_some(realms)
            });
        let auth_realm = match (raw.keycloak_auth_realm.clone(), &realms) {
            (Some(r), _) => self.realm_name("KEYCLOAK_AUTH_REALM", r.trim().to_owned()),
            (None, Some(realms)) if realms.len() == 1 => Some(realms[0].clone()),
            (None, Some(_)) => {
                self.problem(
                    "KEYCLOAK_AUTH_REALM",
                    "must be set when KEYCLOAK_REALM lists several realms (usually master, \
                     with the credentials of a master-realm admin)",
                );
                None
            }
            (None, None) => None,
        };
        let realm = realms.as_ref().map(|r| r[0].clone());
        let credentials = self.credentials(raw);
        let extra_roots = self.ca_file("KEYCLOAK_CA_FILE", raw.keycloak_ca_file.as_deref());
        Some(KeycloakConfig {
            base_url: base_url?,
            realm: realm?,
            realms: realms?,
            auth_realm: auth_realm?,
            credentials: credentials?,
            extra_roots: extra_roots?,
        })
    }

    fn realm_name(&mut self, var: &'static str, realm: String) -> Option<String> {
        if realm.contains('/') || realm.chars().any(char::is_control) {
            self.problem(var, format!("{realm:?} is not a realm name"));
            return None;
        }
        Some(realm)
    }

    fn credentials(&mut self, raw: &RawEnv) -> Option<Credentials> {
        let client_id = raw.keycloak_client_id.as_deref().map(str::trim);
        // Secrets are taken as given: a space may be part of them.
        let secret = raw.keycloak_client_secret.clone();
        let username = raw.keycloak_username.as_deref().map(str::trim);
        let password = raw.keycloak_password.clone();
        match (secret, username, password) {
            (Some(secret), None, None) => match client_id {
                Some(client_id) => Some(Credentials::ClientSecret {
                    client_id: client_id.to_owned(),
                    secret: Secret::new(secret),
                }),
                None => {
                    self.problem(
                        "KEYCLOAK_CLIENT_ID",
                        "must be set when KEYCLOAK_CLIENT_SECRET is set",
                    );
                    None
                }
            },
            (Some(_), _, _) => {
                self.problem(
                    "KEYCLOAK_CLIENT_SECRET",
                    "is set together with KEYCLOAK_USERNAME/KEYCLOAK_PASSWORD; \
                     set either a client secret or a username and password",
                );
                None
            }
            (None, Some(username), Some(password)) => Some(Credentials::Password {
                client_id: client_id.unwrap_or(DEFAULT_PASSWORD_CLIENT).to_owned(),
                username: username.to_owned(),
                password: Secret::new(password),
            }),
            (None, Some(_), None) => {
                self.problem(
                    "KEYCLOAK_PASSWORD",
                    "must be set when KEYCLOAK_USERNAME is set",
                );
                None
            }
            (None, None, Some(_)) => {
                self.problem(
                    "KEYCLOAK_USERNAME",
                    "must be set when KEYCLOAK_PASSWORD is set",
                );
                None
            }
            // A secret file that failed has been reported already.
            (None, None, None)
                if self.problems.iter().any(|p| {
                    p.var == "KEYCLOAK_CLIENT_SECRET_FILE" || p.var == "KEYCLOAK_PASSWORD_FILE"
                }) =>
            {
                None
            }
            (None, None, None) => {
                self.problem(
                    "KEYCLOAK_CLIENT_SECRET",
                    "no Keycloak credentials: set KEYCLOAK_CLIENT_ID and KEYCLOAK_CLIENT_SECRET \
                     (recommended), or KEYCLOAK_USERNAME and KEYCLOAK_PASSWORD",
                );
                None
            }
        }
    }

    fn smtp(&mut self, raw: &RawEnv) -> Option<SmtpConfig> {
        let host = self.required("SMTP_HOST", raw.smtp_host.clone());
        let security = match raw.smtp_security.as_deref().map(str::trim) {
            None => Some(SmtpSecurity::StartTls),
            Some(s) => match s.to_ascii_lowercase().as_str() {
                "starttls" => Some(SmtpSecurity::StartTls),
                "tls" | "ssl" | "smtps" => Some(SmtpSecurity::Tls),
                "none" | "plain" => Some(SmtpSecurity::None),
                _ => {
                    self.problem(
                        "SMTP_SECURITY",
                        format!("{s:?} is not one of starttls, tls, none"),
                    );
                    None
                }
            },
        };
        let port = match raw.smtp_port.as_deref().map(str::trim) {
            None => security.map(SmtpSecurity::default_port),
            Some(p) => match p.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => {
                    self.problem("SMTP_PORT", format!("{p:?} is not a port number (1-65535)"));
                    None
                }
            },
        };
        let sender = self
            .required("SMTP_SENDER", raw.smtp_sender.clone())
            .and_then(|s| self.mailbox("SMTP_SENDER", &s));
        let recipients = self
            .required("SMTP_RECEIVER", raw.smtp_receiver.clone())
            .and_then(|list| {
                let mut out = Vec::new();
                let mut ok = true;
                for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    match self.mailbox("SMTP_RECEIVER", item) {
                        Some(m) => out.push(m),
                        None => ok = false,
                    }
                }
                if ok && out.is_empty() {
                    self.problem("SMTP_RECEIVER", "lists no address");
                }
                (ok && !out.is_empty()).then_some(out)
            });
        let credentials = match (raw.smtp_password.clone(), raw.smtp_username.as_deref()) {
            (Some(password), Some(username)) => Some(Some(SmtpCredentials {
                username: username.trim().to_owned(),
                password: Secret::new(password),
            })),
            // As in the original script, the sender's address is the login.
            (Some(password), None) => sender.as_ref().map(|s| {
                Some(SmtpCredentials {
                    username: s.email.to_string(),
                    password: Secret::new(password),
                })
            }),
            (None, Some(_)) => {
                self.problem(
                    "SMTP_USERNAME",
                    "is set but SMTP_PASSWORD is not; set both to log in, or neither",
                );
                None
            }
            (None, None) => Some(None),
        };
        let extra_roots = self.ca_file("SMTP_CA_FILE", raw.smtp_ca_file.as_deref());
        Some(SmtpConfig {
            host: host?,
            port: port?,
            security: security?,
            sender: sender?,
            recipients: recipients?,
            credentials: credentials?,
            extra_roots: extra_roots?,
        })
    }

    fn mailbox(&mut self, var: &'static str, value: &str) -> Option<Mailbox> {
        match value.parse::<Mailbox>() {
            Ok(m) => Some(m),
            Err(err) => {
                self.problem(var, format!("{value:?} is not an email address ({err})"));
                None
            }
        }
    }

    fn event_types(&mut self, value: Option<&str>) -> Option<Vec<String>> {
        const VAR: &str = "NOTIFIER_EVENT_TYPES";
        let mut types: Vec<String> = Vec::new();
        let mut unknown = Vec::new();
        for name in value.unwrap_or(DEFAULT_EVENT_TYPES).split(',') {
            let name = name.trim().to_ascii_uppercase();
            if name.is_empty() {
                continue;
            }
            if !KNOWN_EVENT_TYPES.contains(&name.as_str()) {
                unknown.push(name);
            } else if !types.contains(&name) {
                types.push(name);
            }
        }
        if !unknown.is_empty() {
            let described: Vec<String> = unknown
                .iter()
                .map(|name| match closest(name, KNOWN_EVENT_TYPES) {
                    Some(meant) => format!("{name} (did you mean {meant}?)"),
                    None => name.clone(),
                })
                .collect();
            self.problem(
                VAR,
                format!(
                    "unknown Keycloak event type{} {}; Keycloak's user event types are names \
                     such as REGISTER, LOGIN_ERROR, UPDATE_PASSWORD, UPDATE_EMAIL, RESET_PASSWORD, \
                     DELETE_ACCOUNT",
                    if unknown.len() == 1 { "" } else { "s" },
                    described.join(", ")
                ),
            );
            return None;
        }
        if types.is_empty() {
            self.problem(VAR, "lists no event type");
            return None;
        }
        Some(types)
    }

    /// A count, 0 (the default) meaning off.
    fn count(&mut self, var: &str, value: Option<&str>) -> Option<usize> {
        let Some(value) = value.map(str::trim) else {
            return Some(0);
        };
        match value.parse::<usize>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.problem(
                    var,
                    format!("{value:?} is not a whole number (0 turns it off)"),
                );
                None
            }
        }
    }

    /// `NOTIFIER_ADMIN_EVENTS`: `RESOURCE:OPERATION` pairs, comma-separated,
    /// `*` for any (`USER:CREATE,USER:DELETE,CLIENT:*`).
    fn admin_events(&mut self, value: Option<&str>) -> Option<Vec<AdminEventPattern>> {
        const VAR: &str = "NOTIFIER_ADMIN_EVENTS";
        let mut patterns = Vec::new();
        let mut ok = true;
        for item in value
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let upper = item.to_ascii_uppercase();
            let (resource, operation) = upper.split_once(':').unwrap_or((upper.as_str(), "*"));
            let (resource, operation) = (resource.trim(), operation.trim());
            let resource_ok = resource == "*"
                || (!resource.is_empty()
                    && resource.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
            if !resource_ok || !(operation == "*" || ADMIN_OPERATIONS.contains(&operation)) {
                self.problem(
                    VAR,
                    format!(
                        "{item:?} is not RESOURCE:OPERATION such as USER:CREATE (operations: \
                         CREATE, UPDATE, DELETE, ACTION, or * for any)"
                    ),
                );
                ok = false;
                continue;
            }
            patterns.push(AdminEventPattern {
                resource: (resource != "*").then(|| resource.to_owned()),
                operation: (operation != "*").then(|| operation.to_owned()),
            });
        }
        ok.then_some(patterns)
    }

    /// `NOTIFIER_ROUTES`: `TYPE[|TYPE…]=address[,address…]` rules separated
    /// by `;`, e.g. `REGISTER=admins@example.com; LOGIN_ERROR|UPDATE_PASSWORD=security@example.com`.
    fn routes(&mut self, value: Option<&str>) -> Option<Vec<Route>> {
        const VAR: &str = "NOTIFIER_ROUTES";
        let mut routes = Vec::new();
        let mut ok = true;
        for rule in value
            .unwrap_or_default()
            .split(';')
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            let Some((types, addresses)) = rule.split_once('=') else {
                self.problem(
                    VAR,
                    format!("{rule:?} is not TYPE=address (e.g. REGISTER=admins@example.com)"),
                );
                ok = false;
                continue;
            };
            let mut route = Route {
                types: Vec::new(),
                recipients: Vec::new(),
            };
            for name in types.split('|').map(|t| t.trim().to_ascii_uppercase()) {
                if KNOWN_EVENT_TYPES.contains(&name.as_str()) {
                    route.types.push(name);
                } else {
                    let hint = closest(&name, KNOWN_EVENT_TYPES)
                        .map(|m| format!(" (did you mean {m}?)"))
                        .unwrap_or_default();
                    self.problem(
                        VAR,
                        format!("{name:?} in {rule:?} is not a Keycloak event type{hint}"),
                    );
                    ok = false;
                }
            }
            for address in addresses
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
            {
                match self.mailbox(VAR, address) {
                    Some(mailbox) => route.recipients.push(mailbox),
                    None => ok = false,
                }
            }
            if route.recipients.is_empty() && ok {
                self.problem(VAR, format!("{rule:?} names no recipient"));
                ok = false;
            }
            routes.push(route);
        }
        ok.then_some(routes)
    }

    fn poll_interval(&mut self, value: Option<&str>) -> Option<Duration> {
        const VAR: &str = "NOTIFIER_POLL_INTERVAL";
        let Some(value) = value else {
            return Some(DEFAULT_POLL_INTERVAL);
        };
        let interval = match parse_duration(value) {
            Ok(d) => d,
            Err(message) => {
                self.problem(VAR, message);
                return None;
            }
        };
        if !(MIN_POLL_INTERVAL..=MAX_POLL_INTERVAL).contains(&interval) {
            self.problem(VAR, format!("{value:?} is outside the range 1s to 24h"));
            return None;
        }
        Some(interval)
    }

    fn start_from(&mut self, value: Option<&str>) -> Option<StartFrom> {
        let Some(value) = value.map(str::trim) else {
            return Some(StartFrom::Now);
        };
        match value.to_ascii_lowercase().as_str() {
            "now" => return Some(StartFrom::Now),
            "beginning" | "all" => return Some(StartFrom::Beginning),
            _ => {}
        }
        if let Ok(at) = DateTime::parse_from_rfc3339(value) {
            return Some(StartFrom::At(at.with_timezone(&Utc)));
        }
        if let Ok(ago) = humantime::parse_duration(value) {
            return Some(StartFrom::Ago(ago));
        }
        self.problem(
            "NOTIFIER_START_FROM",
            format!(
                "{value:?} is not `now`, `beginning`, an RFC 3339 time such as \
                 2026-01-31T08:00:00Z, or a duration ago such as 24h"
            ),
        );
        None
    }

    fn page_size(&mut self, value: Option<&str>) -> Option<u32> {
        let Some(value) = value.map(str::trim) else {
            return Some(DEFAULT_PAGE_SIZE);
        };
        match value.parse::<u32>() {
            Ok(n) if (1..=MAX_PAGE_SIZE).contains(&n) => Some(n),
            _ => {
                self.problem(
                    "NOTIFIER_PAGE_SIZE",
                    format!("{value:?} is not a number from 1 to {MAX_PAGE_SIZE}"),
                );
                None
            }
        }
    }
}

const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// The known variable `name` most likely meant, if it is close enough
/// (at most three edits, a third of its length).
fn closest_known(name: &str) -> Option<&'static str> {
    closest(name, KNOWN_VARS)
}

/// The name in `names` closest to `name`, if it is close enough.
fn closest(name: &str, names: &[&'static str]) -> Option<&'static str> {
    names
        .iter()
        .map(|known| (edit_distance(name, known), *known))
        .filter(|(d, _)| *d <= 3 && *d * 3 <= name.len())
        .min()
        .map(|(_, known)| known)
}

/// Levenshtein distance (variable names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let old = row[j + 1];
            row[j + 1] = (old + 1).min(row[j] + 1).min(prev + usize::from(ca != *cb));
            prev = old;
        }
    }
    row[b.len()]
}

/// Parses `KEYCLOAK_URL`: http or https, no query or fragment, trailing
/// slashes removed. A legacy `/auth` path is kept as given.
pub fn parse_base_url(value: &str) -> Result<Url, String> {
    let mut url =
        Url::parse(value.trim()).map_err(|err| format!("{value:?} is not a URL ({err})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{value:?} must start with http:// or https://"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{value:?} has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{value:?} must not have a query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "must not contain credentials; use KEYCLOAK_CLIENT_SECRET or \
                    KEYCLOAK_USERNAME/KEYCLOAK_PASSWORD"
                .into(),
        );
    }
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(url)
}

/// Parses a duration such as `30s`, `2m`, `1h 30m`; a bare number means seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(value)
        .map_err(|err| format!("{value:?} is not a duration such as 30s or 2m ({err})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("KEYCLOAK_URL", "https://sso.example.com/"),
        ("KEYCLOAK_REALM", "acme"),
        ("KEYCLOAK_CLIENT_ID", "notifier"),
        ("KEYCLOAK_CLIENT_SECRET", "a/b=c?d+e&f"),
        ("SMTP_HOST", "smtp.example.com"),
        ("SMTP_SENDER", "keycloak@example.com"),
        ("SMTP_RECEIVER", "admin@example.com"),
    ];

    fn with(overrides: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        let mut all: BTreeMap<&str, &str> = MINIMAL.iter().copied().collect();
        for (k, v) in overrides {
            all.insert(k, v);
        }
        vars(&all.into_iter().collect::<Vec<_>>())
    }

    fn without(names: &[&str]) -> Vec<(OsString, OsString)> {
        vars(
            &MINIMAL
                .iter()
                .copied()
                .filter(|(k, _)| !names.contains(k))
                .collect::<Vec<_>>(),
        )
    }

    fn problems(vars: Vec<(OsString, OsString)>) -> Vec<String> {
        Config::from_vars(vars)
            .expect_err("config should be rejected")
            .problems
            .into_iter()
            .map(|p| p.var)
            .collect()
    }

    #[test]
    fn minimal_configuration_gets_documented_defaults() {
        let config = Config::from_vars(vars(MINIMAL)).unwrap();
        assert_eq!(
            config.keycloak.base_url.as_str(),
            "https://sso.example.com/"
        );
        assert_eq!(config.keycloak.realm, "acme");
        assert_eq!(config.keycloak.auth_realm, "acme");
        assert_eq!(
            config.keycloak.credentials,
            Credentials::ClientSecret {
                client_id: "notifier".into(),
                secret: Secret::new("a/b=c?d+e&f"),
            }
        );
        assert_eq!(config.event_types, vec!["REGISTER"]);
        assert_eq!(config.poll_interval, Duration::from_secs(30));
        assert_eq!(config.state_dir, PathBuf::from("/data"));
        assert_eq!(config.start_from, StartFrom::Now);
        assert_eq!(config.page_size, 100);
        assert_eq!(config.http_addr, None);
        assert_eq!(config.smtp.security, SmtpSecurity::StartTls);
        assert_eq!(config.smtp.port, 587);
        assert_eq!(config.smtp.credentials, None);
    }

    #[test]
    fn the_original_scripts_variables_work_unchanged() {
        let config = Config::from_vars(vars(&[
            ("KEYCLOAK_URL", "https://your-keycloak.com/auth/"),
            ("KEYCLOAK_REALM", "your-keycloak-realm"),
            ("KEYCLOAK_USERNAME", "keycloak-admin-user"),
            ("KEYCLOAK_PASSWORD", "keycloak-admin-password"),
            ("SMTP_HOST", "smtp.your-host.com"),
            ("SMTP_PORT", "587"),
            ("SMTP_SENDER", "mail@your-host.com"),
            ("SMTP_RECEIVER", "your-receiver@host.com"),
            ("SMTP_PASSWORD", "your-smtp-password"),
        ]))
        .unwrap();
        assert_eq!(
            config.keycloak.base_url.as_str(),
            "https://your-keycloak.com/auth"
        );
        assert_eq!(
            config.keycloak.credentials,
            Credentials::Password {
                client_id: "admin-cli".into(),
                username: "keycloak-admin-user".into(),
                password: Secret::new("keycloak-admin-password"),
            }
        );
        assert_eq!(
            config.smtp.credentials,
            Some(SmtpCredentials {
                username: "mail@your-host.com".into(),
                password: Secret::new("your-smtp-password"),
            })
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let found = problems(vars(&[
            ("KEYCLOAK_URL", "ftp://x"),
            ("SMTP_PORT", "99999"),
            ("SMTP_SECURITY", "ssl3"),
            ("SMTP_RECEIVER", "not-an-address, ok@example.com"),
            ("NOTIFIER_EVENT_TYPES", "REGISTER, NOPE"),
            ("NOTIFIER_POLL_INTERVAL", "soon"),
            ("NOTIFIER_START_FROM", "yesterday-ish"),
            ("NOTIFIER_PAGE_SIZE", "0"),
        ]));
        for var in [
            "KEYCLOAK_URL",
            "KEYCLOAK_REALM",
            "KEYCLOAK_CLIENT_SECRET",
            "SMTP_HOST",
            "SMTP_PORT",
            "SMTP_SECURITY",
            "SMTP_SENDER",
            "SMTP_RECEIVER",
            "NOTIFIER_EVENT_TYPES",
            "NOTIFIER_POLL_INTERVAL",
            "NOTIFIER_START_FROM",
            "NOTIFIER_PAGE_SIZE",
        ] {
            assert!(
                found.iter().any(|f| f == var),
                "{var} missing from {found:?}"
            );
        }
    }

    #[test]
    fn the_error_message_names_each_variable_on_its_own_line() {
        let err = Config::from_vars(without(&["SMTP_HOST", "KEYCLOAK_REALM"])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("invalid configuration (2 problems):"),
            "{text}"
        );
        assert!(text.contains("\n  KEYCLOAK_REALM: must be set\n"), "{text}");
        assert!(text.contains("\n  SMTP_HOST: must be set\n"), "{text}");
    }

    #[test]
    fn keycloak_url_accepts_trailing_slash_and_legacy_auth_path() {
        for (given, expected) in [
            ("http://kc:8080", "http://kc:8080/"),
            ("http://kc:8080/", "http://kc:8080/"),
            ("https://kc.example.com/auth", "https://kc.example.com/auth"),
            (
                "https://kc.example.com/auth/",
                "https://kc.example.com/auth",
            ),
            ("https://kc.example.com/sso//", "https://kc.example.com/sso"),
        ] {
            assert_eq!(parse_base_url(given).unwrap().as_str(), expected, "{given}");
        }
        for bad in [
            "kc:8080",
            "ftp://kc",
            "http://kc/?a=b",
            "http://u:p@kc/",
            "http://",
        ] {
            assert!(parse_base_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_url_with_credentials_is_rejected_without_echoing_them() {
        let err =
            Config::from_vars(with(&[("KEYCLOAK_URL", "https://u:hunter2@kc/")])).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn event_types_are_trimmed_upper_cased_deduplicated_and_checked() {
        let config = Config::from_vars(with(&[(
            "NOTIFIER_EVENT_TYPES",
            " register ,LOGIN_ERROR,, UPDATE_PASSWORD,REGISTER",
        )]))
        .unwrap();
        assert_eq!(
            config.event_types,
            vec!["REGISTER", "LOGIN_ERROR", "UPDATE_PASSWORD"]
        );
        let err = Config::from_vars(with(&[("NOTIFIER_EVENT_TYPES", "REGISTER,LOGIN_FAILED")]))
            .unwrap_err();
        assert!(err.to_string().contains("LOGIN_FAILED"), "{err}");
        assert_eq!(
            problems(with(&[("NOTIFIER_EVENT_TYPES", " , ")])),
            ["NOTIFIER_EVENT_TYPES"]
        );
    }

    #[test]
    fn poll_interval_takes_human_durations_and_bare_seconds() {
        for (given, secs) in [("30s", 30), ("2m", 120), ("1h 30m", 5400), ("45", 45)] {
            let config = Config::from_vars(with(&[("NOTIFIER_POLL_INTERVAL", given)])).unwrap();
            assert_eq!(config.poll_interval, Duration::from_secs(secs), "{given}");
        }
        for bad in ["0s", "500ms", "2d", "fast"] {
            assert_eq!(
                problems(with(&[("NOTIFIER_POLL_INTERVAL", bad)])),
                ["NOTIFIER_POLL_INTERVAL"],
                "{bad}"
            );
        }
    }

    #[test]
    fn start_from_accepts_now_beginning_timestamps_and_durations() {
        let now = DateTime::parse_from_rfc3339("2026-12-03T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        for (given, expected_ms) in [
            ("now", now.timestamp_millis()),
            ("NOW", now.timestamp_millis()),
            ("beginning", 0),
            ("2026-12-01T00:00:00+01:00", 1_796_079_600_000),
            ("24h", now.timestamp_millis() - 86_400_000),
        ] {
            let config = Config::from_vars(with(&[("NOTIFIER_START_FROM", given)])).unwrap();
            assert_eq!(config.start_from.resolve(now), expected_ms, "{given}");
        }
    }

    #[test]
    fn smtp_security_sets_the_default_port() {
        for (security, port) in [("starttls", 587), ("tls", 465), ("none", 25), ("NONE", 25)] {
            let config = Config::from_vars(with(&[("SMTP_SECURITY", security)])).unwrap();
            assert_eq!(config.smtp.port, port, "{security}");
        }
        let config =
            Config::from_vars(with(&[("SMTP_SECURITY", "none"), ("SMTP_PORT", "1025")])).unwrap();
        assert_eq!(config.smtp.port, 1025);
    }

    #[test]
    fn several_recipients_are_a_comma_list() {
        let config = Config::from_vars(with(&[(
            "SMTP_RECEIVER",
            "a@example.com, Security Team <sec@example.com>,",
        )]))
        .unwrap();
        let emails: Vec<String> = config
            .smtp
            .recipients
            .iter()
            .map(|m| m.email.to_string())
            .collect();
        assert_eq!(emails, ["a@example.com", "sec@example.com"]);
    }

    #[test]
    fn smtp_login_uses_the_username_when_given() {
        let config =
            Config::from_vars(with(&[("SMTP_USERNAME", "apikey"), ("SMTP_PASSWORD", "p")]))
                .unwrap();
        assert_eq!(config.smtp.credentials.unwrap().username, "apikey");
        assert_eq!(
            problems(with(&[("SMTP_USERNAME", "apikey")])),
            ["SMTP_USERNAME"]
        );
    }

    #[test]
    fn credentials_must_be_one_complete_mode() {
        assert_eq!(
            problems(with(&[
                ("KEYCLOAK_USERNAME", "admin"),
                ("KEYCLOAK_PASSWORD", "pw")
            ])),
            ["KEYCLOAK_CLIENT_SECRET"]
        );
        assert_eq!(
            problems(without(&["KEYCLOAK_CLIENT_ID"])),
            ["KEYCLOAK_CLIENT_ID"]
        );
        assert_eq!(
            problems(vars(&[
                ("KEYCLOAK_URL", "http://kc"),
                ("KEYCLOAK_REALM", "r"),
                ("KEYCLOAK_USERNAME", "admin"),
                ("SMTP_HOST", "h"),
                ("SMTP_SENDER", "a@b.c"),
                ("SMTP_RECEIVER", "a@b.c"),
            ])),
            ["KEYCLOAK_PASSWORD"]
        );
    }

    #[test]
    fn several_realms_need_an_auth_realm() {
        let config = Config::from_vars(with(&[
            ("KEYCLOAK_REALM", "acme, beta,acme"),
            ("KEYCLOAK_AUTH_REALM", "master"),
        ]))
        .unwrap();
        assert_eq!(config.keycloak.realms, ["acme", "beta"]);
        assert_eq!(config.for_realm("beta").keycloak.realm, "beta");
        assert_eq!(config.for_realm("beta").keycloak.realms, ["beta"]);
        assert_eq!(
            problems(with(&[("KEYCLOAK_REALM", "acme,beta")])),
            ["KEYCLOAK_AUTH_REALM"]
        );
        assert_eq!(
            problems(with(&[("KEYCLOAK_REALM", " , ")])),
            ["KEYCLOAK_REALM"]
        );
    }

    #[test]
    fn auth_realm_defaults_to_the_watched_realm_and_can_be_master() {
        let config = Config::from_vars(with(&[("KEYCLOAK_AUTH_REALM", "master")])).unwrap();
        assert_eq!(config.keycloak.realm, "acme");
        assert_eq!(config.keycloak.auth_realm, "master");
    }

    #[test]
    fn empty_values_count_as_unset() {
        let config = Config::from_vars(with(&[("SMTP_PASSWORD", ""), ("SMTP_PORT", " ")])).unwrap();
        assert_eq!(config.smtp.credentials, None);
        assert_eq!(config.smtp.port, 587);
    }

    #[test]
    fn secrets_never_appear_in_debug_output_or_the_summary() {
        let config = Config::from_vars(with(&[("SMTP_PASSWORD", "smtp-hunter2")])).unwrap();
        for text in [format!("{config:?}"), config.redacted_summary()] {
            assert!(!text.contains("a/b=c?d+e&f"), "{text}");
            assert!(!text.contains("smtp-hunter2"), "{text}");
        }
    }

    #[test]
    fn unknown_prefixed_variables_are_listed_with_the_name_they_probably_meant() {
        let config = Config::from_vars(with(&[
            ("NOTIFIER_EVENT_TYPE", "REGISTER"),
            ("SMTP_RECIEVER", "x@example.com"),
            ("KEYCLOAK_SOMETHING_ELSE", "1"),
            ("PATH", "/bin"),
        ]))
        .unwrap();
        assert_eq!(
            config.unknown_vars,
            vec![
                ("KEYCLOAK_SOMETHING_ELSE".to_owned(), None),
                (
                    "NOTIFIER_EVENT_TYPE".to_owned(),
                    Some("NOTIFIER_EVENT_TYPES")
                ),
                ("SMTP_RECIEVER".to_owned(), Some("SMTP_RECEIVER")),
            ]
        );
    }

    #[test]
    fn the_time_zone_is_an_iana_name() {
        let config = Config::from_vars(with(&[("NOTIFIER_TIME_ZONE", "Europe/Berlin")])).unwrap();
        assert_eq!(config.time_zone, chrono_tz::Europe::Berlin);
        assert_eq!(
            Config::from_vars(vars(MINIMAL)).unwrap().time_zone,
            chrono_tz::UTC
        );
        assert_eq!(
            problems(with(&[("NOTIFIER_TIME_ZONE", "CEST+2")])),
            ["NOTIFIER_TIME_ZONE"]
        );
    }

    #[test]
    fn the_http_address_is_an_address_and_port() {
        let config = Config::from_vars(with(&[("NOTIFIER_HTTP_ADDR", "0.0.0.0:8080")])).unwrap();
        assert_eq!(config.http_addr, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(
            problems(with(&[("NOTIFIER_HTTP_ADDR", "8080")])),
            ["NOTIFIER_HTTP_ADDR"]
        );
    }

    #[test]
    fn a_misspelt_variable_is_named_when_the_configuration_fails() {
        let mut all = without(&["SMTP_RECEIVER"]);
        all.extend(vars(&[("SMTP_RECIEVER", "a@example.com")]));
        let err = Config::from_vars(all).unwrap_err().to_string();
        assert!(err.contains("  SMTP_RECEIVER: must be set"), "{err}");
        assert!(
            err.contains(
                "  SMTP_RECIEVER: is not a setting of the notifier; did you mean SMTP_RECEIVER?"
            ),
            "{err}"
        );
    }

    #[test]
    fn a_misspelt_event_type_gets_a_suggestion() {
        let err = Config::from_vars(with(&[("NOTIFIER_EVENT_TYPES", "LOGIN_EROR")])).unwrap_err();
        assert!(
            err.to_string()
                .contains("LOGIN_EROR (did you mean LOGIN_ERROR?)"),
            "{err}"
        );
    }

    #[test]
    fn the_summary_shows_values_as_they_are_written() {
        let summary = Config::from_vars(with(&[
            ("SMTP_SECURITY", "none"),
            ("NOTIFIER_START_FROM", "24h"),
        ]))
        .unwrap()
        .redacted_summary();
        assert!(summary.contains("security=none"), "{summary}");
        assert!(summary.contains("start_from=1day ago"), "{summary}");
    }

    #[test]
    fn routes_send_event_types_to_their_own_recipients() {
        let config = Config::from_vars(with(&[(
            "NOTIFIER_ROUTES",
            "register = admins@example.com; login_error|UPDATE_PASSWORD=sec@example.com, soc@example.com;",
        )]))
        .unwrap();
        let emails = |t: &str| -> Vec<String> {
            config
                .recipients_for(t)
                .iter()
                .map(|m| m.email.to_string())
                .collect()
        };
        assert_eq!(emails("REGISTER"), ["admins@example.com"]);
        assert_eq!(
            emails("UPDATE_PASSWORD"),
            ["sec@example.com", "soc@example.com"]
        );
        assert_eq!(
            emails("LOGOUT"),
            ["admin@example.com"],
            "the rest go to SMTP_RECEIVER"
        );
        for bad in [
            "REGISTER",
            "REGISTR=a@example.com",
            "REGISTER=not-an-address",
            "REGISTER=",
        ] {
            assert_eq!(
                problems(with(&[("NOTIFIER_ROUTES", bad)])),
                ["NOTIFIER_ROUTES"],
                "{bad}"
            );
        }
    }

    #[test]
    fn admin_events_are_resource_operation_pairs() {
        let config = Config::from_vars(with(&[(
            "NOTIFIER_ADMIN_EVENTS",
            "user:create, CLIENT:*, GROUP",
        )]))
        .unwrap();
        let [user, client, group] = &config.admin_events[..] else {
            panic!("{:?}", config.admin_events)
        };
        assert!(user.matches("USER", "CREATE") && !user.matches("USER", "DELETE"));
        assert!(client.matches("CLIENT", "DELETE") && !client.matches("USER", "CREATE"));
        assert!(group.matches("GROUP", "UPDATE"));
        assert!(
            Config::from_vars(vars(MINIMAL))
                .unwrap()
                .admin_events
                .is_empty()
        );
        for bad in ["USER:MODIFY", "us er:CREATE", ":CREATE"] {
            assert_eq!(
                problems(with(&[("NOTIFIER_ADMIN_EVENTS", bad)])),
                ["NOTIFIER_ADMIN_EVENTS"],
                "{bad}"
            );
        }
    }

    #[test]
    fn clients_can_be_included_or_excluded() {
        let config =
            Config::from_vars(with(&[("NOTIFIER_EXCLUDE_CLIENTS", "monitoring, ci-bot")])).unwrap();
        assert!(config.wants_client(Some("web")));
        assert!(config.wants_client(None));
        assert!(!config.wants_client(Some("ci-bot")));
        let config = Config::from_vars(with(&[("NOTIFIER_INCLUDE_CLIENTS", "web")])).unwrap();
        assert!(config.wants_client(Some("web")));
        assert!(!config.wants_client(Some("other")));
        assert!(!config.wants_client(None));
    }

    #[test]
    fn log_format_and_level_are_checked() {
        let config = Config::from_vars(with(&[
            ("NOTIFIER_LOG_FORMAT", "JSON"),
            ("NOTIFIER_LOG_LEVEL", "Debug"),
        ]))
        .unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.log_level.as_deref(), Some("debug"));
        assert_eq!(
            problems(with(&[
                ("NOTIFIER_LOG_FORMAT", "xml"),
                ("NOTIFIER_LOG_LEVEL", "loud")
            ])),
            ["NOTIFIER_LOG_FORMAT", "NOTIFIER_LOG_LEVEL"]
        );
    }

    #[test]
    fn known_vars_lists_exactly_the_variables_read() {
        let fields = serde_json::to_value(RawEnv::default()).unwrap();
        let mut read: Vec<String> = fields
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.to_ascii_uppercase())
            .collect();
        read.sort();
        let mut known: Vec<String> = KNOWN_VARS.iter().map(|v| v.to_string()).collect();
        known.sort();
        assert_eq!(read, known);
    }

    #[test]
    fn secrets_can_come_from_files_with_one_trailing_newline_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s3cret/with=odd?chars+& \n").unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "smtp-pw\r\n").unwrap();
        let config = Config::from_vars(without(&["KEYCLOAK_CLIENT_SECRET"]).into_iter().chain(
            vars(&[
                ("KEYCLOAK_CLIENT_SECRET_FILE", secret.to_str().unwrap()),
                ("SMTP_PASSWORD_FILE", password.to_str().unwrap()),
            ]),
        ))
        .unwrap();
        assert_eq!(
            config.keycloak.credentials,
            Credentials::ClientSecret {
                client_id: "notifier".into(),
                secret: Secret::new("s3cret/with=odd?chars+& "),
            }
        );
        assert_eq!(
            config.smtp.credentials.unwrap().password,
            Secret::new("smtp-pw")
        );
    }

    #[test]
    fn a_secret_file_that_clashes_or_cannot_be_read_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let found = problems(with(&[
            ("KEYCLOAK_CLIENT_SECRET_FILE", missing.to_str().unwrap()),
            ("SMTP_PASSWORD_FILE", empty.to_str().unwrap()),
            ("KEYCLOAK_PASSWORD_FILE", missing.to_str().unwrap()),
        ]));
        assert!(
            found.contains(&"KEYCLOAK_CLIENT_SECRET_FILE".to_owned()),
            "{found:?}"
        );
        assert!(
            found.contains(&"SMTP_PASSWORD_FILE".to_owned()),
            "{found:?}"
        );
        assert!(
            found.contains(&"KEYCLOAK_PASSWORD_FILE".to_owned()),
            "{found:?}"
        );
        let err = Config::from_vars(with(&[(
            "KEYCLOAK_CLIENT_SECRET_FILE",
            missing.to_str().unwrap(),
        )]))
        .unwrap_err();
        assert!(err.to_string().contains("set only one of them"), "{err}");
        assert!(!err.to_string().contains("a/b=c?d+e&f"), "{err}");
    }

    #[test]
    fn ca_files_must_hold_pem_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("ca.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        assert_eq!(
            problems(with(&[
                ("KEYCLOAK_CA_FILE", garbage.to_str().unwrap()),
                ("SMTP_CA_FILE", "/nonexistent/ca.pem"),
            ])),
            ["KEYCLOAK_CA_FILE", "SMTP_CA_FILE"]
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_non_utf8_value_is_reported_not_a_panic() {
        use std::os::unix::ffi::OsStringExt;
        let mut all = vars(MINIMAL);
        all.push((
            OsString::from("SMTP_HOST"),
            OsString::from_vec(vec![0x66, 0xff, 0x6f]),
        ));
        all.retain(|(k, v)| k != "SMTP_HOST" || v.to_str().is_none());
        assert_eq!(problems(all), ["SMTP_HOST", "SMTP_HOST"]);
    }
}

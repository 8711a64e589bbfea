//! The mail for one event: rendering (pure), and the [`Mailer`] seam that
//! delivers it (SMTP in `smtp.rs`).
//!
//! Event fields are typed by users, so every value is treated as hostile:
//! control characters never reach a header (lettre panics on CRLF in a
//! display name), values in the body are escaped visibly, and long values
//! are cut.

use chrono::DateTime;
use lettre::Message;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, MultiPart};
use std::fmt::Write as _;
use std::future::Future;

use crate::config::SmtpConfig;
use crate::event::Event;
use crate::keycloak::UserInfo;
use crate::templates::{
    Detail, DigestRow, DigestView, EventView, MailView, Parts, Row, Templates, UserView,
};
use chrono_tz::Tz;
/// Subjects are cut to this many characters.
pub const MAX_SUBJECT_CHARS: usize = 200;
/// Each value in the body is cut to this many characters.
const MAX_VALUE_CHARS: usize = 2_000;
/// At most this many detail entries are listed; the rest are counted.
const MAX_DETAILS: usize = 50;
/// Shown where the event has no value.
const ABSENT: &str = "-";

/// A rendered notification, before addresses are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    /// The text part.
    pub body: String,
    /// The HTML part.
    pub html: String,
    /// Derived from the realm and the event key only, so a re-sent mail has
    /// the same Message-ID and receivers can drop the duplicate.
    pub message_id: String,
}

/// What a mail shows besides the event itself.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub realm: &'a str,
    /// The sender's domain, for the Message-ID.
    pub domain: &'a str,
    /// Times are shown in this zone, with UTC beside them.
    pub time_zone: Tz,
    /// The user as Keycloak knows them now, when the event names one.
    pub user: Option<&'a UserInfo>,
    /// Keycloak's base URL, for a link to the user in the admin console.
    pub console: Option<&'a str>,
    /// The templates to use (the built-in ones when `None`).
    pub templates: Option<&'a Templates>,
}

/// Renders the mail for `event` of `realm`, times in UTC, without user
/// details. `domain` goes into the Message-ID (the sender's domain).
pub fn render(event: &Event, realm: &str, domain: &str) -> Rendered {
    render_with(
        event,
        &Context {
            realm,
            domain,
            time_zone: Tz::UTC,
            user: None,
            console: None,
            templates: None,
        },
    )
}

/// A time as the mail shows it: in `zone` with UTC beside it, or UTC alone.
fn show_time(ms: i64, zone: Tz) -> String {
    let Some(utc) = DateTime::from_timestamp_millis(ms) else {
        return format!("{ms} ms after the epoch (out of range)");
    };
    let utc_text = utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    if zone == Tz::UTC {
        return utc_text;
    }
    let local = utc.with_timezone(&zone);
    format!("{} ({utc_text} UTC)", local.format("%Y-%m-%d %H:%M:%S %Z"))
}

/// Renders the mail for `event` in `context`. A template that fails on
/// this event (an override, say) falls back to the built-in ones: a mail is
/// never lost to a template.
pub fn render_with(event: &Event, context: &Context<'_>) -> Rendered {
    let view = view(event, context);
    let templates = context.templates.unwrap_or(&BUILTIN);
    let parts = templates.render(&event.kind, &view).or_else(|err| {
        tracing::error!(error = %err, "a mail template failed; using the built-in one");
        BUILTIN.render(&event.kind, &view)
    });
    let parts = parts.unwrap_or_else(|err| Parts {
        subject: header_text(
            &format!("[Keycloak {}] {}", context.realm, event.kind),
            MAX_SUBJECT_CHARS,
        ),
        text: format!(
            "Keycloak event {} in realm {} (the mail template failed: {err}).\n",
            body_text(&event.kind),
            body_text(context.realm)
        ),
        html: String::new(),
    });
    let message_id = format!(
        "<kn.{}.{}@{}>",
        id_safe(context.realm),
        id_safe(&event.dedupe_key()),
        domain_safe(context.domain)
    );
    finish(parts, message_id)
}

/// Digests list at most this many events; the rest are counted.
const MAX_DIGEST_ROWS: usize = 500;

/// One mail for many events: a line each (up to [`MAX_DIGEST_ROWS`]) and
/// the exact number it stands for. Its Message-ID is derived from the realm
/// and the events, so a re-sent digest is recognisable too.
pub fn render_digest(events: &[&Event], context: &Context<'_>) -> Rendered {
    let realm = context.realm;
    let mut types: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    types.sort_unstable();
    types.dedup();
    let time =
        |e: Option<&&Event>| e.map_or_else(String::new, |e| show_time(e.time, context.time_zone));
    let rows = events
        .iter()
        .take(MAX_DIGEST_ROWS)
        .map(|event| DigestRow {
            time: show_time(event.time, context.time_zone),
            kind: body_text(&event.kind),
            who: body_text(&view(event, context).who),
            ip: event.ip_address.as_deref().map(body_text),
            client: event.client_id.as_deref().map(body_text),
            error: event.error.as_deref().map(body_text),
        })
        .collect();
    let digest = DigestView {
        realm: body_text(realm),
        version: env!("CARGO_PKG_VERSION"),
        count: events.len(),
        types: body_text(&types.join(", ")),
        first_time: time(events.first()),
        last_time: time(events.last()),
        rows,
        hidden: events.len().saturating_sub(MAX_DIGEST_ROWS),
    };
    let templates = context.templates.unwrap_or(&BUILTIN);
    let parts = templates
        .render_digest(&digest)
        .or_else(|err| {
            tracing::error!(error = %err, "the digest template failed; using the built-in one");
            BUILTIN.render_digest(&digest)
        })
        .unwrap_or_else(|err| Parts {
            subject: format!("[Keycloak {realm}] {} events", events.len()),
            text: format!(
                "{} events in realm {} (the digest template failed: {err}).\n",
                events.len(),
                body_text(realm)
            ),
            html: String::new(),
        });
    let first_key = events.first().map(|e| e.dedupe_key()).unwrap_or_default();
    let message_id = format!(
        "<kn-digest.{}.{}.{}@{}>",
        id_safe(realm),
        id_safe(&first_key),
        events.len(),
        domain_safe(context.domain)
    );
    finish(parts, message_id)
}

/// A rendered mail from its parts; the text part ends with a line break.
fn finish(parts: Parts, message_id: String) -> Rendered {
    let mut body = parts.text;
    if !body.ends_with('\n') {
        body.push('\n');
    }
    Rendered {
        subject: parts.subject,
        body,
        html: parts.html,
        message_id,
    }
}

/// The built-in templates, for callers that pass none.
static BUILTIN: std::sync::LazyLock<Templates> = std::sync::LazyLock::new(Templates::builtin);

/// What the templates see of `event`: every value escaped for text (HTML
/// escaping is the HTML templates' own, automatic).
fn view(event: &Event, context: &Context<'_>) -> MailView {
    let realm = context.realm;
    let who = match (event.username(), event.email()) {
        (Some(user), Some(email)) if user != email => format!("{user} ({email})"),
        (Some(user), _) => user.to_owned(),
        (None, Some(email)) => email.to_owned(),
        (None, None) => event
            .details
            .get("resource_path")
            .or(event.user_id.as_ref())
            .cloned()
            .unwrap_or_default(),
    };
    let time = show_time(event.time, context.time_zone);
    let time_label = if context.time_zone == Tz::UTC {
        "Time (UTC)"
    } else {
        "Time"
    };
    let text = |value: Option<&str>| value.map(body_text);
    let rows: Vec<Row> = [
        (time_label, Some(time.as_str())),
        ("Realm", Some(realm)),
        ("Event type", Some(event.kind.as_str())),
        ("Username", event.username()),
        ("Email", event.email()),
        ("User ID", event.user_id.as_deref()),
        ("IP address", event.ip_address.as_deref()),
        ("Client", event.client_id.as_deref()),
        ("Error", event.error.as_deref()),
        ("Session ID", event.session_id.as_deref()),
        ("Event ID", event.id.as_deref()),
    ]
    .into_iter()
    .map(|(label, value)| Row {
        label,
        value: value.map_or_else(|| ABSENT.to_owned(), body_text),
    })
    .collect();
    let details = event
        .details
        .iter()
        .take(MAX_DETAILS)
        .map(|(key, value)| Detail {
            key: body_text(key),
            value: body_text(value),
        })
        .collect();
    let user_link = match (context.console, event.user_id.as_deref()) {
        (Some(base), Some(id)) => Some(format!(
            "{}/admin/master/console/#/{}/users/{}/settings",
            base.trim_end_matches('/'),
            url_part(realm),
            url_part(id)
        )),
        _ => None,
    };
    MailView {
        realm: body_text(realm),
        version: env!("CARGO_PKG_VERSION"),
        who: header_text(&who, MAX_SUBJECT_CHARS),
        event: EventView {
            kind: body_text(&event.kind),
            id: text(event.id.as_deref()),
            time,
            user_id: text(event.user_id.as_deref()),
            username: text(event.username()),
            email: text(event.email()),
            ip_address: text(event.ip_address.as_deref()),
            client: text(event.client_id.as_deref()),
            error: text(event.error.as_deref()),
        },
        rows,
        details,
        details_hidden: event.details.len().saturating_sub(MAX_DETAILS),
        user: context.user.map(|user| user_view(user, context.time_zone)),
        user_link,
        accent: match crate::templates::kind_of(&event.kind) {
            "register" => "#36b37e",
            "login_error" => "#de350b",
            "credential" => "#ff991f",
            "admin" => "#6554c0",
            _ => "#0052cc",
        },
    }
}

/// The user's record as Keycloak holds it now (it may have changed since
/// the event).
fn user_view(user: &UserInfo, zone: Tz) -> UserView {
    let name = [user.first_name.as_deref(), user.last_name.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let created = user.created.map(|ms| show_time(ms, zone));
    let enabled = user.enabled.map(|e| if e { "yes" } else { "no" });
    let rows = [
        ("Name", (!name.is_empty()).then_some(name.as_str())),
        ("Username", user.username.as_deref()),
        ("Email", user.email.as_deref()),
        ("Created", created.as_deref()),
        ("Enabled", enabled),
    ]
    .into_iter()
    .map(|(label, value)| Row {
        label,
        value: value.map_or_else(|| ABSENT.to_owned(), body_text),
    })
    .collect();
    UserView {
        rows,
        attributes: user
            .attributes
            .iter()
            .take(MAX_DETAILS)
            .map(|(key, values)| Detail {
                key: body_text(key),
                value: values
                    .iter()
                    .map(|v| body_text(v))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
            .collect(),
        attributes_hidden: user.attributes.len().saturating_sub(MAX_DETAILS),
    }
}

/// A value as one URL path or fragment part: unreserved characters kept,
/// everything else percent-encoded.
fn url_part(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The mail of `send-test-email`: proves the SMTP settings reach the
/// recipients, and says where it came from.
pub fn test_mail(config: &crate::config::Config) -> Rendered {
    let realm = &config.keycloak.realm;
    let now = chrono::Utc::now();
    Rendered {
        subject: header_text(
            &format!("[Keycloak {realm}] keycloak-notifier test mail"),
            MAX_SUBJECT_CHARS,
        ),
        body: format!(
            "This is a test mail from keycloak-notifier {}.\n\n\
             If you can read it, mails about events in Keycloak realm {} will reach\n\
             this address through {}:{}.\n\nSent at {} (UTC).\n",
            env!("CARGO_PKG_VERSION"),
            body_text(realm),
            config.smtp.host,
            config.smtp.port,
            now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        ),
        html: String::new(),
        message_id: format!(
            "<kn-test.{}.{}@{}>",
            id_safe(realm),
            now.timestamp_millis(),
            domain_safe(config.smtp.sender.email.domain())
        ),
    }
}

/// Text for a header: control characters (CR, LF, tabs, the Unicode line
/// separators) become spaces, runs of spaces collapse, and the result is cut.
/// Characters that must not reach a mail as they are: control characters,
/// the Unicode line separators, and the bidirectional overrides and
/// isolates, which can make text read differently from what it is (an IP
/// address shown backwards). Letters of right-to-left scripts are fine.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

pub fn header_text(value: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(value.len().min(max_chars * 4));
    let mut chars = 0;
    let mut last_space = true;
    for c in value.chars() {
        let c = if is_unsafe(c) || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && last_space {
            continue;
        }
        if chars == max_chars {
            out.push('…');
            return out;
        }
        last_space = c == ' ';
        out.push(c);
        chars += 1;
    }
    out.trim_end().to_owned()
}

/// Text for one value in the body: control characters escaped visibly
/// (`\n`, `\u{7}`), so an injected line break shows as what it is, and cut to
/// [`MAX_VALUE_CHARS`] with the full length said.
pub fn body_text(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(MAX_VALUE_CHARS + 64));
    for (count, c) in value.chars().enumerate() {
        if count == MAX_VALUE_CHARS {
            let _ = write!(out, "… (cut, {} characters in all)", value.chars().count());
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// A Message-ID part: letters, digits and `-` kept, anything else `=XX`.
fn id_safe(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "={byte:02X}");
        }
    }
    if out.is_empty() { "-".into() } else { out }
}

fn domain_safe(domain: &str) -> String {
    let ok = !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        domain.to_owned()
    } else {
        "keycloak-notifier.invalid".into()
    }
}

/// Why a mail was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("cannot build the mail: {0}")]
    Build(String),
    #[error("cannot set up SMTP for {host}:{port}: {reason}")]
    Setup {
        host: String,
        port: u16,
        reason: String,
    },
    /// Worth trying again: the server is unreachable, busy (4xx), or
    /// refused the connection, TLS, the login or the sender.
    #[error("the mail was not sent, will retry: {0}")]
    Transient(String),
    /// The server refused this mail's recipients or content for good (5xx).
    #[error("the SMTP server refused the mail for good: {0}")]
    Permanent(String),
}

impl MailError {
    /// Whether sending the same mail again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, MailError::Transient(_))
    }

    /// What went wrong, without the word on retrying (for reports).
    pub fn detail(&self) -> String {
        match self {
            MailError::Transient(detail) | MailError::Permanent(detail) => detail.clone(),
            other => other.to_string(),
        }
    }
}

/// Addresses a rendered mail from the sender to `recipients`.
pub fn build_message(
    rendered: Rendered,
    smtp: &SmtpConfig,
    recipients: &[Mailbox],
) -> Result<Message, MailError> {
    let mut builder = Message::builder()
        .from(smtp.sender.clone())
        .subject(rendered.subject)
        .message_id(Some(rendered.message_id));
    for recipient in recipients {
        builder = builder.to(recipient.clone());
    }
    let built = if rendered.html.is_empty() {
        builder.header(ContentType::TEXT_PLAIN).body(rendered.body)
    } else {
        builder.multipart(MultiPart::alternative_plain_html(
            rendered.body,
            rendered.html,
        ))
    };
    built.map_err(|err| MailError::Build(err.to_string()))
}

/// Something that delivers mails: SMTP in the product, a recorder in tests.
pub trait Mailer {
    /// Resolves when the server has accepted the mail.
    fn send(&self, message: Message) -> impl Future<Output = Result<(), MailError>> + Send;
}

/// One mailer shared by the loops of several realms.
impl<M: Mailer + Send + Sync> Mailer for std::sync::Arc<M> {
    fn send(&self, message: Message) -> impl Future<Output = Result<(), MailError>> + Send {
        self.as_ref().send(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SmtpSecurity;
    use crate::event::tests::register_event;
    use proptest::prelude::*;

    fn smtp() -> SmtpConfig {
        SmtpConfig {
            host: "localhost".into(),
            port: 25,
            security: SmtpSecurity::None,
            sender: "Keycloak <kc@example.com>".parse().unwrap(),
            recipients: vec![
                "a@example.com".parse().unwrap(),
                "b@example.com".parse().unwrap(),
            ],
            credentials: None,
            extra_roots: Vec::new(),
        }
    }

    #[test]
    fn a_registration_reads_well() {
        let event = register_event("4b1d6a7e-7f3c-4d4e-9a55-0c7d1c2f9b10", 1_764_763_200_123);
        let mail = render(&event, "test", "example.com");
        assert_eq!(
            mail.subject,
            "[Keycloak test] REGISTER: alice (alice@example.test)"
        );
        assert_eq!(
            mail.message_id,
            "<kn.test.4b1d6a7e-7f3c-4d4e-9a55-0c7d1c2f9b10@example.com>"
        );
        for line in [
            "A new user registered in Keycloak realm test: alice (alice@example.test).",
            "Time (UTC): 2025-12-03T12:00:00.123Z",
            "Realm:      test",
            "Event type: REGISTER",
            "Username:   alice",
            "Email:      alice@example.test",
            "User ID:    0b9e1f6c-user",
            "IP address: 192.0.2.7",
            "Client:     web",
            "Error:      -",
            "  register_method = form",
        ] {
            assert!(
                mail.body.contains(line),
                "missing {line:?} in\n{}",
                mail.body
            );
        }
    }

    #[test]
    fn the_message_id_depends_only_on_realm_and_event() {
        let a = render(&register_event("id-1", 1), "test", "example.com");
        let mut later = register_event("id-1", 1);
        later.details.insert("username".into(), "changed".into());
        assert_eq!(
            a.message_id,
            render(&later, "test", "example.com").message_id
        );
        assert_ne!(
            a.message_id,
            render(&register_event("id-2", 1), "test", "example.com").message_id
        );
        assert_ne!(
            a.message_id,
            render(&register_event("id-1", 1), "prod", "example.com").message_id
        );
        assert_eq!(
            render(&register_event("x", 1), "my realm", "bad domain").message_id,
            "<kn.my=20realm.x@keycloak-notifier.invalid>"
        );
    }

    #[test]
    fn crlf_in_a_username_cannot_inject_a_header() {
        let mut event = register_event("e", 1);
        event.details.insert(
            "username".into(),
            "mallory\r\nBcc: victim@example.com\r\n\r\n<script>".into(),
        );
        let mail = render(&event, "test", "example.com");
        assert!(!mail.subject.contains(['\r', '\n']));
        assert!(
            mail.body
                .contains("mallory\\r\\nBcc: victim@example.com\\r\\n\\r\\n<script>")
        );
        let raw = String::from_utf8(
            build_message(mail, &smtp(), &smtp().recipients)
                .unwrap()
                .formatted(),
        )
        .unwrap();
        assert!(!raw.lines().any(|l| l.starts_with("Bcc:")), "{raw}");
    }

    #[test]
    fn times_show_in_the_configured_zone_with_utc_beside_them() {
        let event = register_event("e", 1_764_763_200_123);
        let mail = render_with(
            &event,
            &Context {
                realm: "test",
                domain: "example.com",
                time_zone: "Europe/Berlin".parse().unwrap(),
                user: None,
                console: None,
                templates: None,
            },
        );
        assert!(
            mail.body
                .contains("Time:       2025-12-03 13:00:00 CET (2025-12-03T12:00:00.123Z UTC)"),
            "{}",
            mail.body
        );
    }

    #[test]
    fn the_user_as_keycloak_knows_them_is_added_escaped() {
        let user = UserInfo {
            username: Some("alice".into()),
            first_name: Some("<b>Alice</b>".into()),
            last_name: Some("Liddell\r\nBcc: x@example.com".into()),
            email: Some("alice@example.test".into()),
            created: Some(1_764_763_200_000),
            enabled: Some(true),
            attributes: [(
                "department".to_owned(),
                vec!["R&D".to_owned(), "Ops".to_owned()],
            )]
            .into(),
        };
        let mail = render_with(
            &register_event("e", 1),
            &Context {
                realm: "test",
                domain: "example.com",
                time_zone: Tz::UTC,
                user: Some(&user),
                console: Some("https://sso.example.com/"),
                templates: None,
            },
        );
        for line in [
            "The user in Keycloak now:",
            "  Name:       <b>Alice</b> Liddell\\r\\nBcc: x@example.com",
            "  Created:    2025-12-03T12:00:00.000Z",
            "  Enabled:    yes",
            "  department = R&D, Ops",
        ] {
            assert!(
                mail.body.contains(line),
                "missing {line:?} in\n{}",
                mail.body
            );
        }
    }

    #[test]
    fn a_megabyte_value_is_cut_and_says_so() {
        let mut event = register_event("e", 1);
        event
            .details
            .insert("username".into(), "x".repeat(1_000_000));
        let mail = render(&event, "test", "example.com");
        assert!(mail.subject.chars().count() <= MAX_SUBJECT_CHARS + 1);
        assert!(mail.body.contains("(cut, 1000000 characters in all)"));
        assert!(mail.body.len() < 20_000, "{}", mail.body.len());
    }

    #[test]
    fn many_details_are_counted_not_listed() {
        let mut event = register_event("e", 1);
        for i in 0..500 {
            event.details.insert(format!("k{i:03}"), "v".into());
        }
        let body = render(&event, "test", "example.com").body;
        assert!(body.contains("… and 454 more details not shown"), "{body}");
    }

    #[test]
    fn an_event_with_nothing_but_time_and_type_still_renders() {
        let event =
            Event::parse_page(&serde_json::json!([{"time": i64::MAX, "type": "LOGIN_ERROR"}]))
                .unwrap()
                .remove(0);
        let mail = render(&event, "test", "example.com");
        assert_eq!(mail.subject, "[Keycloak test] LOGIN_ERROR");
        assert!(mail.body.contains("(out of range)"));
        build_message(mail, &smtp(), &smtp().recipients).unwrap();
    }

    #[test]
    fn the_mail_goes_to_every_recipient_as_plain_text() {
        let message = build_message(
            render(&register_event("e", 1), "test", "example.com"),
            &smtp(),
            &smtp().recipients,
        )
        .unwrap();
        let to: Vec<String> = message
            .envelope()
            .to()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(to, ["a@example.com", "b@example.com"]);
        let raw = String::from_utf8(message.formatted()).unwrap();
        assert!(
            raw.contains("Content-Type: text/plain; charset=utf-8"),
            "{raw}"
        );
        assert!(raw.contains("Message-ID: <kn.test.e@example.com>"), "{raw}");
    }

    proptest! {
        /// Whatever an event holds, rendering and building never panic and
        /// no header line comes from event data.
        #[test]
        fn hostile_fields_never_panic_or_inject_headers(
            username in any::<String>(),
            email in ".{0,40}",
            kind in "[A-Z_]{1,20}",
            ip in any::<String>(),
            extra in proptest::collection::btree_map(any::<String>(), any::<String>(), 0..8),
            time in any::<i64>(),
        ) {
            let mut event = register_event("id", 0);
            event.time = time;
            event.kind = kind;
            event.ip_address = Some(ip);
            event.details = extra;
            event.details.insert("username".into(), format!("{username}\r\nX-Injected: 1"));
            event.details.insert("email".into(), email);
            let mail = render(&event, "test", "example.com");
            prop_assert!(!mail.subject.chars().any(|c| c.is_control()));
            let raw = String::from_utf8_lossy(&build_message(mail, &smtp(), &smtp().recipients).unwrap().formatted()).into_owned();
            let headers = raw.split("\r\n\r\n").next().unwrap_or_default();
            prop_assert!(!headers.lines().any(|l| l.starts_with("X-Injected")), "{}", headers);
        }
    }
}

//! Mail templates (minijinja): a subject, a text part and an HTML part per
//! kind of event (registration, failed login, credential change, admin
//! change), with a generic fallback.
//!
//! The defaults are built into the binary (`templates/` in the source);
//! `NOTIFIER_TEMPLATE_DIR` can replace any of them by a file of the same
//! name. HTML templates are autoescaped, and a variable a template names but
//! the mail does not have is an error, not an empty string. Every template
//! is tried on sample events at start-up, so a broken override stops the
//! notifier before it mails anything.

use std::path::Path;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

/// The built-in templates.
const DEFAULTS: &[(&str, &str)] = &[
    ("subject.txt", include_str!("../templates/subject.txt")),
    (
        "event_rows.txt",
        include_str!("../templates/event_rows.txt"),
    ),
    (
        "event_rows.html",
        include_str!("../templates/event_rows.html"),
    ),
    ("layout.html", include_str!("../templates/layout.html")),
    ("generic.txt", include_str!("../templates/generic.txt")),
    ("generic.html", include_str!("../templates/generic.html")),
    ("register.txt", include_str!("../templates/register.txt")),
    ("register.html", include_str!("../templates/register.html")),
    (
        "login_error.txt",
        include_str!("../templates/login_error.txt"),
    ),
    (
        "login_error.html",
        include_str!("../templates/login_error.html"),
    ),
    (
        "credential.txt",
        include_str!("../templates/credential.txt"),
    ),
    (
        "credential.html",
        include_str!("../templates/credential.html"),
    ),
    (
        "digest.subject.txt",
        include_str!("../templates/digest.subject.txt"),
    ),
    ("digest.txt", include_str!("../templates/digest.txt")),
    ("digest.html", include_str!("../templates/digest.html")),
    ("admin.txt", include_str!("../templates/admin.txt")),
    ("admin.html", include_str!("../templates/admin.html")),
];

/// Event types whose mail is about a user's credentials.
const CREDENTIAL_TYPES: &[&str] = &[
    "UPDATE_PASSWORD",
    "UPDATE_CREDENTIAL",
    "REMOVE_CREDENTIAL",
    "RESET_PASSWORD",
    "UPDATE_TOTP",
    "REMOVE_TOTP",
];

/// The template kind of an event type: `register`, `login_error`,
/// `credential` or `generic`. A template named after the type itself
/// (`update_email.txt`) wins over its kind.
pub fn kind_of(event_type: &str) -> &'static str {
    match event_type {
        t if t.starts_with(crate::event::ADMIN_PREFIX) => "admin",
        "REGISTER" => "register",
        "LOGIN_ERROR" => "login_error",
        t if CREDENTIAL_TYPES.contains(&t) => "credential",
        _ => "generic",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read the template directory {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("template {name}: {reason}")]
    Invalid { name: String, reason: String },
}

/// A label and a value, as the templates list them.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub label: &'static str,
    pub value: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Detail {
    pub key: String,
    pub value: String,
}

/// The user as Keycloak holds them now.
#[derive(Debug, Clone, Serialize)]
pub struct UserView {
    pub rows: Vec<Row>,
    pub attributes: Vec<Detail>,
    pub attributes_hidden: usize,
}

/// The event as the templates see it: every value already escaped for a
/// text mail (control characters visible, long values cut).
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: Option<String>,
    pub time: String,
    pub user_id: Option<String>,
    pub username: Option<String>,
    pub email: Option<String>,
    pub ip_address: Option<String>,
    pub client: Option<String>,
    pub error: Option<String>,
}

/// Everything a template can use.
#[derive(Debug, Clone, Serialize)]
pub struct MailView {
    pub realm: String,
    pub version: &'static str,
    /// Username and email, or what there is of them.
    pub who: String,
    pub event: EventView,
    pub rows: Vec<Row>,
    pub details: Vec<Detail>,
    pub details_hidden: usize,
    pub user: Option<UserView>,
    /// The admin console's page of the user, when the event names one.
    pub user_link: Option<String>,
    /// The kind's colour in the HTML part.
    pub accent: &'static str,
}

/// One event's line in a digest.
#[derive(Debug, Clone, Serialize)]
pub struct DigestRow {
    pub time: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub who: String,
    pub ip: Option<String>,
    pub client: Option<String>,
    pub error: Option<String>,
}

/// What the digest templates see.
#[derive(Debug, Clone, Serialize)]
pub struct DigestView {
    pub realm: String,
    pub version: &'static str,
    /// How many events the digest stands for (all of them).
    pub count: usize,
    /// The event types, comma-separated.
    pub types: String,
    pub first_time: String,
    pub last_time: String,
    pub rows: Vec<DigestRow>,
    /// Events counted but not listed.
    pub hidden: usize,
}

/// A rendered mail's parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub subject: String,
    pub text: String,
    pub html: String,
}

pub struct Templates {
    env: Environment<'static>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Templates")
    }
}

impl Templates {
    /// The built-in templates only.
    pub fn builtin() -> Self {
        Self::load(None)
            .unwrap_or_else(|err| unreachable!("the built-in templates are valid: {err}"))
    }

    /// The built-in templates, each replaced by a file of the same name in
    /// `dir` (if given), then tried on sample mails.
    pub fn load(dir: Option<&Path>) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|err| TemplateError::Invalid {
                name: "syntax".into(),
                reason: err.to_string(),
            })?;
        env.set_syntax(syntax);
        env.add_filter("pad", pad);
        let invalid = |name: &str, err: minijinja::Error| TemplateError::Invalid {
            name: name.to_owned(),
            reason: describe(&err),
        };
        for (name, source) in DEFAULTS {
            env.add_template_owned(*name, *source)
                .map_err(|e| invalid(name, e))?;
        }
        if let Some(dir) = dir {
            let read_err = |reason: String| TemplateError::Read {
                path: dir.display().to_string(),
                reason,
            };
            let entries = std::fs::read_dir(dir).map_err(|e| read_err(e.to_string()))?;
            for entry in entries {
                let path = entry.map_err(|e| read_err(e.to_string()))?.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned)
                else {
                    continue;
                };
                if !(name.ends_with(".txt") || name.ends_with(".html")) {
                    continue;
                }
                let source =
                    std::fs::read_to_string(&path).map_err(|e| TemplateError::Invalid {
                        name: path.display().to_string(),
                        reason: e.to_string(),
                    })?;
                env.add_template_owned(name.clone(), source)
                    .map_err(|e| invalid(&path.display().to_string(), e))?;
            }
        }
        let templates = Self { env };
        templates.try_all()?;
        Ok(templates)
    }

    /// Renders `view` with the templates of `event_type`.
    pub fn render(&self, event_type: &str, view: &MailView) -> Result<Parts, TemplateError> {
        let own = event_type.to_ascii_lowercase();
        let kind = kind_of(event_type);
        let subject = self.render_first(
            &[
                &format!("{own}.subject.txt"),
                &format!("{kind}.subject.txt"),
                "subject.txt",
            ],
            view,
            None,
        )?;
        let subject = crate::mail::header_text(&subject, crate::mail::MAX_SUBJECT_CHARS);
        let text = self.render_first(
            &[&format!("{own}.txt"), &format!("{kind}.txt"), "generic.txt"],
            view,
            None,
        )?;
        let html = self.render_first(
            &[
                &format!("{own}.html"),
                &format!("{kind}.html"),
                "generic.html",
            ],
            view,
            Some(&subject),
        )?;
        Ok(Parts {
            subject,
            text,
            html,
        })
    }

    /// Renders a digest (`digest.subject.txt`, `digest.txt`, `digest.html`).
    pub fn render_digest(&self, view: &DigestView) -> Result<Parts, TemplateError> {
        let subject = self.render_named("digest.subject.txt", Value::from(Serde(view)))?;
        let subject = crate::mail::header_text(&subject, crate::mail::MAX_SUBJECT_CHARS);
        let text = self.render_named("digest.txt", Value::from(Serde(view)))?;
        let context =
            minijinja::context! { subject => subject.clone(), ..Value::from(Serde(view)) };
        let html = self.render_named("digest.html", context)?;
        Ok(Parts {
            subject,
            text,
            html,
        })
    }

    fn render_named(&self, name: &str, context: Value) -> Result<String, TemplateError> {
        let invalid = |err: minijinja::Error| TemplateError::Invalid {
            name: name.to_owned(),
            reason: describe(&err),
        };
        self.env
            .get_template(name)
            .map_err(invalid)?
            .render(context)
            .map_err(invalid)
    }

    fn render_first(
        &self,
        names: &[&str],
        view: &MailView,
        subject: Option<&str>,
    ) -> Result<String, TemplateError> {
        let name = names
            .iter()
            .find(|name| self.env.get_template(name).is_ok())
            .copied()
            .unwrap_or("generic.txt");
        let template = self
            .env
            .get_template(name)
            .map_err(|err| TemplateError::Invalid {
                name: name.to_owned(),
                reason: describe(&err),
            })?;
        let mut context = Value::from(Serde(view));
        if let Some(subject) = subject {
            context = minijinja::context! { subject => subject, ..context };
        }
        template
            .render(context)
            .map_err(|err| TemplateError::Invalid {
                name: name.to_owned(),
                reason: describe(&err),
            })
    }

    /// Renders every kind with sample events, with and without a user and
    /// with every optional value missing.
    fn try_all(&self) -> Result<(), TemplateError> {
        for event_type in [
            "REGISTER",
            "LOGIN_ERROR",
            "UPDATE_PASSWORD",
            "LOGOUT",
            "ADMIN_USER_CREATE",
        ] {
            for full in [true, false] {
                self.render(event_type, &MailView::sample(event_type, full))?;
            }
        }
        for hidden in [0, 3] {
            self.render_digest(&DigestView {
                realm: "example".into(),
                version: env!("CARGO_PKG_VERSION"),
                count: 2 + hidden,
                types: "LOGIN_ERROR".into(),
                first_time: "2026-01-01T00:00:00.000Z".into(),
                last_time: "2026-01-01T00:00:01.000Z".into(),
                rows: vec![DigestRow {
                    time: "2026-01-01T00:00:00.000Z".into(),
                    kind: "LOGIN_ERROR".into(),
                    who: "alice".into(),
                    ip: (hidden == 0).then(|| "192.0.2.1".into()),
                    client: None,
                    error: Some("user_not_found".into()),
                }],
                hidden,
            })?;
        }
        Ok(())
    }
}

impl MailView {
    /// A made-up mail for trying templates.
    fn sample(event_type: &str, full: bool) -> Self {
        let some = |s: &str| full.then(|| s.to_owned());
        MailView {
            realm: "example".into(),
            version: env!("CARGO_PKG_VERSION"),
            who: if full {
                "alice (alice@example.com)".into()
            } else {
                String::new()
            },
            event: EventView {
                kind: event_type.into(),
                id: some("0b9e1f6c-0000-4000-8000-000000000000"),
                time: "2026-01-01T00:00:00.000Z".into(),
                user_id: some("5f1c4a0e-0000-4000-8000-000000000000"),
                username: some("alice"),
                email: some("alice@example.com"),
                ip_address: some("192.0.2.1"),
                client: some("web"),
                error: some("invalid_user_credentials"),
            },
            rows: vec![Row {
                label: "Realm",
                value: "example".into(),
            }],
            details: if full {
                vec![Detail {
                    key: "k".into(),
                    value: "v".into(),
                }]
            } else {
                Vec::new()
            },
            details_hidden: usize::from(full),
            user: full.then(|| UserView {
                rows: vec![Row {
                    label: "Name",
                    value: "Alice".into(),
                }],
                attributes: vec![Detail {
                    key: "a".into(),
                    value: "b".into(),
                }],
                attributes_hidden: 1,
            }),
            user_link: some(
                "https://sso.example.com/admin/master/console/#/example/users/x/settings",
            ),
            accent: "#0052cc",
        }
    }
}

/// `{{ text | pad(12) }}`: left-justified to a width (for aligned columns).
fn pad(value: String, width: usize) -> String {
    format!("{value:<width$}")
}

/// A template error with its place, on one line.
fn describe(err: &minijinja::Error) -> String {
    let mut text = err.to_string();
    if let (Some(name), Some(line)) = (err.name(), err.line()) {
        text = format!("{text} (in {name}, line {line})");
    }
    text.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_types_map_to_their_kind() {
        assert_eq!(kind_of("REGISTER"), "register");
        assert_eq!(kind_of("LOGIN_ERROR"), "login_error");
        assert_eq!(kind_of("UPDATE_PASSWORD"), "credential");
        assert_eq!(kind_of("REMOVE_TOTP"), "credential");
        assert_eq!(kind_of("LOGOUT"), "generic");
        assert_eq!(kind_of("ADMIN_USER_CREATE"), "admin");
    }

    #[test]
    fn an_override_directory_replaces_a_template_and_a_broken_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("register.subject.txt"),
            "New account: {{ who }}",
        )
        .unwrap();
        let templates = Templates::load(Some(dir.path())).unwrap();
        let parts = templates
            .render("REGISTER", &MailView::sample("REGISTER", true))
            .unwrap();
        assert_eq!(parts.subject, "New account: alice (alice@example.com)");
        let other = templates
            .render("LOGIN_ERROR", &MailView::sample("LOGIN_ERROR", true))
            .unwrap();
        assert_eq!(
            other.subject,
            "[Keycloak example] LOGIN_ERROR: alice (alice@example.com)"
        );

        std::fs::write(dir.path().join("generic.txt"), "{{ event.no_such_field }}").unwrap();
        let err = Templates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("generic.txt"), "{err}");
        assert!(err.contains("undefined"), "{err}");

        std::fs::write(dir.path().join("generic.txt"), "{% if %}").unwrap();
        let err = Templates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(err.contains("generic.txt"), "{err}");
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_it() {
        let err = Templates::load(Some(Path::new("/nonexistent/templates"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/templates"), "{err}");
    }
}

//! `keycloak-notifier check`: proves a configuration works, end to end,
//! without mailing anything and without changing anything in Keycloak.
//! One line per check; the command succeeds only when every check passes.

use std::fmt;

use chrono::Utc;

use crate::config::{Config, Credentials};
use crate::cursor::CursorStore;
use crate::keycloak::{KeycloakClient, admin_events_warning, event_settings_warnings};
use crate::smtp::SmtpMailer;

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckLine {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = if self.passed { "ok  " } else { "FAIL" };
        write!(f, "{mark}  {:<16} {}", self.name, self.detail)
    }
}

fn line(name: &'static str, result: Result<String, String>) -> CheckLine {
    let (passed, detail) = match result {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    CheckLine {
        name,
        passed,
        detail,
    }
}

/// Runs every check; a check that cannot run because an earlier one failed
/// says so.
pub async fn run(config: &Config) -> Vec<CheckLine> {
    let mut lines = vec![line("configuration", Ok(config.redacted_summary()))];
    for (name, meant) in &config.unknown_vars {
        lines.push(line(
            "unknown variable",
            Err(match meant {
                Some(meant) => {
                    format!("{name} is not a setting of the notifier; did you mean {meant}?")
                }
                None => format!("{name} is not a setting of the notifier"),
            }),
        ));
    }
    lines.push(line("state directory", state_directory(config)));

    let who = match &config.keycloak.credentials {
        Credentials::ClientSecret { client_id, .. } => format!("client {client_id:?}"),
        Credentials::Password { username, .. } => format!("user {username:?}"),
    };
    match KeycloakClient::new(&config.keycloak) {
        Err(err) => lines.push(line("keycloak login", Err(err.to_string()))),
        Ok(mut keycloak) => match keycloak.connect().await {
            Err(err) => {
                lines.push(line("keycloak login", Err(err.to_string())));
                for name in ["events", "users", "event settings"] {
                    lines.push(line(name, Err("not checked: no login".into())));
                }
            }
            Ok(()) => {
                lines.push(line(
                    "keycloak login",
                    Ok(format!(
                        "{} realm {:?} as {who}",
                        keycloak.base_url(),
                        config.keycloak.auth_realm
                    )),
                ));
                for realm in &config.keycloak.realms {
                    let realm_config = config.for_realm(realm);
                    let mut client = keycloak.for_realm(realm);
                    lines.extend(realm_checks(&realm_config, &mut client).await);
                }
            }
        },
    }

    lines.push(line(
        "smtp",
        match SmtpMailer::new(&config.smtp) {
            Err(err) => Err(err.detail()),
            Ok(mailer) => mailer.probe().await.map_err(|err| err.detail()),
        },
    ));
    lines
}

/// The checks of one watched realm: its events and users can be read, and
/// its event settings keep what is watched.
async fn realm_checks(config: &Config, keycloak: &mut KeycloakClient) -> Vec<CheckLine> {
    let realm = &config.keycloak.realm;
    let in_realm = |result: Result<String, String>| match result {
        Ok(detail) => Ok(format!("realm {realm:?}: {detail}")),
        Err(detail) => Err(format!("realm {realm:?}: {detail}")),
    };
    let now = Utc::now().timestamp_millis();
    let events = keycloak
        .events_page(&config.event_types, now, 0, 1)
        .await
        .map(|_| "readable (role view-events)".to_owned())
        .map_err(|err| err.to_string());
    let users = keycloak
        .users_probe()
        .await
        .map(|()| "readable (role view-users)".to_owned())
        .map_err(|err| err.to_string());
    let settings = match keycloak.events_config().await {
        Err(err) => Err(err.to_string()),
        Ok(settings) => {
            let since = CursorStore::new(&config.state_dir, realm)
                .load()
                .ok()
                .flatten()
                .map_or(now, |c| c.since);
            let mut warnings = event_settings_warnings(&settings, &config.event_types, since, now);
            warnings.extend(admin_events_warning(
                &settings,
                !config.admin_events.is_empty(),
            ));
            if warnings.is_empty() {
                Ok(format!(
                    "events saved, including {}; {}",
                    config.event_types.join(", "),
                    match settings.events_expiration.filter(|s| *s > 0) {
                        Some(s) => format!("kept {s} s"),
                        None => "kept without expiry".into(),
                    }
                ))
            } else {
                Err(warnings.join("; "))
            }
        }
    };
    vec![
        line("events", in_realm(events)),
        line("users", in_realm(users)),
        line("event settings", in_realm(settings)),
    ]
}

/// The state directory takes a file (or, missing, would be created), and
/// every realm's cursor, if any, is readable. Nothing is left behind.
fn state_directory(config: &Config) -> Result<String, String> {
    let dir = &config.state_dir;
    if !dir.exists() {
        return match dir.ancestors().skip(1).find(|p| p.exists()) {
            Some(parent) if parent.is_dir() => Ok(format!(
                "{} does not exist yet; the notifier will create it in {}",
                dir.display(),
                parent.display()
            )),
            _ => Err(format!(
                "{} does not exist and cannot be created",
                dir.display()
            )),
        };
    }
    let probe = dir.join(".check-write");
    std::fs::write(&probe, b"ok")
        .map_err(|err| format!("cannot write in {}: {err}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    let mut cursors = Vec::new();
    for realm in &config.keycloak.realms {
        let cursor = CursorStore::new(dir, realm)
            .load()
            .map_err(|err| err.to_string())?;
        cursors.push(match cursor {
            Some(cursor) => format!(
                "realm {realm:?} at {}",
                chrono::DateTime::from_timestamp_millis(cursor.time).map_or_else(
                    || cursor.time.to_string(),
                    |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                )
            ),
            None => format!("realm {realm:?} not started yet"),
        });
    }
    Ok(format!(
        "{} writable; cursors: {}",
        dir.display(),
        cursors.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_read_as_a_report() {
        let ok = line("smtp", Ok("127.0.0.1:25 answered".into()));
        let failed = line("users", Err("403".into()));
        assert_eq!(
            ok.to_string(),
            "ok    smtp             127.0.0.1:25 answered"
        );
        assert_eq!(failed.to_string(), "FAIL  users            403");
    }
}

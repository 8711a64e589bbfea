//! Helpers for the end-to-end tests: the real Keycloak and Mailpit started by
//! `scripts/stack` (through `scripts/test`), and the real notifier binary.
//!
//! Nothing here stands in for Keycloak or Mailpit. Without a running stack
//! every test fails loudly, naming what is missing.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The test realm and its clients (keycloak-test-realm/test-realm.json).
pub const REALM: &str = "test";
pub const NOTIFIER_CLIENT: &str = "notifier";
pub const NOTIFIER_SECRET: &str = "test-only-notifier-secret/with=odd?chars+&";
pub const PUBLIC_CLIENT: &str = "web";
pub const REDIRECT_URI: &str = "http://localhost/cb";

/// Waits in tests give up after this long.
pub const WAIT: Duration = Duration::from_secs(60);

/// The running stack, as `scripts/stack start` describes it in its env file.
#[derive(Debug, Clone)]
pub struct Stack {
    pub keycloak_url: String,
    pub mailpit_url: String,
    pub smtp_host: String,
    pub smtp_port: String,
}

impl Stack {
    pub fn get() -> Stack {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: the end-to-end tests need the real Keycloak and Mailpit. \
                     Run them with scripts/test, or start a stack with `scripts/stack start DIR` \
                     and `source DIR/env` first."
                )
            })
        };
        Stack {
            keycloak_url: var("KN_KEYCLOAK_URL"),
            mailpit_url: var("KN_MAILPIT_URL"),
            smtp_host: var("KN_SMTP_HOST"),
            smtp_port: var("KN_SMTP_PORT"),
        }
    }

    /// The environment of a notifier watching `types` in the test realm with
    /// the service-account client, mailing `recipient` through Mailpit.
    pub fn notifier_env(
        &self,
        types: &str,
        recipient: &str,
        state_dir: &Path,
    ) -> BTreeMap<String, String> {
        [
            ("KEYCLOAK_URL", self.keycloak_url.as_str()),
            ("KEYCLOAK_REALM", REALM),
            ("KEYCLOAK_CLIENT_ID", NOTIFIER_CLIENT),
            ("KEYCLOAK_CLIENT_SECRET", NOTIFIER_SECRET),
            ("SMTP_HOST", self.smtp_host.as_str()),
            ("SMTP_PORT", self.smtp_port.as_str()),
            ("SMTP_SECURITY", "none"),
            ("SMTP_SENDER", "Keycloak Notifier <notifier@example.test>"),
            ("SMTP_RECEIVER", recipient),
            ("NOTIFIER_EVENT_TYPES", types),
            ("NOTIFIER_POLL_INTERVAL", "1s"),
            ("NOTIFIER_STATE_DIR", state_dir.to_str().unwrap()),
            ("RUST_LOG", "keycloak_notifier=debug,info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}-{:x}{:x}{}",
        std::process::id(),
        nanos % 0xffff_ffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// An RFC 3339 time `secs` seconds ago, for NOTIFIER_START_FROM.
pub fn seconds_ago(secs: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(secs)).to_rfc3339()
}

/// An HTTP client like the notifier's (bundled roots, no system store).
pub fn http(cookies: bool) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(keycloak_notifier::tls::client_config(&[]).unwrap())
        .cookie_store(cookies)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Sends a request and reads its JSON answer.
pub async fn json(request: reqwest::RequestBuilder) -> Value {
    request.send().await.unwrap().json().await.unwrap()
}

// ---------------------------------------------------------------- Keycloak

/// A failed password grant for a user that does not exist: Keycloak stores
/// a LOGIN_ERROR event whose details name `username`.
pub async fn failed_login(stack: &Stack, username: &str) {
    let response = http(false)
        .post(format!(
            "{}/realms/{REALM}/protocol/openid-connect/token",
            stack.keycloak_url
        ))
        .form(&[
            ("grant_type", "password"),
            ("client_id", PUBLIC_CLIENT),
            ("username", username),
            ("password", "wrong-password"),
        ])
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_client_error(),
        "a failed login should be refused, got {}",
        response.status()
    );
}

/// A user registers through Keycloak's own registration form, as a browser
/// does: the auth endpoint with `prompt=create`, cookies kept, the form
/// posted. Returns the new user's id.
pub async fn register_user(stack: &Stack, username: &str, email: &str) -> String {
    let client = http(true);
    let form_page = client
        .get(format!(
            "{}/realms/{REALM}/protocol/openid-connect/auth",
            stack.keycloak_url
        ))
        .query(&[
            ("client_id", PUBLIC_CLIENT),
            ("response_type", "code"),
            ("scope", "openid"),
            ("redirect_uri", REDIRECT_URI),
            ("prompt", "create"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(form_page.status(), 200, "the registration form should load");
    let html = form_page.text().await.unwrap();
    let action = form_action(&html).unwrap_or_else(|| panic!("no registration form in:\n{html}"));
    let response = client
        .post(action)
        .form(&[
            ("username", username),
            ("email", email),
            ("firstName", "Test"),
            ("lastName", "Registrant"),
            ("password", "a-long-test-password-1"),
            ("password-confirm", "a-long-test-password-1"),
        ])
        .send()
        .await
        .unwrap();
    let location = response
        .headers()
        .get("location")
        .map(|l| l.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert!(
        response.status().is_redirection() && location.starts_with(REDIRECT_URI),
        "registration should redirect to the app, got {} {location}: {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );
    user_id(stack, username).await
}

/// The action URL of the registration form, HTML entities undone.
fn form_action(html: &str) -> Option<String> {
    let start = html.find("id=\"kc-register-form\"")?;
    let form = &html[start..];
    let action = form.split("action=\"").nth(1)?.split('"').next()?;
    Some(action.replace("&amp;", "&"))
}

/// An access token of the notifier's service account (view-users).
pub async fn service_token(stack: &Stack) -> String {
    let body = json(
        http(false)
            .post(format!(
                "{}/realms/{REALM}/protocol/openid-connect/token",
                stack.keycloak_url
            ))
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", NOTIFIER_CLIENT),
                ("client_secret", NOTIFIER_SECRET),
            ]),
    )
    .await;
    body["access_token"].as_str().unwrap().to_owned()
}

pub async fn user_id(stack: &Stack, username: &str) -> String {
    let users = json(
        http(false)
            .get(format!("{}/admin/realms/{REALM}/users", stack.keycloak_url))
            .query(&[("username", username), ("exact", "true")])
            .bearer_auth(service_token(stack).await),
    )
    .await;
    users[0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("user {username} not found: {users}"))
        .to_owned()
}

// ---------------------------------------------------------------- Mailpit

/// The mails Mailpit holds for one recipient.
pub struct Mailbox<'a> {
    stack: &'a Stack,
    pub address: String,
}

#[derive(Debug, Clone)]
pub struct MailSummary {
    pub id: String,
    pub subject: String,
    pub message_id: String,
}

impl<'a> Mailbox<'a> {
    pub fn new(stack: &'a Stack, address: &str) -> Self {
        Self {
            stack,
            address: address.to_owned(),
        }
    }

    pub async fn list(&self) -> Vec<MailSummary> {
        let body = json(
            http(false)
                .get(format!("{}/api/v1/search", self.stack.mailpit_url))
                .query(&[
                    ("query", format!("to:\"{}\"", self.address)),
                    ("limit", "10000".into()),
                ]),
        )
        .await;
        body["messages"]
            .as_array()
            .unwrap_or_else(|| panic!("unexpected Mailpit answer: {body}"))
            .iter()
            .map(|m| MailSummary {
                id: m["ID"].as_str().unwrap().to_owned(),
                subject: m["Subject"].as_str().unwrap_or_default().to_owned(),
                message_id: m["MessageID"].as_str().unwrap_or_default().to_owned(),
            })
            .collect()
    }

    /// The mails whose subject contains `needle`.
    pub async fn matching(&self, needle: &str) -> Vec<MailSummary> {
        self.list()
            .await
            .into_iter()
            .filter(|m| m.subject.contains(needle))
            .collect()
    }

    /// Waits until at least `n` mails contain `needle` in their subject.
    pub async fn wait_for(&self, needle: &str, n: usize) -> Vec<MailSummary> {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self.matching(needle).await;
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} mails matching {needle:?} reached {} within {WAIT:?}",
                found.len(),
                self.address
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The text body of one mail.
    pub async fn text(&self, id: &str) -> String {
        let body =
            json(http(false).get(format!("{}/api/v1/message/{id}", self.stack.mailpit_url))).await;
        body["Text"].as_str().unwrap_or_default().to_owned()
    }
}

// ---------------------------------------------------------------- notifier

/// The real notifier binary, running as a child process.
pub struct NotifierProcess {
    child: Child,
    pub log: PathBuf,
}

impl NotifierProcess {
    pub fn start(env: &BTreeMap<String, String>, log: &Path) -> Self {
        let out = File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_keycloak-notifier"))
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the notifier did not exit within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, as `docker stop` sends, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for NotifierProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

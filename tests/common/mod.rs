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
    failed_login_in(stack, REALM, username).await;
}

/// Failed logins named `{prefix}-NNN` for each number in `range`, eight at a
/// time (so that some share a millisecond); returns the names.
pub async fn failed_logins(
    stack: &Stack,
    prefix: &str,
    range: std::ops::Range<usize>,
) -> Vec<String> {
    let names: Vec<String> = range.map(|i| format!("{prefix}-{i:03}")).collect();
    for chunk in names.chunks(8) {
        let logins: Vec<_> = chunk
            .iter()
            .map(|name| {
                let (stack, name) = (stack.clone(), name.clone());
                tokio::spawn(async move { failed_login(&stack, &name).await })
            })
            .collect();
        for login in logins {
            login.await.unwrap();
        }
    }
    names
}

/// Waits until `path` exists (the notifier saves its first cursor at once).
pub fn wait_for_file(path: &Path) {
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`failed_login`] in another realm (one with the public client `web`).
pub async fn failed_login_in(stack: &Stack, realm: &str, username: &str) {
    failed_login_via(stack, realm, PUBLIC_CLIENT, username).await;
}

/// A failed password grant through `client` (a public client with direct
/// access grants, such as `web` or the realm's own `admin-cli`).
pub async fn failed_login_via(stack: &Stack, realm: &str, client: &str, username: &str) {
    let response = http(false)
        .post(format!(
            "{}/realms/{realm}/protocol/openid-connect/token",
            stack.keycloak_url
        ))
        .form(&[
            ("grant_type", "password"),
            ("client_id", client),
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
            ("lastName", "O'Registrant"),
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
pub struct Mailbox {
    api: String,
    pub address: String,
}

#[derive(Debug, Clone)]
pub struct MailSummary {
    pub id: String,
    pub subject: String,
    pub message_id: String,
}

impl Mailbox {
    /// In the stack's Mailpit.
    pub fn new(stack: &Stack, address: &str) -> Self {
        Self::at(&stack.mailpit_url, address)
    }

    /// In the Mailpit whose HTTP API is at `api`.
    pub fn at(api: &str, address: &str) -> Self {
        Self {
            api: api.to_owned(),
            address: address.to_owned(),
        }
    }

    pub async fn list(&self) -> Vec<MailSummary> {
        let body = json(
            http(false)
                .get(format!("{}/api/v1/search", self.api))
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
        self.wait_for_within(needle, n, WAIT).await
    }

    /// [`Mailbox::wait_for`] with its own time limit.
    pub async fn wait_for_within(
        &self,
        needle: &str,
        n: usize,
        limit: Duration,
    ) -> Vec<MailSummary> {
        let deadline = Instant::now() + limit;
        loop {
            let found = self.matching(needle).await;
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} mails matching {needle:?} reached {} within {limit:?}",
                found.len(),
                self.address
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The text part of one mail.
    pub async fn text(&self, id: &str) -> String {
        self.part(id, "Text").await
    }

    /// The HTML part of one mail.
    pub async fn html(&self, id: &str) -> String {
        self.part(id, "HTML").await
    }

    async fn part(&self, id: &str, part: &str) -> String {
        let body = json(http(false).get(format!("{}/api/v1/message/{id}", self.api))).await;
        body[part].as_str().unwrap_or_default().to_owned()
    }
}

/// A Mailpit of a test's own (the stack's binary), for tests that stop it or
/// make it refuse mail without disturbing the other tests.
pub struct MailpitProcess {
    child: Option<Child>,
    pub smtp_port: u16,
    pub http_port: u16,
    database: PathBuf,
    extra: Vec<String>,
}

impl MailpitProcess {
    pub fn start(dir: &Path, extra: &[&str]) -> Self {
        let mut mailpit = Self {
            child: None,
            smtp_port: free_port(),
            http_port: free_port(),
            database: dir.join("mailpit.db"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        mailpit.restart();
        mailpit
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Starts it (again) on the same ports and database, and waits until
    /// its API and SMTP port answer.
    pub fn restart(&mut self) {
        let bin = std::env::var("KN_MAILPIT_BIN")
            .expect("KN_MAILPIT_BIN is not set: run the tests with scripts/test");
        let child = Command::new(bin)
            .args(["--smtp", &format!("127.0.0.1:{}", self.smtp_port)])
            .args(["--listen", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--database", self.database.to_str().unwrap()])
            .args([
                "--max",
                "0",
                "--disable-version-check",
                "--smtp-disable-rdns",
                "--quiet",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.smtp_port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.http_port)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "the test's Mailpit did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it (SIGKILL: an outage, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MailpitProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How many mails name each of `names` (the last word of the subject); a
/// mail for a name not in the list fails the test.
pub fn mails_per_name(names: &[String], mails: &[MailSummary]) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = names.iter().map(|n| (n.clone(), 0)).collect();
    for mail in mails {
        let name = mail.subject.rsplit(' ').next().unwrap_or_default();
        *counts
            .get_mut(name)
            .unwrap_or_else(|| panic!("unexpected mail {:?}", mail.subject)) += 1;
    }
    counts
}

pub fn assert_each_name_mailed_once(names: &[String], mails: &[MailSummary]) {
    let counts = mails_per_name(names, mails);
    let wrong: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        wrong.is_empty(),
        "events not mailed exactly once: {wrong:?}"
    );
    assert_eq!(mails.len(), names.len());
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

//! Keycloak going away and tokens running out, on a real Keycloak.
//!
//! The Keycloak outage runs on a stack of its own with an on-disk database
//! (`KN_STACK_DB=dev-file`), so that its realm and events survive the
//! restart and the other tests keep their Keycloak.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A second stack, stopped when dropped.
struct OwnStack {
    dir: tempfile::TempDir,
}

impl OwnStack {
    fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack")
    }

    fn start_with_disk_database() -> (Self, Stack) {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new(Self::script())
            .args(["start"])
            .arg(dir.path())
            .env("KN_STACK_DB", "dev-file")
            .status()
            .unwrap();
        assert!(
            status.success(),
            "the outage test's own stack did not start"
        );
        let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
        let value = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("export {name}=")))
                .unwrap_or_else(|| panic!("{name} missing from the stack's env file"))
                .to_owned()
        };
        let stack = Stack {
            keycloak_url: value("KN_KEYCLOAK_URL"),
            mailpit_url: value("KN_MAILPIT_URL"),
            smtp_host: value("KN_SMTP_HOST"),
            smtp_port: value("KN_SMTP_PORT"),
        };
        (Self { dir }, stack)
    }

    fn keycloak(&self, action: &str) {
        let status = Command::new(Self::script())
            .arg(action)
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "scripts/stack {action} failed");
    }
}

impl Drop for OwnStack {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keycloak_restart_is_survived_unattended_and_loses_nothing() {
    let (own, stack) = OwnStack::start_with_disk_database();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("kcdown"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("kcdown");
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));

    let before: Vec<String> = (0..10).map(|i| format!("{prefix}-a{i}")).collect();
    for name in &before {
        failed_login(&stack, name).await;
    }
    let mut notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    mailbox.wait_for(&prefix, before.len()).await;

    own.keycloak("keycloak-stop");
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let log = notifier.log_text();
    assert!(
        log.contains("cannot reach Keycloak"),
        "polls should fail while Keycloak is down:\n{log}"
    );
    own.keycloak("keycloak-start");
    let outage = down.elapsed();

    let back = Instant::now();
    let after: Vec<String> = (0..10).map(|i| format!("{prefix}-b{i}")).collect();
    for name in &after {
        failed_login(&stack, name).await;
    }
    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    mailbox.wait_for(&prefix, all.len()).await;
    eprintln!(
        "figure: Keycloak outage {:.0} s (stop to ready); new events mailed {:.1} s after it was back",
        outage.as_secs_f64(),
        back.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_each_name_mailed_once(&all, &mailbox.matching(&prefix).await);
    assert!(
        notifier.is_running(),
        "the notifier must ride out the outage:\n{}",
        notifier.log_text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_60_second_tokens_no_poll_fails_over_three_lifespans() {
    // The test realm's accessTokenLifespan is 60 s.
    const RUN: Duration = Duration::from_secs(190);
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("tokens"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("tokens");
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.insert("NOTIFIER_POLL_INTERVAL".into(), "2s".into());
    let notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    wait_for_file(&state.path().join("cursor-test.json"));

    let started = Instant::now();
    let mut names = Vec::new();
    while started.elapsed() < RUN {
        let name = format!("{prefix}-{:03}", names.len());
        failed_login(&stack, &name).await;
        names.push(name);
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
    mailbox.wait_for(&prefix, names.len()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_each_name_mailed_once(&names, &mailbox.matching(&prefix).await);

    let log = notifier.log_text();
    let tokens = log.matches("got a new access token").count();
    eprintln!(
        "figure: {:.0} s with 60 s tokens: {tokens} tokens fetched, {} polls failed, {} events mailed",
        started.elapsed().as_secs_f64(),
        log.matches("poll failed").count(),
        names.len()
    );
    assert!(
        tokens >= 4,
        "the token should have been renewed at least 3 times:\n{log}"
    );
    assert!(!log.contains("poll failed"), "{log}");
    assert!(!log.contains("401 from Keycloak"), "{log}");
}

//! The notifier end to end, on the real Keycloak and Mailpit of
//! `scripts/stack`: real events in, real mails out.
//!
//! Tests run side by side on one realm and one Mailpit, so each one mails its
//! own recipient and recognises its own events by unique names.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_registration_through_the_real_form_is_mailed_with_email_and_user_id() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("admins"));
    let mailbox = Mailbox::new(&stack, &admin);
    let env = stack.notifier_env("REGISTER", &admin, state.path());
    let notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    // The notifier starts from "now"; wait until it has saved that cursor
    // before the user registers.
    wait_for_file(&state.path().join("cursor-test.json"));

    let username = unique("newuser");
    let email = format!("{username}@example.test");
    let user_id = register_user(&stack, &username, &email).await;

    let mails = mailbox.wait_for(&username, 1).await;
    assert_eq!(mails.len(), 1, "exactly one mail per registration");
    assert_eq!(
        mails[0].subject,
        format!("[Keycloak test] REGISTER: {username} ({email})")
    );
    let text = mailbox.text(&mails[0].id).await;
    for expected in [
        format!("Email:      {email}"),
        format!("User ID:    {user_id}"),
        format!("Username:   {username}"),
        "Event type: REGISTER".to_owned(),
        "Realm:      test".to_owned(),
        "Client:     web".to_owned(),
        "IP address: 127.0.0.1".to_owned(),
        "  register_method = form".to_owned(),
        "The user in Keycloak now:".to_owned(),
        "  Name:       Test O'Registrant".to_owned(),
        "  Enabled:    yes".to_owned(),
    ] {
        assert!(
            text.contains(&expected),
            "missing {expected:?} in:\n{text}\nlog:\n{}",
            notifier.log_text()
        );
    }
    assert!(
        mails[0].message_id.starts_with("kn.test."),
        "{}",
        mails[0].message_id
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn more_than_a_page_of_pending_events_is_each_mailed_exactly_once() {
    const EVENTS: usize = 130;
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("security"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("drain");
    let start_from = seconds_ago(2);

    // Failed logins while no notifier runs; several at once, so that some
    // share a millisecond.
    let names = failed_logins(&stack, &prefix, 0..EVENTS).await;

    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.insert("NOTIFIER_START_FROM".into(), start_from);
    let started = Instant::now();
    let notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    mailbox.wait_for(&prefix, EVENTS).await;
    let drain = started.elapsed();
    eprintln!(
        "figure: drained {EVENTS} pending events in {:.2} s (start-up included)",
        drain.as_secs_f64()
    );

    // Let a few more polls pass: nothing may arrive twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mails = mailbox.matching(&prefix).await;
    assert_each_name_mailed_once(&names, &mails);
    let log = notifier.log_text();
    let most_pages = log
        .split("pages=")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<u32>()
                .ok()
        })
        .max();
    assert!(
        most_pages >= Some(2),
        "the drain should have needed a second page:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_restart_nothing_is_sent_again_and_new_events_still_are() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("restart"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("again");
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    // Small pages, so that page boundaries fall between these events.
    env.insert("NOTIFIER_PAGE_SIZE".into(), "3".into());

    let first_batch: Vec<String> = (0..10).map(|i| format!("{prefix}-a{i}")).collect();
    for name in &first_batch {
        failed_login(&stack, name).await;
    }
    let mut notifier = NotifierProcess::start(&env, &state.path().join("first.log"));
    mailbox.wait_for(&prefix, first_batch.len()).await;
    // The poll that mailed them ends with one more (short) page.
    let deadline = Instant::now() + WAIT;
    loop {
        let (healthy, report) = healthcheck(state.path());
        assert!(healthy, "{report}");
        if report.starts_with("alive; last successful poll") {
            break;
        }
        assert!(Instant::now() < deadline, "{report}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = notifier.terminate();
    assert!(
        status.success(),
        "SIGTERM should stop the notifier cleanly: {status:?}\n{}",
        notifier.log_text()
    );

    let (healthy, report) = healthcheck(state.path());
    assert!(!healthy, "a stopped notifier must not look alive: {report}");

    let restarted = NotifierProcess::start(&env, &state.path().join("second.log"));
    // A new event after the restart proves the restarted notifier polls.
    let late = format!("{prefix}-b0");
    failed_login(&stack, &late).await;
    mailbox.wait_for(&prefix, first_batch.len() + 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut all = first_batch.clone();
    all.push(late);
    assert_each_name_mailed_once(&all, &mailbox.matching(&prefix).await);
    assert!(
        restarted
            .log_text()
            .contains("resuming from the saved cursor")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unparseable_cursor_file_refuses_to_start_and_is_left_alone() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("cursor"));
    let cursor = state.path().join("cursor-test.json");
    std::fs::write(&cursor, "{\"version\":1,\"realm\":\"test\",\"time\":17").unwrap();
    let env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());

    let mut notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    let status = notifier.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", notifier.log_text());
    let log = notifier.log_text();
    assert!(
        log.contains(&cursor.display().to_string()),
        "the error should name the file:\n{log}"
    );
    assert!(log.contains("refusing to start"), "{log}");
    assert_eq!(
        std::fs::read_to_string(&cursor).unwrap(),
        "{\"version\":1,\"realm\":\"test\",\"time\":17",
        "the cursor file must not be reset"
    );
    assert!(Mailbox::new(&stack, &admin).list().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_original_scripts_settings_work_against_the_real_keycloak() {
    // The seed script's variables: a realm user's password through admin-cli,
    // a KEYCLOAK_URL with the legacy /auth/ path, SMTP_RECEIVER.
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("seed"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("seed");
    let mut env: BTreeMap<String, String> = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.remove("KEYCLOAK_CLIENT_ID");
    env.remove("KEYCLOAK_CLIENT_SECRET");
    env.insert(
        "KEYCLOAK_URL".into(),
        format!("{}/auth/", stack.keycloak_url),
    );
    env.insert("KEYCLOAK_USERNAME".into(), "notifier-admin".into());
    env.insert(
        "KEYCLOAK_PASSWORD".into(),
        "notifier-admin-test-only-pw".into(),
    );
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    failed_login(&stack, &format!("{prefix}-x")).await;

    let notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    let mails = mailbox.wait_for(&prefix, 1).await;
    assert_eq!(mails.len(), 1);
    assert!(
        notifier.log_text().contains("using the other form"),
        "{}",
        notifier.log_text()
    );
}

/// Runs `keycloak-notifier healthcheck` as the image's HEALTHCHECK does.
fn healthcheck(state_dir: &std::path::Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keycloak-notifier"))
        .arg("healthcheck")
        .env_clear()
        .env("NOTIFIER_STATE_DIR", state_dir)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

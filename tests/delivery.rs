//! Delivery guarantees on the real stack: every matching event becomes
//! exactly one mail through SMTP outages, refusals and crashes.
//!
//! These tests use a Mailpit of their own (the stack's binary) so that
//! stopping it or making it refuse mail does not disturb the other tests.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

/// Time for the notifier to notice a returned SMTP server: its retry delay
/// may have grown to the 60 s cap (plus jitter) during the outage.
const RECOVERY: Duration = Duration::from_secs(150);

fn env_for(
    stack: &Stack,
    mailpit: &MailpitProcess,
    recipient: &str,
    state: &std::path::Path,
) -> BTreeMap<String, String> {
    let mut env = stack.notifier_env("LOGIN_ERROR", recipient, state);
    env.insert("SMTP_PORT".into(), mailpit.smtp_port.to_string());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    env
}

#[tokio::test(flavor = "multi_thread")]
async fn an_smtp_outage_of_30_seconds_loses_and_duplicates_nothing() {
    let stack = Stack::get();
    let dir = tempfile::tempdir().unwrap();
    let mut mailpit = MailpitProcess::start(dir.path(), &[]);
    let admin = format!("{}@example.test", unique("outage"));
    let mailbox = Mailbox::at(&mailpit.api(), &admin);
    let prefix = unique("smtpdown");
    let env = env_for(&stack, &mailpit, &admin, dir.path());

    let before = failed_logins(&stack, &prefix, 0..20).await;
    let notifier = NotifierProcess::start(&env, &dir.path().join("notifier.log"));
    mailbox.wait_for(&prefix, before.len()).await;

    // SMTP goes away; events keep coming and the notifier keeps retrying.
    mailpit.stop();
    let outage = Instant::now();
    let during = failed_logins(&stack, &prefix, 20..60).await;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    let log = notifier.log_text();
    assert!(
        log.contains("mail not sent; retrying"),
        "the notifier should retry:\n{log}"
    );

    // The same server comes back on the same port.
    mailpit.restart();
    let back = Instant::now();
    let all: Vec<String> = before.iter().chain(&during).cloned().collect();
    mailbox.wait_for_within(&prefix, all.len(), RECOVERY).await;
    eprintln!(
        "figure: SMTP outage {:.0} s with {} events pending; all delivered {:.1} s after the server returned",
        back.duration_since(outage).as_secs_f64(),
        during.len(),
        back.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_each_name_mailed_once(&all, &mailbox.matching(&prefix).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanently_refused_mail_goes_to_the_dead_letter_file_and_later_events_still_go_out() {
    let stack = Stack::get();
    let dir = tempfile::tempdir().unwrap();
    // Every recipient refused with 550, as a server does for an unknown mailbox.
    let mailpit = MailpitProcess::start(
        dir.path(),
        &["--enable-chaos", "--chaos-triggers", "Recipient:550:100"],
    );
    let admin = format!("{}@example.test", unique("refused"));
    let mailbox = Mailbox::at(&mailpit.api(), &admin);
    let prefix = unique("deadletter");
    let env = env_for(&stack, &mailpit, &admin, dir.path());

    let refused = failed_logins(&stack, &prefix, 0..3).await;
    let notifier = NotifierProcess::start(&env, &dir.path().join("notifier.log"));
    let letters_path = dir.path().join("dead-letter-test.jsonl");
    let deadline = Instant::now() + WAIT;
    let mut letters = loop {
        let text = std::fs::read_to_string(&letters_path).unwrap_or_default();
        let names: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter_map(|entry| {
                let name = entry["event"]["details"]["username"].as_str()?.to_owned();
                assert!(entry["error"].as_str().unwrap().contains("550"), "{entry}");
                name.starts_with(&prefix).then_some(name)
            })
            .collect();
        if names.len() >= refused.len() {
            break names;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters missing:\n{}",
            notifier.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    letters.sort();
    assert_eq!(letters, refused, "each refused event once");
    assert!(mailbox.matching(&prefix).await.is_empty());

    // The server accepts mail again: the notifier went on, nothing is stuck.
    let response = http(false)
        .put(format!("{}/api/v1/chaos", mailpit.api()))
        .json(&serde_json::json!({"Recipient": {"ErrorCode": 550, "Probability": 0}}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let later = failed_logins(&stack, &prefix, 3..5).await;
    mailbox.wait_for(&prefix, later.len()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_each_name_mailed_once(&later, &mailbox.matching(&prefix).await);
    let log = notifier.log_text();
    assert!(log.contains("refused the mail for good"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_drain_loses_nothing_and_duplicates_at_most_one_mail_per_kill() {
    const EVENTS: usize = 300;
    const KILLS: usize = 6;
    let stack = Stack::get();
    let dir = tempfile::tempdir().unwrap();
    let mailpit = MailpitProcess::start(dir.path(), &[]);
    let admin = format!("{}@example.test", unique("crash"));
    let mailbox = Mailbox::at(&mailpit.api(), &admin);
    let prefix = unique("crash");
    let mut env = env_for(&stack, &mailpit, &admin, dir.path());
    // Small pages and a slower drain give the kills more moments to land on.
    env.insert("NOTIFIER_PAGE_SIZE".into(), "25".into());
    let names = failed_logins(&stack, &prefix, 0..EVENTS).await;

    let mut kills_mid_drain = 0;
    for round in 0..KILLS {
        let mut notifier =
            NotifierProcess::start(&env, &dir.path().join(format!("run{round}.log")));
        // Kill at a moment spread over the start-up and the drain.
        let delay = Duration::from_millis(150 + (round as u64 * 97) % 500);
        tokio::time::sleep(delay).await;
        let before = mailbox.matching(&prefix).await.len();
        notifier.kill_hard();
        if before > 0 && before < EVENTS {
            kills_mid_drain += 1;
        }
    }
    let notifier = NotifierProcess::start(&env, &dir.path().join("final.log"));
    mailbox.wait_for(&prefix, EVENTS).await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mails = mailbox.matching(&prefix).await;
    let counts = mails_per_name(&names, &mails);
    let lost = counts.values().filter(|n| **n == 0).count();
    let duplicates: usize = counts.values().map(|n| n.saturating_sub(1)).sum();
    eprintln!(
        "figure: kill -9 x{KILLS} ({kills_mid_drain} mid-drain) over {EVENTS} events: {lost} lost, {duplicates} duplicates"
    );
    assert_eq!(lost, 0, "{}", notifier.log_text());
    assert!(
        duplicates <= KILLS,
        "{duplicates} duplicates for {KILLS} kills"
    );
    // A duplicate carries the same Message-ID, so receivers can drop it.
    let mut ids: BTreeMap<&str, usize> = BTreeMap::new();
    for mail in &mails {
        *ids.entry(mail.message_id.as_str()).or_default() += 1;
    }
    assert_eq!(ids.len(), EVENTS, "one Message-ID per event");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_smtp_is_down_exits_0_within_10_s_and_keeps_the_pending_event() {
    let stack = Stack::get();
    let dir = tempfile::tempdir().unwrap();
    let mut mailpit = MailpitProcess::start(dir.path(), &[]);
    let admin = format!("{}@example.test", unique("sigterm"));
    let mailbox = Mailbox::at(&mailpit.api(), &admin);
    let prefix = unique("sigterm");
    let env = env_for(&stack, &mailpit, &admin, dir.path());
    mailpit.stop();
    let pending = failed_logins(&stack, &prefix, 0..1).await;

    let mut notifier = NotifierProcess::start(&env, &dir.path().join("first.log"));
    let deadline = Instant::now() + WAIT;
    while !notifier.log_text().contains("mail not sent; retrying") {
        assert!(Instant::now() < deadline, "{}", notifier.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = Instant::now();
    let status = notifier.terminate();
    eprintln!(
        "figure: SIGTERM during SMTP retries: exit {:?} after {:.2} s",
        status.code(),
        asked.elapsed().as_secs_f64()
    );
    assert!(status.success(), "{}", notifier.log_text());

    // Nothing was claimed: the event goes out once SMTP is back.
    mailpit.restart();
    let _again = NotifierProcess::start(&env, &dir.path().join("second.log"));
    mailbox.wait_for(&prefix, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_each_name_mailed_once(&pending, &mailbox.matching(&prefix).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_100_failed_logins_becomes_one_digest_naming_all_100() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("digest"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("burst");
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    env.insert("NOTIFIER_DIGEST_THRESHOLD".into(), "20".into());
    let names = failed_logins(&stack, &prefix, 0..100).await;

    let _notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    // Other tests' failed logins of the same seconds may share the digest.
    let deadline = Instant::now() + WAIT;
    let digest = loop {
        let mut found = None;
        for mail in mailbox.list().await {
            let text = mailbox.text(&mail.id).await;
            if text.contains(&prefix) {
                assert!(
                    found.is_none(),
                    "the burst is spread over more than one mail"
                );
                found = Some((mail, text));
            }
        }
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no digest arrived");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let (mail, text) = digest;
    assert!(
        mail.subject.contains(" events: LOGIN_ERROR"),
        "{}",
        mail.subject
    );
    for name in &names {
        assert_eq!(
            text.matches(&format!("{name}\n")).count() + text.matches(&format!("{name} ")).count(),
            1,
            "{name} in:\n{text}"
        );
    }
    assert!(
        mail.message_id.starts_with("kn-digest.test."),
        "{}",
        mail.message_id
    );
}

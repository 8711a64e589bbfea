//! The operator's commands on the real stack: `check`, `once`,
//! `send-test-email`, logs (JSON, trace level without secrets) and warnings
//! about misspelt variables.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn run(command: &str, env: &BTreeMap<String, String>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keycloak-notifier"))
        .arg(command)
        .env_clear()
        .envs(env)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[tokio::test(flavor = "multi_thread")]
async fn check_passes_on_a_working_setup_and_reports_each_check() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let env = stack.notifier_env("REGISTER,LOGIN_ERROR", "admins@example.test", state.path());
    let output = run("check", &env);
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    eprintln!("check report:\n{report}");
    assert!(output.status.success(), "{}", text(&output));
    for expected in [
        "ok    configuration",
        "ok    state directory",
        "ok    keycloak login",
        "ok    events           realm \"test\": readable (role view-events)",
        "ok    users            realm \"test\": readable (role view-users)",
        "ok    event settings   realm \"test\": events saved, including REGISTER, LOGIN_ERROR; kept without expiry",
        "ok    smtp",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in:\n{report}"
        );
    }
    assert!(!report.contains(NOTIFIER_SECRET), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_naming_what_is_wrong() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let mut env = stack.notifier_env("REGISTER,CLIENT_LOGIN", "admins@example.test", state.path());
    env.insert("NOTIFIER_POLL_INTERVALL".into(), "10s".into());
    env.insert("SMTP_PORT".into(), free_port().to_string());
    let output = run("check", &env);
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        report.contains("FAIL  unknown variable NOTIFIER_POLL_INTERVALL is not a setting of the notifier; did you mean NOTIFIER_POLL_INTERVAL?"),
        "{report}"
    );
    assert!(
        report.contains("FAIL  event settings   realm \"test\": the realm does not save these watched event types, so they are never mailed: CLIENT_LOGIN"),
        "{report}"
    );
    assert!(
        report.contains("FAIL  smtp             connecting failed"),
        "{report}"
    );

    env.insert("KEYCLOAK_CLIENT_SECRET".into(), "wrong-secret".into());
    let output = run("check", &env);
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        report.contains(
            "FAIL  keycloak login   Keycloak rejected the credentials of client \"notifier\""
        ),
        "{report}"
    );
    assert!(
        report.contains("FAIL  users            not checked: no login"),
        "{report}"
    );
    assert!(!report.contains("wrong-secret"), "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn once_mails_what_is_new_and_a_second_run_mails_nothing() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("once"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("once");
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    let names: Vec<String> = (0..5).map(|i| format!("{prefix}-{i}")).collect();
    for name in &names {
        failed_login(&stack, name).await;
    }

    let first = run("once", &env);
    assert!(first.status.success(), "{}", text(&first));
    assert_each_name_mailed_once(&names, &mailbox.matching(&prefix).await);
    let second = run("once", &env);
    assert!(second.status.success(), "{}", text(&second));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_each_name_mailed_once(&names, &mailbox.matching(&prefix).await);

    // SMTP unreachable: the run fails, and the event waits for the next one.
    let late = format!("{prefix}-late");
    failed_login(&stack, &late).await;
    let mut down = env.clone();
    down.insert("SMTP_PORT".into(), free_port().to_string());
    let failed = run("once", &down);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    let again = run("once", &env);
    assert!(again.status.success(), "{}", text(&again));
    let mut all = names.clone();
    all.push(late);
    assert_each_name_mailed_once(&all, &mailbox.matching(&prefix).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn send_test_email_reaches_the_recipients_and_shows_the_reply() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("testmail"));
    let env = stack.notifier_env("REGISTER", &admin, state.path());
    let output = run("send-test-email", &env);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        stdout.starts_with("sent to 1 recipient(s); the server answered: 250 "),
        "{stdout}"
    );
    let mails = Mailbox::new(&stack, &admin)
        .wait_for("keycloak-notifier test mail", 1)
        .await;
    assert_eq!(
        mails[0].subject,
        "[Keycloak test] keycloak-notifier test mail"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_log_even_at_trace_level_and_json_lines_parse() {
    let stack = Stack::get();
    let dir = tempfile::tempdir().unwrap();
    // A Mailpit that takes any login, so the SMTP password is really used.
    let mailpit = MailpitProcess::start(
        dir.path(),
        &["--smtp-auth-accept-any", "--smtp-auth-allow-insecure"],
    );
    let admin = format!("{}@example.test", unique("secrets"));
    let prefix = unique("secrets");
    let smtp_password = "smtp-Secret-Value-0123";
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, dir.path());
    env.insert("SMTP_PORT".into(), mailpit.smtp_port.to_string());
    env.insert("SMTP_USERNAME".into(), "mailer".into());
    env.insert("SMTP_PASSWORD".into(), smtp_password.into());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    env.insert("NOTIFIER_LOG_FORMAT".into(), "json".into());
    env.insert("RUST_LOG".into(), "trace".into());
    failed_login(&stack, &format!("{prefix}-x")).await;
    let mut notifier = NotifierProcess::start(&env, &dir.path().join("notifier.log"));
    Mailbox::at(&mailpit.api(), &admin)
        .wait_for(&prefix, 1)
        .await;
    assert!(notifier.terminate().success());

    let log = notifier.log_text();
    assert!(
        log.lines().count() > 20,
        "trace logging should be busy:\n{log}"
    );
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|err| panic!("not a JSON line ({err}): {line}"));
    }
    for secret in [NOTIFIER_SECRET, smtp_password] {
        let form_encoded: String = url_encode(secret);
        for form in [
            secret.to_owned(),
            form_encoded,
            base64(secret),
            base64(&format!("\0mailer\0{secret}")),
        ] {
            assert!(!log.contains(&form), "{form:?} appears in the log");
        }
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn base64(s: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_endpoint_reports_health_readiness_and_counts_that_match_the_mailbox() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("metrics"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("metrics");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.insert("NOTIFIER_HTTP_ADDR".into(), addr.clone());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    let names: Vec<String> = (0..3).map(|i| format!("{prefix}-{i}")).collect();
    for name in &names {
        failed_login(&stack, name).await;
    }
    let mut notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    mailbox.wait_for(&prefix, names.len()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let get = |path: &str| {
        let url = format!("http://{addr}{path}");
        async move {
            let response = http(false).get(url).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(get("/readyz").await, (200, "ready\n".to_owned()));
    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    // Everything this notifier mailed went to this test's own recipient.
    let in_mailbox = mailbox.list().await.len() as f64;
    let mailed =
        value("keycloak_notifier_events_mailed_total{realm=\"test\",type=\"LOGIN_ERROR\"}");
    assert!(mailed >= names.len() as f64, "{metrics}");
    assert_eq!(mailed, in_mailbox, "{metrics}");
    assert_eq!(
        value("keycloak_notifier_events_seen_total{realm=\"test\",type=\"LOGIN_ERROR\"}"),
        mailed
    );
    assert_eq!(value("keycloak_notifier_smtp_send_seconds_count"), mailed);
    assert!(
        value("keycloak_notifier_polls_total{realm=\"test\",result=\"ok\"}") >= 2.0,
        "{metrics}"
    );
    assert!(value("keycloak_notifier_token_refreshes_total{realm=\"test\"}") >= 1.0);
    assert!(value("keycloak_notifier_last_successful_poll_age_seconds{realm=\"test\"}") < 5.0);
    assert!(!metrics.contains("result=\"failed\""), "{metrics}");

    // The healthcheck subcommand asks the same endpoint.
    let probe = |env: &BTreeMap<String, String>| run("healthcheck", env);
    let alive = probe(&env);
    assert!(alive.status.success(), "{}", text(&alive));
    assert!(notifier.terminate().success());
    let gone = probe(&env);
    assert_eq!(gone.status.code(), Some(1), "{}", text(&gone));
}

#[tokio::test(flavor = "multi_thread")]
async fn several_realms_share_one_token_and_a_failing_realm_does_not_stop_the_others() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admin = format!("{}@example.test", unique("realms"));
    let mailbox = Mailbox::new(&stack, &admin);
    let prefix = unique("realms");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, state.path());
    env.remove("KEYCLOAK_CLIENT_ID");
    env.remove("KEYCLOAK_CLIENT_SECRET");
    // The stack's master-realm admin (test only), for every realm at once;
    // "ghost" does not exist.
    env.insert("KEYCLOAK_REALM".into(), "test,test2,ghost".into());
    env.insert("KEYCLOAK_AUTH_REALM".into(), "master".into());
    env.insert(
        "KEYCLOAK_USERNAME".into(),
        std::env::var("KN_KEYCLOAK_ADMIN_USERNAME").unwrap(),
    );
    env.insert(
        "KEYCLOAK_PASSWORD".into(),
        std::env::var("KN_KEYCLOAK_ADMIN_PASSWORD").unwrap(),
    );
    env.insert("NOTIFIER_HTTP_ADDR".into(), addr.clone());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    failed_login_in(&stack, "test", &format!("{prefix}-one")).await;
    failed_login_in(&stack, "test2", &format!("{prefix}-two")).await;

    let notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    let mut subjects: Vec<String> = mailbox
        .wait_for(&prefix, 2)
        .await
        .into_iter()
        .map(|m| m.subject)
        .collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            format!("[Keycloak test2] LOGIN_ERROR: {prefix}-two"),
            format!("[Keycloak test] LOGIN_ERROR: {prefix}-one"),
        ]
    );

    let metrics = http(false)
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let has = |line: &str| metrics.lines().any(|l| l.starts_with(line));
    assert!(
        has("keycloak_notifier_token_refreshes_total{realm=\"master\"} 1"),
        "one token for all realms:\n{metrics}"
    );
    assert!(
        has("keycloak_notifier_polls_total{realm=\"test\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        has("keycloak_notifier_polls_total{realm=\"test2\",result=\"ok\"}"),
        "{metrics}"
    );
    assert!(
        has("keycloak_notifier_polls_total{realm=\"ghost\",result=\"failed\"}"),
        "{metrics}"
    );
    let ready = http(false)
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "not ready while a realm fails");

    for realm in ["test", "test2", "ghost"] {
        assert!(
            state.path().join(format!("cursor-{realm}.json")).exists(),
            "no cursor for {realm}"
        );
    }
    let log = notifier.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("realm{realm=ghost}") && l.contains("poll failed")),
        "the failing realm's lines should name it:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_and_client_filters_pick_who_gets_which_mail() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admins = format!("{}@example.test", unique("admins"));
    let security = format!("{}@example.test", unique("security"));
    let prefix = unique("routes");
    let mut env = stack.notifier_env("LOGIN_ERROR", &admins, state.path());
    env.insert("NOTIFIER_ROUTES".into(), format!("LOGIN_ERROR={security}"));
    env.insert("NOTIFIER_EXCLUDE_CLIENTS".into(), "admin-cli".into());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    failed_login_via(&stack, "test", "admin-cli", &format!("{prefix}-cli")).await;
    failed_login_via(&stack, "test", "web", &format!("{prefix}-web")).await;

    let _notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    let to_security = Mailbox::new(&stack, &security);
    to_security.wait_for(&prefix, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let subjects: Vec<String> = to_security
        .matching(&prefix)
        .await
        .into_iter()
        .map(|m| m.subject)
        .collect();
    assert_eq!(
        subjects,
        [format!("[Keycloak test] LOGIN_ERROR: {prefix}-web")]
    );
    assert!(
        Mailbox::new(&stack, &admins).list().await.is_empty(),
        "LOGIN_ERROR is routed away from SMTP_RECEIVER"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_created_by_an_admin_becomes_a_mail() {
    let stack = Stack::get();
    let state = tempfile::tempdir().unwrap();
    let admins = format!("{}@example.test", unique("adminevents"));
    let mailbox = Mailbox::new(&stack, &admins);
    let mut env = stack.notifier_env("REGISTER", &admins, state.path());
    env.insert("NOTIFIER_ADMIN_EVENTS".into(), "USER:CREATE".into());
    let _notifier = NotifierProcess::start(&env, &state.path().join("notifier.log"));
    wait_for_file(&state.path().join("admin-cursor-test.json"));

    // An administrator (the stack's master admin, test only) creates a user
    // through the admin API: Keycloak stores no REGISTER for that.
    let token = json(
        http(false)
            .post(format!(
                "{}/realms/master/protocol/openid-connect/token",
                stack.keycloak_url
            ))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                (
                    "username",
                    &std::env::var("KN_KEYCLOAK_ADMIN_USERNAME").unwrap(),
                ),
                (
                    "password",
                    &std::env::var("KN_KEYCLOAK_ADMIN_PASSWORD").unwrap(),
                ),
            ]),
    )
    .await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let username = unique("created");
    let email = format!("{username}@example.test");
    let created = http(false)
        .post(format!("{}/admin/realms/{REALM}/users", stack.keycloak_url))
        .bearer_auth(&token)
        .json(&serde_json::json!({"username": username, "email": email, "enabled": true, "firstName": "Made", "lastName": "ByAdmin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);

    let mails = mailbox.wait_for(&username, 1).await;
    assert_eq!(
        mails[0].subject,
        format!("[Keycloak test] ADMIN_USER_CREATE: {username} ({email})")
    );
    let text = mailbox.text(&mails[0].id).await;
    assert!(
        text.contains("An administrator changed Keycloak realm test: USER CREATE"),
        "{text}"
    );
    assert!(text.contains("  operation = CREATE"), "{text}");
    assert!(text.contains("  admin_user_id = "), "{text}");
    assert!(
        text.contains("  Name:       Made ByAdmin"),
        "the created user is looked up:\n{text}"
    );
}

//! The binary's behaviour before it talks to anything: arguments and
//! configuration errors.

use std::process::Command;

fn notifier() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keycloak-notifier"));
    command.env_clear();
    command
}

#[test]
fn a_bad_configuration_lists_every_problem_and_exits_2() {
    let output = notifier()
        .env("KEYCLOAK_URL", "keycloak:8080")
        .env("KEYCLOAK_CLIENT_SECRET", "top-secret-value")
        .env("SMTP_PORT", "smtp")
        .env("NOTIFIER_EVENT_TYPES", "REGISTER,SIGNUP")
        .env("NOTIFIER_POLL_INTERVAL", "often")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    for line in [
        "invalid configuration (9 problems):",
        "  KEYCLOAK_URL: \"keycloak:8080\" must start with http:// or https://",
        "  KEYCLOAK_REALM: must be set",
        "  KEYCLOAK_CLIENT_ID: must be set when KEYCLOAK_CLIENT_SECRET is set",
        "  SMTP_HOST: must be set",
        "  SMTP_PORT: \"smtp\" is not a port number",
        "  SMTP_SENDER: must be set",
        "  SMTP_RECEIVER: must be set",
        "  NOTIFIER_EVENT_TYPES: unknown Keycloak event type SIGNUP",
        "  NOTIFIER_POLL_INTERVAL: \"often\" is not a duration",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("top-secret-value"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn version_and_help_answer_without_configuration() {
    let version = notifier().arg("--version").output().unwrap();
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8(version.stdout).unwrap().trim(),
        format!("keycloak-notifier {}", env!("CARGO_PKG_VERSION"))
    );
    let help = notifier().arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(
        String::from_utf8(help.stdout)
            .unwrap()
            .contains("KEYCLOAK_URL")
    );
    let unknown = notifier().arg("--frobnicate").output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

#[test]
fn a_state_directory_that_cannot_be_created_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, "").unwrap();
    let state_dir = file.join("state");
    let output = notifier()
        .env("KEYCLOAK_URL", "http://127.0.0.1:9")
        .env("KEYCLOAK_REALM", "test")
        .env("KEYCLOAK_CLIENT_ID", "notifier")
        .env("KEYCLOAK_CLIENT_SECRET", "s")
        .env("SMTP_HOST", "127.0.0.1")
        .env("SMTP_SENDER", "a@example.test")
        .env("SMTP_RECEIVER", "b@example.test")
        .env("NOTIFIER_STATE_DIR", &state_dir)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains(&format!(
            "cannot create the state directory {}",
            state_dir.display()
        )),
        "{stderr}"
    );
}

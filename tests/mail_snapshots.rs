//! Snapshots of rendered mails, one per kind, and with hostile values: what
//! an administrator reads, pinned. Review a change with `cargo insta review`
//! (or `INSTA_UPDATE=always cargo test --test mail_snapshots` and `git diff`).

use keycloak_notifier::event::Event;
use keycloak_notifier::keycloak::UserInfo;
use keycloak_notifier::mail::{self, Context, Rendered};
use serde_json::{Value, json};

fn event(value: Value) -> Event {
    Event::parse_page(&json!([value])).unwrap().remove(0)
}

fn context<'a>(user: Option<&'a UserInfo>) -> Context<'a> {
    Context {
        realm: "acme",
        domain: "example.com",
        time_zone: "Europe/Berlin".parse().unwrap(),
        user,
        console: Some("https://sso.example.com/"),
        templates: None,
    }
}

fn show(mail: &Rendered) -> String {
    format!(
        "Subject: {}\nMessage-ID: {}\n\n----- text -----\n{}\n----- html -----\n{}",
        mail.subject, mail.message_id, mail.body, mail.html
    )
}

fn alice() -> UserInfo {
    UserInfo {
        username: Some("alice".into()),
        first_name: Some("Alice".into()),
        last_name: Some("Liddell".into()),
        email: Some("alice@example.com".into()),
        created: Some(1_764_763_100_000),
        enabled: Some(true),
        attributes: [("department".to_owned(), vec!["Research".to_owned()])].into(),
    }
}

#[test]
fn register() {
    let event = event(json!({
        "id": "3f2c", "time": 1_764_763_200_123u64, "type": "REGISTER", "clientId": "web",
        "userId": "u-1", "ipAddress": "192.0.2.7",
        "details": {"username": "alice", "email": "alice@example.com", "register_method": "form", "first_name": "Alice", "last_name": "Liddell"}
    }));
    let user = alice();
    insta::assert_snapshot!(show(&mail::render_with(&event, &context(Some(&user)))));
}

#[test]
fn login_error() {
    let event = event(json!({
        "id": "9a1b", "time": 1_764_763_200_123u64, "type": "LOGIN_ERROR", "clientId": "web",
        "ipAddress": "203.0.113.9", "error": "user_not_found",
        "details": {"username": "mallory", "auth_method": "openid-connect", "grant_type": "password"}
    }));
    insta::assert_snapshot!(show(&mail::render_with(&event, &context(None))));
}

#[test]
fn credential_change() {
    let event = event(json!({
        "id": "77c0", "time": 1_764_763_200_123u64, "type": "UPDATE_PASSWORD", "clientId": "account-console",
        "userId": "u-1", "ipAddress": "192.0.2.7", "details": {"username": "alice"}
    }));
    let user = alice();
    insta::assert_snapshot!(show(&mail::render_with(&event, &context(Some(&user)))));
}

#[test]
fn other_event_types() {
    let event = event(json!({"time": 1_764_763_200_123u64, "type": "LOGOUT", "userId": "u-1"}));
    insta::assert_snapshot!(show(&mail::render_with(&event, &context(None))));
}

#[test]
fn admin_user_creation() {
    let event = Event::parse_admin_page(&json!([{
        "id": "ad-1", "time": 1_764_763_200_123u64,
        "authDetails": {"realmId": "master-id", "clientId": "cli-id", "userId": "admin-id", "ipAddress": "192.0.2.1"},
        "operationType": "CREATE", "resourceType": "USER", "resourcePath": "users/u-9",
        "representation": "{\"username\":\"carol\",\"email\":\"carol@example.com\",\"enabled\":true}"
    }]))
    .unwrap()
    .remove(0);
    insta::assert_snapshot!(show(&mail::render_with(&event, &context(None))));
}

#[test]
fn digest() {
    let events: Vec<Event> = (0..3)
        .map(|i| {
            event(json!({
                "id": format!("d{i}"), "time": 1_764_763_200_000u64 + i, "type": "LOGIN_ERROR",
                "ipAddress": "203.0.113.9", "error": "invalid_user_credentials",
                "details": {"username": format!("user{i}")}
            }))
        })
        .collect();
    let refs: Vec<&Event> = events.iter().collect();
    insta::assert_snapshot!(show(&mail::render_digest(&refs, &context(None))));
}

#[test]
fn hostile_values() {
    let huge = "x".repeat(1_000_000);
    let event = event(json!({
        "id": "evil\r\nBcc: victim@example.com", "time": 1_764_763_200_123u64, "type": "REGISTER",
        "clientId": "<script>alert(1)</script>", "userId": "u-1",
        "ipAddress": "\u{202e}1.0.0.127",
        "details": {
            "username": "<b>mallory</b>\r\nBcc: victim@example.com",
            "email": "\"><img src=x onerror=alert(1)>@example.com",
            "first_name": "Zalgo Z\u{0335}\u{0321}a\u{0336}l\u{0337}g\u{0338}o",
            "last_name": "\u{05e9}\u{05dc}\u{05d5}\u{05dd} \u{202b}rtl",
            "huge": huge,
            "null_byte": "a\u{0000}b"
        }
    }));
    let user = UserInfo {
        first_name: Some("<script>alert('x')</script>".into()),
        ..alice()
    };
    let mail = mail::render_with(&event, &context(Some(&user)));
    assert!(!mail.subject.contains(['\r', '\n']));
    assert!(
        !mail.html.contains("<script>") && !mail.html.contains("<img"),
        "HTML is escaped"
    );
    assert!(
        mail.body.len() < 40_000,
        "the 1 MB value is cut: {}",
        mail.body.len()
    );
    insta::assert_snapshot!(show(&mail));
}

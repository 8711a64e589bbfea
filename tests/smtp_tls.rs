//! SMTP over TLS with an internal CA, and a login, against a real Mailpit:
//! STARTTLS, TLS from the first byte, and an unknown CA refused.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// A test CA and a certificate it signed for 127.0.0.1, made with openssl.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn make_pki(dir: &Path) -> Pki {
    let path = |name: &str| dir.join(name).display().to_string();
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl").args(args).output().unwrap();
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let (ca, ca_key, key, csr, cert, ext) = (
        path("ca.pem"),
        path("ca.key"),
        path("server.key"),
        path("server.csr"),
        path("server.pem"),
        path("ext.cnf"),
    );
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
        "-days",
        "2",
        "-subj",
        "/CN=keycloak-notifier test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &csr,
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    Pki { ca, cert, key }
}

async fn mails_through(
    security: &str,
    require: &str,
    with_ca: bool,
) -> (
    Mailbox,
    String,
    NotifierProcess,
    tempfile::TempDir,
    MailpitProcess,
) {
    let stack = Stack::get();
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let mailpit = MailpitProcess::start(
        dir.path(),
        &[
            "--smtp-tls-cert",
            &pki.cert,
            "--smtp-tls-key",
            &pki.key,
            require,
            "--smtp-auth-accept-any",
        ],
    );
    let admin = format!("{}@example.test", unique("tls"));
    let prefix = unique(security);
    let mut env = stack.notifier_env("LOGIN_ERROR", &admin, dir.path());
    env.insert("SMTP_HOST".into(), "127.0.0.1".into());
    env.insert("SMTP_PORT".into(), mailpit.smtp_port.to_string());
    env.insert("SMTP_SECURITY".into(), security.into());
    env.insert("SMTP_USERNAME".into(), "notifier-login".into());
    env.insert("SMTP_PASSWORD".into(), "any-password-test-only".into());
    env.insert("NOTIFIER_START_FROM".into(), seconds_ago(2));
    if with_ca {
        env.insert("SMTP_CA_FILE".into(), pki.ca.clone());
    }
    failed_login(&stack, &format!("{prefix}-1")).await;
    let notifier = NotifierProcess::start(&env, &dir.path().join("notifier.log"));
    (
        Mailbox::at(&mailpit.api(), &admin),
        prefix,
        notifier,
        dir,
        mailpit,
    )
}

/// The SMTP login name Mailpit recorded for a mail.
async fn login_of(api: &str, id: &str) -> String {
    let body = json(http(false).get(format!("{api}/api/v1/message/{id}"))).await;
    body["Username"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_with_an_internal_ca_and_a_login_delivers() {
    let (mailbox, prefix, _notifier, _dir, mailpit) =
        mails_through("starttls", "--smtp-require-starttls", true).await;
    let mails = mailbox.wait_for(&prefix, 1).await;
    assert_eq!(
        login_of(&mailpit.api(), &mails[0].id).await,
        "notifier-login"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_from_the_first_byte_with_an_internal_ca_delivers() {
    let (mailbox, prefix, _notifier, _dir, mailpit) =
        mails_through("tls", "--smtp-require-tls", true).await;
    let mails = mailbox.wait_for(&prefix, 1).await;
    assert_eq!(
        login_of(&mailpit.api(), &mails[0].id).await,
        "notifier-login"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_an_unknown_ca_is_refused_and_the_mail_kept_for_later() {
    let (mailbox, prefix, notifier, _dir, _mailpit) =
        mails_through("starttls", "--smtp-require-starttls", false).await;
    let deadline = Instant::now() + WAIT;
    while !notifier.log_text().contains("mail not sent; retrying") {
        assert!(Instant::now() < deadline, "{}", notifier.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = notifier.log_text();
    assert!(
        log.contains("UnknownIssuer"),
        "the error should say the CA is unknown:\n{log}"
    );
    assert!(!log.contains("any-password-test-only"), "{log}");
    assert!(mailbox.matching(&prefix).await.is_empty());
}

//! The shipped artefacts on the real stack: the `FROM scratch` image built
//! from the real Dockerfile (scripts/image, run by scripts/test), and the
//! static binary alone in an empty chroot.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const PODMAN_RUN: &[&str] = &[
    "--runtime",
    "/usr/sbin/runc",
    "run",
    "--network",
    "host",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
];

fn required(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: scripts/test builds the image and the static binary and sets it")
    })
}

fn podman(args: &[&str]) -> Output {
    Command::new("podman").args(args).output().unwrap()
}

/// A container of the image, removed when dropped.
struct Container {
    name: String,
}

impl Container {
    fn start(image: &str, data: &Path, env: &[(String, String)]) -> Self {
        let name = unique("kn-test");
        let volume = format!("{}:/data", data.display());
        let mut args: Vec<&str> = PODMAN_RUN.to_vec();
        args.extend(["-d", "--name", &name, "-v", &volume]);
        let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for pair in &pairs {
            args.extend(["-e", pair]);
        }
        args.push(image);
        let output = podman(&args);
        assert!(
            output.status.success(),
            "podman run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Self { name }
    }

    fn logs(&self) -> String {
        let output = podman(&["logs", &self.name]);
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr)
    }

    /// `podman stop` (SIGTERM) and the exit code.
    fn stop(&self) -> String {
        let output = podman(&["stop", "-t", "10", &self.name]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let code = podman(&["inspect", &self.name, "--format", "{{.State.ExitCode}}"]);
        String::from_utf8_lossy(&code.stdout).trim().to_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", &self.name]);
    }
}

/// The notifier's environment as `-e` pairs, without the host-side state dir
/// (the image's default `/data` is the mounted volume).
fn container_env(stack: &Stack, types: &str, recipient: &str) -> Vec<(String, String)> {
    stack
        .notifier_env(types, recipient, Path::new("/data"))
        .into_iter()
        .filter(|(k, _)| k != "NOTIFIER_STATE_DIR")
        .collect()
}

fn state_dir_for_uid_65534() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("chown")
        .args(["65534:65534"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scratch_image_mails_a_registration_keeps_its_cursor_on_the_volume_and_resends_nothing()
{
    let stack = Stack::get();
    let image = required("KN_IMAGE");
    let data = state_dir_for_uid_65534();
    let admin = format!("{}@example.test", unique("image"));
    let mailbox = Mailbox::new(&stack, &admin);
    let mut env = container_env(&stack, "REGISTER", &admin);
    // The image serves on 0.0.0.0:8080; with the host's network, a free port.
    let http_addr = format!("127.0.0.1:{}", free_port());
    env.push(("NOTIFIER_HTTP_ADDR".into(), http_addr.clone()));

    let first = Container::start(&image, data.path(), &env);
    let cursor = data.path().join("cursor-test.json");
    wait_for_file(&cursor);
    let alice = unique("imguser");
    let alice_id = register_user(&stack, &alice, &format!("{alice}@example.test")).await;
    let mails = mailbox.wait_for(&alice, 1).await;
    assert!(
        mailbox.text(&mails[0].id).await.contains(&alice_id),
        "{}",
        first.logs()
    );

    // The cursor is on the host, written by the image's non-root user.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cursor).unwrap()).unwrap();
    // At least the registration is recorded (other tests' registrations in
    // the same seconds may be too).
    assert!(
        saved["recent"].as_object().is_some_and(|r| !r.is_empty()),
        "{saved}"
    );
    assert!(saved["time"].as_i64() >= saved["since"].as_i64(), "{saved}");
    let owner = Command::new("stat")
        .args(["-c", "%u"])
        .arg(&cursor)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), "65534");

    // The image's own HEALTHCHECK (the binary's healthcheck subcommand,
    // asking /healthz), and readiness after a successful poll.
    let health = podman(&["healthcheck", "run", &first.name]);
    let ready = http(false)
        .get(format!("http://{http_addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(
        health.status.success(),
        "healthcheck: {}{}",
        String::from_utf8_lossy(&health.stdout),
        first.logs()
    );

    assert_eq!(
        first.stop(),
        "0",
        "SIGTERM should end the container cleanly:\n{}",
        first.logs()
    );
    drop(first);

    let second = Container::start(&image, data.path(), &env);
    let bob = unique("imguser");
    register_user(&stack, &bob, &format!("{bob}@example.test")).await;
    mailbox.wait_for(&bob, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        mailbox.matching(&alice).await.len(),
        1,
        "re-sent after restart:\n{}",
        second.logs()
    );
    assert_eq!(mailbox.matching(&bob).await.len(), 1);
    assert!(second.logs().contains("resuming from the saved cursor"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_static_binary_needs_nothing_from_the_system() {
    let stack = Stack::get();
    let binary = PathBuf::from(required("KN_STATIC_BINARY"));
    // An empty root: the binary and a state directory, nothing else (no
    // libc, no CA bundle, no /etc, no /dev).
    let root = tempfile::tempdir().unwrap();
    std::fs::copy(&binary, root.path().join("keycloak-notifier")).unwrap();
    std::fs::create_dir(root.path().join("data")).unwrap();
    let mut entries: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    entries.sort();
    assert_eq!(entries, ["data", "keycloak-notifier"]);

    let admin = format!("{}@example.test", unique("chroot"));
    let mailbox = Mailbox::new(&stack, &admin);
    let env = stack.notifier_env("LOGIN_ERROR", &admin, Path::new("/data"));
    let log = root.path().join("notifier.log");
    let mut child = Command::new("/usr/sbin/chroot")
        .arg(root.path())
        .arg("/keycloak-notifier")
        .env_clear()
        .envs(&env)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(root.path().join("notifier.err")).unwrap())
        .spawn()
        .unwrap();
    wait_for_file(&root.path().join("data/cursor-test.json"));
    let name = unique("chrooted");
    failed_login(&stack, &name).await;
    let found = tokio::time::timeout(WAIT, mailbox.wait_for(&name, 1)).await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(root.path().join("notifier.err")).unwrap_or_default();
    assert!(found.is_ok(), "no mail from the chrooted binary:\n{stderr}");
    assert!(status.success(), "{status:?}\n{stderr}");
}

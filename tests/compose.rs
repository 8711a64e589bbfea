//! The container deployment files, checked without a container engine:
//! `compose/docker-compose.yml` (with `compose/.env.example` and the secret
//! files beside it) and the Kubernetes manifests in `docs/kubernetes.md`.
//!
//! The Compose file is validated against the Compose specification's JSON
//! schema; the other tests check what a schema cannot: that the notifier is
//! given only variables it reads, that its `*_FILE` variables name secrets
//! that exist, that Keycloak imports the real test realm, and that the
//! resulting configuration passes the notifier's own validation and matches
//! that realm.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use keycloak_notifier::config::{Config, Credentials, DEFAULT_STATE_DIR, KNOWN_VARS};
use serde::Deserialize;
use serde_json::Value;

/// A variable the notifier reads that is not in `KNOWN_VARS`.
const RUST_LOG: &str = "RUST_LOG";
/// Where Compose mounts a service's secrets.
const SECRETS_DIR: &str = "/run/secrets/";
/// Where the Keycloak image imports realms from with `--import-realm`.
const KEYCLOAK_IMPORT_DIR: &str = "/opt/keycloak/data/import";
/// The image's user and group.
const IMAGE_USER: u64 = 65534;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose_dir() -> PathBuf {
    repo().join("compose")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// Every document of a YAML text as JSON (anchors resolved, `<<` merged).
fn yaml_documents(text: &str, origin: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            let mut value = serde_norway::Value::deserialize(document)
                .unwrap_or_else(|err| panic!("{origin} is not valid YAML: {err}"));
            value
                .apply_merge()
                .unwrap_or_else(|err| panic!("{origin}: {err}"));
            serde_json::to_value(value)
                .unwrap_or_else(|err| panic!("{origin} cannot be read as JSON: {err}"))
        })
        .collect()
}

/// A variable the notifier may read: known to its configuration, or RUST_LOG.
fn is_read_by_notifier(name: &str) -> bool {
    name == RUST_LOG || KNOWN_VARS.contains(&name)
}

/// A variable whose value names a file holding a secret (not a CA bundle).
fn is_secret_file_var(name: &str) -> bool {
    name.ends_with("_FILE") && !name.ends_with("_CA_FILE")
}

/// A scalar as Compose and Kubernetes read it: strings as they are, numbers
/// and booleans in their YAML spelling.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------- Compose

struct Compose {
    dir: PathBuf,
    doc: Value,
}

impl Compose {
    fn load() -> Self {
        let dir = compose_dir();
        let path = dir.join("docker-compose.yml");
        let mut docs = yaml_documents(&read(&path), &path.display().to_string());
        assert_eq!(
            docs.len(),
            1,
            "{} must hold one YAML document",
            path.display()
        );
        Self {
            dir,
            doc: docs.remove(0),
        }
    }

    fn service(&self, name: &str) -> &Value {
        let service = &self.doc["services"][name];
        assert!(
            service.is_object(),
            "docker-compose.yml has no service {name:?}"
        );
        service
    }

    fn notifier(&self) -> &Value {
        self.service("notifier")
    }

    /// The env files the notifier gets, in order, with whether each is required.
    fn notifier_env_files(&self) -> Vec<(PathBuf, bool)> {
        let entries = match &self.notifier()["env_file"] {
            Value::Null => Vec::new(),
            Value::Array(entries) => entries.clone(),
            single => vec![single.clone()],
        };
        entries
            .iter()
            .map(|entry| match entry {
                Value::String(path) => (self.dir.join(path), true),
                Value::Object(long) => {
                    let path = long["path"].as_str().expect("env_file entry without path");
                    let required = long.get("required").is_none_or(|r| r != false);
                    (self.dir.join(path), required)
                }
                other => panic!("unexpected env_file entry {other}"),
            })
            .collect()
    }

    /// Every variable the notifier gets, in the order Compose applies them
    /// (env files first, then `environment:`; a later one wins). With
    /// `local: false`, optional env files (a user's overrides) are left out.
    fn notifier_env(&self, local: bool) -> Vec<EnvVar> {
        let mut vars = Vec::new();
        for (path, required) in self.notifier_env_files() {
            if !required && !local {
                continue;
            }
            if !path.exists() {
                assert!(
                    !required,
                    "the required env file {} is missing",
                    path.display()
                );
                continue;
            }
            let file = EnvFile::parse(&path).unwrap_or_else(|problems| {
                panic!("{}:\n  {}", path.display(), problems.join("\n  "))
            });
            vars.extend(file.vars);
        }
        let origin = "docker-compose.yml services..env.exampleironment".to_owned();
        match &self.notifier()["environment"] {
            Value::Null => {}
            Value::Object(map) => {
                for (name, value) in map {
                    vars.push(EnvVar {
                        name: name.clone(),
                        value: scalar(value),
                        origin: origin.clone(),
                    });
                }
            }
            Value::Array(list) => {
                for item in list {
                    let item = item.as_str().expect("environment entries are strings");
                    let (name, value) = match item.split_once('=') {
                        Some((name, value)) => (name, Some(value.to_owned())),
                        None => (item, None),
                    };
                    vars.push(EnvVar {
                        name: name.to_owned(),
                        value,
                        origin: origin.clone(),
                    });
                }
            }
            other => panic!("unexpected environment {other}"),
        }
        vars
    }

    /// The host file behind `path` in the notifier's container, which must
    /// be a Compose secret granted to the notifier and declared with a file
    /// that exists and is not empty.
    fn notifier_secret_file(&self, path: &str) -> Result<PathBuf, String> {
        let Some(target) = path.strip_prefix(SECRETS_DIR) else {
            return Err(format!("{path:?} is not under {SECRETS_DIR}"));
        };
        let granted = self.notifier_secrets();
        let Some((source, _)) = granted.iter().find(|(_, t)| t == target || t == path) else {
            let names: Vec<_> = granted.iter().map(|(_, target)| target).collect();
            return Err(format!(
                "{path:?}: the notifier has no secret mounted there (its secrets: {names:?})"
            ));
        };
        let declared = &self.doc["secrets"][source];
        let Some(file) = declared["file"].as_str() else {
            return Err(format!(
                "secret {source:?} is not declared at the top level with a `file:`"
            ));
        };
        let host = self.dir.join(file);
        match fs::read_to_string(&host) {
            Ok(text) if text.strip_suffix('\n').unwrap_or(&text).is_empty() => {
                Err(format!("secret file {} is empty", host.display()))
            }
            Ok(_) => Ok(host),
            Err(err) => Err(format!("secret file {}: {err}", host.display())),
        }
    }

    /// (source, target) of every secret granted to the notifier.
    fn notifier_secrets(&self) -> Vec<(String, String)> {
        let Some(list) = self.notifier()["secrets"].as_array() else {
            return Vec::new();
        };
        list.iter()
            .map(|entry| match entry {
                Value::String(name) => (name.clone(), name.clone()),
                Value::Object(long) => {
                    let source = long["source"].as_str().expect("secret without source");
                    let target = long.get("target").and_then(Value::as_str).unwrap_or(source);
                    (source.to_owned(), target.to_owned())
                }
                other => panic!("unexpected secrets entry {other}"),
            })
            .collect()
    }

    /// (source, target, read only) of every volume of a service, short or
    /// long syntax.
    fn volumes(&self, service: &str) -> Vec<(String, String, bool)> {
        let Some(list) = self.service(service)["volumes"].as_array() else {
            return Vec::new();
        };
        list.iter()
            .map(|entry| match entry {
                Value::String(short) => {
                    let parts: Vec<&str> = short.split(':').collect();
                    match parts.as_slice() {
                        [source, target] => ((*source).to_owned(), (*target).to_owned(), false),
                        [source, target, options] => (
                            (*source).to_owned(),
                            (*target).to_owned(),
                            options.split(',').any(|option| option == "ro"),
                        ),
                        _ => panic!("unexpected volume {short:?}"),
                    }
                }
                Value::Object(long) => (
                    long["source"].as_str().unwrap_or_default().to_owned(),
                    long["target"]
                        .as_str()
                        .expect("volume without target")
                        .to_owned(),
                    long.get("read_only") == Some(&Value::Bool(true)),
                ),
                other => panic!("unexpected volume {other}"),
            })
            .collect()
    }
}

/// One variable given to the notifier, and where it was set.
#[derive(Debug, Clone)]
struct EnvVar {
    name: String,
    value: Option<String>,
    origin: String,
}

/// A Compose env file, restricted to what reads the same everywhere:
/// `NAME=value` lines, comments and blank lines.
struct EnvFile {
    vars: Vec<EnvVar>,
    /// Names in commented-out assignments (`# NAME=...`): the documentation.
    commented_out: BTreeSet<String>,
}

impl EnvFile {
    fn parse(path: &Path) -> Result<Self, Vec<String>> {
        let mut vars: Vec<EnvVar> = Vec::new();
        let mut commented_out = BTreeSet::new();
        let mut problems = Vec::new();
        for (index, line) in read(path).lines().enumerate() {
            let number = index + 1;
            let origin = format!("{}:{number}", path.display());
            if line.trim().is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                // `# NAME=...` documents a variable; other comments are prose.
                let name = comment.trim_start().split_once('=').map(|(name, _)| name);
                if let Some(name) = name.filter(|name| {
                    is_var_name(name) && name.starts_with(|c: char| c.is_ascii_uppercase())
                }) {
                    commented_out.insert(name.to_owned());
                }
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                problems.push(format!(
                    "line {number}: {line:?} is not NAME=value (a bare name would come from the shell)"
                ));
                continue;
            };
            if !is_var_name(name) {
                problems.push(format!("line {number}: {name:?} is not a variable name"));
                continue;
            }
            if value.starts_with(['"', '\'']) {
                problems.push(format!(
                    "line {number}: {name}: no quotes; Compose would strip them"
                ));
            }
            if value.contains('$') {
                problems.push(format!(
                    "line {number}: {name}: no `$`; Compose would interpolate it"
                ));
            }
            if value.contains(" #") || value.contains("\t#") {
                problems.push(format!(
                    "line {number}: {name}: no ` #`; Compose would cut the value there"
                ));
            }
            if value != value.trim() {
                problems.push(format!("line {number}: {name}: leading or trailing blanks"));
            }
            if let Some(earlier) = vars.iter().find(|var| var.name == name) {
                problems.push(format!(
                    "line {number}: {name} is already set at {}",
                    earlier.origin
                ));
            }
            vars.push(EnvVar {
                name: name.to_owned(),
                value: Some(value.to_owned()),
                origin,
            });
        }
        if problems.is_empty() {
            Ok(Self {
                vars,
                commented_out,
            })
        } else {
            Err(problems)
        }
    }
}

fn is_var_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn compose_schema() -> Value {
    // The copy in the repository; the shared one beside a clone only as a
    // fallback, so that the test does not depend on it.
    let candidates = [
        compose_dir().join("compose-spec.json"),
        repo().join("../shared/schemas/compose-spec.json"),
    ];
    let path = candidates
        .iter()
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("no Compose schema: none of {candidates:?} exists"));
    let schema: Value = serde_json::from_str(&read(path))
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()));
    assert_eq!(
        schema["title"],
        "Compose Specification",
        "{} is not the Compose schema",
        path.display()
    );
    schema
}

/// The messages of every way `instance` breaks `schema`, with their paths.
fn schema_errors(schema: &Value, instance: &Value) -> Vec<String> {
    let validator = jsonschema::draft7::new(schema)
        .unwrap_or_else(|err| panic!("the Compose schema does not compile: {err}"));
    validator
        .iter_errors(instance)
        .map(|err| format!("at {}: {err}", err.instance_path()))
        .collect()
}

/// The test realm that Keycloak imports.
fn test_realm() -> Value {
    let path = repo().join("keycloak-test-realm/test-realm.json");
    serde_json::from_str(&read(&path))
        .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display()))
}

/// The value of `NAME=value` in scripts/stack, which pins the versions the
/// end-to-end tests run against.
fn stack_version(name: &str) -> String {
    let path = repo().join("scripts/stack");
    let prefix = format!("{name}=");
    read(&path)
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{} sets no {name}", path.display()))
        .trim_matches(['"', '\''])
        .to_owned()
}

/// Validates variables as the notifier would at start-up, each `*_FILE`
/// value replaced by the host file that `host_file` finds for it.
fn validated_config(
    vars: &[EnvVar],
    host_file: impl Fn(&EnvVar) -> Result<PathBuf, String>,
) -> Config {
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    let mut problems = Vec::new();
    for var in vars {
        let Some(value) = &var.value else { continue };
        if var.name == RUST_LOG {
            continue;
        }
        let value = if is_secret_file_var(&var.name) {
            match host_file(var) {
                Ok(path) => path.display().to_string(),
                Err(problem) => {
                    problems.push(format!("{} ({}): {problem}", var.name, var.origin));
                    continue;
                }
            }
        } else {
            value.clone()
        };
        merged.insert(var.name.clone(), value);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Config::from_vars(
        merged
            .into_iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value))),
    )
    .unwrap_or_else(|err| panic!("the notifier would refuse this configuration: {err}"))
}

#[test]
fn compose_file_follows_the_compose_specification() {
    let errors = schema_errors(&compose_schema(), &Compose::load().doc);
    assert!(
        errors.is_empty(),
        "compose/docker-compose.yml breaks the Compose schema:\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn the_schema_check_catches_mistakes() {
    // A misspelt key and a wrong type must not pass unnoticed.
    let mut compose = Compose::load().doc;
    compose["services"]["notifier"]["restrat"] = "always".into();
    compose["services"]["mailpit"]["ports"] = 8025.into();
    let errors = schema_errors(&compose_schema(), &compose);
    assert!(errors.iter().any(|e| e.contains("restrat")), "{errors:#?}");
    assert!(
        errors.iter().any(|e| e.contains("/services/mailpit/ports")),
        "{errors:#?}"
    );
}

#[test]
fn the_notifier_gets_only_variables_it_reads() {
    let compose = Compose::load();
    let vars = compose.notifier_env(true);
    assert!(!vars.is_empty(), "the notifier gets no variables at all");
    let unknown: Vec<String> = vars
        .iter()
        .filter(|var| !is_read_by_notifier(&var.name))
        .map(|var| format!("{} ({})", var.name, var.origin))
        .collect();
    assert!(
        unknown.is_empty(),
        "variables the notifier does not read (typos?): {unknown:?}; it reads {KNOWN_VARS:?} and {RUST_LOG}"
    );
}

#[test]
fn the_env_file_documents_every_variable() {
    let compose = Compose::load();
    let (path, _) = compose
        .notifier_env_files()
        .into_iter()
        .next()
        .expect("the notifier has no env_file");
    let file = EnvFile::parse(&path)
        .unwrap_or_else(|problems| panic!("{}:\n  {}", path.display(), problems.join("\n  ")));
    let set: BTreeSet<&str> = file.vars.iter().map(|var| var.name.as_str()).collect();
    let unknown: Vec<&String> = file
        .commented_out
        .iter()
        .filter(|name| !is_read_by_notifier(name))
        .collect();
    assert!(
        unknown.is_empty(),
        "{} documents variables the notifier does not read: {unknown:?}",
        path.display()
    );
    let missing: Vec<&&str> = KNOWN_VARS
        .iter()
        .filter(|name| !set.contains(*name) && !file.commented_out.contains(**name))
        .collect();
    assert!(
        missing.is_empty(),
        "{} neither sets nor documents (as `# NAME=...`) {missing:?}",
        path.display()
    );
}

#[test]
fn every_file_variable_names_a_declared_secret() {
    let compose = Compose::load();
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for var in compose.notifier_env(true) {
        if !var.name.ends_with("_FILE") {
            continue;
        }
        let Some(path) = &var.value else { continue };
        match compose.notifier_secret_file(path) {
            Ok(_) => {
                used.insert(path.trim_start_matches(SECRETS_DIR).to_owned());
            }
            Err(problem) => problems.push(format!("{} ({}): {problem}", var.name, var.origin)),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        used.contains("keycloak_client_secret"),
        "the notifier should read its client secret from a file: {used:?}"
    );
    for (source, target) in compose.notifier_secrets() {
        assert!(
            used.contains(&target),
            "the notifier gets secret {source:?} but no *_FILE variable names it"
        );
    }
}

#[test]
fn keycloak_imports_the_test_realm() {
    let compose = Compose::load();
    let keycloak = compose.service("keycloak");
    let mount = compose
        .volumes("keycloak")
        .into_iter()
        .find(|(_, target, _)| target == KEYCLOAK_IMPORT_DIR)
        .unwrap_or_else(|| panic!("keycloak mounts nothing at {KEYCLOAK_IMPORT_DIR}"));
    let (source, _, read_only) = mount;
    let source = compose.dir.join(source);
    let expected = repo().join("keycloak-test-realm");
    assert_eq!(
        source.canonicalize().unwrap_or(source.clone()),
        expected.canonicalize().unwrap(),
        "the realm mount {} is not {}",
        source.display(),
        expected.display()
    );
    assert!(expected.join("test-realm.json").is_file());
    assert!(read_only, "mount the test realm read-only");
    let command: Vec<String> = keycloak["command"]
        .as_array()
        .expect("keycloak's command as a list")
        .iter()
        .filter_map(scalar)
        .collect();
    assert!(
        command.iter().any(|arg| arg == "--import-realm"),
        "{command:?}"
    );
}

#[test]
fn the_stack_runs_the_versions_the_tests_use() {
    let compose = Compose::load();
    let image = |service: &str| {
        compose.service(service)["image"]
            .as_str()
            .unwrap_or_else(|| panic!("{service} has no image"))
            .to_owned()
    };
    assert_eq!(
        image("keycloak"),
        format!(
            "quay.io/keycloak/keycloak:{}",
            stack_version("KEYCLOAK_VERSION")
        )
    );
    assert_eq!(
        image("mailpit"),
        format!("axllent/mailpit:{}", stack_version("MAILPIT_VERSION"))
    );
}

#[test]
fn the_notifier_starts_once_keycloak_is_healthy() {
    let compose = Compose::load();
    let notifier = compose.notifier();
    assert_eq!(
        notifier["depends_on"]["keycloak"]["condition"], "service_healthy",
        "the notifier should wait for a healthy Keycloak"
    );
    assert!(
        compose.service("keycloak")["healthcheck"]["test"].is_array(),
        "keycloak needs a healthcheck for service_healthy"
    );
    let build = &notifier["build"];
    let context = compose
        .dir
        .join(build["context"].as_str().expect("notifier build context"));
    assert_eq!(
        context.canonicalize().unwrap(),
        repo().canonicalize().unwrap()
    );
    let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
    assert!(
        context.join(dockerfile).is_file(),
        "no {dockerfile} in the build context"
    );
}

#[test]
fn the_notifier_configuration_is_valid_and_fits_the_stack() {
    let compose = Compose::load();
    // As committed: a user's .env may point elsewhere.
    let vars = compose.notifier_env(false);
    let config = validated_config(&vars, |var| {
        compose.notifier_secret_file(var.value.as_deref().unwrap_or_default())
    });

    // Keycloak and the mail server are services of this stack.
    let services = compose.doc["services"].as_object().unwrap();
    let keycloak_host = config.keycloak.base_url.host_str().unwrap_or_default();
    assert!(
        services.contains_key(keycloak_host),
        "KEYCLOAK_URL names host {keycloak_host:?}, which is no service of the stack"
    );
    assert!(
        services.contains_key(&config.smtp.host),
        "SMTP_HOST {:?} is no service of the stack",
        config.smtp.host
    );

    // The credentials are those of the test realm's client.
    let realm = test_realm();
    assert_eq!(config.keycloak.realm, realm["realm"]);
    let Credentials::ClientSecret { client_id, secret } = &config.keycloak.credentials else {
        panic!("the stack should use the test realm's confidential client");
    };
    let clients = realm["clients"].as_array().unwrap();
    let client = clients
        .iter()
        .find(|client| client["clientId"] == client_id.as_str())
        .unwrap_or_else(|| panic!("the test realm has no client {client_id:?}"));
    assert_eq!(client["serviceAccountsEnabled"], true);
    assert_eq!(
        client["secret"].as_str(),
        Some(secret.expose()),
        "the secret file does not hold client {client_id:?}'s secret"
    );

    // The realm stores every event type the notifier watches.
    let stored: Vec<&str> = realm["enabledEventTypes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for event_type in &config.event_types {
        assert!(
            stored.contains(&event_type.as_str()),
            "the test realm does not store {event_type} events"
        );
    }

    // The cursor lives on a named volume.
    let state_dir = config.state_dir.to_str().unwrap();
    let (volume, _, _) = compose
        .volumes("notifier")
        .into_iter()
        .find(|(_, target, _)| target == state_dir)
        .unwrap_or_else(|| panic!("nothing is mounted at the state directory {state_dir}"));
    assert!(
        compose.doc["volumes"]
            .as_object()
            .is_some_and(|volumes| volumes.contains_key(&volume)),
        "the state directory's volume {volume:?} is not a named volume"
    );
}

#[test]
fn the_checks_catch_a_misspelt_variable_and_a_missing_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".env.example");
    fs::write(
        &path,
        "# KEYCLOAK_REALM=documented\nKEYCLOAK_RELAM=test\nSMTP_SENDER=\"quoted\"\n",
    )
    .unwrap();
    let problems = EnvFile::parse(&path).err().expect("a quoted value passed");
    assert!(
        problems.iter().any(|p| p.contains("no quotes")),
        "{problems:?}"
    );

    fs::write(&path, "# KEYCLOAK_REALM=documented\nKEYCLOAK_RELAM=test\n").unwrap();
    let file = EnvFile::parse(&path).unwrap();
    assert!(file.commented_out.contains("KEYCLOAK_REALM"));
    assert!(!is_read_by_notifier(&file.vars[0].name));

    let compose = Compose::load();
    let missing = compose.notifier_secret_file("/run/secrets/no_such_secret");
    assert!(
        missing
            .as_ref()
            .is_err_and(|problem| problem.contains("no secret mounted")),
        "{missing:?}"
    );
    let outside = compose.notifier_secret_file("/etc/passwd");
    assert!(outside.is_err(), "{outside:?}");
}

// ------------------------------------------------------------- Kubernetes

/// The YAML documents of every ```yaml block in docs/kubernetes.md.
fn kubernetes_manifests() -> Vec<Value> {
    let path = repo().join("docs/kubernetes.md");
    let text = read(&path);
    let mut manifests = Vec::new();
    let mut block: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        match &mut block {
            None if line.trim_end() == "```yaml" => block = Some((index + 1, String::new())),
            None => {}
            Some((start, yaml)) if line.trim_end() == "```" => {
                let origin = format!("{} (block at line {start})", path.display());
                manifests.extend(
                    yaml_documents(yaml, &origin)
                        .into_iter()
                        .filter(|doc| !doc.is_null()),
                );
                block = None;
            }
            Some((_, yaml)) => {
                yaml.push_str(line);
                yaml.push('\n');
            }
        }
    }
    assert!(
        block.is_none(),
        "{}: a ```yaml block is not closed",
        path.display()
    );
    manifests
}

fn manifest<'a>(manifests: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = manifests.iter().filter(|m| m["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "docs/kubernetes.md should hold one {kind}");
    found[0]
}

#[test]
fn the_kubernetes_manifests_are_consistent() {
    let manifests = kubernetes_manifests();
    for doc in &manifests {
        assert!(
            doc["apiVersion"].is_string() && doc["kind"].is_string(),
            "a manifest without apiVersion or kind: {doc}"
        );
    }
    let secret = manifest(&manifests, "Secret");
    let claim = manifest(&manifests, "PersistentVolumeClaim");
    let deployment = manifest(&manifests, "Deployment");

    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    assert_eq!(
        claim["spec"]["accessModes"],
        serde_json::json!(["ReadWriteOnce"])
    );

    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // Runs as the image's unprivileged user, with nothing it does not need.
    let pod_security = &pod["securityContext"];
    let security = &container["securityContext"];
    let run_as_user = security["runAsUser"]
        .as_u64()
        .or(pod_security["runAsUser"].as_u64());
    assert_eq!(run_as_user, Some(IMAGE_USER));
    assert!(security["runAsNonRoot"] == true || pod_security["runAsNonRoot"] == true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // The probes ask the endpoint the image serves on 8080.
    assert_eq!(container["ports"][0]["containerPort"], 8080);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let port_name = &container["ports"][0]["name"];
    assert_eq!(&container["livenessProbe"]["httpGet"]["port"], port_name);
    assert!(container["resources"]["limits"]["memory"].is_string());

    // Only variables the notifier reads, set to plain values.
    let vars: Vec<EnvVar> = container["env"]
        .as_array()
        .expect("the container's env")
        .iter()
        .map(|entry| EnvVar {
            name: entry["name"]
                .as_str()
                .expect("env entry without name")
                .to_owned(),
            value: scalar(&entry["value"]),
            origin: "docs/kubernetes.md".to_owned(),
        })
        .collect();
    let unknown: Vec<&str> = vars
        .iter()
        .map(|var| var.name.as_str())
        .filter(|name| !is_read_by_notifier(name))
        .collect();
    assert!(
        unknown.is_empty(),
        "variables the notifier does not read: {unknown:?}"
    );

    // Volumes by name, and where the container mounts them.
    let volumes: BTreeMap<&str, &Value> = pod["volumes"]
        .as_array()
        .expect("the pod's volumes")
        .iter()
        .map(|volume| (volume["name"].as_str().unwrap(), volume))
        .collect();
    let mounts: Vec<(&str, &str)> = container["volumeMounts"]
        .as_array()
        .expect("the container's volumeMounts")
        .iter()
        .map(|mount| {
            (
                mount["mountPath"].as_str().unwrap(),
                mount["name"].as_str().unwrap(),
            )
        })
        .collect();

    // The state directory is the claim.
    let state_dir = vars
        .iter()
        .find(|var| var.name == "NOTIFIER_STATE_DIR")
        .and_then(|var| var.value.clone())
        .unwrap_or_else(|| DEFAULT_STATE_DIR.to_owned());
    let (_, data) = mounts
        .iter()
        .find(|(path, _)| *path == state_dir)
        .unwrap_or_else(|| panic!("nothing is mounted at the state directory {state_dir}"));
    assert_eq!(
        volumes[data]["persistentVolumeClaim"]["claimName"],
        claim["metadata"]["name"]
    );

    // Each *_FILE variable names a key of the Secret, mounted as a file;
    // the check runs the notifier's validation on those values.
    let secret_name = &secret["metadata"]["name"];
    // (`data` would be base64; the example uses `stringData`.)
    let secret_values: BTreeMap<String, String> = secret["stringData"]
        .as_object()
        .expect("the Secret's stringData")
        .iter()
        .map(|(key, value)| (key.clone(), scalar(value).unwrap_or_default()))
        .collect();
    let files = tempfile::tempdir().unwrap();
    let config = validated_config(&vars, |var| {
        let path = var.value.as_deref().unwrap_or_default();
        let (mount_path, volume) = mounts
            .iter()
            .find(|(mount_path, _)| path.starts_with(&format!("{mount_path}/")))
            .ok_or_else(|| format!("{path:?} is under no volume mount"))?;
        let source = &volumes[volume]["secret"];
        if source["secretName"] != *secret_name {
            return Err(format!("{path:?} is not in Secret {secret_name}"));
        }
        let file_name = &path[mount_path.len() + 1..];
        let key = match source["items"].as_array() {
            Some(items) => items
                .iter()
                .find(|item| item["path"] == file_name)
                .and_then(|item| item["key"].as_str())
                .ok_or_else(|| format!("no item of the secret volume has path {file_name:?}"))?,
            None => file_name,
        };
        let value = secret_values
            .get(key)
            .ok_or_else(|| format!("Secret {secret_name} has no key {key:?}"))?;
        let host = files.path().join(key);
        fs::write(&host, value).map_err(|err| err.to_string())?;
        Ok(host)
    });
    assert!(matches!(
        config.keycloak.credentials,
        Credentials::ClientSecret { .. }
    ));
}

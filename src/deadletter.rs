//! Events whose mail the SMTP server refused for good.
//!
//! Such an event is not retried forever (that would block every later
//! event) and not dropped silently: it is appended to a dead-letter file in
//! the state directory, one JSON object a line, with the server's reply.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use chrono::Utc;
use serde::Serialize;

use crate::cursor::file_safe;
use crate::event::Event;

#[derive(Debug, thiserror::Error)]
#[error("cannot append to the dead-letter file {path}: {source}")]
pub struct DeadLetterError {
    pub path: PathBuf,
    pub source: io::Error,
}

#[derive(Serialize)]
struct Entry<'a> {
    /// When the mail was given up, RFC 3339.
    refused_at: String,
    realm: &'a str,
    /// The SMTP server's reply.
    error: &'a str,
    event: &'a Event,
}

#[derive(Debug, Clone)]
pub struct DeadLetters {
    path: PathBuf,
    realm: String,
}

impl DeadLetters {
    pub fn new(state_dir: &Path, realm: &str) -> Self {
        Self {
            path: state_dir.join(format!("dead-letter-{}.jsonl", file_safe(realm))),
            realm: realm.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line and syncs it to disk before returning.
    pub fn append(&self, event: &Event, error: &str) -> Result<(), DeadLetterError> {
        let entry = Entry {
            refused_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            realm: &self.realm,
            error,
            event,
        };
        let result = (|| {
            let mut line = serde_json::to_vec(&entry).map_err(io::Error::other)?;
            line.push(b'\n');
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            file.write_all(&line)?;
            file.sync_all()
        })();
        result.map_err(|source| DeadLetterError {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::register_event;

    #[test]
    fn each_refused_event_is_one_json_line_with_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let letters = DeadLetters::new(dir.path(), "test");
        letters
            .append(&register_event("e1", 5), "550 5.1.1 no such user")
            .unwrap();
        letters
            .append(&register_event("e2", 6), "554 rejected\nsecond line")
            .unwrap();
        let text = std::fs::read_to_string(letters.path()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["realm"], "test");
        assert_eq!(lines[0]["error"], "550 5.1.1 no such user");
        assert_eq!(lines[0]["event"]["id"], "e1");
        assert_eq!(lines[0]["event"]["type"], "REGISTER");
        assert_eq!(lines[0]["event"]["details"]["username"], "alice");
        assert_eq!(lines[1]["error"], "554 rejected\nsecond line");
    }
}

//! The persisted position in a realm's event stream.
//!
//! The cursor is the time of the newest event mailed plus the keys of every
//! event mailed in the last [`OVERLAP_MS`] before it. Polls ask again from
//! the start of that window (`since`), so events that share a millisecond
//! (Keycloak's sort has no tie-breaker) and events that became visible late
//! (an event's time is set before its transaction commits) are still found,
//! and the keys make sure none is mailed twice. The cursor is written
//! atomically after each accepted mail, so a crash re-sends at most the mail
//! in flight.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::event::Event;

const FORMAT_VERSION: u32 = 1;

/// How far back each poll looks again before the newest event handled.
pub const OVERLAP_MS: i64 = 5_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Epoch milliseconds of the newest event handled.
    pub time: i64,
    /// Events older than this are never new; polls ask from here.
    pub since: i64,
    /// Dedupe keys of the events handled at or after `since`, with their time.
    pub recent: BTreeMap<String, i64>,
}

impl Cursor {
    /// A first-run cursor: events from `time` on are new.
    pub fn starting_at(time: i64) -> Self {
        Self {
            time,
            since: time,
            recent: BTreeMap::new(),
        }
    }

    /// Whether `event` has not been handled yet.
    pub fn is_new(&self, event: &Event) -> bool {
        event.time >= self.since && !self.recent.contains_key(&event.dedupe_key())
    }

    /// Records `event` as handled and forgets keys that fell out of the window.
    pub fn advance_past(&mut self, event: &Event) {
        if event.time < self.since {
            return;
        }
        self.recent.insert(event.dedupe_key(), event.time);
        self.time = self.time.max(event.time);
        self.since = self.since.max(self.time.saturating_sub(OVERLAP_MS));
        let since = self.since;
        self.recent.retain(|_, time| *time >= since);
    }
}

/// What the cursor file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CursorFile {
    version: u32,
    realm: String,
    time: i64,
    since: i64,
    recent: BTreeMap<String, i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error("cannot read the cursor file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the cursor file {path} is not a valid cursor ({reason}); refusing to start, because \
         starting over would re-send or skip events. Fix or remove the file (removing it starts \
         from NOTIFIER_START_FROM)"
    )]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write the cursor file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot create the state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
}

/// The cursor file of one realm in the state directory.
#[derive(Debug, Clone)]
pub struct CursorStore {
    dir: PathBuf,
    path: PathBuf,
    realm: String,
}

impl CursorStore {
    pub fn new(state_dir: &Path, realm: &str) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
            path: state_dir.join(format!("cursor-{}.json", file_safe(realm))),
            realm: realm.to_owned(),
        }
    }

    /// The cursor of the realm's admin events (`admin-cursor-<realm>.json`).
    pub fn for_admin_events(state_dir: &Path, realm: &str) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
            path: state_dir.join(format!("admin-cursor-{}.json", file_safe(realm))),
            realm: realm.to_owned(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved cursor, or `None` when there is no file yet (first run).
    /// Any other problem is an error: never a silent reset.
    pub fn load(&self) -> Result<Option<Cursor>, CursorError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CursorError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let invalid = |reason: String| CursorError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let file: CursorFile =
            serde_json::from_slice(&bytes).map_err(|err| invalid(err.to_string()))?;
        if file.version != FORMAT_VERSION {
            return Err(invalid(format!("unknown format version {}", file.version)));
        }
        if file.realm != self.realm {
            return Err(invalid(format!(
                "it belongs to realm {:?}, not {:?}",
                file.realm, self.realm
            )));
        }
        if file.time < 0 || file.since < 0 || file.since > file.time {
            return Err(invalid(format!(
                "impossible times (time {}, since {})",
                file.time, file.since
            )));
        }
        Ok(Some(Cursor {
            time: file.time,
            since: file.since,
            recent: file.recent,
        }))
    }

    /// Writes the cursor atomically: a temporary file, fsync, rename over the
    /// old one, fsync of the directory. A crash leaves the old or the new
    /// cursor, never a torn one.
    pub fn save(&self, cursor: &Cursor) -> Result<(), CursorError> {
        let write_err = |source| CursorError::Write {
            path: self.path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&CursorFile {
            version: FORMAT_VERSION,
            realm: self.realm.clone(),
            time: cursor.time,
            since: cursor.since,
            recent: cursor.recent.clone(),
        })
        .map_err(io::Error::other)
        .map_err(write_err)?;
        let tmp = self.path.with_extension("json.tmp");
        let result = (|| {
            let mut file = File::create(&tmp)?;
            file.write_all(&body)?;
            file.write_all(b"\n")?;
            file.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(write_err)
    }

    /// Creates the state directory if it is missing.
    pub fn ensure_dir(&self) -> Result<(), CursorError> {
        fs::create_dir_all(&self.dir).map_err(|source| CursorError::CreateDir {
            path: self.dir.clone(),
            source,
        })
    }
}

/// A realm name as a file-name part: letters, digits, `-`, `_` and `.` kept,
/// every other byte written as `%XX`, so different realms never share a file.
pub(crate) fn file_safe(realm: &str) -> String {
    let mut out = String::with_capacity(realm.len());
    for byte in realm.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_') {
            out.push(char::from(byte));
        } else if byte == b'.' && !out.is_empty() {
            out.push('.');
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::register_event;

    #[test]
    fn events_in_one_millisecond_are_told_apart_by_key() {
        let mut cursor = Cursor::starting_at(100);
        let a = register_event("a", 100);
        assert!(cursor.is_new(&a));
        cursor.advance_past(&a);
        assert!(!cursor.is_new(&a));
        assert!(cursor.is_new(&register_event("b", 100)));
        assert!(
            !cursor.is_new(&register_event("old", 99)),
            "before the first-run start"
        );
    }

    #[test]
    fn a_late_event_inside_the_overlap_window_is_still_new() {
        let mut cursor = Cursor::starting_at(0);
        cursor.advance_past(&register_event("a", 10_000));
        cursor.advance_past(&register_event("c", 20_000));
        assert_eq!((cursor.time, cursor.since), (20_000, 15_000));
        // Committed late: its time is before the newest event handled.
        assert!(cursor.is_new(&register_event("b", 16_000)));
        cursor.advance_past(&register_event("b", 16_000));
        assert!(!cursor.is_new(&register_event("b", 16_000)));
        assert_eq!(
            cursor.time, 20_000,
            "an older event never moves the cursor back"
        );
        // Outside the window: taken as handled (its key is forgotten).
        assert!(!cursor.is_new(&register_event("a", 10_000)));
        assert_eq!(cursor.recent.len(), 2, "{:?}", cursor.recent);
    }

    #[test]
    fn a_missing_file_is_a_first_run_and_a_saved_cursor_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path(), "test");
        assert_eq!(store.load().unwrap(), None);
        let mut cursor = Cursor::starting_at(5);
        cursor.advance_past(&register_event("x", 7));
        cursor.advance_past(&register_event("y", 7));
        store.save(&cursor).unwrap();
        assert_eq!(store.load().unwrap(), Some(cursor));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["cursor-test.json"], "no temporary file left behind");
    }

    #[test]
    fn an_unparseable_cursor_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(dir.path(), "test");
        for garbage in [&b"{not json"[..], b"", b"{\"version\":1}", b"\xff\xfe"] {
            fs::write(store.path(), garbage).unwrap();
            let err = store.load().unwrap_err();
            assert!(matches!(err, CursorError::Invalid { .. }), "{err}");
            assert!(
                err.to_string()
                    .contains(&store.path().display().to_string())
            );
        }
    }

    #[test]
    fn a_cursor_of_another_realm_or_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CursorStore::new(dir.path(), "other")
            .save(&Cursor::starting_at(1))
            .unwrap();
        fs::rename(
            dir.path().join("cursor-other.json"),
            dir.path().join("cursor-test.json"),
        )
        .unwrap();
        let err = CursorStore::new(dir.path(), "test").load().unwrap_err();
        assert!(
            err.to_string().contains("belongs to realm \"other\""),
            "{err}"
        );
        fs::write(
            dir.path().join("cursor-test.json"),
            r#"{"version":9,"realm":"test","time":1,"since":1,"recent":{}}"#,
        )
        .unwrap();
        let err = CursorStore::new(dir.path(), "test").load().unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
    }

    #[test]
    fn a_state_directory_that_cannot_be_written_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = CursorStore::new(&dir.path().join("missing"), "test");
        let err = store.save(&Cursor::starting_at(1)).unwrap_err();
        assert!(
            err.to_string().contains("missing/cursor-test.json"),
            "{err}"
        );
        store.ensure_dir().unwrap();
        store.save(&Cursor::starting_at(1)).unwrap();
    }

    #[test]
    fn realm_names_map_to_distinct_safe_file_names() {
        assert_eq!(file_safe("test"), "test");
        assert_eq!(file_safe("my realm/x"), "my%20realm%2Fx");
        assert_eq!(file_safe(".."), "%2E.");
        assert_eq!(file_safe("a%2F"), "a%252F");
        assert_ne!(file_safe("a/b"), file_safe("a%2Fb"));
    }
}

//! A Keycloak user event, read leniently from the admin API's JSON.
//!
//! Every field but `time` and `type` may be missing or null, and the values
//! are whatever users typed: nothing here trusts their shape or size.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// One user event (`EventRepresentation`). It serialises back to Keycloak's
/// field names (for the dead-letter file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Random UUID, sent by Keycloak 26.2 and later.
    pub id: Option<String>,
    /// Epoch milliseconds.
    pub time: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub realm_id: Option<String>,
    pub client_id: Option<String>,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub ip_address: Option<String>,
    pub error: Option<String>,
    pub details: BTreeMap<String, String>,
}

/// Why an event from the API could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDecodeError {
    #[error("the events response is not a JSON array")]
    NotAnArray,
    #[error("event #{index} is not a JSON object")]
    NotAnObject { index: usize },
    #[error("event #{index} has no numeric `time`")]
    NoTime { index: usize },
    #[error("event #{index} has no `type`")]
    NoType { index: usize },
}

impl Event {
    /// The key that tells events apart. Keycloak 26.2+ gives every event a
    /// random id; older servers do not, and then the event's own content
    /// stands in for it.
    pub fn dedupe_key(&self) -> String {
        match &self.id {
            Some(id) => id.clone(),
            None => format!("content-{:016x}", self.content_hash()),
        }
    }

    /// A stable hash (FNV-1a, 64 bit) of everything the event says.
    fn content_hash(&self) -> u64 {
        let mut hash = Fnv1a::default();
        hash.write_i64(self.time);
        for field in [
            Some(&self.kind),
            self.realm_id.as_ref(),
            self.client_id.as_ref(),
            self.user_id.as_ref(),
            self.session_id.as_ref(),
            self.ip_address.as_ref(),
            self.error.as_ref(),
        ] {
            hash.write_opt_str(field.map(String::as_str));
        }
        for (key, value) in &self.details {
            hash.write_opt_str(Some(key));
            hash.write_opt_str(Some(value));
        }
        hash.0
    }

    /// The user's name as the event tells it (details carry it for
    /// registrations and failed logins).
    pub fn username(&self) -> Option<&str> {
        self.details.get("username").map(String::as_str)
    }

    pub fn email(&self) -> Option<&str> {
        self.details.get("email").map(String::as_str)
    }

    /// Parses one page of the events endpoint.
    pub fn parse_page(body: &Value) -> Result<Vec<Event>, EventDecodeError> {
        parse_items(body, Event::from_json)
    }

    fn from_json(index: usize, value: &Value) -> Result<Event, EventDecodeError> {
        let (object, time) = object_with_time(index, value)?;
        let kind = object
            .get("type")
            .and_then(text)
            .ok_or(EventDecodeError::NoType { index })?;
        let field = |name: &str| object.get(name).and_then(text);
        let details = object
            .get("details")
            .and_then(Value::as_object)
            .map(|map| {
                map.iter()
                    .filter_map(|(key, value)| text(value).map(|v| (key.clone(), v)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Event {
            id: field("id"),
            time,
            kind,
            realm_id: field("realmId"),
            client_id: field("clientId"),
            user_id: field("userId"),
            session_id: field("sessionId"),
            ip_address: field("ipAddress"),
            error: field("error"),
            details,
        })
    }
}

/// Prefix of the `kind` of an event made from an admin event
/// (`ADMIN_USER_CREATE`): templates and subjects tell them apart by it.
pub const ADMIN_PREFIX: &str = "ADMIN_";

impl Event {
    /// Parses one page of the admin-events endpoint into events the rest of
    /// the notifier handles like user events: `kind` is
    /// `ADMIN_<resource>_<operation>`, `user_id` the user the change is
    /// about (for `users/<id>` paths), and the details say who did what:
    /// operation, resource type and path, the acting admin's user id, client
    /// and realm, and the representation when Keycloak stores it (its
    /// username and email are lifted out for the subject).
    pub fn parse_admin_page(body: &Value) -> Result<Vec<Event>, EventDecodeError> {
        parse_items(body, Event::from_admin_json)
    }

    fn from_admin_json(index: usize, value: &Value) -> Result<Event, EventDecodeError> {
        let (object, time) = object_with_time(index, value)?;
        let field = |name: &str| object.get(name).and_then(text);
        let operation = field("operationType").ok_or(EventDecodeError::NoType { index })?;
        let resource = field("resourceType").unwrap_or_else(|| "UNKNOWN".into());
        let auth = object.get("authDetails").and_then(Value::as_object);
        let auth_field = |name: &str| auth.and_then(|a| a.get(name)).and_then(text);
        let path = field("resourcePath");
        let mut details = BTreeMap::new();
        details.insert("operation".to_owned(), operation.clone());
        details.insert("resource_type".to_owned(), resource.clone());
        for (key, value) in [
            ("resource_path", path.clone()),
            ("admin_user_id", auth_field("userId")),
            ("admin_client", auth_field("clientId")),
            ("admin_realm", auth_field("realmId")),
            ("representation", field("representation")),
        ] {
            if let Some(value) = value {
                details.insert(key.to_owned(), value);
            }
        }
        if let Some(extra) = object.get("details").and_then(Value::as_object) {
            for (key, value) in extra {
                if let Some(value) = text(value) {
                    details.entry(key.clone()).or_insert(value);
                }
            }
        }
        // The representation is JSON text; its username and email name the
        // subject of a user change.
        let representation: Option<Value> = details
            .get("representation")
            .and_then(|r| serde_json::from_str(r).ok());
        for key in ["username", "email"] {
            if let Some(value) = representation
                .as_ref()
                .and_then(|r| r.get(key))
                .and_then(text)
            {
                details.insert(key.to_owned(), value);
            }
        }
        let user_id = match (resource.as_str(), path.as_deref()) {
            ("USER", Some(path)) => path
                .strip_prefix("users/")
                .map(|rest| rest.split('/').next().unwrap_or(rest).to_owned())
                .filter(|id| !id.is_empty()),
            _ => None,
        };
        Ok(Event {
            id: field("id"),
            time,
            kind: format!("{ADMIN_PREFIX}{resource}_{operation}"),
            realm_id: field("realmId"),
            client_id: auth_field("clientId"),
            user_id,
            session_id: None,
            ip_address: auth_field("ipAddress"),
            error: field("error"),
            details,
        })
    }
}

/// An event's JSON object and its `time`, which every event must have.
fn object_with_time(
    index: usize,
    value: &Value,
) -> Result<(&serde_json::Map<String, Value>, i64), EventDecodeError> {
    let object = value
        .as_object()
        .ok_or(EventDecodeError::NotAnObject { index })?;
    let time = object
        .get("time")
        .and_then(Value::as_i64)
        .ok_or(EventDecodeError::NoTime { index })?;
    Ok((object, time))
}

/// Every item of a JSON array through `parse` (with its index, for errors).
fn parse_items(
    body: &Value,
    parse: fn(usize, &Value) -> Result<Event, EventDecodeError>,
) -> Result<Vec<Event>, EventDecodeError> {
    let items = body.as_array().ok_or(EventDecodeError::NotAnArray)?;
    items
        .iter()
        .enumerate()
        .map(|(index, item)| parse(index, item))
        .collect()
}

/// A JSON value as text: strings as they are, numbers and booleans written
/// out, null as absent, anything nested as compact JSON.
fn text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// FNV-1a: tiny, and stable across Rust releases (unlike `DefaultHasher`),
/// which matters because the key is persisted.
#[derive(Debug)]
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_i64(&mut self, n: i64) {
        self.write(&n.to_le_bytes());
    }

    fn write_opt_str(&mut self, s: Option<&str>) {
        match s {
            // A length prefix keeps ("ab","c") apart from ("a","bc").
            Some(s) => {
                self.write(&[1]);
                self.write(&(s.len() as u64).to_le_bytes());
                self.write(s.as_bytes());
            }
            None => self.write(&[0]),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A REGISTER event as Keycloak 26.7 sends it.
    pub(crate) fn register_event(id: &str, time: i64) -> Event {
        Event::parse_page(&json!([{
            "id": id,
            "time": time,
            "type": "REGISTER",
            "realmId": "5f1c4a0e-realm",
            "clientId": "web",
            "userId": "0b9e1f6c-user",
            "sessionId": "8d2f-session",
            "ipAddress": "192.0.2.7",
            "details": {
                "auth_method": "openid-connect",
                "register_method": "form",
                "username": "alice",
                "email": "alice@example.test"
            }
        }]))
        .unwrap()
        .remove(0)
    }

    #[test]
    fn a_full_event_is_read() {
        let event = register_event("e1", 1_700_000_000_123);
        assert_eq!(event.id.as_deref(), Some("e1"));
        assert_eq!(event.kind, "REGISTER");
        assert_eq!(event.username(), Some("alice"));
        assert_eq!(event.email(), Some("alice@example.test"));
        assert_eq!(event.ip_address.as_deref(), Some("192.0.2.7"));
        assert_eq!(event.dedupe_key(), "e1");
    }

    #[test]
    fn missing_null_and_odd_fields_are_tolerated() {
        let events = Event::parse_page(&json!([
            {"time": 5, "type": "LOGIN_ERROR"},
            {"time": 6, "type": "LOGIN_ERROR", "id": null, "userId": null, "details": null},
            {"time": 7, "type": "LOGIN_ERROR", "details": {"n": 3, "b": true, "x": null, "o": {"a": 1}}},
        ]))
        .unwrap();
        assert_eq!(events[0].id, None);
        assert_eq!(events[1].user_id, None);
        assert!(events[1].details.is_empty());
        assert_eq!(events[2].details["n"], "3");
        assert_eq!(events[2].details["b"], "true");
        assert_eq!(events[2].details["o"], r#"{"a":1}"#);
        assert!(!events[2].details.contains_key("x"));
    }

    #[test]
    fn events_without_time_or_type_are_an_error_not_a_guess() {
        assert_eq!(
            Event::parse_page(&json!([{"type": "REGISTER"}])),
            Err(EventDecodeError::NoTime { index: 0 })
        );
        assert_eq!(
            Event::parse_page(&json!([{"time": 1}])),
            Err(EventDecodeError::NoType { index: 0 })
        );
        assert_eq!(
            Event::parse_page(&json!({"error": "x"})),
            Err(EventDecodeError::NotAnArray)
        );
    }

    #[test]
    fn an_admin_user_creation_reads_as_an_event_about_that_user() {
        let events = Event::parse_admin_page(&json!([{
            "id": "a1",
            "time": 42,
            "realmId": "realm-uuid",
            "authDetails": {"realmId": "master-uuid", "clientId": "cli-uuid", "userId": "admin-uuid", "ipAddress": "127.0.0.1"},
            "operationType": "CREATE",
            "resourceType": "USER",
            "resourcePath": "users/new-user-uuid",
            "representation": "{\"username\":\"carol\",\"email\":\"carol@example.test\",\"enabled\":true}"
        }]))
        .unwrap();
        let event = &events[0];
        assert_eq!(event.kind, "ADMIN_USER_CREATE");
        assert_eq!(event.user_id.as_deref(), Some("new-user-uuid"));
        assert_eq!(event.username(), Some("carol"));
        assert_eq!(event.email(), Some("carol@example.test"));
        assert_eq!(event.details["admin_user_id"], "admin-uuid");
        assert_eq!(event.details["resource_path"], "users/new-user-uuid");
        assert_eq!(event.ip_address.as_deref(), Some("127.0.0.1"));
        assert_eq!(event.dedupe_key(), "a1");
    }

    #[test]
    fn an_odd_admin_event_is_still_read() {
        let events = Event::parse_admin_page(&json!([
            {"time": 1, "operationType": "DELETE", "resourceType": "CLIENT", "representation": "not json"},
            {"time": 2, "operationType": "ACTION", "resourceType": "USER", "resourcePath": "users/"},
        ]))
        .unwrap();
        assert_eq!(events[0].kind, "ADMIN_CLIENT_DELETE");
        assert_eq!(events[0].username(), None);
        assert_eq!(events[1].user_id, None);
        assert_eq!(
            Event::parse_admin_page(&json!([{"time": 1}])),
            Err(EventDecodeError::NoType { index: 0 })
        );
    }

    #[test]
    fn events_without_id_get_a_stable_content_key() {
        let page = json!([
            {"time": 5, "type": "LOGIN_ERROR", "details": {"username": "a"}},
            {"time": 5, "type": "LOGIN_ERROR", "details": {"username": "b"}},
        ]);
        let first = Event::parse_page(&page).unwrap();
        let again = Event::parse_page(&page).unwrap();
        assert_ne!(first[0].dedupe_key(), first[1].dedupe_key());
        assert_eq!(first[0].dedupe_key(), again[0].dedupe_key());
        // Pinned: the key is persisted in cursor files, so it must never change.
        assert_eq!(first[0].dedupe_key(), "content-f56d7e60367959d2");
    }
}

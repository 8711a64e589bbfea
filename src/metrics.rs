//! What the notifier has done, for `/metrics` (Prometheus text format) and
//! `/readyz`. Counters are kept by realm and event type; the loop records,
//! the HTTP server reads.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the SMTP send-latency histogram buckets.
const SMTP_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5, 10.0];

type RealmType = (String, String);

#[derive(Debug, Default)]
struct Inner {
    seen: BTreeMap<RealmType, u64>,
    mailed: BTreeMap<RealmType, u64>,
    failed: BTreeMap<RealmType, u64>,
    dead_lettered: BTreeMap<RealmType, u64>,
    polls_ok: BTreeMap<String, u64>,
    polls_failed: BTreeMap<String, u64>,
    token_fetches: BTreeMap<String, u64>,
    newest_event_ms: BTreeMap<String, i64>,
    last_ok_poll_ms: BTreeMap<String, i64>,
    smtp_bucket_counts: [u64; SMTP_BUCKETS.len()],
    smtp_count: u64,
    smtp_sum: f64,
}

/// Shared between the loop(s) and the HTTP server.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn key(realm: &str, kind: &str) -> RealmType {
    (realm.to_owned(), kind.to_owned())
}

impl Metrics {
    fn with(&self, change: impl FnOnce(&mut Inner)) {
        if let Ok(mut inner) = self.inner.lock() {
            change(&mut inner);
        }
    }

    /// A new event was found (before its mail is sent).
    pub fn event_seen(&self, realm: &str, kind: &str, time_ms: i64) {
        self.with(|m| {
            *m.seen.entry(key(realm, kind)).or_default() += 1;
            let newest = m.newest_event_ms.entry(realm.to_owned()).or_insert(time_ms);
            *newest = (*newest).max(time_ms);
        });
    }

    pub fn mailed(&self, realm: &str, kind: &str, took: Duration) {
        self.with(|m| {
            *m.mailed.entry(key(realm, kind)).or_default() += 1;
            m.observe_smtp(took);
        });
    }

    /// A send that failed and will be tried again.
    pub fn mail_failed(&self, realm: &str, kind: &str, took: Duration) {
        self.with(|m| {
            *m.failed.entry(key(realm, kind)).or_default() += 1;
            m.observe_smtp(took);
        });
    }

    pub fn dead_lettered(&self, realm: &str, kind: &str, took: Duration) {
        self.with(|m| {
            *m.dead_lettered.entry(key(realm, kind)).or_default() += 1;
            m.observe_smtp(took);
        });
    }

    pub fn poll(&self, realm: &str, ok: bool, now_ms: i64) {
        self.with(|m| {
            if ok {
                *m.polls_ok.entry(realm.to_owned()).or_default() += 1;
                m.last_ok_poll_ms.insert(realm.to_owned(), now_ms);
            } else {
                *m.polls_failed.entry(realm.to_owned()).or_default() += 1;
            }
        });
    }

    /// How many access tokens the client of `realm` has fetched in all.
    pub fn token_fetches(&self, realm: &str, total: u64) {
        self.with(|m| {
            m.token_fetches.insert(realm.to_owned(), total);
        });
    }

    /// Whether every realm in `realms` had a successful poll within `max_age`.
    pub fn ready(&self, realms: &[String], now_ms: i64, max_age: Duration) -> bool {
        let max_age_ms = i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX);
        self.inner.lock().is_ok_and(|m| {
            realms.iter().all(|realm| {
                m.last_ok_poll_ms
                    .get(realm)
                    .is_some_and(|last| now_ms.saturating_sub(*last) <= max_age_ms)
            })
        })
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self, now_ms: i64) -> String {
        let Ok(m) = self.inner.lock() else {
            return String::new();
        };
        let mut out = String::new();
        let by_type =
            |out: &mut String, name: &str, help: &str, values: &BTreeMap<RealmType, u64>| {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for ((realm, kind), value) in values {
                    let _ = writeln!(
                        out,
                        "{name}{{realm=\"{}\",type=\"{}\"}} {value}",
                        label(realm),
                        label(kind)
                    );
                }
            };
        by_type(
            &mut out,
            "keycloak_notifier_events_seen_total",
            "New events found.",
            &m.seen,
        );
        by_type(
            &mut out,
            "keycloak_notifier_events_mailed_total",
            "Events whose mail the SMTP server accepted.",
            &m.mailed,
        );
        by_type(
            &mut out,
            "keycloak_notifier_mail_failures_total",
            "Sends that failed and were retried.",
            &m.failed,
        );
        by_type(
            &mut out,
            "keycloak_notifier_events_dead_lettered_total",
            "Events whose mail was refused for good (see the dead-letter file).",
            &m.dead_lettered,
        );

        let _ = writeln!(
            out,
            "# HELP keycloak_notifier_polls_total Polls of the events API.\n# TYPE keycloak_notifier_polls_total counter"
        );
        for (realm, value) in &m.polls_ok {
            let _ = writeln!(
                out,
                "keycloak_notifier_polls_total{{realm=\"{}\",result=\"ok\"}} {value}",
                label(realm)
            );
        }
        for (realm, value) in &m.polls_failed {
            let _ = writeln!(
                out,
                "keycloak_notifier_polls_total{{realm=\"{}\",result=\"failed\"}} {value}",
                label(realm)
            );
        }
        let _ = writeln!(
            out,
            "# HELP keycloak_notifier_token_refreshes_total Access tokens fetched from Keycloak.\n# TYPE keycloak_notifier_token_refreshes_total counter"
        );
        for (realm, value) in &m.token_fetches {
            let _ = writeln!(
                out,
                "keycloak_notifier_token_refreshes_total{{realm=\"{}\"}} {value}",
                label(realm)
            );
        }

        let name = "keycloak_notifier_smtp_send_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time to hand one mail to the SMTP server.\n# TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (bound, count) in SMTP_BUCKETS.iter().zip(m.smtp_bucket_counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", m.smtp_count);
        let _ = writeln!(out, "{name}_sum {}", m.smtp_sum);
        let _ = writeln!(out, "{name}_count {}", m.smtp_count);

        let age = |out: &mut String, name: &str, help: &str, values: &BTreeMap<String, i64>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (realm, ms) in values {
                let seconds = now_ms.saturating_sub(*ms) as f64 / 1000.0;
                let _ = writeln!(out, "{name}{{realm=\"{}\"}} {seconds:.3}", label(realm));
            }
        };
        age(
            &mut out,
            "keycloak_notifier_newest_event_age_seconds",
            "Seconds since the newest event seen.",
            &m.newest_event_ms,
        );
        age(
            &mut out,
            "keycloak_notifier_last_successful_poll_age_seconds",
            "Seconds since the last successful poll.",
            &m.last_ok_poll_ms,
        );
        out
    }
}

impl Inner {
    fn observe_smtp(&mut self, took: Duration) {
        let seconds = took.as_secs_f64();
        for (bound, count) in SMTP_BUCKETS.iter().zip(self.smtp_bucket_counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
                break;
            }
        }
        self.smtp_count += 1;
        self.smtp_sum += seconds;
    }
}

/// A label value with `\`, `"` and line breaks escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_histogram_and_ages_render_as_prometheus_text() {
        let m = Metrics::default();
        m.event_seen("test", "REGISTER", 1_000);
        m.event_seen("test", "REGISTER", 2_000);
        m.mailed("test", "REGISTER", Duration::from_millis(2));
        m.mail_failed("test", "REGISTER", Duration::from_secs(1));
        m.dead_lettered("test", "REGISTER", Duration::from_millis(3));
        m.poll("test", true, 5_000);
        m.poll("test", false, 6_000);
        m.token_fetches("test", 3);
        let text = m.render(7_500);
        for line in [
            "keycloak_notifier_events_seen_total{realm=\"test\",type=\"REGISTER\"} 2",
            "keycloak_notifier_events_mailed_total{realm=\"test\",type=\"REGISTER\"} 1",
            "keycloak_notifier_mail_failures_total{realm=\"test\",type=\"REGISTER\"} 1",
            "keycloak_notifier_events_dead_lettered_total{realm=\"test\",type=\"REGISTER\"} 1",
            "keycloak_notifier_polls_total{realm=\"test\",result=\"ok\"} 1",
            "keycloak_notifier_polls_total{realm=\"test\",result=\"failed\"} 1",
            "keycloak_notifier_token_refreshes_total{realm=\"test\"} 3",
            "keycloak_notifier_smtp_send_seconds_bucket{le=\"0.0025\"} 1",
            "keycloak_notifier_smtp_send_seconds_bucket{le=\"0.005\"} 2",
            "keycloak_notifier_smtp_send_seconds_bucket{le=\"2.5\"} 3",
            "keycloak_notifier_smtp_send_seconds_bucket{le=\"+Inf\"} 3",
            "keycloak_notifier_smtp_send_seconds_count 3",
            "keycloak_notifier_newest_event_age_seconds{realm=\"test\"} 5.500",
            "keycloak_notifier_last_successful_poll_age_seconds{realm=\"test\"} 2.500",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn ready_means_every_realm_polled_successfully_recently() {
        let m = Metrics::default();
        let realms = vec!["a".to_owned(), "b".to_owned()];
        assert!(!m.ready(&realms, 0, Duration::from_secs(90)), "no poll yet");
        m.poll("a", true, 1_000);
        assert!(!m.ready(&realms, 1_000, Duration::from_secs(90)));
        m.poll("b", true, 1_000);
        assert!(m.ready(&realms, 91_000, Duration::from_secs(90)));
        assert!(!m.ready(&realms, 91_001, Duration::from_secs(90)));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

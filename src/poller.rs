//! Which events are new, and in what order: pure decisions, no I/O.
//!
//! A poll asks Keycloak for the watched types with `direction=asc` from the
//! cursor's `since` (inclusive) and pages with `first`/`max` until a short page.
//! Each page goes through [`select_new`]; the caller mails the result in
//! order and advances the cursor past each event once its mail is accepted.

use std::collections::HashSet;

use crate::cursor::Cursor;
use crate::event::Event;

/// The events of `page` not yet handled according to `cursor`, oldest first,
/// each key once. Events sharing a millisecond keep the server's order.
pub fn select_new(cursor: &Cursor, page: Vec<Event>) -> Vec<Event> {
    let mut seen = HashSet::new();
    let mut fresh: Vec<Event> = page
        .into_iter()
        .filter(|event| cursor.is_new(event) && seen.insert(event.dedupe_key()))
        .collect();
    // Stable: the server's order is kept within one millisecond.
    fresh.sort_by_key(|event| event.time);
    fresh
}

/// Whether a page of `len` events asked for with `max` is the last one.
pub fn is_last_page(len: usize, max: u32) -> bool {
    len < max as usize
}

/// The `first` offset of the page after the one that started at `first`.
pub fn next_offset(first: u32, max: u32) -> u32 {
    first.saturating_add(max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::register_event;
    use proptest::prelude::*;

    fn ids(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.id.as_deref().unwrap()).collect()
    }

    #[test]
    fn events_before_the_cursor_or_already_mailed_at_its_time_are_dropped() {
        let mut cursor = Cursor::starting_at(100);
        cursor.advance_past(&register_event("done", 100));
        assert_eq!(cursor.since, 100);
        let page = vec![
            register_event("old", 99),
            register_event("done", 100),
            register_event("same-ms", 100),
            register_event("later", 101),
        ];
        assert_eq!(ids(&select_new(&cursor, page)), ["same-ms", "later"]);
    }

    #[test]
    fn a_first_run_cursor_takes_events_at_its_own_millisecond() {
        let cursor = Cursor::starting_at(100);
        let page = vec![register_event("a", 100), register_event("b", 100)];
        assert_eq!(ids(&select_new(&cursor, page)), ["a", "b"]);
    }

    #[test]
    fn duplicates_within_a_page_are_mailed_once_and_order_is_by_time() {
        let cursor = Cursor::starting_at(0);
        let page = vec![
            register_event("b", 20),
            register_event("a", 10),
            register_event("b", 20),
            register_event("c", 20),
        ];
        assert_eq!(ids(&select_new(&cursor, page)), ["a", "b", "c"]);
    }

    #[test]
    fn paging_stops_at_a_short_page() {
        assert!(!is_last_page(100, 100));
        assert!(is_last_page(99, 100));
        assert!(is_last_page(0, 100));
        assert_eq!(next_offset(200, 100), 300);
        assert_eq!(next_offset(u32::MAX, 100), u32::MAX);
    }

    /// Replays a stream through pages of `max` (as Keycloak serves them:
    /// ascending by time, arbitrary order inside one millisecond), with the
    /// cursor persisted and reloaded between polls.
    fn drain(stream: &[Event], cursor: &mut Cursor, max: usize) -> Vec<String> {
        let from = cursor.since;
        let visible: Vec<&Event> = stream.iter().filter(|e| e.time >= from).collect();
        let mut mailed = Vec::new();
        for page in visible.chunks(max) {
            for event in select_new(cursor, page.iter().map(|e| (*e).clone()).collect()) {
                cursor.advance_past(&event);
                mailed.push(event.id.clone().unwrap());
            }
        }
        mailed
    }

    proptest! {
        /// Every event is mailed exactly once, however the events fall into
        /// milliseconds, pages and polls.
        #[test]
        fn every_event_is_mailed_exactly_once(
            gaps in proptest::collection::vec(0i64..3, 1..300),
            max in 1usize..20,
            poll_every in 1usize..50,
        ) {
            let mut time = 1_000;
            let stream: Vec<Event> = gaps
                .iter()
                .enumerate()
                .map(|(i, gap)| {
                    time += gap;
                    register_event(&format!("e{i}"), time)
                })
                .collect();
            let mut cursor = Cursor::starting_at(0);
            let mut mailed = Vec::new();
            // New events arrive between polls.
            for upto in (poll_every..stream.len() + poll_every).step_by(poll_every) {
                let arrived = &stream[..upto.min(stream.len())];
                mailed.extend(drain(arrived, &mut cursor, max));
            }
            mailed.extend(drain(&stream, &mut cursor, max));
            let expected: Vec<String> = stream.iter().map(|e| e.id.clone().unwrap()).collect();
            prop_assert_eq!(mailed, expected);
        }
    }
}

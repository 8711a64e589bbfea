//! Which events are new, and in what order: pure decisions, no I/O.
//!
//! A poll asks Keycloak for the watched types with `direction=asc` from the
//! cursor's `since` (inclusive), `max` at a time, until a short page. Each
//! page goes through [`select_new`]; the caller mails the result in order
//! and advances the cursor past each event once its mail is accepted.
//!
//! The next page starts at the time of the last event of the page before
//! ([`next_page`]), never at an offset: Keycloak sorts by time only, so
//! events that share a millisecond may come in another order in the next
//! request, and an offset could then return one of them twice and never the
//! other. Asking again from that millisecond returns all of them; the
//! cursor's keys drop the ones already mailed. A page that is all one
//! millisecond is asked for again, twice as large, until it holds them all.

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

/// The `dateFrom` and `max` of the page after a full one that started at
/// `from`, asked for `max` events and ended at `last_time`: from that last
/// time, with the configured size `page_size`; or, when the whole page was
/// one millisecond, that millisecond again with twice the size.
pub fn next_page(from: i64, max: u32, page_size: u32, last_time: i64) -> (i64, u32) {
    if last_time > from {
        (last_time, page_size)
    } else {
        (from, max.saturating_mul(2))
    }
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
    fn pages_follow_the_time_of_the_last_event() {
        assert!(!is_last_page(100, 100));
        assert!(is_last_page(99, 100));
        assert!(is_last_page(0, 100));
        assert_eq!(next_page(10, 100, 100, 25), (25, 100));
        assert_eq!(
            next_page(25, 100, 100, 25),
            (25, 200),
            "a full page in one millisecond"
        );
        assert_eq!(next_page(25, 200, 100, 30), (30, 100));
        assert_eq!(next_page(25, u32::MAX, 100, 25), (25, u32::MAX));
    }

    /// Replays a stream as Keycloak serves it: ascending by time, events of
    /// one millisecond in an order that changes from request to request, and
    /// pages chosen by [`next_page`]; the cursor carries over between polls.
    fn drain(stream: &[Event], cursor: &mut Cursor, max: usize, requests: &mut u64) -> Vec<String> {
        let (mut from, mut size) = (cursor.since, max as u32);
        let mut mailed = Vec::new();
        loop {
            *requests += 1;
            let mut visible: Vec<Event> =
                stream.iter().filter(|e| e.time >= from).cloned().collect();
            // A different tie order on every request (stable sort by time
            // after a request-dependent rotation).
            let len = visible.len();
            if len > 0 {
                visible.rotate_left((*requests as usize * 7) % len);
            }
            visible.sort_by_key(|e| e.time);
            let page: Vec<Event> = visible.into_iter().take(size as usize).collect();
            let page_len = page.len();
            let last_time = page.last().map(|e| e.time);
            for event in select_new(cursor, page) {
                cursor.advance_past(&event);
                mailed.push(event.id.clone().unwrap());
            }
            match last_time {
                Some(last) if !is_last_page(page_len, size) => {
                    (from, size) = next_page(from, size, max as u32, last);
                }
                _ => return mailed,
            }
        }
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
            let mut requests = 0;
            // New events arrive between polls.
            for upto in (poll_every..stream.len() + poll_every).step_by(poll_every) {
                let arrived = &stream[..upto.min(stream.len())];
                mailed.extend(drain(arrived, &mut cursor, max, &mut requests));
            }
            mailed.extend(drain(&stream, &mut cursor, max, &mut requests));
            let mut expected: Vec<String> = stream.iter().map(|e| e.id.clone().unwrap()).collect();
            // Exactly once each; within one millisecond the order may vary.
            mailed.sort();
            expected.sort();
            prop_assert_eq!(mailed, expected);
        }
    }
}

//! Waiting between tries: capped exponential backoff with jitter (from
//! `backon`), and sleeps that end early on shutdown.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

/// The first wait…
pub const MIN_DELAY: Duration = Duration::from_secs(1);
/// …doubles up to this cap; jitter spreads the waits of several notifiers.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Delays for retrying without end: 1 s, 2 s, 4 s … 60 s, 60 s, …, each
/// jittered (up to twice as long) and never above [`MAX_DELAY`].
pub fn backoff() -> impl Iterator<Item = Duration> {
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .build();
    std::iter::from_fn(move || Some(delays.next().unwrap_or(MAX_DELAY).min(MAX_DELAY)))
}

/// Sleeps for `delay`; `false` if `shutdown` came first.
pub async fn sleep_or_stop(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = shutdown.cancelled() => false,
    }
}

/// A delay for a log line, to the millisecond.
pub fn show(delay: Duration) -> String {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_never_end() {
        let delays: Vec<Duration> = backoff().take(20).collect();
        assert!(
            delays[0] >= MIN_DELAY && delays[0] <= MIN_DELAY * 2,
            "{delays:?}"
        );
        assert!(delays[5] > delays[0], "{delays:?}");
        assert!(delays.iter().all(|d| *d <= MAX_DELAY), "{delays:?}");
        assert_eq!(delays[19], MAX_DELAY, "{delays:?}");
    }
}

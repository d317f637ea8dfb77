//! Wall-clock time read through tokio's clock, so that a test with paused time
//! (`#[tokio::test(start_paused = true)]`, `time::advance`) moves run timestamps, backoff and
//! max age along with its timers. In production it is the wall clock (read once at start,
//! advanced by the monotonic clock: immune to the wall clock jumping).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    wall: Timestamp,
    base: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        Clock {
            wall: Timestamp::now(),
            base: Instant::now(),
        }
    }

    pub fn now(&self) -> Timestamp {
        let since = SignedDuration::try_from(self.base.elapsed()).unwrap_or(SignedDuration::MAX);
        self.wall.checked_add(since).unwrap_or(self.wall)
    }

    /// The tokio instant of a wall-clock time (now, if it is past).
    pub fn instant_at(&self, t: Timestamp) -> Instant {
        let now = self.now();
        let ahead = t.duration_since(now);
        if ahead.is_negative() {
            return Instant::now();
        }
        Instant::now() + Duration::try_from(ahead).unwrap_or(Duration::ZERO)
    }

    /// Minutes since the Unix epoch, now: the slot of a function's last hour (`stats.rs`).
    pub fn unix_minute(&self) -> u64 {
        u64::try_from(self.now().as_second()).unwrap_or(0) / 60
    }

    /// How long ago `t` was (zero if in the future).
    pub fn age(&self, t: Timestamp) -> Duration {
        Duration::try_from(self.now().duration_since(t)).unwrap_or(Duration::ZERO)
    }
}

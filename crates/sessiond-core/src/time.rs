//! Time as a port: [`Timestamp`] (UTC milliseconds) and the [`Clock`] that supplies "now".
//!
//! Nothing else in sessiond reads the system clock; tests inject a [`ManualClock`] and move time
//! by hours in a microsecond.

use std::sync::atomic::{AtomicI64, Ordering};

use chrono::{DateTime, Utc};

/// A point in time: milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The timestamp of `ms` milliseconds since the epoch.
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    /// Milliseconds since the epoch.
    pub const fn as_millis(self) -> i64 {
        self.0
    }

    /// This time plus `s` seconds, saturating.
    pub fn plus_secs(self, s: u64) -> Self {
        let ms = i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000);
        Self(self.0.saturating_add(ms))
    }

    /// This time minus `s` seconds, saturating.
    pub fn minus_secs(self, s: u64) -> Self {
        let ms = i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000);
        Self(self.0.saturating_sub(ms))
    }

    /// Whole seconds from `self` until `later` (0 if `later` is not after `self`).
    pub fn secs_until(self, later: Timestamp) -> u64 {
        u64::try_from(later.0.saturating_sub(self.0).max(0) / 1000).unwrap_or(0)
    }

    /// As a chrono UTC datetime (for the wire).
    pub fn to_datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// From a chrono UTC datetime.
    pub fn from_datetime(dt: DateTime<Utc>) -> Self {
        Self(dt.timestamp_millis())
    }
}

/// The source of "now".
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Timestamp {
        Timestamp(Utc::now().timestamp_millis())
    }
}

/// A clock that only moves when told to: for tests.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: Timestamp) -> Self {
        Self(AtomicI64::new(start.0))
    }

    /// Moves the clock forward by `s` seconds.
    pub fn advance_secs(&self, s: u64) {
        let ms = i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000);
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Moves the clock forward by `ms` milliseconds.
    pub fn advance_millis(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_rounds_down() {
        let t = Timestamp::from_millis(1_000);
        assert_eq!(t.plus_secs(2).as_millis(), 3_000);
        assert_eq!(t.minus_secs(2).as_millis(), -1_000);
        assert_eq!(t.secs_until(Timestamp::from_millis(2_999)), 1);
        assert_eq!(t.secs_until(Timestamp::from_millis(0)), 0);
        assert_eq!(
            Timestamp::from_millis(i64::MAX)
                .plus_secs(u64::MAX)
                .as_millis(),
            i64::MAX
        );
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp::from_millis(5));
        assert_eq!(c.now().as_millis(), 5);
        c.advance_secs(3600);
        assert_eq!(c.now().as_millis(), 3_600_005);
    }
}

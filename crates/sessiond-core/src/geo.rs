//! Geolocation (a port: the server reads a MaxMind-format database) and impossible travel.
//!
//! A session's location is looked up from its client IP when it is shown, so nothing is
//! stored and a newer database applies at once. Impossible travel compares consecutive uses
//! of one user's sessions: the distance between their places over the time between them; a
//! speed above the policy's `max_speed_kmh` is a finding. The last use of each user is kept in
//! a fixed-size table per node (a user's slot may be taken by another user, which only loses a
//! comparison), so memory does not grow with the number of users.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;

use slots::Slots;

/// Where an address is.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    /// ISO 3166-1 alpha-2 country code.
    pub country: Option<String>,
    /// City name (English).
    pub city: Option<String>,
    /// Latitude and longitude, in degrees.
    pub coordinates: Option<(f64, f64)>,
}

/// Looks addresses up.
pub trait Locator: Send + Sync + 'static {
    /// The place of `ip`, if the database knows it.
    fn locate(&self, ip: IpAddr) -> Option<Place>;
}

/// Great-circle distance in kilometres (haversine, mean Earth radius).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// Distances below this are never a finding: city-level coordinates are that coarse.
pub const MIN_DISTANCE_KM: f64 = 100.0;

/// An impossible journey between two uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Journey {
    /// Kilometres between the two places.
    pub km: f64,
    /// Seconds between the two uses.
    pub seconds: f64,
    /// The implied speed.
    pub kmh: f64,
}

/// The last use of each user, in a fixed number of slots.
pub struct Travel {
    slots: Slots,
    hasher: RandomState,
}

impl std::fmt::Debug for Travel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Travel").finish_non_exhaustive()
    }
}

/// Slots of the last-use table (about 2 MiB).
const SLOTS: usize = 1 << 16;

impl Default for Travel {
    fn default() -> Self {
        Self {
            slots: Slots::new(SLOTS),
            hasher: RandomState::new(),
        }
    }
}

impl Travel {
    /// A use of `user` (a tenant-qualified key) at `place` and `at_ms`: answers the journey
    /// from the user's previous use if it is faster than `max_kmh`. A believable use becomes
    /// the user's reference; an impossible one does not (the next use is still compared with
    /// the last believable place, not with the suspect's).
    pub fn used(&self, user: &str, place: (f64, f64), at_ms: i64, max_kmh: f64) -> Option<Journey> {
        let key = self.hasher.hash_one(user);
        self.slots.update(key, place, at_ms, |previous, at| {
            let km = distance_km(previous, place);
            if km < MIN_DISTANCE_KM {
                return None;
            }
            let seconds = ((at_ms - at) as f64 / 1000.0).max(1.0);
            let kmh = km / (seconds / 3600.0);
            (kmh > max_kmh).then_some(Journey { km, seconds, kmh })
        })
    }
}

/// A direct-mapped table of (user key, coordinates, time), locked per slot.
mod slots {
    use std::sync::Mutex;

    type Entry = Option<(u64, (f64, f64), i64)>;

    pub struct Slots(Box<[Mutex<Entry>]>);

    impl Slots {
        pub fn new(n: usize) -> Self {
            Self((0..n).map(|_| Mutex::new(None)).collect())
        }

        /// Judges a use against the user's previous one (`judge` answers a finding or
        /// `None`) and stores it as the newest unless it was judged a finding.
        pub fn update<T>(
            &self,
            key: u64,
            place: (f64, f64),
            at: i64,
            judge: impl FnOnce((f64, f64), i64) -> Option<T>,
        ) -> Option<T> {
            let slot = &self.0[(key as usize) % self.0.len()];
            let mut e = slot
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match *e {
                // An older use arriving late is neither compared nor stored.
                Some((k, _, t)) if k == key && t > at => None,
                Some((k, p, t)) if k == key => {
                    let finding = judge(p, t);
                    if finding.is_none() {
                        *e = Some((key, place, at));
                    }
                    finding
                }
                _ => {
                    *e = Some((key, place, at));
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BERLIN: (f64, f64) = (52.52, 13.405);
    const TOKYO: (f64, f64) = (35.6895, 139.6917);
    const POTSDAM: (f64, f64) = (52.3906, 13.0645);

    #[test]
    fn distances() {
        let d = distance_km(BERLIN, TOKYO);
        assert!((8900.0..9000.0).contains(&d), "{d}");
        assert!(distance_km(BERLIN, POTSDAM) < 30.0);
    }

    #[test]
    fn impossible_journeys_are_found_and_possible_ones_are_not() {
        let t = Travel::default();
        assert_eq!(t.used("u", BERLIN, 0, 1000.0), None, "a first use");
        // Potsdam a minute later: too close to judge.
        assert_eq!(t.used("u", POTSDAM, 60_000, 1000.0), None);
        // Tokyo an hour later: about 8,900 km/h.
        let j = t.used("u", TOKYO, 3_660_000, 1000.0).unwrap();
        assert!(j.kmh > 8000.0 && j.kmh < 9500.0, "{j:?}");
        // Back in Berlin a minute later: compared with Potsdam, the last believable place.
        assert_eq!(t.used("u", BERLIN, 3_720_000, 1000.0), None);
        // Tokyo twelve hours later: a plane is fast enough.
        let later = 3_720_000 + 12 * 3_600_000;
        assert_eq!(t.used("u", TOKYO, later, 1000.0), None);
        // Another user is compared with nobody but themselves.
        assert_eq!(t.used("v", BERLIN, later, 1000.0), None);
    }
}

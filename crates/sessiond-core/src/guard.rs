//! Brute-force and flood protection in bounded memory.
//!
//! Attempts are counted per source, in count-min sketches over a sliding window. A source is
//! the client network (an IPv4 address, or the /64 of an IPv6 address, which one subscriber
//! usually holds whole) together with the API key that asked, or the API key alone when the
//! request names no client address: leaving `client.ip` out is no way around the counters, and
//! one application cannot spend another's allowance. Creations are also counted per user. The
//! sketches hold a fixed number of counters whatever the number of addresses, so a flood from
//! millions of addresses cannot grow memory. A sketch can only over-count (when keys collide in
//! every row), never under-count; with the default sizes a key is wrongly blocked only when
//! about 100,000 networks are blocked at once, and then with a probability near 1%.
//!
//! - **Guessing**: a source whose unknown or invalid tokens pass `verify_failures` in a window
//!   is blocked: its unknown or invalid tokens answer `429 too_many_attempts` with
//!   `Retry-After` instead of `401`. A token of a live session is still answered while its
//!   source is blocked (the lookup is one hash probe), so an attacker behind a shared address
//!   (a NAT, a proxy) cannot lock out its neighbours. The block lasts `block_s`, doubling with
//!   every further multiple of the threshold the source reaches in the window (exponential
//!   backoff), at most `block_max_s`. Refused attempts still count, so a client that keeps
//!   guessing stays blocked longer.
//! - **Creation**: at most `creates_per_user` new sessions per user, `creates_per_ip` per
//!   client network (and API key), and `creates_per_key` per API key for requests that name no
//!   client address, in a window; past it, `429 too_many_attempts` until the window moves on.
//!   The per-key limit is far higher than the per-network one: all of an application's users
//!   share its key, so it bounds a runaway or abused key, not a person.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};

use crate::time::Timestamp;

/// Rows of every sketch (independent hashes).
const ROWS: usize = 4;
/// Counters per row of the guessing sketches (a power of two).
const WIDE: usize = 1 << 18;
/// Counters per row of the creation sketches.
const NARROW: usize = 1 << 16;

/// The thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// Length of the sliding window, in seconds.
    pub window_s: u64,
    /// Unknown or invalid tokens per network and window before the network is blocked.
    pub verify_failures: u32,
    /// The first block, in seconds.
    pub block_s: u64,
    /// The longest block, in seconds.
    pub block_max_s: u64,
    /// Sessions created per user and window (0: no limit).
    pub creates_per_user: u32,
    /// Sessions created per client network and window (0: no limit).
    pub creates_per_ip: u32,
    /// Sessions created per API key and window by requests naming no client address (0: no
    /// limit).
    pub creates_per_key: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            window_s: 60,
            verify_failures: 20,
            block_s: 10,
            block_max_s: 3600,
            creates_per_user: 30,
            creates_per_ip: 300,
            creates_per_key: 60_000,
        }
    }
}

/// The network an address counts under: the address itself for IPv4 (and IPv4-mapped IPv6),
/// its /64 for IPv6.
pub fn network(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_bits()) | (0xffff << 32),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => u128::from(v4.to_bits()) | (0xffff << 32),
            None => v6.to_bits() & !((1u128 << 64) - 1),
        },
    }
}

/// A network as text: `203.0.113.7` or `2001:db8:1:2::/64`.
pub fn network_label(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Hashes of a key, one per row, with per-process random keys (an attacker cannot aim
/// collisions at someone else's address).
#[derive(Debug)]
struct Hashes {
    state: RandomState,
    width: usize,
}

impl Hashes {
    fn new(width: usize) -> Self {
        Self {
            state: RandomState::new(),
            width,
        }
    }

    /// One keyed hash split in two (`h1 + row * h2`, Kirsch and Mitzenmacher): as good as
    /// independent hashes for a count-min sketch, at the cost of one.
    fn cells(&self, key: impl Hash) -> [usize; ROWS] {
        let h = self.state.hash_one(key);
        let (h1, h2) = (h as u32 as usize, ((h >> 32) as u32 | 1) as usize);
        let mut out = [0; ROWS];
        for (row, cell) in out.iter_mut().enumerate() {
            *cell = row * self.width + (h1.wrapping_add(row.wrapping_mul(h2)) & (self.width - 1));
        }
        out
    }
}

/// Counts per key over a sliding window: the current window's count plus the previous one's,
/// weighted by how much of it still overlaps.
#[derive(Debug)]
struct WindowSketch {
    window_ms: i64,
    /// Two windows of `ROWS * WIDTH` counters: index `(window % 2)`.
    cells: [Box<[AtomicU32]>; 2],
    /// The window the counters of `cells[window % 2]` belong to.
    epoch: AtomicI64,
    hashes: Hashes,
}

fn zeroed(width: usize) -> Box<[AtomicU32]> {
    (0..ROWS * width).map(|_| AtomicU32::new(0)).collect()
}

impl WindowSketch {
    fn new(window_s: u64, width: usize) -> Self {
        Self {
            window_ms: i64::try_from(window_s.max(1).saturating_mul(1000)).unwrap_or(i64::MAX),
            cells: [zeroed(width), zeroed(width)],
            epoch: AtomicI64::new(0),
            hashes: Hashes::new(width),
        }
    }

    /// Moves the windows on to `now`'s, clearing what fell out of the sliding window.
    fn rotate(&self, now: Timestamp) -> i64 {
        let w = now.as_millis().div_euclid(self.window_ms);
        let seen = self.epoch.load(Ordering::Acquire);
        if w > seen
            && self
                .epoch
                .compare_exchange(seen, w, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // The winner clears; a concurrent reader may see a half-cleared window for a
            // moment, which only under-counts the previous window briefly.
            let clear = |c: &[AtomicU32]| c.iter().for_each(|x| x.store(0, Ordering::Relaxed));
            clear(&self.cells[w.rem_euclid(2) as usize]);
            if w > seen + 1 {
                clear(&self.cells[(w + 1).rem_euclid(2) as usize]);
            }
        }
        w
    }

    fn estimate_at(&self, cells: &[usize; ROWS], w: i64, now: Timestamp) -> u32 {
        let cur = &self.cells[w.rem_euclid(2) as usize];
        let prev = &self.cells[(w + 1).rem_euclid(2) as usize];
        let into = now.as_millis() - w * self.window_ms;
        let weight = 1.0 - (into as f64 / self.window_ms as f64).clamp(0.0, 1.0);
        let min = |c: &[AtomicU32]| {
            cells
                .iter()
                .map(|&i| c[i].load(Ordering::Relaxed))
                .min()
                .unwrap_or(0)
        };
        let total = f64::from(min(cur)) + f64::from(min(prev)) * weight;
        total.round().clamp(0.0, f64::from(u32::MAX)) as u32
    }

    /// Adds one to `key` (conservative update: only the rows at the minimum grow, which keeps
    /// collisions from inflating other keys) and answers the estimate after it.
    fn add(&self, key: impl Hash, now: Timestamp) -> u32 {
        let w = self.rotate(now);
        let cells = self.hashes.cells(key);
        let cur = &self.cells[w.rem_euclid(2) as usize];
        let low = cells
            .iter()
            .map(|&i| cur[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        for &i in &cells {
            let _ = cur[i].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v <= low).then(|| v.saturating_add(1))
            });
        }
        self.estimate_at(&cells, w, now)
    }

    /// Seconds until the current window ends.
    fn secs_to_next_window(&self, now: Timestamp) -> u64 {
        let left = self.window_ms - now.as_millis().rem_euclid(self.window_ms);
        u64::try_from((left + 999) / 1000).unwrap_or(1).max(1)
    }
}

/// Per key, the latest time (in seconds) it is blocked until: each cell keeps the maximum, a
/// key's value is the minimum over its rows.
#[derive(Debug)]
struct BlockSketch {
    cells: Box<[AtomicU32]>,
    hashes: Hashes,
    /// Seconds since the epoch at which the sketch's clock starts (values are relative, u32).
    origin_s: i64,
}

impl BlockSketch {
    fn new(now: Timestamp) -> Self {
        Self {
            cells: zeroed(WIDE),
            hashes: Hashes::new(WIDE),
            origin_s: now.as_millis().div_euclid(1000) - 1,
        }
    }

    fn rel(&self, at: Timestamp) -> u32 {
        u32::try_from((at.as_millis().div_euclid(1000) - self.origin_s).max(0)).unwrap_or(u32::MAX)
    }

    /// Seconds `key` stays blocked after `now` (0: not blocked).
    fn remaining(&self, key: impl Hash, now: Timestamp) -> u64 {
        let until = self
            .hashes
            .cells(key)
            .iter()
            .map(|&i| self.cells[i].load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        u64::from(until.saturating_sub(self.rel(now)))
    }

    fn block(&self, key: impl Hash, until: Timestamp) {
        let until = self.rel(until);
        for i in self.hashes.cells(key) {
            self.cells[i].fetch_max(until, Ordering::Relaxed);
        }
    }
}

/// Whom an attempt counts against: the client network and the API key that asked, or the API
/// key alone when the request names no client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source {
    network: Option<u128>,
    api_key: u64,
}

impl Source {
    /// The source of a request naming `ip` (if any), made with the API key named `actor` (its
    /// fingerprint; `None` in process).
    pub fn new(ip: Option<IpAddr>, actor: Option<&str>) -> Self {
        let mut h = std::hash::DefaultHasher::new();
        actor.hash(&mut h);
        Self {
            network: ip.map(network),
            api_key: h.finish(),
        }
    }
}

/// A source just blocked for guessing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// Failures counted in the window.
    pub failures: u32,
    /// How long the block lasts, in seconds.
    pub for_s: u64,
}

/// Refusal of an attempt: retry after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub u64);

/// A creation refused: which limit it hit (`user`, `network` or `api_key`) and when to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    /// The limit hit.
    pub limit: &'static str,
    /// Retry after this many seconds.
    pub retry_after: RetryAfter,
}

/// The counters of one node.
#[derive(Debug)]
pub struct Guard {
    cfg: GuardConfig,
    failures: WindowSketch,
    blocked: BlockSketch,
    creates_user: WindowSketch,
    creates_ip: WindowSketch,
}

impl Guard {
    /// Empty counters ([`Guard::memory_bytes`], fixed).
    pub fn new(cfg: GuardConfig, now: Timestamp) -> Self {
        Self {
            failures: WindowSketch::new(cfg.window_s, WIDE),
            blocked: BlockSketch::new(now),
            creates_user: WindowSketch::new(cfg.window_s, NARROW),
            creates_ip: WindowSketch::new(cfg.window_s, NARROW),
            cfg,
        }
    }

    /// Bytes held by the counters: 16 MiB, whatever the traffic (they never grow).
    pub fn memory_bytes() -> usize {
        // The failures' two windows and the blocks (wide), the creations' two windows twice.
        (3 * WIDE + 4 * NARROW) * ROWS * std::mem::size_of::<AtomicU32>()
    }

    /// Whether the source is blocked now; a refused attempt counts as a failure. Asked only
    /// for tokens that matched no live session: a valid token goes through whatever its source.
    pub fn check_verify(&self, key: Source, now: Timestamp) -> Result<(), RetryAfter> {
        match self.blocked.remaining(key, now) {
            0 => Ok(()),
            left => {
                self.failures.add(key, now);
                Err(RetryAfter(left))
            }
        }
    }

    /// Counts an unknown or invalid token from the source; answers the block it starts, if
    /// the failures reached the threshold (again).
    pub fn verify_failed(&self, key: Source, now: Timestamp) -> Option<Blocked> {
        let failures = self.failures.add(key, now);
        let threshold = self.cfg.verify_failures.max(1);
        if failures < threshold {
            return None;
        }
        // 1x the threshold: block_s; 2x: twice that; 4x: four times; ...
        let doublings = (failures / threshold).max(1).ilog2();
        let for_s = self
            .cfg
            .block_s
            .saturating_mul(1u64 << doublings.min(40))
            .min(self.cfg.block_max_s)
            .max(1);
        self.blocked.block(key, now.plus_secs(for_s));
        Some(Blocked { failures, for_s })
    }

    /// Counts a session creation for the user (a tenant-qualified key) and the source;
    /// refuses it when either is over its limit in the window.
    pub fn check_create(
        &self,
        user_key: &str,
        source: Source,
        now: Timestamp,
    ) -> Result<(), Throttled> {
        if self.cfg.creates_per_user > 0
            && self.creates_user.add(user_key, now) > self.cfg.creates_per_user
        {
            return Err(Throttled {
                limit: "user",
                retry_after: RetryAfter(self.creates_user.secs_to_next_window(now)),
            });
        }
        let (limit, name) = if source.network.is_some() {
            (self.cfg.creates_per_ip, "network")
        } else {
            (self.cfg.creates_per_key, "api_key")
        };
        if limit > 0 && self.creates_ip.add(source, now) > limit {
            return Err(Throttled {
                limit: name,
                retry_after: RetryAfter(self.creates_ip.secs_to_next_window(now)),
            });
        }
        Ok(())
    }
}

/// Lets at most [`EventGate::PER_SECOND`] events a second through (per node), so that a flood
/// of findings cannot become a flood of writes.
#[derive(Debug, Default)]
pub struct EventGate {
    second: AtomicI64,
    count: AtomicU32,
    suppressed: AtomicU64,
}

impl EventGate {
    /// Events let through per second.
    pub const PER_SECOND: u32 = 20;

    /// Whether one more event may be recorded at `now`.
    pub fn allow(&self, now: Timestamp) -> bool {
        let s = now.as_millis().div_euclid(1000);
        if self.second.swap(s, Ordering::Relaxed) != s {
            self.count.store(0, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed) < Self::PER_SECOND
    }

    /// Like [`EventGate::allow`], counting what it refuses: `Some(n)` when one more event may
    /// be recorded, `n` the events refused since the last one let through (the event should
    /// say so); `None` when it may not.
    pub fn admit(&self, now: Timestamp) -> Option<u64> {
        if self.allow(now) {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seconds from the start of a minute.
    fn t(s: i64) -> Timestamp {
        Timestamp::from_millis(1_699_999_980_000 + s * 1000)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The source of `addr` asking with the key `api_key:k1`.
    fn src(addr: &str) -> Source {
        Source::new(Some(ip(addr)), Some("api_key:k1"))
    }

    fn guard() -> Guard {
        Guard::new(
            GuardConfig {
                window_s: 60,
                verify_failures: 5,
                block_s: 10,
                block_max_s: 100,
                creates_per_user: 3,
                creates_per_ip: 4,
                creates_per_key: 6,
            },
            t(0),
        )
    }

    #[test]
    fn networks() {
        assert_eq!(
            network(ip("2001:db8:1:2::1")),
            network(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            network(ip("2001:db8:1:2::1")),
            network(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            network(ip("203.0.113.7")),
            network(ip("::ffff:203.0.113.7"))
        );
        assert_ne!(network(ip("203.0.113.7")), network(ip("203.0.113.8")));
        assert_eq!(network_label(ip("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        assert_eq!(network_label(ip("203.0.113.7")), "203.0.113.7");
    }

    #[test]
    fn guessing_blocks_with_exponential_backoff_then_forgets() {
        let g = guard();
        let a = src("203.0.113.7");
        for _ in 0..4 {
            assert_eq!(g.verify_failed(a, t(1)), None);
        }
        assert_eq!(g.check_verify(a, t(1)), Ok(()));
        assert_eq!(
            g.verify_failed(a, t(1)),
            Some(Blocked {
                failures: 5,
                for_s: 10
            })
        );
        assert_eq!(g.check_verify(a, t(2)), Err(RetryAfter(9)));
        // Someone else is not affected.
        assert_eq!(g.check_verify(src("203.0.113.8"), t(2)), Ok(()));
        assert_eq!(g.check_verify(src("2001:db8::1"), t(2)), Ok(()));
        // The refused attempts counted: at 10 failures the next block doubles.
        for _ in 0..3 {
            assert!(g.check_verify(a, t(3)).is_err());
        }
        assert_eq!(g.check_verify(a, t(12)), Ok(()));
        let b = g.verify_failed(a, t(12)).unwrap();
        assert!(b.failures >= 9, "{b:?}");
        assert!(b.for_s >= 10);
        for _ in 0..40 {
            g.check_verify(a, t(13)).ok();
            g.verify_failed(a, t(13));
        }
        let b = g.verify_failed(a, t(13)).unwrap();
        assert_eq!(b.for_s, 100, "capped at block_max_s");
        // Two quiet windows later the network starts afresh.
        assert_eq!(g.check_verify(a, t(200)), Ok(()));
        assert_eq!(g.verify_failed(a, t(200)), None);
    }

    #[test]
    fn creates_are_limited_per_user_and_per_network() {
        let g = guard();
        let a = src("198.51.100.1");
        for _ in 0..3 {
            assert_eq!(g.check_create("default/u1", a, t(1)), Ok(()));
        }
        assert_eq!(
            g.check_create("default/u1", a, t(1)),
            Err(Throttled {
                limit: "user",
                retry_after: RetryAfter(59)
            }),
            "the fourth create of u1 in the window"
        );
        // Other users from the same network: its fifth create in the window is refused.
        assert_eq!(g.check_create("default/u2", a, t(2)), Ok(()));
        assert_eq!(
            g.check_create("default/u3", a, t(2)),
            Err(Throttled {
                limit: "network",
                retry_after: RetryAfter(58)
            })
        );
        // The same network through another API key has its own allowance.
        let other = Source::new(Some(ip("198.51.100.1")), Some("api_key:k2"));
        assert_eq!(g.check_create("default/u3", other, t(2)), Ok(()));
        // Two windows later nothing is left of them.
        assert_eq!(g.check_create("default/u1", a, t(130)), Ok(()));
    }

    #[test]
    fn a_flood_from_many_networks_stays_in_fixed_memory_and_spares_others() {
        let g = guard();
        for i in 0..200_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            g.verify_failed(Source::new(Some(a), Some("api_key:k1")), t(1));
        }
        assert_eq!(g.check_verify(src("203.0.113.99"), t(1)), Ok(()));
        assert_eq!(g.verify_failed(src("203.0.113.99"), t(1)), None);
        assert_eq!(Guard::memory_bytes(), 16 << 20);
    }

    #[test]
    fn a_request_without_client_address_counts_against_its_api_key() {
        let g = guard();
        let k1 = Source::new(None, Some("api_key:k1"));
        for _ in 0..4 {
            assert_eq!(g.verify_failed(k1, t(1)), None);
        }
        assert!(
            g.verify_failed(k1, t(1)).is_some(),
            "the fifth guess blocks"
        );
        assert_eq!(g.check_verify(k1, t(2)), Err(RetryAfter(9)));
        // Another key, and the same key naming a client address, are separate sources.
        assert_eq!(
            g.check_verify(Source::new(None, Some("api_key:k2")), t(2)),
            Ok(())
        );
        assert_eq!(g.check_verify(src("203.0.113.7"), t(2)), Ok(()));
        // Creations without an address count against the key, under its own, higher limit
        // (creates_per_key = 6, creates_per_ip = 4).
        let k3 = Source::new(None, Some("api_key:k3"));
        for u in 0..6 {
            assert_eq!(g.check_create(&format!("default/c{u}"), k3, t(3)), Ok(()));
        }
        assert_eq!(
            g.check_create("default/c9", k3, t(3)).map_err(|e| e.limit),
            Err("api_key")
        );
    }

    #[test]
    fn a_network_blocked_through_one_key_is_not_blocked_through_another() {
        let g = guard();
        let nat = "198.51.100.200";
        for _ in 0..5 {
            g.verify_failed(src(nat), t(1));
        }
        assert!(g.check_verify(src(nat), t(1)).is_err());
        assert_eq!(
            g.check_verify(Source::new(Some(ip(nat)), Some("api_key:k2")), t(1)),
            Ok(())
        );
    }

    #[test]
    fn the_gate_counts_what_it_refuses() {
        let gate = EventGate::default();
        for _ in 0..EventGate::PER_SECOND {
            assert_eq!(gate.admit(t(1)), Some(0));
        }
        assert_eq!(gate.admit(t(1)), None);
        assert_eq!(gate.admit(t(1)), None);
        assert_eq!(gate.admit(t(2)), Some(2));
    }
}

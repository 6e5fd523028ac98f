//! Caps on the number of live sessions, per node and per tenant, so that creating sessions
//! cannot exhaust the memory of the embedded store (which keeps every session in RAM) or grow a
//! shared store without bound.
//!
//! Counting every create against an exact count on every request would cost a scan (or a
//! `count(*)`) per create. Instead the counts are read from the store's own count
//! ([`SessionStore::active_sessions`]) at most every [`REFRESH_MS`], and every session created
//! on this node in between is added to them at once. The cap is therefore exact right after a
//! refresh and errs on the side of refusing between refreshes (sessions that ended since the
//! last refresh still count); concurrent creates can overshoot it by the number in flight.
//! Where the store cannot count cheaply (Redis, which would have to scan its keyspace), the
//! caps count only what this node created since it started, which bounds what one node can add.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::error::CoreError;
use crate::store::SessionStore;
use crate::time::Timestamp;
use crate::token::TenantId;

/// Milliseconds between reads of the store's counts.
pub const REFRESH_MS: i64 = 5_000;

/// The caps (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Caps {
    /// Live sessions in the store this node serves.
    pub max_sessions: u64,
    /// Live sessions of one tenant.
    pub max_sessions_per_tenant: u64,
}

#[derive(Debug, Default)]
struct Counts {
    /// When the store's counts were last read (`None`: never, or the store cannot count).
    read_at: Option<Timestamp>,
    /// Whether the store can count.
    store_counts: bool,
    total: u64,
    tenants: HashMap<TenantId, u64>,
}

/// The caps and the counts they are checked against.
#[derive(Debug)]
pub struct Capacity {
    caps: Caps,
    counts: Mutex<Counts>,
    /// Whether a refresh is under way (one store count at a time; meanwhile, the last counts).
    refreshing: AtomicBool,
}

impl Capacity {
    /// Caps with no sessions counted yet.
    pub fn new(caps: Caps) -> Self {
        Self {
            caps,
            counts: Mutex::new(Counts {
                store_counts: true,
                ..Counts::default()
            }),
            refreshing: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether one more session of `tenant` may be created: `SessionCapacityReached` at the
    /// node's cap, `TenantSessionLimit` at the tenant's.
    pub async fn check(
        &self,
        store: &dyn SessionStore,
        tenant: &TenantId,
        now: Timestamp,
    ) -> Result<(), CoreError> {
        if self.caps == Caps::default() {
            return Ok(());
        }
        let due = {
            let c = self.lock();
            c.store_counts
                && c.read_at
                    .is_none_or(|at| now.as_millis() - at.as_millis() >= REFRESH_MS)
        };
        if due && !self.refreshing.swap(true, Ordering::AcqRel) {
            let read = store.active_sessions(now).await;
            self.refreshing.store(false, Ordering::Release);
            let read = read?;
            {
                let mut c = self.lock();
                c.read_at = Some(now);
                match read {
                    Some(counts) => {
                        c.total = counts.iter().map(|(_, n)| n).sum();
                        c.tenants = counts.into_iter().collect();
                    }
                    // The store cannot count: from now on only this node's creates count.
                    None => c.store_counts = false,
                }
            }
        }
        let c = self.lock();
        if self.caps.max_sessions > 0 && c.total >= self.caps.max_sessions {
            return Err(CoreError::SessionCapacityReached);
        }
        if self.caps.max_sessions_per_tenant > 0
            && c.tenants.get(tenant).copied().unwrap_or(0) >= self.caps.max_sessions_per_tenant
        {
            return Err(CoreError::TenantSessionLimit);
        }
        Ok(())
    }

    /// Counts a session just created.
    pub fn created(&self, tenant: &TenantId) {
        if self.caps == Caps::default() {
            return;
        }
        let mut c = self.lock();
        c.total = c.total.saturating_add(1);
        *c.tenants.entry(tenant.clone()).or_default() += 1;
    }
}

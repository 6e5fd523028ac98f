//! The session record and the lifecycle rules that decide a session's fate: liveness with
//! sliding idle and fixed absolute expiry, step-up requirements, the per-user limit's choice of
//! victim, and merge patches of session data.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::{Map, Value};
use sessiond_api as api;

use crate::error::CoreError;
use crate::policy::Policy;
use crate::time::Timestamp;
use crate::token::{SessionHandle, TenantId, TokenHash, UserId};

/// How the user authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRecord {
    /// The method, for example `password`.
    pub method: Arc<str>,
    /// Authenticator assurance level, 1 to 3.
    pub aal: u8,
    /// When the user last authenticated.
    pub authenticated_at: Timestamp,
}

/// The device a session was created on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceRecord {
    /// Client IP.
    pub ip: Option<IpAddr>,
    /// Raw user agent.
    pub user_agent: Option<Arc<str>>,
    /// Browser family.
    pub browser: Option<Arc<str>>,
    /// Operating system.
    pub os: Option<Arc<str>>,
}

/// The stored lifecycle state. Expiry by timeout is also decided at read time (see
/// [`liveness`]) from the deadlines stored with the session and the current policy, whichever
/// is sooner; `Expired` is written when the sweeper finds a timed-out session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredState {
    /// Not ended by anyone (may still have timed out).
    Active,
    /// Revoked.
    Revoked {
        /// Why: `logout`, `revoked`, `force_logout`, `limit_evicted`, ...
        reason: Arc<str>,
        /// When.
        at: Timestamp,
    },
    /// Marked expired by the sweeper.
    Expired {
        /// When it expired.
        at: Timestamp,
    },
}

/// A session as stored. `last_seen_at` may lag behind the live value a store keeps separately.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Public id.
    pub handle: SessionHandle,
    /// SHA-256 of the current token.
    pub token_hash: TokenHash,
    /// The user.
    pub user_id: UserId,
    /// The tenant.
    pub tenant: TenantId,
    /// When created.
    pub created_at: Timestamp,
    /// When last used.
    pub last_seen_at: Timestamp,
    /// Remember-me session.
    pub remember_me: bool,
    /// Authentication.
    pub auth: AuthRecord,
    /// Device.
    pub device: DeviceRecord,
    /// Application data: the text of a JSON object.
    pub data: Arc<str>,
    /// Lifecycle state.
    pub state: StoredState,
    /// Token mode: the refresh state ([`crate::refresh::RefreshState`] as JSON text), replaced
    /// atomically on each refresh. `None` for sessions without a refresh token.
    pub refresh: Option<Arc<str>>,
    /// What detectors found (`binding_mismatch`, ...), in the order found, each once.
    pub flags: Vec<Arc<str>>,
    /// The absolute expiry, fixed when the session is created: a later policy can bring it
    /// forward but never push it back. `None` for sessions stored before it was kept (derived
    /// from the policy, and pinned at their next use).
    pub expires_at: Option<Timestamp>,
    /// The idle timeout (seconds) in force at the session's last pinned use: the idle expiry is
    /// `last_seen_at` plus this, or plus the current policy's if that is shorter. `None` for
    /// sessions stored before it was kept.
    pub idle_timeout_s: Option<u64>,
    /// How many times the session's token was rotated (rotate, reauthenticate). Access tokens
    /// carry the count they were issued at; one issued before the last rotation is refused.
    pub rotations: u32,
}

/// A session as read from a store: the shared record and the live `last_seen_at`.
#[derive(Debug, Clone)]
pub struct StoredSession {
    /// The record.
    pub record: Arc<SessionRecord>,
    /// The most recent use, which may be newer than `record.last_seen_at`.
    pub last_seen_at: Timestamp,
}

impl StoredSession {
    /// Wraps a record whose `last_seen_at` is current.
    pub fn new(record: Arc<SessionRecord>) -> Self {
        let last_seen_at = record.last_seen_at;
        Self {
            record,
            last_seen_at,
        }
    }
}

/// A session's effective status at a moment, under a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Valid.
    Active,
    /// Revoked, with its reason.
    Revoked(Arc<str>),
    /// Timed out (or marked expired) at this time.
    Expired(Timestamp),
}

/// The idle and absolute expiry of a session under `policy`: the deadlines stored with the
/// session, brought forward by the policy if it is stricter. A relaxed policy never moves a
/// deadline back, so a timed-out session stays timed out.
pub fn expiries(
    rec: &SessionRecord,
    last_seen: Timestamp,
    policy: &Policy,
) -> (Timestamp, Timestamp) {
    let t = policy.timeouts(rec.remember_me);
    let mut absolute = rec.created_at.plus_secs(t.absolute_s);
    if let Some(fixed) = rec.expires_at {
        absolute = absolute.min(fixed);
    }
    let idle_s = rec.idle_timeout_s.map_or(t.idle_s, |s| s.min(t.idle_s));
    let idle = last_seen.plus_secs(idle_s).min(absolute);
    (idle, absolute)
}

/// Whether a use of the session under `policy` must store new deadlines with it: its idle
/// timeout differs from the policy's (the policy changed), or it has none stored (old data).
pub fn needs_pin(rec: &SessionRecord, policy: &Policy) -> bool {
    rec.expires_at.is_none() || rec.idle_timeout_s != Some(policy.timeouts(rec.remember_me).idle_s)
}

/// Stores in `rec` the deadlines a use under `policy` fixes: the policy's idle timeout, and the
/// absolute expiry if none was stored (derived once, as it was before it was kept).
pub fn pin(rec: &mut SessionRecord, policy: &Policy) {
    let t = policy.timeouts(rec.remember_me);
    rec.expires_at = Some(
        rec.expires_at
            .unwrap_or_else(|| rec.created_at.plus_secs(t.absolute_s)),
    );
    rec.idle_timeout_s = Some(t.idle_s);
}

/// Whether the session is active at `now` under `policy`: revoked and marked-expired sessions
/// are not; an active one is expired once `now` reaches its idle or absolute expiry.
pub fn liveness(
    rec: &SessionRecord,
    last_seen: Timestamp,
    policy: &Policy,
    now: Timestamp,
) -> Liveness {
    match &rec.state {
        StoredState::Revoked { reason, .. } => Liveness::Revoked(reason.clone()),
        StoredState::Expired { at } => Liveness::Expired(*at),
        StoredState::Active => {
            let (idle, absolute) = expiries(rec, last_seen, policy);
            let end = idle.min(absolute);
            if now >= end {
                Liveness::Expired(end)
            } else {
                Liveness::Active
            }
        }
    }
}

/// The error a token-presenting operation answers for a session that is not active.
pub fn liveness_error(l: &Liveness) -> Option<CoreError> {
    match l {
        Liveness::Active => None,
        Liveness::Revoked(_) => Some(CoreError::SessionRevoked),
        Liveness::Expired(_) => Some(CoreError::SessionExpired),
    }
}

/// Checks step-up requirements against an active session whose assurance level counts as
/// `aal` now (see [`Policy::effective_aal`]).
pub fn check_requirements(
    rec: &SessionRecord,
    aal: u8,
    req: &api::Requirements,
    now: Timestamp,
) -> Result<(), CoreError> {
    if let Some(min) = req.min_aal
        && aal < min
    {
        return Err(CoreError::ReauthenticationRequired(format!(
            "this request needs assurance level {min}; the session has {aal}"
        )));
    }
    if let Some(max_age) = req.max_auth_age_s
        && now > rec.auth.authenticated_at.plus_secs(max_age)
    {
        return Err(CoreError::ReauthenticationRequired(format!(
            "this request needs an authentication at most {max_age} seconds old"
        )));
    }
    Ok(())
}

/// Validates requirements from a request.
pub fn validate_requirements(req: &api::Requirements) -> Result<(), CoreError> {
    if let Some(a) = req.min_aal
        && !(1..=3).contains(&a)
    {
        return Err(CoreError::InvalidRequest(
            "require.min_aal must be 1, 2 or 3".into(),
        ));
    }
    Ok(())
}

/// Of a user's sessions, the ones to evict so that one more fits under `max`: the least
/// recently used first. `sessions` holds `(last_seen_at, handle)` of the user's *active* sessions.
pub fn choose_evictions(
    mut sessions: Vec<(Timestamp, SessionHandle)>,
    max: u32,
) -> Vec<SessionHandle> {
    let max = max as usize;
    if sessions.len() < max {
        return Vec::new();
    }
    sessions.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
    let excess = sessions.len() + 1 - max;
    sessions.into_iter().take(excess).map(|(_, h)| h).collect()
}

/// Applies an RFC 7396 JSON merge patch to `target`.
pub fn merge_patch(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let entry = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge_patch(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Applies a merge patch to stored data text, checking the result against `limit` bytes.
pub fn patch_data(
    current: &str,
    patch: &Map<String, Value>,
    limit: usize,
) -> Result<String, CoreError> {
    let mut data: Map<String, Value> = serde_json::from_str(current).map_err(|e| {
        CoreError::Internal(format!("stored session data is not a JSON object: {e}"))
    })?;
    merge_patch(&mut data, patch);
    encode_data(&data, limit)
}

/// Serializes session data, checking it against `limit` bytes.
pub fn encode_data(data: &Map<String, Value>, limit: usize) -> Result<String, CoreError> {
    let text = serde_json::to_string(data)
        .map_err(|e| CoreError::Internal(format!("cannot encode session data: {e}")))?;
    if text.len() > limit {
        return Err(CoreError::DataTooLarge {
            size: text.len(),
            limit,
        });
    }
    Ok(text)
}

/// The wire view of a stored session at `now` under `policy`.
pub fn to_api(s: &StoredSession, policy: &Policy, now: Timestamp) -> api::Session {
    let rec = &s.record;
    let (idle, absolute) = expiries(rec, s.last_seen_at, policy);
    let (status, reason) = match liveness(rec, s.last_seen_at, policy, now) {
        Liveness::Active => (api::SessionStatus::Active, None),
        Liveness::Revoked(r) => (api::SessionStatus::Revoked, Some(r.to_string())),
        Liveness::Expired(_) => (api::SessionStatus::Expired, None),
    };
    let data = serde_json::from_str(&rec.data).unwrap_or_default();
    api::Session {
        handle: rec.handle.to_string(),
        user_id: rec.user_id.to_string(),
        tenant: rec.tenant.to_string(),
        status,
        created_at: rec.created_at.to_datetime(),
        last_seen_at: s.last_seen_at.to_datetime(),
        idle_expires_at: idle.to_datetime(),
        expires_at: absolute.to_datetime(),
        remember_me: rec.remember_me,
        auth: api::AuthInfo {
            method: rec.auth.method.to_string(),
            aal: rec.auth.aal,
            authenticated_at: rec.auth.authenticated_at.to_datetime(),
        },
        device: api::Device {
            ip: rec.device.ip.map(|ip| ip.to_string()),
            user_agent: rec.device.user_agent.as_deref().map(str::to_owned),
            browser: rec.device.browser.as_deref().map(str::to_owned),
            os: rec.device.os.as_deref().map(str::to_owned),
            location: None,
        },
        data,
        revoked_reason: reason,
        flags: rec.flags.iter().map(|f| f.to_string()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sessiond_api::PolicyDocument;

    fn rec(created: i64, remember_me: bool) -> SessionRecord {
        SessionRecord {
            handle: SessionHandle::generate().unwrap(),
            token_hash: TokenHash::of("t"),
            user_id: UserId::parse("u").unwrap(),
            tenant: TenantId::default_tenant(),
            created_at: Timestamp::from_millis(created),
            last_seen_at: Timestamp::from_millis(created),
            remember_me,
            auth: AuthRecord {
                method: "password".into(),
                aal: 1,
                authenticated_at: Timestamp::from_millis(created),
            },
            device: DeviceRecord::default(),
            data: "{}".into(),
            state: StoredState::Active,
            refresh: None,
            flags: Vec::new(),
            expires_at: None,
            idle_timeout_s: None,
            rotations: 0,
        }
    }

    fn policy(idle: u64, abs: u64) -> Policy {
        Policy::new(PolicyDocument {
            idle_timeout_s: idle,
            absolute_timeout_s: abs,
            remember_me_idle_timeout_s: idle * 10,
            remember_me_absolute_timeout_s: abs * 10,
            ..PolicyDocument::default()
        })
        .unwrap()
    }

    #[test]
    fn idle_expiry_slides_with_last_seen_but_absolute_does_not() {
        let p = policy(10, 25);
        let r = rec(0, false);
        let t = Timestamp::from_millis;
        assert_eq!(liveness(&r, t(0), &p, t(9_999)), Liveness::Active);
        assert_eq!(
            liveness(&r, t(0), &p, t(10_000)),
            Liveness::Expired(t(10_000))
        );
        // seen at 8s: idle now ends at 18s
        assert_eq!(liveness(&r, t(8_000), &p, t(17_999)), Liveness::Active);
        // seen at 20s: idle would end at 30s but absolute ends at 25s
        assert_eq!(liveness(&r, t(20_000), &p, t(24_999)), Liveness::Active);
        assert_eq!(
            liveness(&r, t(20_000), &p, t(25_000)),
            Liveness::Expired(t(25_000))
        );
        assert_eq!(expiries(&r, t(20_000), &p), (t(25_000), t(25_000)));
    }

    #[test]
    fn remember_me_uses_its_own_timeouts() {
        let p = policy(10, 25);
        let r = rec(0, true);
        let t = Timestamp::from_millis;
        assert_eq!(liveness(&r, t(0), &p, t(99_999)), Liveness::Active);
        assert_eq!(
            liveness(&r, t(0), &p, t(100_000)),
            Liveness::Expired(t(100_000))
        );
    }

    #[test]
    fn revoked_and_marked_expired_are_not_active_whatever_the_time() {
        let p = policy(10, 25);
        let mut r = rec(0, false);
        r.state = StoredState::Revoked {
            reason: "logout".into(),
            at: Timestamp::from_millis(1),
        };
        assert_eq!(
            liveness(&r, r.last_seen_at, &p, Timestamp::from_millis(2)),
            Liveness::Revoked("logout".into())
        );
        assert!(matches!(
            liveness_error(&Liveness::Revoked("x".into())),
            Some(CoreError::SessionRevoked)
        ));
        r.state = StoredState::Expired {
            at: Timestamp::from_millis(1),
        };
        assert!(matches!(
            liveness_error(&liveness(&r, r.last_seen_at, &p, Timestamp::from_millis(2))),
            Some(CoreError::SessionExpired)
        ));
    }

    #[test]
    fn a_policy_change_applies_to_existing_sessions() {
        let r = rec(0, false);
        let t = Timestamp::from_millis;
        assert_eq!(
            liveness(&r, t(0), &policy(100, 100), t(50_000)),
            Liveness::Active
        );
        assert!(matches!(
            liveness(&r, t(0), &policy(10, 100), t(50_000)),
            Liveness::Expired(_)
        ));
    }

    #[test]
    fn stored_deadlines_win_over_a_relaxed_policy_but_not_a_stricter_one() {
        let t = Timestamp::from_millis;
        for remember_me in [false, true] {
            let mut r = rec(0, remember_me);
            let created_under = policy(2, 3);
            pin(&mut r, &created_under);
            assert!(!needs_pin(&r, &created_under));
            let relaxed = policy(1800, 43_200);
            assert!(needs_pin(&r, &relaxed));
            let (i, a) = if remember_me { (20, 30) } else { (2, 3) };
            assert_eq!(
                expiries(&r, t(0), &relaxed),
                (t(i * 1000), t(a * 1000)),
                "remember_me={remember_me}"
            );
            assert_eq!(
                liveness(&r, t(0), &relaxed, t(a * 1000)),
                Liveness::Expired(t(i * 1000))
            );
            // Stricter than stored: the policy wins.
            let s = if remember_me { 10_000 } else { 1000 };
            assert_eq!(expiries(&r, t(0), &policy(1, 1)), (t(s), t(s)));
        }
        // Old data: nothing stored, the policy decides; pinning derives the absolute expiry once.
        let mut old = rec(0, false);
        assert_eq!(
            expiries(&old, t(0), &policy(100, 200)),
            (t(100_000), t(200_000))
        );
        pin(&mut old, &policy(100, 200));
        assert_eq!(old.expires_at, Some(t(200_000)));
        assert_eq!(old.idle_timeout_s, Some(100));
    }

    #[test]
    fn requirements_check_aal_and_auth_age() {
        let mut r = rec(0, false);
        r.auth.aal = 1;
        let now = Timestamp::from_millis(100_000);
        let need_aal2 = api::Requirements {
            min_aal: Some(2),
            max_auth_age_s: None,
        };
        assert!(matches!(
            check_requirements(&r, r.auth.aal, &need_aal2, now),
            Err(CoreError::ReauthenticationRequired(_))
        ));
        r.auth.aal = 2;
        assert!(check_requirements(&r, r.auth.aal, &need_aal2, now).is_ok());
        let fresh = api::Requirements {
            min_aal: None,
            max_auth_age_s: Some(100),
        };
        assert!(check_requirements(&r, 2, &fresh, now).is_ok());
        let fresher = api::Requirements {
            min_aal: None,
            max_auth_age_s: Some(99),
        };
        assert!(check_requirements(&r, 2, &fresher, now).is_err());
        assert!(
            validate_requirements(&api::Requirements {
                min_aal: Some(4),
                max_auth_age_s: None
            })
            .is_err()
        );
    }

    #[test]
    fn eviction_picks_least_recently_used_until_one_fits() {
        let h: Vec<SessionHandle> = (0..4).map(|_| SessionHandle::generate().unwrap()).collect();
        let t = Timestamp::from_millis;
        let sessions = vec![
            (t(30), h[0].clone()),
            (t(10), h[1].clone()),
            (t(40), h[2].clone()),
            (t(20), h[3].clone()),
        ];
        assert!(choose_evictions(sessions.clone(), 5).is_empty());
        assert_eq!(choose_evictions(sessions.clone(), 4), vec![h[1].clone()]);
        assert_eq!(
            choose_evictions(sessions.clone(), 2),
            vec![h[1].clone(), h[3].clone(), h[0].clone()]
        );
        assert_eq!(choose_evictions(sessions, 1).len(), 4);
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut target: Map<String, Value> =
            serde_json::from_str(r#"{"a":"b","c":{"d":"e","f":"g"},"x":1}"#).unwrap();
        let patch: Map<String, Value> =
            serde_json::from_str(r#"{"a":"z","c":{"f":null,"h":{"i":null}},"x":null,"n":[1]}"#)
                .unwrap();
        merge_patch(&mut target, &patch);
        let want: Map<String, Value> =
            serde_json::from_str(r#"{"a":"z","c":{"d":"e","h":{}},"n":[1]}"#).unwrap();
        assert_eq!(target, want);
    }

    #[test]
    fn data_limit_is_enforced() {
        let patch: Map<String, Value> = serde_json::from_str(r#"{"k":"0123456789"}"#).unwrap();
        assert!(patch_data("{}", &patch, 100).is_ok());
        assert!(matches!(
            patch_data("{}", &patch, 10),
            Err(CoreError::DataTooLarge { .. })
        ));
    }

    #[test]
    fn stored_data_reads_back_with_the_same_numbers() {
        // Numbers that only fit an f64 must survive encode_data and the parse in to_api unchanged.
        let sent = r#"{"big":104847464738446744073709551617,"f":1.0484746473844676e29,"x":0.1}"#;
        let data: Map<String, Value> = serde_json::from_str(sent).unwrap();
        let mut r = rec(0, false);
        r.data = encode_data(&data, 1024).unwrap().into();
        let s = StoredSession::new(Arc::new(r));
        let shown = to_api(&s, &policy(10, 25), Timestamp::from_millis(0)).data;
        assert_eq!(shown, data);
        let again: Map<String, Value> =
            serde_json::from_str(&encode_data(&shown, 1024).unwrap()).unwrap();
        assert_eq!(again, data);
    }
}

//! [`Row`]: a session record as flat, storable values, and its conversion to and from
//! [`SessionRecord`]. Every backend stores these columns (SQL backends as columns, Redis as a
//! JSON document), so the conversion and its validation are written once.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sessiond_core::session::{AuthRecord, DeviceRecord, SessionRecord, StoredState};
use sessiond_core::store::StoreError;
use sessiond_core::time::Timestamp;
use sessiond_core::token::{SessionHandle, TenantId, TokenHash, UserId};

/// A session as stored. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Public id.
    pub handle: String,
    /// SHA-256 of the current token (32 bytes).
    pub token_hash: Vec<u8>,
    /// User id.
    pub user_id: String,
    /// Tenant id.
    pub tenant: String,
    /// Creation time.
    pub created_at: i64,
    /// Last use written back.
    pub last_seen_at: i64,
    /// Remember-me session.
    pub remember_me: bool,
    /// Authentication method.
    pub auth_method: String,
    /// Assurance level.
    pub auth_aal: i16,
    /// Time of the last authentication.
    pub authenticated_at: i64,
    /// Client IP.
    pub ip: Option<String>,
    /// Raw user agent.
    pub user_agent: Option<String>,
    /// Browser family.
    pub browser: Option<String>,
    /// OS family.
    pub os: Option<String>,
    /// Session data, a JSON object's text.
    pub data: String,
    /// `active`, `revoked` or `expired`.
    pub state: String,
    /// Reason of a revocation.
    pub revoked_reason: Option<String>,
    /// When the session was revoked or expired.
    pub ended_at: Option<i64>,
    /// Token mode's refresh state (JSON text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<String>,
    /// Detectors' flags, comma-separated; `None` when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<String>,
    /// Absolute expiry fixed at creation; `None` in rows written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Idle timeout (seconds) in force at the last pinned use; `None` in older rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<i64>,
    /// Token rotations so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rotations: i32,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Backend(format!("stored session has an invalid {what}"))
}

impl Row {
    /// The storable form of a record.
    pub fn from_record(r: &SessionRecord) -> Self {
        let (state, revoked_reason, ended_at) = match &r.state {
            StoredState::Active => ("active", None, None),
            StoredState::Revoked { reason, at } => {
                ("revoked", Some(reason.to_string()), Some(at.as_millis()))
            }
            StoredState::Expired { at } => ("expired", None, Some(at.as_millis())),
        };
        Self {
            handle: r.handle.to_string(),
            token_hash: r.token_hash.as_bytes().to_vec(),
            user_id: r.user_id.to_string(),
            tenant: r.tenant.to_string(),
            created_at: r.created_at.as_millis(),
            last_seen_at: r.last_seen_at.as_millis(),
            remember_me: r.remember_me,
            auth_method: r.auth.method.to_string(),
            auth_aal: i16::from(r.auth.aal),
            authenticated_at: r.auth.authenticated_at.as_millis(),
            ip: r.device.ip.map(|ip| ip.to_string()),
            user_agent: r.device.user_agent.as_deref().map(str::to_owned),
            browser: r.device.browser.as_deref().map(str::to_owned),
            os: r.device.os.as_deref().map(str::to_owned),
            data: r.data.to_string(),
            state: state.to_owned(),
            revoked_reason,
            ended_at,
            refresh: r.refresh.as_deref().map(str::to_owned),
            flags: (!r.flags.is_empty()).then(|| r.flags.join(",")),
            expires_at: r.expires_at.map(Timestamp::as_millis),
            idle_timeout_s: r
                .idle_timeout_s
                .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
            rotations: i32::try_from(r.rotations).unwrap_or(i32::MAX),
        }
    }

    /// The record, validated. `intern` may share equal strings (user agents, browsers) between
    /// records held in memory.
    pub fn into_record(
        self,
        mut intern: impl FnMut(String) -> Arc<str>,
    ) -> Result<SessionRecord, StoreError> {
        let hash: [u8; 32] = self
            .token_hash
            .try_into()
            .map_err(|_| corrupt("token hash"))?;
        let ended = Timestamp::from_millis(self.ended_at.unwrap_or(0));
        let state = match self.state.as_str() {
            "active" => StoredState::Active,
            "revoked" => StoredState::Revoked {
                reason: self.revoked_reason.unwrap_or_default().into(),
                at: ended,
            },
            "expired" => StoredState::Expired { at: ended },
            _ => return Err(corrupt("state")),
        };
        let ip = match self.ip.as_deref() {
            Some(s) => Some(s.parse::<IpAddr>().map_err(|_| corrupt("ip"))?),
            None => None,
        };
        Ok(SessionRecord {
            handle: SessionHandle::parse(&self.handle).map_err(|_| corrupt("handle"))?,
            token_hash: TokenHash::from_bytes(hash),
            user_id: UserId::parse(&self.user_id).map_err(|_| corrupt("user id"))?,
            tenant: TenantId::parse(&self.tenant).map_err(|_| corrupt("tenant"))?,
            created_at: Timestamp::from_millis(self.created_at),
            last_seen_at: Timestamp::from_millis(self.last_seen_at),
            remember_me: self.remember_me,
            auth: AuthRecord {
                method: intern(self.auth_method),
                aal: u8::try_from(self.auth_aal).map_err(|_| corrupt("aal"))?,
                authenticated_at: Timestamp::from_millis(self.authenticated_at),
            },
            device: DeviceRecord {
                ip,
                user_agent: self.user_agent.map(&mut intern),
                browser: self.browser.map(&mut intern),
                os: self.os.map(&mut intern),
            },
            data: self.data.into(),
            state,
            refresh: self.refresh.map(Into::into),
            flags: self
                .flags
                .as_deref()
                .map(|f| {
                    f.split(',')
                        .filter(|x| !x.is_empty())
                        .map(|x| intern(x.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            expires_at: self.expires_at.map(Timestamp::from_millis),
            idle_timeout_s: match self.idle_timeout_s {
                Some(s) => Some(u64::try_from(s).map_err(|_| corrupt("idle timeout"))?),
                None => None,
            },
            rotations: u32::try_from(self.rotations).map_err(|_| corrupt("rotation count"))?,
        })
    }
}

/// Plain conversion, without interning.
pub fn no_intern(s: String) -> Arc<str> {
    s.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_corruption_is_an_error() {
        let (rec, _) = crate::conformance::record("u", "t", Timestamp::from_millis(5));
        let row = Row::from_record(&rec);
        assert_eq!(row.clone().into_record(no_intern).unwrap(), rec);
        let mut revoked = rec.clone();
        revoked.state = StoredState::Revoked {
            reason: "logout".into(),
            at: Timestamp::from_millis(9),
        };
        assert_eq!(
            Row::from_record(&revoked).into_record(no_intern).unwrap(),
            revoked
        );
        let mut pinned = rec.clone();
        pinned.expires_at = Some(Timestamp::from_millis(3_600_005));
        pinned.idle_timeout_s = Some(1800);
        pinned.rotations = 2;
        let text = serde_json::to_string(&Row::from_record(&pinned)).unwrap();
        let back: Row = serde_json::from_str(&text).unwrap();
        assert_eq!(back.into_record(no_intern).unwrap(), pinned);
        // A row written before the deadlines were kept reads back without them.
        let old: Row = serde_json::from_str(&serde_json::to_string(&row).unwrap()).unwrap();
        assert_eq!(old.expires_at, None);
        let mut bad = row.clone();
        bad.state = "zombie".into();
        assert!(bad.into_record(no_intern).is_err());
        let mut bad = row;
        bad.token_hash.pop();
        assert!(bad.into_record(no_intern).is_err());
    }
}

//! The session object on the wire, serialized straight from the stored record.
//!
//! [`crate::session::to_api`] builds an owned [`api::Session`] (a dozen strings, the data parsed
//! into a map, five timestamps formatted by chrono) that is then serialized and dropped. Verify
//! answers that object on every request, so [`SessionJson`] writes the very same JSON from the
//! record instead: borrowed strings, timestamps formatted on the stack, empty data written as is.
//! The output is byte-for-byte what `serde_json` makes of
//! `SessionResponse { session: to_api(..) }` (tests compare both on many records).

use serde::ser::{Serialize, SerializeStruct, Serializer};
use serde_json::{Map, Value};
use sessiond_api as api;

use crate::policy::Policy;
use crate::session::{Liveness, StoredSession, expiries, liveness};
use crate::time::Timestamp;

/// `{"session": …}` of a stored session under its policy at `now`, serializable without building
/// an [`api::Session`]. `location` is the device's location, when geolocation is on.
#[derive(Debug, Clone, Copy)]
pub struct SessionJson<'a> {
    /// The session.
    pub session: &'a StoredSession,
    /// Its tenant's policy.
    pub policy: &'a Policy,
    /// The moment its status is decided at.
    pub now: Timestamp,
    /// The device's location.
    pub location: Option<&'a api::Location>,
}

impl SessionJson<'_> {
    /// The JSON text of the response.
    pub fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(768);
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }
}

impl Serialize for SessionJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("SessionResponse", 1)?;
        st.serialize_field("session", &Inner(self))?;
        st.end()
    }
}

/// The session object itself, in [`api::Session`]'s field order.
struct Inner<'a, 'b>(&'b SessionJson<'a>);

impl Serialize for Inner<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        let rec = &v.session.record;
        let (idle, absolute) = expiries(rec, v.session.last_seen_at, v.policy);
        let (status, reason) = match liveness(rec, v.session.last_seen_at, v.policy, v.now) {
            Liveness::Active => (api::SessionStatus::Active, None),
            Liveness::Revoked(r) => (api::SessionStatus::Revoked, Some(r)),
            Liveness::Expired(_) => (api::SessionStatus::Expired, None),
        };
        let mut st = s.serialize_struct("Session", 14)?;
        st.serialize_field("handle", rec.handle.as_str())?;
        st.serialize_field("user_id", rec.user_id.as_str())?;
        st.serialize_field("tenant", rec.tenant.as_str())?;
        st.serialize_field("status", &status)?;
        st.serialize_field("created_at", &Millis(rec.created_at))?;
        st.serialize_field("last_seen_at", &Millis(v.session.last_seen_at))?;
        st.serialize_field("idle_expires_at", &Millis(idle))?;
        st.serialize_field("expires_at", &Millis(absolute))?;
        st.serialize_field("remember_me", &rec.remember_me)?;
        st.serialize_field("auth", &Auth(v))?;
        st.serialize_field("device", &Device(v))?;
        st.serialize_field("data", &Data(&rec.data))?;
        st.serialize_field("revoked_reason", &reason.as_deref())?;
        st.serialize_field("flags", &Flags(&rec.flags))?;
        st.end()
    }
}

struct Auth<'a, 'b>(&'b SessionJson<'a>);

impl Serialize for Auth<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let a = &self.0.session.record.auth;
        let mut st = s.serialize_struct("AuthInfo", 3)?;
        st.serialize_field("method", &*a.method)?;
        st.serialize_field("aal", &a.aal)?;
        st.serialize_field("authenticated_at", &Millis(a.authenticated_at))?;
        st.end()
    }
}

struct Device<'a, 'b>(&'b SessionJson<'a>);

impl Serialize for Device<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = &self.0.session.record.device;
        let mut st = s.serialize_struct("Device", 5)?;
        match d.ip {
            Some(ip) => st.serialize_field("ip", &IpText(ip))?,
            None => st.serialize_field("ip", &None::<&str>)?,
        }
        st.serialize_field("user_agent", &d.user_agent.as_deref())?;
        st.serialize_field("browser", &d.browser.as_deref())?;
        st.serialize_field("os", &d.os.as_deref())?;
        st.serialize_field("location", &self.0.location)?;
        st.end()
    }
}

/// An IP address as a JSON string, formatted without an intermediate `String`.
struct IpText(std::net::IpAddr);

impl Serialize for IpText {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// Session data: written as stored when it is the empty object, else through a map exactly as
/// [`crate::session::to_api`] does (so key order and spacing are the same whatever the store
/// kept). Unreadable stored data is the empty object there too.
struct Data<'a>(&'a str);

impl Serialize for Data<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == "{}" {
            return serde::ser::SerializeMap::end(s.serialize_map(Some(0))?);
        }
        let map: Map<String, Value> = serde_json::from_str(self.0).unwrap_or_default();
        map.serialize(s)
    }
}

struct Flags<'a>(&'a [std::sync::Arc<str>]);

impl Serialize for Flags<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|f| &**f))
    }
}

/// A timestamp as `YYYY-MM-DDTHH:MM:SS.mmmZ`, the format of [`api::timestamp::format`].
struct Millis(Timestamp);

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; 24];
        match format_millis(self.0.as_millis(), &mut buf) {
            Some(text) => s.serialize_str(text),
            // Outside years 0000-9999: chrono's own formatting, as the owned object would have.
            None => s.serialize_str(&api::timestamp::format(&self.0.to_datetime())),
        }
    }
}

/// Formats Unix milliseconds in years 1970-9999 as `YYYY-MM-DDTHH:MM:SS.mmmZ` into `buf`, or
/// `None` outside that range.
fn format_millis(ms: i64, buf: &mut [u8; 24]) -> Option<&str> {
    // 10000-01-01T00:00:00Z
    const END: i64 = 253_402_300_800_000;
    if !(0..END).contains(&ms) {
        return None;
    }
    let days = ms.div_euclid(86_400_000);
    let in_day = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (hh, rest) = (in_day / 3_600_000, in_day % 3_600_000);
    let (mm, rest) = (rest / 60_000, rest % 60_000);
    let (ss, milli) = (rest / 1000, rest % 1000);
    let mut put = |at: usize, v: i64, width: usize| {
        let mut v = v;
        for i in (0..width).rev() {
            // v is non-negative and below 10^width here, so each digit is 0-9.
            buf[at + i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, m, 2);
    put(8, d, 2);
    put(11, hh, 2);
    put(14, mm, 2);
    put(17, ss, 2);
    put(20, milli, 3);
    buf[4] = b'-';
    buf[7] = b'-';
    buf[10] = b'T';
    buf[13] = b':';
    buf[16] = b':';
    buf[19] = b'.';
    buf[23] = b'Z';
    std::str::from_utf8(buf).ok()
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (days >= 0).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    // Eras of 400 years (146,097 days) from 0000-03-01, with March as the first month so that
    // the leap day ends the year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use super::*;
    use crate::session::{AuthRecord, DeviceRecord, SessionRecord, StoredState, to_api};
    use crate::token::{SessionHandle, TenantId, TokenHash, UserId};

    fn record(
        data: &str,
        state: StoredState,
        flags: &[&str],
        device: DeviceRecord,
    ) -> StoredSession {
        let created = Timestamp::from_millis(1_767_225_600_123);
        StoredSession {
            record: Arc::new(SessionRecord {
                handle: SessionHandle::generate().unwrap(),
                token_hash: TokenHash::of("t"),
                user_id: UserId::parse("user \"quoted\" \u{e9}").unwrap(),
                tenant: TenantId::default_tenant(),
                created_at: created,
                last_seen_at: created,
                remember_me: true,
                auth: AuthRecord {
                    method: "webauthn".into(),
                    aal: 2,
                    authenticated_at: created,
                },
                device,
                data: data.into(),
                state,
                refresh: None,
                flags: flags.iter().map(|f| Arc::from(*f)).collect(),
                expires_at: None,
                idle_timeout_s: None,
                rotations: 0,
            }),
            last_seen_at: Timestamp::from_millis(1_767_225_660_999),
        }
    }

    fn same(s: &StoredSession, now: Timestamp, location: Option<api::Location>) {
        let policy = Policy::default();
        let mut owned = to_api(s, &policy, now);
        owned.device.location = location.clone();
        let expected = serde_json::to_vec(&api::SessionResponse { session: owned }).unwrap();
        let got = SessionJson {
            session: s,
            policy: &policy,
            now,
            location: location.as_ref(),
        }
        .to_vec()
        .unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(expected).unwrap()
        );
    }

    #[test]
    fn writes_what_the_owned_object_serializes_to() {
        let device = DeviceRecord {
            ip: Some("2001:db8::7".parse().unwrap()),
            user_agent: Some("Mozilla/5.0 \\ \"x\"".into()),
            browser: Some("Firefox".into()),
            os: None,
        };
        let now = Timestamp::from_millis(1_767_225_700_000);
        for data in [
            "{}",
            r#"{"z":1,"a":{"b":[1,2,"\u00e9"]},"m":null}"#,
            "not json",
            r#"{ "a" : 1 }"#,
        ] {
            same(
                &record(data, StoredState::Active, &[], device.clone()),
                now,
                None,
            );
        }
        same(
            &record(
                "{}",
                StoredState::Revoked {
                    reason: "theft_detected".into(),
                    at: now,
                },
                &["binding_mismatch", "impossible_travel"],
                DeviceRecord::default(),
            ),
            now,
            Some(api::Location {
                country: Some("FR".into()),
                city: None,
                latitude: Some(48.85),
                longitude: Some(2.35),
            }),
        );
        same(
            &record("{}", StoredState::Expired { at: now }, &[], device.clone()),
            now,
            None,
        );
        // Expired by its idle timeout at `now`, never marked.
        same(
            &record("{}", StoredState::Active, &[], device),
            Timestamp::from_millis(1_767_225_600_000 + 400 * 86_400_000),
            None,
        );
    }

    #[test]
    fn timestamps_match_chrono_across_the_range() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut cases: Vec<i64> = vec![
            0,
            1,
            999,
            86_399_999,
            951_782_400_000,     // 2000-02-29
            4_107_542_399_999,   // 2100-02-28T23:59:59.999
            253_402_300_799_999, // 9999-12-31T23:59:59.999
        ];
        cases.extend((0..20_000).map(|_| rng.i64(0..253_402_300_800_000)));
        for ms in cases {
            let mut buf = [0u8; 24];
            let ours = format_millis(ms, &mut buf).unwrap().to_owned();
            let theirs = api::timestamp::format(&Timestamp::from_millis(ms).to_datetime());
            assert_eq!(ours, theirs, "{ms}");
        }
        let mut buf = [0u8; 24];
        assert_eq!(format_millis(-1, &mut buf), None);
        assert_eq!(format_millis(253_402_300_800_000, &mut buf), None);
    }
}

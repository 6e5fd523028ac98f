//! Verifying the webhooks sessiond sends (Standard Webhooks): check the signature and the
//! timestamp before trusting a payload, and deduplicate by `webhook-id` (deliveries are
//! at-least-once: the same id may arrive again).

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sessiond_api::Event;

/// How far a delivery's timestamp may be from now, by default (replay window).
pub const DEFAULT_TOLERANCE_S: i64 = 300;

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The secret is not `whsec_` followed by base64.
    #[error("the webhook secret must be whsec_ followed by base64")]
    BadSecret,
    /// A `webhook-*` header is missing or malformed.
    #[error("missing or malformed webhook headers")]
    BadHeaders,
    /// The timestamp is outside the tolerance (a replay, or a clock far off).
    #[error("the webhook timestamp is outside the tolerance")]
    Stale,
    /// No signature matches.
    #[error("no webhook signature matches")]
    BadSignature,
    /// The signed body is not a sessiond event payload.
    #[error("the webhook body is not a sessiond event")]
    BadBody,
}

/// Checks deliveries signed with one endpoint's secret.
pub struct WebhookVerifier {
    key: hmac::Key,
    tolerance_s: i64,
}

impl std::fmt::Debug for WebhookVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field("tolerance_s", &self.tolerance_s)
            .finish_non_exhaustive()
    }
}

#[derive(serde::Deserialize)]
struct Payload {
    data: Event,
}

impl WebhookVerifier {
    /// A verifier for the endpoint's `whsec_` secret, with the default tolerance.
    pub fn new(secret: &str) -> Result<Self, WebhookError> {
        let b64 = secret
            .strip_prefix("whsec_")
            .ok_or(WebhookError::BadSecret)?;
        let bytes = STANDARD.decode(b64).map_err(|_| WebhookError::BadSecret)?;
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &bytes),
            tolerance_s: DEFAULT_TOLERANCE_S,
        })
    }

    /// The same verifier with another tolerance, in seconds.
    pub fn with_tolerance(mut self, seconds: i64) -> Self {
        self.tolerance_s = seconds;
        self
    }

    /// Verifies a delivery from the values of its `webhook-id`, `webhook-timestamp` and
    /// `webhook-signature` headers and its raw body, at `now_unix_s`; answers the event.
    /// Signatures are compared in constant time.
    pub fn verify(
        &self,
        id: &str,
        timestamp: &str,
        signatures: &str,
        body: &[u8],
        now_unix_s: i64,
    ) -> Result<Event, WebhookError> {
        if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(WebhookError::BadHeaders);
        }
        let ts: i64 = timestamp.parse().map_err(|_| WebhookError::BadHeaders)?;
        // `abs_diff` cannot overflow, whatever the two values (a timestamp of `i64::MIN` included).
        // A negative tolerance accepts nothing.
        let stale = u64::try_from(self.tolerance_s)
            .map_or(true, |tolerance| now_unix_s.abs_diff(ts) > tolerance);
        if stale {
            return Err(WebhookError::Stale);
        }
        let mut signed = Vec::with_capacity(id.len() + timestamp.len() + body.len() + 2);
        signed.extend_from_slice(id.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(timestamp.as_bytes());
        signed.push(b'.');
        signed.extend_from_slice(body);
        let matched = signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|s| STANDARD.decode(s).ok())
            .any(|tag| hmac::verify(&self.key, &signed, &tag).is_ok());
        if !matched {
            return Err(WebhookError::BadSignature);
        }
        serde_json::from_slice::<Payload>(body)
            .map(|p| p.data)
            .map_err(|_| WebhookError::BadBody)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sign(secret_bytes: &[u8], id: &str, ts: i64, body: &str) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret_bytes);
        let tag = hmac::sign(&key, format!("{id}.{ts}.{body}").as_bytes());
        format!("v1,{}", STANDARD.encode(tag.as_ref()))
    }

    #[test]
    fn accepts_a_signed_delivery_and_refuses_tampering_and_replays() {
        let bytes = [9u8; 32];
        let secret = format!("whsec_{}", STANDARD.encode(bytes));
        let v = WebhookVerifier::new(&secret).unwrap();
        let body = r#"{"type":"session.revoked","timestamp":"2026-01-01T00:00:00.000Z","data":{"id":"0000000000010000000000000001","time":"2026-01-01T00:00:00.000Z","type":"session.revoked","tenant":"default","user_id":"u","handle":"ses_x","ip":null,"user_agent":null,"actor":null,"request_id":null,"reason":"logout","details":{}}}"#;
        let sig = sign(&bytes, "d1", 1000, body);
        let e = v
            .verify(
                "d1",
                "1000",
                &format!("v1,bm9wZQ== {sig}"),
                body.as_bytes(),
                1010,
            )
            .unwrap();
        assert_eq!(e.event_type, "session.revoked");
        assert_eq!(e.reason.as_deref(), Some("logout"));
        let tampered = body.replace("logout", "revoked");
        assert_eq!(
            v.verify("d1", "1000", &sig, tampered.as_bytes(), 1010),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            v.verify("d2", "1000", &sig, body.as_bytes(), 1010),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            v.verify("d1", "1000", &sig, body.as_bytes(), 1000 + 301),
            Err(WebhookError::Stale)
        );
        assert_eq!(
            v.verify("d1", "soon", &sig, body.as_bytes(), 1000),
            Err(WebhookError::BadHeaders)
        );
        assert!(WebhookVerifier::new("nope").is_err());
    }

    #[test]
    fn extreme_timestamps_are_stale_without_overflow() {
        let bytes = [9u8; 32];
        let v = WebhookVerifier::new(&format!("whsec_{}", STANDARD.encode(bytes))).unwrap();
        let body = "{}";
        for (ts, now) in [
            (i64::MIN, 1000),
            (i64::MAX, 1000),
            (i64::MIN, i64::MAX),
            (i64::MAX, i64::MIN),
            (i64::MIN, -1),
            (1000, i64::MIN),
            (1000, i64::MAX),
        ] {
            let sig = sign(&bytes, "d1", ts, body);
            assert_eq!(
                v.verify("d1", &ts.to_string(), &sig, body.as_bytes(), now),
                Err(WebhookError::Stale),
                "ts {ts}, now {now}"
            );
        }
        // Both extreme and equal: within the tolerance, so the signature decides.
        let sig = sign(&bytes, "d1", i64::MIN, body);
        assert_eq!(
            v.verify(
                "d1",
                "-9223372036854775808",
                &sig,
                body.as_bytes(),
                i64::MIN
            ),
            Err(WebhookError::BadBody)
        );
        // A negative tolerance accepts nothing.
        let v = v.with_tolerance(-1);
        let sig = sign(&bytes, "d1", 1000, body);
        assert_eq!(
            v.verify("d1", "1000", &sig, body.as_bytes(), 1000),
            Err(WebhookError::Stale)
        );
    }
}

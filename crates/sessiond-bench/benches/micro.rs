#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Criterion micro-benchmarks of the pure steps of a verify: token generation (create and
//! rotate), hashing a presented token, the liveness decision, rendering the wire session,
//! the stored row of a session (encode, decode, JSON), and token mode's access-token signing and
//! verification (EdDSA and ES256).
//!
//! `cargo bench -p sessiond-bench --bench micro` measures; `-- --test` runs each once.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use sessiond_api::SessionResponse;
use sessiond_core::policy::Policy;
use sessiond_core::session::{
    AuthRecord, DeviceRecord, SessionRecord, StoredSession, StoredState, liveness, to_api,
};
use sessiond_core::time::Timestamp;
use sessiond_core::token::{SessionHandle, TenantId, TokenFormat, UserId};
use sessiond_core::wire::SessionJson;
use sessiond_store::row::{Row, no_intern};

/// A fixed "now": 2026-01-01T00:00:00Z.
const NOW_MS: i64 = 1_767_225_600_000;

/// An active session created a minute before [`NOW_MS`], with `data` as its data.
fn session(data: &str) -> StoredSession {
    let (_, token_hash) = TokenFormat::default().generate().unwrap();
    let created = Timestamp::from_millis(NOW_MS - 60_000);
    StoredSession::new(Arc::new(SessionRecord {
        handle: SessionHandle::generate().unwrap(),
        token_hash,
        user_id: UserId::parse("bench-user-1").unwrap(),
        tenant: TenantId::default_tenant(),
        created_at: created,
        last_seen_at: created,
        remember_me: false,
        auth: AuthRecord {
            method: "password".into(),
            aal: 1,
            authenticated_at: created,
        },
        device: DeviceRecord {
            ip: Some("203.0.113.7".parse().unwrap()),
            user_agent: Some(
                "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0".into(),
            ),
            browser: Some("Firefox".into()),
            os: Some("Linux".into()),
        },
        data: data.into(),
        state: StoredState::Active,
        refresh: None,
        flags: Vec::new(),
        expires_at: None,
        idle_timeout_s: None,
        rotations: 0,
    }))
}

/// Session data of about 1 KiB: 16 string fields of 48 bytes.
fn kib_of_data() -> String {
    let map: serde_json::Map<String, serde_json::Value> = (0..16)
        .map(|i| (format!("key_{i:02}"), "x".repeat(48).into()))
        .collect();
    serde_json::to_string(&map).unwrap()
}

/// Token generation and the hashing of a presented token.
fn tokens(c: &mut Criterion) {
    let format = TokenFormat::default();
    c.bench_function("token/generate", |b| b.iter(|| format.generate().unwrap()));
    let (token, _) = format.generate().unwrap();
    let presented = token.expose().to_owned();
    c.bench_function("token/hash_presented", |b| {
        b.iter(|| format.hash_presented(black_box(&presented)))
    });
    let malformed = "sdt_not-a-token";
    c.bench_function("token/hash_presented (malformed)", |b| {
        b.iter(|| format.hash_presented(black_box(malformed)))
    });
}

/// The verify decision and the rendering of its answer.
fn decision(c: &mut Criterion) {
    let policy = Policy::default();
    let now = Timestamp::from_millis(NOW_MS);
    let empty = session("{}");
    let big_data = kib_of_data();
    let big = session(&big_data);

    c.bench_function("session/liveness", |b| {
        b.iter(|| {
            liveness(
                black_box(&empty.record),
                black_box(empty.last_seen_at),
                black_box(&policy),
                black_box(now),
            )
        })
    });
    c.bench_function("session/to_api (empty data)", |b| {
        b.iter(|| to_api(black_box(&empty), &policy, black_box(now)))
    });
    c.bench_function("session/to_api (1 KiB data)", |b| {
        b.iter(|| to_api(black_box(&big), &policy, black_box(now)))
    });
    c.bench_function("session/to_api + JSON response (empty data)", |b| {
        b.iter(|| {
            serde_json::to_vec(&SessionResponse {
                session: to_api(black_box(&empty), &policy, black_box(now)),
            })
            .unwrap()
        })
    });
    for (name, s) in [("empty data", &empty), ("1 KiB data", &big)] {
        c.bench_function(
            &format!("session/JSON response from the record ({name})"),
            |b| {
                b.iter(|| {
                    SessionJson {
                        session: black_box(s),
                        policy: &policy,
                        now: black_box(now),
                        location: None,
                    }
                    .to_vec()
                    .unwrap()
                })
            },
        );
    }
    c.bench_function("session/to_api + JSON response (1 KiB data)", |b| {
        b.iter(|| {
            serde_json::to_vec(&SessionResponse {
                session: to_api(black_box(&big), &policy, black_box(now)),
            })
            .unwrap()
        })
    });
}

/// The stored form of a session: the row every backend writes (SQL columns, Redis JSON), and
/// reading it back with validation; Redis also (de)serializes it as JSON.
fn storage(c: &mut Criterion) {
    let big_data = kib_of_data();
    let big = session(&big_data);
    let empty = session("{}");
    let row = Row::from_record(&empty.record);
    let json = serde_json::to_vec(&row).unwrap();
    c.bench_function("row/encode (empty data)", |b| {
        b.iter(|| Row::from_record(black_box(&empty.record)))
    });
    c.bench_function("row/encode (1 KiB data)", |b| {
        b.iter(|| Row::from_record(black_box(&big.record)))
    });
    c.bench_function("row/decode (empty data)", |b| {
        b.iter(|| black_box(row.clone()).into_record(no_intern).unwrap())
    });
    c.bench_function("row/JSON serialize (empty data)", |b| {
        b.iter(|| serde_json::to_vec(black_box(&row)).unwrap())
    });
    c.bench_function("row/JSON deserialize + decode (empty data)", |b| {
        b.iter(|| {
            serde_json::from_slice::<Row>(black_box(&json))
                .unwrap()
                .into_record(no_intern)
                .unwrap()
        })
    });
}

/// Token mode: signing an access token, and verifying one (header, key, signature, claims).
fn access_tokens(c: &mut Criterion) {
    use sessiond_core::jwt::{Keyring, SigningAlg};
    let now = Timestamp::from_millis(NOW_MS);
    let s = NOW_MS / 1000;
    let claims = sessiond_api::AccessClaims {
        iss: "https://auth.example".into(),
        aud: "api".into(),
        sub: "bench-user-1".into(),
        sid: SessionHandle::generate().unwrap().as_str().to_owned(),
        iat: s,
        nbf: s,
        exp: s + 300,
        auth_time: s,
        aal: 1,
        tenant: "default".into(),
        jti: "bench".into(),
        rot: 0,
        extra: serde_json::Map::new(),
    };
    for alg in [SigningAlg::EdDSA, SigningAlg::ES256] {
        let ring = Keyring::load(&Keyring::generate(alg, now, None).unwrap(), None).unwrap();
        let jwt = ring.sign(&claims, now).unwrap();
        c.bench_function(&format!("access_token/sign ({})", alg.as_str()), |b| {
            b.iter(|| ring.sign(black_box(&claims), now).unwrap())
        });
        c.bench_function(&format!("access_token/verify ({})", alg.as_str()), |b| {
            b.iter(|| ring.verify(black_box(&jwt), now).unwrap())
        });
    }
}

/// The signature check alone, with aws-lc-rs directly: the floor under `access_token/verify`.
fn raw_signatures(c: &mut Criterion) {
    use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let msg = [7u8; 300];
    let sig = pair.sign(&msg);
    let public = UnparsedPublicKey::new(&ED25519, pair.public_key().as_ref().to_vec());
    c.bench_function("signature/ed25519 verify (aws-lc-rs)", |b| {
        b.iter(|| {
            public
                .verify(black_box(&msg), black_box(sig.as_ref()))
                .unwrap()
        })
    });
}

criterion_group!(
    benches,
    tokens,
    decision,
    storage,
    access_tokens,
    raw_signatures
);
criterion_main!(benches);

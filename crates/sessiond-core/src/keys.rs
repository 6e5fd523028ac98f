//! [`Keys`]: the keyring of token mode, shared by every node through the store.
//!
//! The first node to start with an empty store generates the keyring and stores it (a
//! compare-and-set, so concurrent first starts agree on one). Every node keeps the loaded keyring
//! in memory and reloads it periodically and when it meets a key id it does not know, so a
//! rotation made by any node or by `sessiond keys rotate` reaches all of them. A node that
//! starts while its store is down loads the keyring on first need once the store answers.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::CoreError;
use crate::events::{Audit, EventKind};
use crate::jwt::{Keyring, Rotation, SealingKey, SigningAlg};
use crate::store::SessionStore;
use crate::time::Timestamp;
use crate::token::TenantId;

/// The name of the keyring document in the store.
pub const KEYRING_DOC: &str = "keyring";

/// The actor of `keys.rotated` events: the `sessiond keys rotate` command.
pub const ROTATION_ACTOR: &str = "cli";

/// Smallest interval between reloads triggered by unknown key ids, in milliseconds.
const MIN_RELOAD_INTERVAL_MS: i64 = 1000;
/// Attempts of a compare-and-set on the keyring before giving up.
const CAS_ATTEMPTS: usize = 5;

/// The loaded keyring and how to reload it.
pub struct Keys {
    store: Arc<dyn SessionStore>,
    sealing: Option<SealingKey>,
    /// Without a sealing key: refuse to store private keys (and other secrets) unsealed.
    refuse_unsealed: bool,
    alg: SigningAlg,
    current: RwLock<Option<Arc<Keyring>>>,
    last_reload_ms: AtomicI64,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("keyring", &self.current())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys on `store`, nothing loaded yet: [`Keys::ensure`] or [`Keys::reload`] loads them.
    /// A keyring generated here gets a key of `alg`.
    pub fn new(store: Arc<dyn SessionStore>, sealing: Option<SealingKey>, alg: SigningAlg) -> Self {
        Self {
            store,
            sealing,
            refuse_unsealed: false,
            alg,
            current: RwLock::new(None),
            last_reload_ms: AtomicI64::new(i64::MIN),
        }
    }

    /// Without a sealing key, generate no keyring (and store no secret) unsealed: token mode
    /// and new secrets are refused until a keyring key is configured. A keyring already stored
    /// unsealed still loads.
    pub fn refusing_unsealed(mut self) -> Self {
        self.refuse_unsealed = true;
        self
    }

    /// Whether secrets cannot be stored here: no sealing key, and storing them unsealed is
    /// refused.
    pub fn refuses_unsealed(&self) -> bool {
        self.refuse_unsealed && self.sealing.is_none()
    }

    /// The key that seals secrets in the store, if any.
    pub fn sealing(&self) -> Option<&SealingKey> {
        self.sealing.as_ref()
    }

    /// [`Keys::new`] and the first load.
    pub async fn load_or_init(
        store: Arc<dyn SessionStore>,
        sealing: Option<SealingKey>,
        alg: SigningAlg,
        now: Timestamp,
    ) -> Result<Self, CoreError> {
        let keys = Self::new(store, sealing, alg);
        keys.reload(now).await?;
        Ok(keys)
    }

    /// The keyring in use, if loaded.
    pub fn current(&self) -> Option<Arc<Keyring>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The keyring in use, loading it first if it is not loaded yet.
    pub async fn ensure(&self, now: Timestamp) -> Result<Arc<Keyring>, CoreError> {
        if let Some(k) = self.current() {
            return Ok(k);
        }
        self.reload(now).await?;
        self.current().ok_or_else(|| {
            CoreError::Internal(if self.refuses_unsealed() {
                "no keyring: token mode needs jwt.keyring_key (or jwt.allow_unsealed_keys)".into()
            } else {
                "the keyring did not load".into()
            })
        })
    }

    /// Loads the stored keyring, or generates one and stores it if there is none.
    pub async fn reload(&self, now: Timestamp) -> Result<(), CoreError> {
        self.last_reload_ms
            .store(now.as_millis(), Ordering::Release);
        for _ in 0..CAS_ATTEMPTS {
            if let Some((version, doc)) = self.store.document(KEYRING_DOC).await? {
                let ring = Keyring::load(&doc, self.sealing.as_ref())?;
                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                    Some(Arc::new(ring));
                // A keyring stored unsealed (by an older version, or without a keyring key) is
                // sealed as soon as a key is available; losing the race to another node is
                // fine (it sealed it, or the next reload will).
                if let Some(sealing) = &self.sealing
                    && let Some(sealed) = Keyring::seal_unsealed(&doc, sealing)?
                    && self
                        .store
                        .put_document(KEYRING_DOC, Some(version), &sealed)
                        .await?
                {
                    tracing::info!("sealed the stored token signing keys with the keyring key");
                }
                return Ok(());
            }
            if self.refuses_unsealed() {
                // No keyring is made until it can be sealed; token mode is refused meanwhile.
                return Ok(());
            }
            let doc = Keyring::generate(self.alg, now, self.sealing.as_ref())?;
            if self.store.put_document(KEYRING_DOC, None, &doc).await? {
                tracing::info!(
                    algorithm = self.alg.as_str(),
                    "generated the token signing keyring"
                );
            }
        }
        Err(CoreError::Conflict)
    }

    /// Reloads unless a reload happened less than a second ago; `true` if it reloaded.
    pub async fn reload_soon(&self, now: Timestamp) -> Result<bool, CoreError> {
        let last = self.last_reload_ms.load(Ordering::Acquire);
        if now.as_millis().saturating_sub(last) < MIN_RELOAD_INTERVAL_MS
            || self
                .last_reload_ms
                .compare_exchange(last, now.as_millis(), Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return Ok(false);
        }
        self.reload(now).await?;
        Ok(true)
    }

    /// Rotates the stored keyring and records `keys.rotated` (actor [`ROTATION_ACTOR`]) (see [`Keyring::rotate`]); returns the new key's id. Nodes
    /// pick the change up at their next reload.
    pub async fn rotate(
        store: &dyn SessionStore,
        sealing: Option<&SealingKey>,
        r: Rotation,
        now: Timestamp,
    ) -> Result<String, CoreError> {
        for _ in 0..CAS_ATTEMPTS {
            let (version, doc) = match store.document(KEYRING_DOC).await? {
                Some((v, d)) => (Some(v), d),
                None => (None, Keyring::generate(r.alg, now, sealing)?),
            };
            // Refuse to rotate a keyring that cannot be read with this configuration.
            Keyring::load(&doc, sealing)?;
            let doc = match sealing {
                Some(s) => Keyring::seal_unsealed(&doc, s)?.unwrap_or(doc),
                None => doc,
            };
            let new_doc = Keyring::rotate(&doc, r, now, sealing)?;
            let ring = Keyring::load(&new_doc, sealing)?;
            if store.put_document(KEYRING_DOC, version, &new_doc).await? {
                let kid = ring
                    .newest_kid()
                    .map(str::to_owned)
                    .ok_or_else(|| CoreError::Internal("rotation added no key".into()))?;
                // The change is recorded (the key id and its times, never key material).
                let mut e = Audit::new(ROTATION_ACTOR).event(
                    EventKind::KeysRotated,
                    now,
                    &TenantId::default_tenant(),
                );
                e.details.insert("kid".into(), kid.clone().into());
                e.details.insert("alg".into(), r.alg.as_str().into());
                e.details
                    .insert("activate_after_s".into(), r.activate_after_s.into());
                e.details
                    .insert("retire_after_s".into(), r.retire_after_s.into());
                store.append_events(&[e]).await?;
                return Ok(kid);
            }
        }
        Err(CoreError::Conflict)
    }
}

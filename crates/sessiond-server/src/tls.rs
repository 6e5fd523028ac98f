//! TLS of the listeners: rustls on aws-lc-rs, TLS 1.2 and 1.3 only, HTTP/2 and HTTP/1.1 offered
//! by ALPN.
//!
//! The certificate chain and key are PEM files. They are read at start (a missing or invalid
//! file stops the start-up with a message naming the key), and again on `SIGHUP` and whenever
//! their modification times change (polled). A reload swaps the certificate that new handshakes
//! get; open connections keep theirs. A reload that fails keeps the current certificate and
//! logs an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::ConfigError;

/// The certificate that new handshakes get, swapped on reload.
#[derive(Debug)]
pub struct CertResolver {
    current: parking_lot::RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// A TLS setup: the acceptor of the listeners and what reloads its certificate.
#[derive(Clone)]
pub struct Tls {
    /// Accepts TLS connections with the current certificate.
    pub acceptor: tokio_rustls::TlsAcceptor,
    resolver: Arc<CertResolver>,
    provider: Arc<CryptoProvider>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate chain and key; the error names the key at fault.
    pub fn new(cert_file: &Path, key_file: &Path) -> Result<Self, ConfigError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let key = load(&provider, cert_file, key_file).map_err(ConfigError)?;
        let resolver = Arc::new(CertResolver {
            current: parking_lot::RwLock::new(Arc::new(key)),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| ConfigError(format!("tls: {e}")))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            resolver,
            provider,
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
        })
    }

    /// Reads the files again; on success new handshakes get the new certificate, on failure
    /// the current one stays.
    pub fn reload(&self) -> Result<(), String> {
        let key = load(&self.provider, &self.cert_file, &self.key_file)?;
        *self.resolver.current.write() = Arc::new(key);
        Ok(())
    }

    fn stamps(&self) -> (Option<SystemTime>, Option<SystemTime>) {
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        (mtime(&self.cert_file), mtime(&self.key_file))
    }

    /// Reloads on `SIGHUP` and when a file's modification time changes (checked every
    /// `interval`). Runs until dropped.
    pub async fn reload_loop(self, interval: Duration) {
        #[cfg(unix)]
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP: TLS files reload on change only");
                None
            }
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = self.stamps();
        loop {
            #[cfg(unix)]
            let signalled = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let signalled = std::future::pending::<()>();
            let why = tokio::select! {
                () = signalled => "SIGHUP",
                _ = tick.tick() => {
                    let now = self.stamps();
                    if now == seen {
                        continue;
                    }
                    "file change"
                }
            };
            seen = self.stamps();
            match self.reload() {
                Ok(()) => tracing::info!(trigger = why, "TLS certificate reloaded"),
                Err(e) => tracing::error!(
                    trigger = why,
                    error = %e,
                    "TLS certificate reload failed; keeping the current certificate"
                ),
            }
        }
    }
}

/// Reads a PEM chain and key into a certified key, checking that they belong together.
fn load(
    provider: &CryptoProvider,
    cert_file: &Path,
    key_file: &Path,
) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("tls.cert_file: cannot read {}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.cert_file: {} holds no PEM certificate",
            cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("tls.key_file: cannot read {}: {e}", key_file.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("tls.key_file: {}: {e}", key_file.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "tls.key_file: {} does not match the certificate in tls.cert_file: {e}",
            key_file.display()
        )
    })?;
    Ok(certified)
}

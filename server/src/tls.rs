//! TLS for every listener (rustls). The serving certificate and the client CA are re-read when
//! their files change, because the operator rotates them in the mounted Secret; a bad new file
//! is logged and the previous material kept, so a half-written rotation never drops service.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn invalid(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no PEM CERTIFICATE block found"));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| invalid(path, format!("not a PEM key file: {e}")))?
        .ok_or_else(|| invalid(path, "no PEM private key (PKCS#8, RSA or EC) found"))
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| invalid(key, format!("unsupported key: {e}")))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| {
        invalid(
            cert,
            format!("certificate does not match {}: {e}", key.display()),
        )
    })?;
    Ok(ck)
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
        store
            .add(c)
            .map_err(|e| invalid(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

/// Hands out the current certificate; swapped in place by the watcher.
#[derive(Debug)]
struct Resolver(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| k.clone())
    }
}

/// The TLS material of one server: the serving certificate and, for the internal listener,
/// the client CA. `public()` and `internal()` give the current rustls configurations.
pub struct TlsState {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    resolver: Arc<Resolver>,
    internal: RwLock<Option<Arc<ServerConfig>>>,
    public: Arc<ServerConfig>,
    stamp: RwLock<Vec<Option<SystemTime>>>,
}

fn alpn(mut c: ServerConfig) -> ServerConfig {
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    c
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsState {
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Arc<Self>, TlsError> {
        let resolver = Arc::new(Resolver(RwLock::new(Arc::new(certified_key(cert, key)?))));
        let public = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        let state = Self {
            cert: cert.into(),
            key: key.into(),
            client_ca: client_ca.map(Into::into),
            resolver,
            internal: RwLock::new(None),
            public: Arc::new(alpn(public)),
            stamp: RwLock::new(Vec::new()),
        };
        if let Some(ca) = client_ca {
            let cfg = state.internal_config(ca)?;
            *state.internal.write().map_err(|_| poisoned())? = Some(cfg);
        }
        *state.stamp.write().map_err(|_| poisoned())? = state.stamps();
        Ok(Arc::new(state))
    }

    fn internal_config(&self, ca: &Path) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .map_err(|e| invalid(ca, format!("cannot verify clients with it: {e}")))?;
        let c = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(self.resolver.clone());
        Ok(Arc::new(alpn(c)))
    }

    pub fn public(&self) -> Arc<ServerConfig> {
        self.public.clone()
    }

    /// The mTLS configuration of the internal listener (client certificate required).
    pub fn internal(&self) -> Option<Arc<ServerConfig>> {
        self.internal.read().ok().and_then(|c| c.clone())
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// Re-reads the files if any changed. Returns true when new material was installed.
    pub fn reload_if_changed(&self) -> bool {
        let now = self.stamps();
        let changed = self.stamp.read().map(|s| *s != now).unwrap_or(true);
        if !changed {
            return false;
        }
        let result = certified_key(&self.cert, &self.key).and_then(|ck| {
            let internal = match &self.client_ca {
                Some(ca) => Some(self.internal_config(ca)?),
                None => None,
            };
            Ok((ck, internal))
        });
        match result {
            Ok((ck, internal)) => {
                if let Ok(mut k) = self.resolver.0.write() {
                    *k = Arc::new(ck);
                }
                if let (Ok(mut slot), Some(cfg)) = (self.internal.write(), internal) {
                    *slot = Some(cfg);
                }
                if let Ok(mut s) = self.stamp.write() {
                    *s = now;
                }
                tracing::info!(cert = %self.cert.display(), "TLS material reloaded");
                true
            }
            Err(e) => {
                // Kubernetes swaps Secret files atomically, but a hand edit may be mid-write:
                // keep serving the old material and try again on the next poll.
                tracing::warn!(error = %e, "TLS files changed but cannot be loaded; keeping the previous certificate");
                false
            }
        }
    }

    /// Polls the files for changes until the process ends.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                me.reload_if_changed();
            }
        });
    }
}

fn poisoned() -> TlsError {
    TlsError::Config("lock poisoned".into())
}

/// Writes a self-signed development certificate under `dir` unless one is there already.
pub fn ensure_dev_cert(dir: &Path, names: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert = dir.join("dev-cert.pem");
    let key = dir.join("dev-key.pem");
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.into(),
        source,
    })?;
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Config(format!("cannot generate a development certificate: {e}")))?;
    crate::fsutil::write_private(&key, ck.signing_key.serialize_pem().as_bytes()).map_err(
        |source| TlsError::Read {
            path: key.clone(),
            source,
        },
    )?;
    std::fs::write(&cert, ck.cert.pem()).map_err(|source| TlsError::Read {
        path: cert.clone(),
        source,
    })?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_changed_files_and_keeps_old_on_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = ensure_dev_cert(dir.path(), &["localhost".into()]).unwrap();
        let st = TlsState::load(&cert, &key, None).unwrap();
        let first = st.resolver.0.read().unwrap().cert[0].clone();
        assert!(!st.reload_if_changed());
        // Rotate: new cert and key.
        std::thread::sleep(Duration::from_millis(20));
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        assert!(st.reload_if_changed());
        let second = st.resolver.0.read().unwrap().cert[0].clone();
        assert_ne!(first, second);
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&cert, "garbage").unwrap();
        assert!(!st.reload_if_changed());
        assert_eq!(st.resolver.0.read().unwrap().cert[0], second);
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = ensure_dev_cert(dir.path(), &["localhost".into()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let k2 = dir.path().join("other.pem");
        std::fs::write(&k2, other.serialize_pem()).unwrap();
        let e = TlsState::load(&cert, &k2, None).err().unwrap().to_string();
        assert!(e.contains("does not match"), "{e}");
    }
}

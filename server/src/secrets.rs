//! Connector secrets: sealed with the key ring (AES-256-GCM, the name bound as associated data)
//! before they reach the store, opened only when a run needs them. Values are never returned by
//! the API, never logged and never part of an error message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use identitymesh_keyring::{KeyRing, KeyRingError};

use crate::store::{now_ms, AuditEntry, SecretRow, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "secret name {0:?} is invalid: use 1-128 characters of letters, digits, '.', '_' or '-'"
    )]
    BadName(String),
    #[error("the secret value is empty; pass the value on stdin (or in the request body)")]
    Empty,
    #[error("the secret value is larger than 64 KiB")]
    TooLarge,
    #[error("no secret named {0:?}; set it with `identitymesh-server secrets set {0}` or PUT /api/secrets/{0}")]
    NotFound(String),
    #[error("secret {name:?}: {source}")]
    Crypto { name: String, source: KeyRingError },
    #[error(transparent)]
    Store(#[from] StoreError),
}

const MAX_VALUE: usize = 64 * 1024;

pub fn check_name(name: &str) -> Result<(), SecretError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SecretError::BadName(name.to_string()))
    }
}

/// What a listing shows of a secret: never its value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub key_id: String,
    pub updated_at_ms: i64,
}

#[derive(Clone)]
pub struct Secrets {
    store: Arc<dyn Store>,
    ring: Arc<KeyRing>,
}

impl Secrets {
    pub fn new(store: Arc<dyn Store>, ring: KeyRing) -> Self {
        Self {
            store,
            ring: Arc::new(ring),
        }
    }

    pub async fn set(&self, name: &str, value: &str, actor: &str) -> Result<(), SecretError> {
        check_name(name)?;
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        if value.len() > MAX_VALUE {
            return Err(SecretError::TooLarge);
        }
        let sealed =
            self.ring
                .seal(name, value.as_bytes())
                .map_err(|source| SecretError::Crypto {
                    name: name.to_string(),
                    source,
                })?;
        let now = now_ms();
        self.store
            .put_secret(&SecretRow {
                name: name.to_string(),
                key_id: sealed.key_id.clone(),
                nonce: sealed.nonce,
                ciphertext: sealed.ciphertext,
                updated_at_ms: now,
            })
            .await?;
        self.audit(actor, "secret.set", name, &sealed.key_id).await;
        Ok(())
    }

    /// The plain value, for a run that needs it right now.
    pub async fn reveal(&self, name: &str) -> Result<String, SecretError> {
        let row = self
            .store
            .secret(name)
            .await?
            .ok_or_else(|| SecretError::NotFound(name.to_string()))?;
        let sealed = identitymesh_keyring::Sealed {
            key_id: row.key_id,
            nonce: row.nonce,
            ciphertext: row.ciphertext,
        };
        let plain = self
            .ring
            .open(name, &sealed)
            .map_err(|source| SecretError::Crypto {
                name: name.to_string(),
                source,
            })?;
        String::from_utf8(plain).map_err(|_| SecretError::Crypto {
            name: name.to_string(),
            source: KeyRingError::Decrypt,
        })
    }

    pub async fn list(&self) -> Result<Vec<SecretInfo>, SecretError> {
        Ok(self
            .store
            .secrets()
            .await?
            .into_iter()
            .map(|r| SecretInfo {
                name: r.name,
                key_id: r.key_id,
                updated_at_ms: r.updated_at_ms,
            })
            .collect())
    }

    pub async fn exists(&self, name: &str) -> Result<bool, SecretError> {
        Ok(self.store.secret(name).await?.is_some())
    }

    pub async fn delete(&self, name: &str, actor: &str) -> Result<bool, SecretError> {
        let gone = self.store.delete_secret(name).await?;
        if gone {
            self.audit(actor, "secret.delete", name, "").await;
        }
        Ok(gone)
    }

    async fn audit(&self, actor: &str, action: &str, name: &str, key_id: &str) {
        let detail = serde_json::json!({ "key_id": key_id }).to_string();
        let entry = AuditEntry::now(actor, action, format!("secret/{name}"), detail);
        crate::store::audit(self.store.as_ref(), entry).await;
    }
}

/// The key ring file: configured (the Kubernetes Secret mounted into the pod), else, for a
/// standalone install, `keyring.json` in the data directory, created on first use.
pub fn keyring_path(
    configured: Option<&Path>,
    data_dir: &Path,
    standalone: bool,
) -> Option<PathBuf> {
    match configured {
        Some(p) => Some(p.to_path_buf()),
        None if standalone => Some(data_dir.join("keyring.json")),
        None => None,
    }
}

pub fn load_keyring(path: &Path, create: bool) -> anyhow::Result<KeyRing> {
    use anyhow::Context;
    match std::fs::read(path) {
        Ok(bytes) => KeyRing::parse(&bytes)
            .with_context(|| format!("key ring {} is not usable", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let ring = KeyRing::generate();
            crate::fsutil::write_private(path, ring.to_json().as_bytes())
                .with_context(|| format!("cannot write a new key ring to {}", path.display()))?;
            tracing::warn!(file = %path.display(), "no key ring found; generated one (back it up: stored secrets cannot be read without it)");
            Ok(ring)
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot read key ring {}: {e} (set keyring.file / IM_KEYRING__FILE to the mounted keyring.json)",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["ldap-bind", "hr.csv_password", "A1"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "has space", "slash/name", "ünï", &"x".repeat(129)] {
            assert!(
                matches!(check_name(bad), Err(SecretError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn values_are_sealed_in_the_store_and_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("s.db"))
                .await
                .unwrap(),
        );
        store.migrate().await.unwrap();
        let ring = load_keyring(&dir.path().join("keyring.json"), true).unwrap();
        let s = Secrets::new(store.clone(), ring.clone());
        s.set("ldap-bind", "S3cret value", "test").await.unwrap();
        let row = store.secret("ldap-bind").await.unwrap().unwrap();
        assert!(!row.ciphertext.windows(6).any(|w| w == b"S3cret"));
        assert_eq!(s.reveal("ldap-bind").await.unwrap(), "S3cret value");
        let listed = s.list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(!format!("{listed:?}").contains("S3cret"));
        // The same file re-read gives the same ring; a different ring cannot open the value.
        let again = load_keyring(&dir.path().join("keyring.json"), false).unwrap();
        assert_eq!(again, ring);
        let other = Secrets::new(store.clone(), KeyRing::generate());
        let e = other.reveal("ldap-bind").await.unwrap_err().to_string();
        assert!(e.contains("cannot be decrypted"), "{e}");
        assert!(matches!(
            s.reveal("nope").await,
            Err(SecretError::NotFound(_))
        ));
        let audit = store
            .audit(&crate::store::AuditFilter::latest(10))
            .await
            .unwrap();
        assert!(audit.iter().any(|a| a.action == "secret.set"));
        assert!(!format!("{audit:?}").contains("S3cret"));
        assert!(s.delete("ldap-bind", "test").await.unwrap());
        assert!(!s.exists("ldap-bind").await.unwrap());
    }
}

//! TLS client configuration: trust only the CA the relay was enrolled with.

use rustls::pki_types::CertificateDer;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("CA file {path} contains no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: String },
    #[error("CA file {path} has an invalid certificate: {reason}")]
    Invalid { path: String, reason: String },
    #[error("TLS configuration failed: {0}")]
    Config(String),
}

/// Parses every certificate of a PEM bundle.
pub fn parse_ca_pem(pem: &[u8], path: &str) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let mut reader = std::io::BufReader::new(pem);
    let certs: Vec<_> = rustls_pemfile::certs(&mut reader)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_ca_pem(&pem, &shown)
}

/// Which roots to trust.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The enrolled cluster CA (the normal case).
    Ca(Vec<CertificateDer<'static>>),
    /// Publicly trusted server certificates (Mozilla roots compiled in).
    PublicRoots,
}

pub fn client_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    match trust {
        Trust::Ca(certs) => {
            for c in certs {
                roots
                    .add(c.clone())
                    .map_err(|e| TlsSetupError::Config(format!("bad CA certificate: {e}")))?;
            }
        }
        Trust::PublicRoots => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // WebSockets need HTTP/1.1; say so, so a server offering h2 does not pick it.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

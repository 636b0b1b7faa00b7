//! Certificates and keys for one harness control plane, generated fresh per cluster with rcgen.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use identitymesh_test_support::pki::TestCa;
use rcgen::KeyPair;

use crate::error::{IoContext, Result};

/// Files written under `<run dir>/pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub apiserver_cert: PathBuf,
    pub apiserver_key: PathBuf,
    pub admin_cert: PathBuf,
    pub admin_key: PathBuf,
    /// Service-account signing key (ECDSA P-256, PKCS#8) and its public key.
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    pub ca_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).ctx(|| format!("write {}", path.display()))
}

impl Pki {
    /// Generates a CA, the apiserver serving certificate (valid for loopback, the given extra
    /// addresses and the in-cluster names), an admin client certificate (system:masters) and a
    /// service-account signing key.
    pub fn generate(dir: &Path, extra_ips: &[IpAddr]) -> Result<Pki> {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;

        let ca = TestCa::new("identitymesh-harness-ca")?;
        let mut sans: Vec<String> = vec![
            "127.0.0.1".into(),
            "localhost".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
            // First address of the service CIDR: the `kubernetes` Service's ClusterIP.
            crate::netns::KUBERNETES_SERVICE_IP.into(),
        ];
        sans.extend(extra_ips.iter().map(|ip| ip.to_string()));
        let sans: Vec<&str> = sans.iter().map(String::as_str).collect();
        let api = ca.server("kube-apiserver", &sans)?;
        let admin = ca.client("harness-admin", Some("system:masters"))?;

        let sa_key = KeyPair::generate()?;

        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_cert: dir.join("ca.crt"),
            ca_key: dir.join("ca.key"),
            apiserver_cert: dir.join("apiserver.crt"),
            apiserver_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            sa_key: dir.join("sa.key"),
            sa_pub: dir.join("sa.pub"),
            ca_pem: ca.cert_pem().to_string(),
            admin_cert_pem: admin.cert_pem,
            admin_key_pem: admin.key_pem,
        };
        write(&pki.ca_cert, &pki.ca_pem)?;
        write(&pki.ca_key, &ca.cert().key_pem)?;
        write(&pki.apiserver_cert, &api.cert_pem)?;
        write(&pki.apiserver_key, &api.key_pem)?;
        write(&pki.admin_cert, &pki.admin_cert_pem)?;
        write(&pki.admin_key, &pki.admin_key_pem)?;
        write(&pki.sa_key, &sa_key.serialize_pem())?;
        write(&pki.sa_pub, &sa_key.public_key_pem())?;
        Ok(pki)
    }
}

/// A test CA and a serving certificate it signed for `127.0.0.1` (an IP SAN) and `localhost`,
/// as PEM files: for a fixture that serves HTTPS on loopback (an identity provider), which pods
/// reach at the same address through [`crate::Cluster::expose_host_port`].
#[derive(Debug, Clone)]
pub struct LoopbackTls {
    pub ca_pem: String,
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl LoopbackTls {
    /// Writes `ca.crt`, `tls.crt` and `tls.key` into `dir` (created); `name` goes into the
    /// certificates' common names.
    pub fn generate(dir: &Path, name: &str) -> Result<LoopbackTls> {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
        let ca = TestCa::new(&format!("{name} test CA"))?;
        // A string that parses as an IP address becomes an IP SAN.
        let cert = ca.server(name, &["127.0.0.1", "localhost"])?;
        let tls = LoopbackTls {
            ca_pem: ca.cert_pem().to_string(),
            ca_cert: dir.join("ca.crt"),
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        write(&tls.ca_cert, &tls.ca_pem)?;
        write(&tls.cert, &cert.cert_pem)?;
        write(&tls.key, &cert.key_pem)?;
        Ok(tls)
    }
}

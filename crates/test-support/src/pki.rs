//! Test certificates: a CA that signs serving and client certificates, and self-signed leaves,
//! generated fresh per test with rcgen. One copy of what every fixture serving TLS needs.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

pub use rcgen::Error as PkiError;

/// A certificate with its private key.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
    /// PKCS#8.
    pub key_der: Vec<u8>,
}

impl Leaf {
    fn new(cert: &rcgen::Certificate, key: &KeyPair) -> Leaf {
        Leaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// Certificate then key, as `reqwest::Identity::from_pem` takes them.
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

/// A test certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: Leaf,
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    if let Some(o) = org {
        dn.push(DnType::OrganizationName, o);
    }
    dn
}

impl TestCa {
    pub fn new(common_name: &str) -> Result<TestCa, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = Leaf::new(&params.self_signed(&key)?, &key);
        Ok(TestCa {
            issuer: Issuer::new(params, key),
            cert,
        })
    }

    /// The CA's own certificate and key (a control plane signs with the key).
    pub fn cert(&self) -> &Leaf {
        &self.cert
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert.cert_pem
    }

    /// A serving certificate for `sans` (a name that parses as an IP address becomes an IP
    /// SAN), its common name `common_name`.
    pub fn server(&self, common_name: &str, sans: &[&str]) -> Result<Leaf, PkiError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = dn(common_name, None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        Ok(Leaf::new(&params.signed_by(&key, &self.issuer)?, &key))
    }

    /// A client certificate for `common_name`, in organisation `org` if given (Kubernetes reads
    /// the organisation as the user's group).
    pub fn client(&self, common_name: &str, org: Option<&str>) -> Result<Leaf, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(common_name, org);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        Ok(Leaf::new(&params.signed_by(&key, &self.issuer)?, &key))
    }
}

/// A self-signed certificate for `sans`, its own trust anchor.
pub fn self_signed(sans: &[&str]) -> Result<Leaf, PkiError> {
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?
        .self_signed(&key)?;
    Ok(Leaf::new(&cert, &key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pem: &str) -> Vec<u8> {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        p.contents
    }

    #[test]
    fn a_server_certificate_is_signed_by_its_ca_for_its_names() {
        let ca = TestCa::new("t CA").unwrap();
        let leaf = ca.server("localhost", &["localhost", "127.0.0.1"]).unwrap();
        let der = parse(&leaf.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let ca_der = parse(ca.cert_pem());
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());
        cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| format!("{n}"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.iter().any(|n| n.contains("localhost")), "{names:?}");
        // An IP SAN, not a DNS name that reads like one.
        assert!(
            names.contains(&"IPAddress(7f:00:00:01)".to_string()),
            "{names:?}"
        );
    }

    #[test]
    fn a_client_certificate_carries_its_organisation() {
        let ca = TestCa::new("t CA").unwrap();
        let leaf = ca.client("admin", Some("system:masters")).unwrap();
        let der = parse(&leaf.cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let org: Vec<_> = cert.subject().iter_organization().collect();
        assert_eq!(org.len(), 1);
        assert_eq!(org[0].as_str().unwrap(), "system:masters");
        assert!(leaf.identity_pem().contains("PRIVATE KEY"));
    }
}

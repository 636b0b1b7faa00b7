//! Certificates (rcgen): the cluster CA, the pods' serving certificate and the operator's mTLS
//! client certificate. Decisions (issue, renew, keep) are pure functions of what exists and now.
//!
//! Key material never reaches logs: the types holding keys redact them in Debug.

use std::fmt;
use std::time::Duration;

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating or signing a certificate failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("certificate is not valid PEM/X.509: {0}")]
    Parse(String),
    #[error("certificate validity out of range: {0}")]
    Time(String),
}

/// A PEM certificate and its PEM PKCS#8 key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// CA lifetime: long, because rotating it means re-trusting it everywhere (relays included).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Operator client certificates are in memory only and short-lived.
pub const CLIENT_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Backdate against clock skew between the operator and the nodes.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

fn serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&b)
}

fn validity(
    p: &mut CertificateParams,
    now: OffsetDateTime,
    valid_for: Duration,
) -> Result<(), CertError> {
    let back = time::Duration::try_from(BACKDATE).map_err(|e| CertError::Time(e.to_string()))?;
    let span = time::Duration::try_from(valid_for).map_err(|e| CertError::Time(e.to_string()))?;
    p.not_before = now - back;
    p.not_after = now
        .checked_add(span)
        .ok_or_else(|| CertError::Time("not_after overflows".into()))?;
    Ok(())
}

/// A new self-signed cluster CA. Its key is stored only in the operator's CA Secret.
pub fn generate_ca(
    cluster: &str,
    namespace: &str,
    now: OffsetDateTime,
) -> Result<CertAndKey, CertError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "IdentityMesh");
    dn.push(
        DnType::CommonName,
        format!("identitymesh-ca {namespace}/{cluster}"),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.serial_number = Some(serial());
    validity(&mut p, now, CA_VALIDITY)?;
    let cert = p.self_signed(&key)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn leaf_params(
    cn: &str,
    now: OffsetDateTime,
    valid_for: Duration,
) -> Result<CertificateParams, CertError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "IdentityMesh");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(serial());
    validity(&mut p, now, valid_for)?;
    Ok(p)
}

fn sign(p: &CertificateParams, ca: &CertAndKey) -> Result<CertAndKey, CertError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(CertAndKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Serving certificate for both pods. SANs: Service names, per-pod names, the spec's dnsNames.
pub fn issue_serving_cert(
    ca: &CertAndKey,
    dns_names: &[String],
    now: OffsetDateTime,
    valid_for: Duration,
) -> Result<CertAndKey, CertError> {
    let cn = dns_names
        .first()
        .map(String::as_str)
        .unwrap_or("identitymesh");
    let mut p = leaf_params(cn, now, valid_for)?;
    p.subject_alt_names = CertificateParams::new(dns_names.to_vec())?.subject_alt_names;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sign(&p, ca)
}

/// Client certificate for the operator's calls to the pods' internal API (mTLS).
pub fn issue_client_cert(
    ca: &CertAndKey,
    common_name: &str,
    now: OffsetDateTime,
) -> Result<CertAndKey, CertError> {
    let mut p = leaf_params(common_name, now, CLIENT_CERT_VALIDITY)?;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    sign(&p, ca)
}

/// What the operator needs to know about an existing certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub not_after: OffsetDateTime,
    pub dns_names: Vec<String>,
    pub authority_key_id: Option<Vec<u8>>,
    pub subject_key_id: Option<Vec<u8>>,
    pub is_ca: bool,
}

/// Parse the first certificate of a PEM chain.
pub fn inspect(cert_pem: &str) -> Result<CertInfo, CertError> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    let not_after = cert.validity().not_after.to_datetime();
    let mut info = CertInfo {
        not_after,
        dns_names: Vec::new(),
        authority_key_id: None,
        subject_key_id: None,
        is_ca: cert.is_ca(),
    };
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    if let GeneralName::DNSName(d) = n {
                        info.dns_names.push((*d).to_string());
                    }
                }
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                info.authority_key_id = aki.key_identifier.as_ref().map(|k| k.0.to_vec());
            }
            ParsedExtension::SubjectKeyIdentifier(ski) => {
                info.subject_key_id = Some(ski.0.to_vec());
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Renewal is due once `now` is within `renew_before` of `not_after`.
pub fn renewal_due(now: OffsetDateTime, not_after: OffsetDateTime, renew_before: Duration) -> bool {
    match time::Duration::try_from(renew_before) {
        Ok(rb) => now >= not_after - rb,
        Err(_) => true,
    }
}

/// Why the serving certificate must be (re)issued, or None to keep it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IssueReason {
    Missing,
    Unreadable,
    RenewalDue,
    NamesChanged,
    IssuerChanged,
}

impl IssueReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            IssueReason::Missing => "Missing",
            IssueReason::Unreadable => "Unreadable",
            IssueReason::RenewalDue => "RenewalDue",
            IssueReason::NamesChanged => "NamesChanged",
            IssueReason::IssuerChanged => "IssuerChanged",
        }
    }
}

/// Decide whether the operator-issued serving certificate needs issuing.
pub fn serving_cert_decision(
    existing: Option<&str>,
    ca: &CertInfo,
    wanted_names: &[String],
    now: OffsetDateTime,
    renew_before: Duration,
) -> Option<IssueReason> {
    let Some(pem) = existing else {
        return Some(IssueReason::Missing);
    };
    let Ok(info) = inspect(pem) else {
        return Some(IssueReason::Unreadable);
    };
    if info.authority_key_id.is_none() || info.authority_key_id != ca.subject_key_id {
        return Some(IssueReason::IssuerChanged);
    }
    let mut have = info.dns_names.clone();
    have.sort();
    let mut want = wanted_names.to_vec();
    want.sort();
    want.dedup();
    if have != want {
        return Some(IssueReason::NamesChanged);
    }
    if renewal_due(now, info.not_after, renew_before) {
        return Some(IssueReason::RenewalDue);
    }
    None
}

/// SANs for the serving certificate, in a stable order.
pub fn serving_dns_names(names: &crate::builders::Names, extra: &[String]) -> Vec<String> {
    let mut v = names.service_dns_names();
    v.extend(names.pod_dns_names());
    for e in extra {
        if !v.contains(e) {
            v.push(e.clone());
        }
    }
    v
}

/// jiff (k8s Time) from time's OffsetDateTime.
pub fn to_timestamp(t: OffsetDateTime) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_second(t.unix_timestamp())
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// time's OffsetDateTime from jiff.
pub fn from_timestamp(t: k8s_openapi::jiff::Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(t.as_second()).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::Names;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("ts")
    }

    #[test]
    fn ca_is_a_ca_and_debug_redacts() {
        let ca = generate_ca("im", "prod", now()).expect("ca");
        let info = inspect(&ca.cert_pem).expect("inspect");
        assert!(info.is_ca);
        assert!(info.subject_key_id.is_some());
        let dbg = format!("{ca:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn serving_cert_names_and_chain() {
        let ca = generate_ca("im", "prod", now()).expect("ca");
        let ca_info = inspect(&ca.cert_pem).expect("ca info");
        let names = serving_dns_names(&Names::new("im", "prod"), &["im.contoso.local".to_string()]);
        assert!(names.contains(&"im.prod.svc.cluster.local".to_string()));
        assert!(names.contains(&"im-a.im-pods.prod.svc".to_string()));
        let leaf =
            issue_serving_cert(&ca, &names, now(), Duration::from_secs(90 * 86400)).expect("leaf");
        let info = inspect(&leaf.cert_pem).expect("leaf info");
        assert!(!info.is_ca);
        assert_eq!(info.authority_key_id, ca_info.subject_key_id);
        let mut got = info.dns_names.clone();
        got.sort();
        let mut want = names.clone();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(
            info.not_after.unix_timestamp(),
            now().unix_timestamp() + 90 * 86400
        );
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn renewal_is_a_pure_function_of_now_not_after_renew_before() {
        let na = now() + time::Duration::days(30);
        let rb = Duration::from_secs(15 * 86400);
        assert!(!renewal_due(now(), na, rb));
        assert!(!renewal_due(
            now() + time::Duration::days(15) - time::Duration::seconds(1),
            na,
            rb
        ));
        assert!(renewal_due(now() + time::Duration::days(15), na, rb));
        assert!(renewal_due(na + time::Duration::days(1), na, rb));
    }

    #[test]
    fn serving_decisions() {
        let ca = generate_ca("im", "prod", now()).expect("ca");
        let ca_info = inspect(&ca.cert_pem).expect("ca info");
        let names = vec!["im".to_string(), "im.prod".to_string()];
        let rb = Duration::from_secs(86400);
        assert_eq!(
            serving_cert_decision(None, &ca_info, &names, now(), rb),
            Some(IssueReason::Missing)
        );
        assert_eq!(
            serving_cert_decision(Some("garbage"), &ca_info, &names, now(), rb),
            Some(IssueReason::Unreadable)
        );
        let leaf =
            issue_serving_cert(&ca, &names, now(), Duration::from_secs(10 * 86400)).expect("leaf");
        assert_eq!(
            serving_cert_decision(Some(&leaf.cert_pem), &ca_info, &names, now(), rb),
            None
        );
        let more = vec![
            "im".to_string(),
            "im.prod".to_string(),
            "x.example".to_string(),
        ];
        assert_eq!(
            serving_cert_decision(Some(&leaf.cert_pem), &ca_info, &more, now(), rb),
            Some(IssueReason::NamesChanged)
        );
        let later = now() + time::Duration::days(9) + time::Duration::hours(1);
        assert_eq!(
            serving_cert_decision(Some(&leaf.cert_pem), &ca_info, &names, later, rb),
            Some(IssueReason::RenewalDue)
        );
        let other_ca = generate_ca("im", "prod", now()).expect("ca2");
        let other_info = inspect(&other_ca.cert_pem).expect("info2");
        assert_eq!(
            serving_cert_decision(Some(&leaf.cert_pem), &other_info, &names, now(), rb),
            Some(IssueReason::IssuerChanged)
        );
    }

    #[test]
    fn client_cert_is_signed_by_ca() {
        let ca = generate_ca("im", "prod", now()).expect("ca");
        let ca_info = inspect(&ca.cert_pem).expect("ca info");
        let c = issue_client_cert(&ca, "identitymesh-operator", now()).expect("client");
        let info = inspect(&c.cert_pem).expect("info");
        assert_eq!(info.authority_key_id, ca_info.subject_key_id);
        assert!(info.dns_names.is_empty());
    }

    #[test]
    fn time_conversions_roundtrip() {
        let t = now();
        assert_eq!(from_timestamp(to_timestamp(t)), t);
    }
}

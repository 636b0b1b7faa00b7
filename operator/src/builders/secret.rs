//! Secrets the operator generates: CA (operator only), serving TLS, key ring.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;

use super::{meta, Names};
use crate::certs::CertAndKey;
use crate::crd::IdentityMeshCluster;
use crate::keyring::{KeyRing, KEYRING_KEY};

pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

/// The CA Secret. Its key is read by the operator only: no pod mounts this Secret.
pub fn build_ca_secret(imc: &IdentityMeshCluster, names: &Names, ca: &CertAndKey) -> Secret {
    Secret {
        metadata: meta(imc, names, names.ca_secret()),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (CA_CERT_KEY.to_string(), bytes(&ca.cert_pem)),
            (CA_KEY_KEY.to_string(), bytes(&ca.key_pem)),
        ])),
        ..Default::default()
    }
}

/// The operator-issued serving certificate (kubernetes.io/tls), with the CA for convenience.
pub fn build_tls_secret(
    imc: &IdentityMeshCluster,
    names: &Names,
    leaf: &CertAndKey,
    ca_cert_pem: &str,
) -> Secret {
    Secret {
        metadata: meta(imc, names, names.operator_tls_secret()),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_string(), bytes(&leaf.cert_pem)),
            ("tls.key".to_string(), bytes(&leaf.key_pem)),
            (CA_CERT_KEY.to_string(), bytes(ca_cert_pem)),
        ])),
        ..Default::default()
    }
}

pub fn build_keyring_secret(imc: &IdentityMeshCluster, names: &Names, kr: &KeyRing) -> Secret {
    Secret {
        metadata: meta(imc, names, names.keyring_secret()),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            KEYRING_KEY.to_string(),
            bytes(&kr.to_json()),
        )])),
        ..Default::default()
    }
}

/// A string value of a Secret key, if present and UTF-8.
pub fn secret_str<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| std::str::from_utf8(&b.0).ok())
        .or_else(|| {
            s.string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(String::as_str)
        })
}

/// CA material from the CA Secret, if complete.
pub fn ca_from_secret(s: &Secret) -> Option<CertAndKey> {
    Some(CertAndKey {
        cert_pem: secret_str(s, CA_CERT_KEY)?.to_string(),
        key_pem: secret_str(s, CA_KEY_KEY)?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builders::test_support::cluster;

    #[test]
    fn secrets_shape() {
        let imc = cluster("im", "prod");
        let names = Names::of(&imc);
        let ca = CertAndKey {
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        };
        let s = build_ca_secret(&imc, &names, &ca);
        assert_eq!(s.metadata.name.as_deref(), Some("im-ca"));
        assert_eq!(ca_from_secret(&s), Some(ca.clone()));
        let t = build_tls_secret(&imc, &names, &ca, "CA");
        assert_eq!(t.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(secret_str(&t, "tls.key"), Some("KEY"));
        let kr = KeyRing::generate();
        let k = build_keyring_secret(&imc, &names, &kr);
        assert_eq!(
            KeyRing::parse(secret_str(&k, KEYRING_KEY).expect("kr").as_bytes()),
            Ok(kr)
        );
        assert!(k.metadata.owner_references.is_some());
    }
}

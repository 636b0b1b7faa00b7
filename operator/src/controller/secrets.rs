//! Secrets and certificates: the Secrets the spec references, the cluster CA (and the
//! ConfigMap that publishes it), the operator-issued serving certificate, the expiry of a
//! user-provided one, and the key ring. Problems become findings (conditions, events), not
//! errors: the rest of the cluster is still reconciled.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;

use super::{Error, Reconciler};
use crate::builders::config::build_ca_config_map;
use crate::builders::secret::{
    build_ca_secret, build_keyring_secret, build_tls_secret, ca_from_secret, secret_str,
};
use crate::builders::FIELD_MANAGER;
use crate::certs::{self, CertAndKey};
use crate::conditions::{CERTIFICATES_CONDITION, KEYRING_CONDITION, SECRETS_CONDITION};
use crate::crd::{CertificateExpiry, IdentityMeshClusterStatus};
use crate::keyring::{KeyRing, KEYRING_KEY};
use crate::observe;

/// Findings of the secret/certificate steps, turned into conditions.
#[derive(Default)]
pub(super) struct Findings {
    pub(super) secret_problems: Vec<String>,
    pub(super) cert_problem: Option<String>,
    pub(super) keyring_problem: Option<String>,
    pub(super) cert_expiry: Option<CertificateExpiry>,
}

impl Reconciler {
    /// The step: what it found, and the CA when there is a usable one (without it the pods
    /// cannot be asked anything).
    pub(super) async fn secrets_and_certificates(
        &mut self,
    ) -> Result<(Findings, Option<CertAndKey>), Error> {
        let mut f = Findings::default();
        self.check_referenced_secrets(&mut f).await?;
        let ca = self.ensure_ca(&mut f).await?;
        if let Some(ca) = &ca {
            let published = build_ca_config_map(&self.imc, &self.names, &ca.cert_pem);
            self.apply_if_changed(&published).await?;
            self.ensure_serving_cert(ca, &mut f).await?;
        }
        self.observe_user_cert(&mut f).await?;
        self.ensure_keyring(&mut f).await?;
        Ok((f, ca))
    }

    /// A Warning event when a problem appears or changes (not on every reconcile: steady state,
    /// even a broken one, writes nothing). Messages name Secrets and keys, never values.
    pub(super) async fn report_problems(&self, old: &IdentityMeshClusterStatus, f: &Findings) {
        let items = [
            (
                SECRETS_CONDITION,
                "SecretProblem",
                (!f.secret_problems.is_empty()).then(|| f.secret_problems.join("; ")),
            ),
            (
                CERTIFICATES_CONDITION,
                "CertificateProblem",
                f.cert_problem.clone(),
            ),
            (
                KEYRING_CONDITION,
                "KeyRingProblem",
                f.keyring_problem.clone(),
            ),
        ];
        for (cond, reason, problem) in items {
            let Some(msg) = problem else { continue };
            let known = observe::get_condition(&old.conditions, cond)
                .is_some_and(|c| c.status == "False" && c.message == msg);
            if !known {
                self.event(EventType::Warning, reason, "Validate", msg)
                    .await;
            }
        }
    }

    /// Referenced Secrets must exist and hold the key; problems name the Secret and key and
    /// never quote values.
    async fn check_referenced_secrets(&mut self, f: &mut Findings) -> Result<(), Error> {
        let spec = &self.imc.spec;
        let api: Api<Secret> = self.api();
        let mut checks: Vec<(&str, &str, &str)> = vec![
            (
                "spec.database",
                spec.database.name.as_str(),
                spec.database.key.as_str(),
            ),
            (
                "spec.licence",
                spec.licence.name.as_str(),
                spec.licence.key.as_str(),
            ),
        ];
        if let Some(user) = &spec.tls.secret_name {
            checks.push(("spec.tls.secretName", user.as_str(), "tls.crt"));
            checks.push(("spec.tls.secretName", user.as_str(), "tls.key"));
        }
        for (field, name, key) in checks {
            let problem = match api.get_opt(name).await.map_err(Error::ReadSecret)? {
                None => Some(format!(
                    "{field}: Secret {name} (key {key:?}) not found in namespace {}; create it or fix the reference",
                    self.names.namespace
                )),
                Some(s) => match secret_str(&s, key) {
                    None => Some(format!(
                        "{field}: Secret {name} has no key {key:?} (or it is not UTF-8)"
                    )),
                    Some(v) if v.trim().is_empty() => {
                        Some(format!("{field}: Secret {name} key {key:?} is empty"))
                    }
                    Some(v)
                        if field == "spec.licence"
                            && serde_json::from_str::<serde_json::Value>(v).is_err() =>
                    {
                        Some(format!(
                            "{field}: Secret {name} key {key:?} is not valid licence JSON"
                        ))
                    }
                    Some(v) if key == "tls.crt" && certs::inspect(v).is_err() => Some(format!(
                        "{field}: Secret {name} key \"tls.crt\" is not a PEM certificate"
                    )),
                    Some(_) => None,
                },
            };
            f.secret_problems.extend(problem);
        }
        Ok(())
    }

    async fn ensure_ca(&mut self, f: &mut Findings) -> Result<Option<CertAndKey>, Error> {
        let api: Api<Secret> = self.api();
        let name = self.names.ca_secret();
        if let Some(s) = api.get_opt(&name).await.map_err(Error::ReadSecret)? {
            if self.owned_elsewhere(&s) {
                return Ok(None);
            }
            return Ok(
                match ca_from_secret(&s)
                    .filter(|ca| certs::inspect(&ca.cert_pem).is_ok_and(|i| i.is_ca))
                {
                    Some(ca) => Some(ca),
                    None => {
                        // Never replace a CA silently: relays and clients trust it.
                        f.cert_problem = Some(format!("Secret {name} does not hold a CA (keys ca.crt, ca.key); delete it to have a new CA generated"));
                        None
                    }
                },
            );
        }
        let ca = certs::generate_ca(
            &self.names.cluster,
            &self.names.namespace,
            time::OffsetDateTime::now_utc(),
        )?;
        match api
            .create(
                &PostParams::default(),
                &build_ca_secret(&self.imc, &self.names, &ca),
            )
            .await
        {
            Ok(_) => {
                self.writes += 1;
                self.event(
                    EventType::Normal,
                    "CAGenerated",
                    "Certificates",
                    format!("generated cluster CA in Secret {name}"),
                )
                .await;
                Ok(Some(ca))
            }
            // Lost a race with another reconcile: use the winner's CA next time.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(None),
            Err(e) => Err(Error::WriteSecret(e)),
        }
    }

    async fn ensure_serving_cert(
        &mut self,
        ca: &CertAndKey,
        f: &mut Findings,
    ) -> Result<(), Error> {
        let Some(issuer) = self.imc.spec.tls.operator_issuer() else {
            return Ok(());
        };
        let (duration, renew_before) = match issuer.parsed() {
            Ok(x) => x,
            Err(e) => {
                f.cert_problem = Some(e);
                return Ok(());
            }
        };
        let name = self.names.operator_tls_secret();
        let api: Api<Secret> = self.api();
        let live = api.get_opt(&name).await.map_err(Error::ReadSecret)?;
        if live.as_ref().is_some_and(|l| self.owned_elsewhere(l)) {
            return Ok(());
        }
        let existing = live.as_ref().and_then(|s| secret_str(s, "tls.crt"));
        let ca_info = certs::inspect(&ca.cert_pem)?;
        let wanted = certs::serving_dns_names(&self.names, &self.imc.spec.tls.dns_names);
        let now = time::OffsetDateTime::now_utc();
        if let Some(reason) =
            certs::serving_cert_decision(existing, &ca_info, &wanted, now, renew_before)
        {
            let leaf = certs::issue_serving_cert(ca, &wanted, now, duration)?;
            let secret = build_tls_secret(&self.imc, &self.names, &leaf, &ca.cert_pem);
            api.patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(Error::WriteSecret)?;
            self.writes += 1;
            self.event(
                EventType::Normal,
                "CertificateIssued",
                "Certificates",
                format!(
                    "issued serving certificate in Secret {name} ({})",
                    reason.as_str()
                ),
            )
            .await;
            let info = certs::inspect(&leaf.cert_pem)?;
            f.cert_expiry = Some(CertificateExpiry {
                not_after: Time(certs::to_timestamp(info.not_after)),
                secret_name: name,
            });
        } else if let Some(info) = existing.and_then(|p| certs::inspect(p).ok()) {
            f.cert_expiry = Some(CertificateExpiry {
                not_after: Time(certs::to_timestamp(info.not_after)),
                secret_name: name,
            });
        }
        Ok(())
    }

    /// Expiry of a user-provided certificate (the operator does not renew it).
    async fn observe_user_cert(&mut self, f: &mut Findings) -> Result<(), Error> {
        let Some(name) = self.imc.spec.tls.secret_name.clone() else {
            return Ok(());
        };
        if let Some(s) = self
            .api::<Secret>()
            .get_opt(&name)
            .await
            .map_err(Error::ReadSecret)?
        {
            if let Some(info) = secret_str(&s, "tls.crt").and_then(|p| certs::inspect(p).ok()) {
                f.cert_expiry = Some(CertificateExpiry {
                    not_after: Time(certs::to_timestamp(info.not_after)),
                    secret_name: name,
                });
            }
        }
        Ok(())
    }

    async fn ensure_keyring(&mut self, f: &mut Findings) -> Result<(), Error> {
        let api: Api<Secret> = self.api();
        let name = self.names.keyring_secret();
        match api.get_opt(&name).await.map_err(Error::ReadSecret)? {
            Some(s) if self.owned_elsewhere(&s) => {}
            Some(s) => {
                // Never regenerated: a new key ring would orphan every stored secret.
                let problem = match secret_str(&s, KEYRING_KEY) {
                    None => Some(format!("Secret {name} has no key {KEYRING_KEY:?}")),
                    Some(v) => KeyRing::parse(v.as_bytes())
                        .err()
                        .map(|e| format!("Secret {name} key {KEYRING_KEY:?}: {e}")),
                };
                f.keyring_problem = problem;
            }
            None => {
                let kr = KeyRing::generate();
                match api
                    .create(
                        &PostParams::default(),
                        &build_keyring_secret(&self.imc, &self.names, &kr),
                    )
                    .await
                {
                    Ok(_) => {
                        self.writes += 1;
                        self.event(
                            EventType::Normal,
                            "KeyRingGenerated",
                            "Secrets",
                            format!("generated key ring in Secret {name}"),
                        )
                        .await;
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(Error::WriteSecret(e)),
                }
            }
        }
        Ok(())
    }
}

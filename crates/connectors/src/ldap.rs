//! LDAP / Active Directory connector: simple bind over LDAPS or StartTLS, paged searches (RFC
//! 2696) per object type, delta imports by a change-marker watermark.
//!
//! Anchors: the `anchor_attribute` value as text. When it is binary (AD's `objectGUID`), a
//! 16-byte `objectGUID` becomes the standard GUID string as AD shows it
//! (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lowercase, first three groups little-endian), any
//! other binary anchor becomes lowercase hex.
//!
//! Deletions are not visible to a delta import (a deleted entry has no change marker left to
//! search for); a full import lets the caller detect them by absence.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use ldap3::adapters::{Adapter, EntriesOnly, PagedResults};
use ldap3::asn1::StructureTag;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Scope, SearchOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Sender;

use crate::error::{ConfigProblem, ConnectorError, TestReport};
use crate::model::{Attributes, ConnectorObject, ImportMode, ImportSummary, Page, Rejected, Value};

/// The Simple Paged Results control; imports need it, so the connection test looks for it.
const PAGED_RESULTS_OID: &str = "1.2.840.113556.1.4.319";

fn default_page_size() -> u32 {
    500
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_anchor() -> String {
    "entryUUID".into()
}
fn default_binary_attributes() -> Vec<String> {
    [
        "objectGUID",
        "objectSid",
        "jpegPhoto",
        "thumbnailPhoto",
        "userCertificate",
    ]
    .map(String::from)
    .to_vec()
}
fn default_filter() -> String {
    "(objectClass=*)".into()
}
fn default_attributes() -> Vec<String> {
    vec!["*".into()]
}

/// An LDAP connector's configuration, as the Admin API stores it (JSON). The bind password is
/// not in here: `bind_password_ref` names a stored secret, which the server resolves and hands
/// to [`LdapConnector::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldaps://host:636` or `ldap://host:389` (the latter with `start_tls` or `allow_plain`).
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before binding.
    #[serde(default)]
    pub start_tls: bool,
    /// Allow `ldap://` without TLS (credentials and data in clear): test directories only.
    #[serde(default)]
    pub allow_plain: bool,
    /// PEM certificate(s) of the CA(s) to trust; default: the public web PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Simple-bind DN; none = anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_dn: Option<String>,
    /// Name of the stored secret holding the bind password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_password_ref: Option<String>,
    /// Entries per LDAP page, and so per [`Page`] (1..=5000).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Bound on connecting and on each directory response.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The attribute whose value identifies an entry for its lifetime.
    #[serde(default = "default_anchor")]
    pub anchor_attribute: String,
    #[serde(default)]
    pub watermark_attribute: WatermarkAttribute,
    /// Attributes always returned as bytes, even when a value happens to be valid UTF-8.
    #[serde(default = "default_binary_attributes")]
    pub binary_attributes: Vec<String>,
    /// Object type name (`people`, `groups`) → where and what to search.
    pub object_types: BTreeMap<String, ObjectTypeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectTypeConfig {
    pub base_dn: String,
    #[serde(default = "default_filter")]
    pub filter: String,
    #[serde(default)]
    pub scope: SearchScope,
    /// Attributes to read; `*` = all user attributes. The anchor and watermark attributes are
    /// always requested in addition (they are operational in OpenLDAP).
    #[serde(default = "default_attributes")]
    pub attributes: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SearchScope {
    #[default]
    Sub,
    One,
}

/// The change marker a delta import searches by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatermarkAttribute {
    /// Generalized time, second resolution: a delta re-reads entries changed in the same second.
    #[serde(rename = "modifyTimestamp")]
    ModifyTimestamp,
    /// OpenLDAP's change sequence number (microsecond time + counters).
    #[default]
    #[serde(rename = "entryCSN")]
    EntryCsn,
    /// Active Directory's per-DC update sequence number (use one DC consistently).
    #[serde(rename = "uSNChanged")]
    UsnChanged,
}

impl WatermarkAttribute {
    pub fn attribute_name(self) -> &'static str {
        match self {
            WatermarkAttribute::ModifyTimestamp => "modifyTimestamp",
            WatermarkAttribute::EntryCsn => "entryCSN",
            WatermarkAttribute::UsnChanged => "uSNChanged",
        }
    }

    /// Orders two change markers of this kind; `None` when either is malformed.
    fn compare(self, a: &str, b: &str) -> Option<std::cmp::Ordering> {
        match self {
            WatermarkAttribute::UsnChanged => Some(
                a.trim()
                    .parse::<u64>()
                    .ok()?
                    .cmp(&b.trim().parse::<u64>().ok()?),
            ),
            // CSNs are fixed-width (time#count#sid#mod), so byte order is time order.
            WatermarkAttribute::EntryCsn => Some(a.cmp(b)),
            // Generalized time may or may not carry a fraction ("…33Z" vs "…33.5Z"): compare the
            // seconds, then the fraction digits. Directories return UTC ("Z").
            WatermarkAttribute::ModifyTimestamp => {
                let (sa, fa) = split_generalized_time(a)?;
                let (sb, fb) = split_generalized_time(b)?;
                Some(sa.cmp(sb).then_with(|| fa.cmp(fb)))
            }
        }
    }

    fn check(self, w: &str) -> Result<(), String> {
        let ok = match self {
            WatermarkAttribute::UsnChanged => w.trim().parse::<u64>().is_ok(),
            WatermarkAttribute::EntryCsn => {
                w.len() >= 14 && w.as_bytes()[..14].iter().all(u8::is_ascii_digit)
            }
            WatermarkAttribute::ModifyTimestamp => split_generalized_time(w).is_some(),
        };
        if ok {
            Ok(())
        } else {
            Err(format!("it is not a {} value", self.attribute_name()))
        }
    }
}

/// `20261126012233.5Z` → (`20261126012233`, `5`).
fn split_generalized_time(s: &str) -> Option<(&str, &str)> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (secs, frac) = match s.split_once(['.', ',']) {
        Some((a, b)) => (a, b),
        None => (s, ""),
    };
    if secs.len() < 10 || !secs.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some((secs, frac.trim_end_matches('0')))
}

enum Transport {
    Ldaps,
    StartTls,
    Plain,
}

impl LdapConfig {
    /// Every problem in the configuration, each with its field path; empty = valid.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        match parse_url(&self.url) {
            Err(m) => p.push(ConfigProblem::new("url", m)),
            Ok(secure) => {
                if secure && self.start_tls {
                    p.push(ConfigProblem::new(
                        "start_tls",
                        "ldaps:// is already TLS; set start_tls to false or use an ldap:// URL",
                    ));
                }
                if !secure && !self.start_tls && !self.allow_plain {
                    p.push(ConfigProblem::new(
                        "url",
                        "plain ldap:// would send the bind password and all data unencrypted; use ldaps://, set start_tls: true, or (test directories only) set allow_plain: true",
                    ));
                }
            }
        }
        if let Some(pem) = &self.ca_pem {
            if let Err(m) = parse_ca_pem(pem) {
                p.push(ConfigProblem::new("ca_pem", m));
            }
        }
        match (&self.bind_dn, &self.bind_password_ref) {
            (Some(dn), _) if dn.trim().is_empty() => p.push(ConfigProblem::new(
                "bind_dn",
                "is empty; give the DN to bind as, or leave it out for an anonymous bind",
            )),
            (Some(_), None) => p.push(ConfigProblem::new(
                "bind_password_ref",
                "is missing; name the stored secret that holds the password for bind_dn",
            )),
            (None, Some(_)) => p.push(ConfigProblem::new(
                "bind_dn",
                "is missing but bind_password_ref is set; give the DN the password belongs to",
            )),
            _ => {}
        }
        if let Some(r) = &self.bind_password_ref {
            if r.trim().is_empty() {
                p.push(ConfigProblem::new(
                    "bind_password_ref",
                    "is empty; name the stored secret that holds the bind password",
                ));
            }
        }
        if !(1..=5000).contains(&self.page_size) {
            p.push(ConfigProblem::new(
                "page_size",
                format!("is {}; use a value from 1 to 5000", self.page_size),
            ));
        }
        if !(100..=3_600_000).contains(&self.timeout_ms) {
            p.push(ConfigProblem::new(
                "timeout_ms",
                format!(
                    "is {}; use a value from 100 to 3600000 milliseconds",
                    self.timeout_ms
                ),
            ));
        }
        if !is_attribute_name(&self.anchor_attribute) {
            p.push(ConfigProblem::new(
                "anchor_attribute",
                format!(
                    "\"{}\" is not an attribute name; use e.g. entryUUID (OpenLDAP) or objectGUID (AD)",
                    self.anchor_attribute
                ),
            ));
        }
        for (i, a) in self.binary_attributes.iter().enumerate() {
            if !is_attribute_name(a) {
                p.push(ConfigProblem::new(
                    format!("binary_attributes[{i}]"),
                    format!("\"{a}\" is not an attribute name"),
                ));
            }
        }
        if self.object_types.is_empty() {
            p.push(ConfigProblem::new(
                "object_types",
                "is empty; configure at least one object type (e.g. people with its base_dn)",
            ));
        }
        for (name, ot) in &self.object_types {
            let at = |f: &str| format!("object_types.{name}.{f}");
            if name.trim().is_empty() {
                p.push(ConfigProblem::new(
                    "object_types",
                    "has an empty object type name",
                ));
            }
            if ot.base_dn.trim().is_empty() {
                p.push(ConfigProblem::new(
                    at("base_dn"),
                    "is empty; give the DN to search under (e.g. ou=people,dc=example,dc=org)",
                ));
            }
            if ldap3::parse_filter(normalize_filter(&ot.filter)).is_err() {
                p.push(ConfigProblem::new(
                    at("filter"),
                    format!(
                        "\"{}\" is not a valid LDAP filter; e.g. (objectClass=inetOrgPerson)",
                        ot.filter
                    ),
                ));
            }
            if ot.attributes.is_empty() {
                p.push(ConfigProblem::new(
                    at("attributes"),
                    "is empty; list the attributes to read, or [\"*\"] for all",
                ));
            }
            for (i, a) in ot.attributes.iter().enumerate() {
                if a != "*" && a != "+" && !is_attribute_name(a) {
                    p.push(ConfigProblem::new(
                        format!("object_types.{name}.attributes[{i}]"),
                        format!("\"{a}\" is not an attribute name (or * / +)"),
                    ));
                }
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    fn transport(&self) -> Transport {
        if self.url.to_ascii_lowercase().starts_with("ldaps://") {
            Transport::Ldaps
        } else if self.start_tls {
            Transport::StartTls
        } else {
            Transport::Plain
        }
    }
}

/// Ok(true) for ldaps://, Ok(false) for ldap://.
fn parse_url(url: &str) -> Result<bool, String> {
    let lower = url.to_ascii_lowercase();
    let (secure, rest) = if let Some(r) = lower.strip_prefix("ldaps://") {
        (true, r)
    } else if let Some(r) = lower.strip_prefix("ldap://") {
        (false, r)
    } else {
        return Err(format!(
            "\"{url}\" is not an LDAP URL; use ldaps://host[:port] or ldap://host[:port]"
        ));
    };
    let hostport = rest.split('/').next().unwrap_or_default();
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        // IPv6 literal: [::1]:636
        match r.split_once(']') {
            Some((h, p)) => (h, p.strip_prefix(':')),
            None => return Err(format!("\"{url}\" has an unterminated IPv6 address")),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err(format!(
            "\"{url}\" names no host; use e.g. ldaps://dc1.example.org"
        ));
    }
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |n| n == 0) {
            return Err(format!("\"{url}\" has an invalid port \"{port}\""));
        }
    }
    Ok(secure)
}

fn parse_ca_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Err(e) => Err(format!(
            "is not valid PEM ({e}); paste the CA certificate (-----BEGIN CERTIFICATE----- …)"
        )),
        Ok(c) if c.is_empty() => Err(
            "contains no certificate; paste the CA certificate (-----BEGIN CERTIFICATE----- …)"
                .into(),
        ),
        Ok(c) => Ok(c),
    }
}

fn is_attribute_name(s: &str) -> bool {
    // A descriptor (letters, digits, hyphens) or a numeric OID, optionally with options (;binary).
    let base = s.split(';').next().unwrap_or_default();
    !base.is_empty()
        && s.split(';').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.')
        })
}

/// Accept `objectClass=person` as well as `(objectClass=person)`, so it can be wrapped in `(&…)`.
fn normalize_filter(f: &str) -> String {
    let t = f.trim();
    if t.starts_with('(') {
        t.to_string()
    } else {
        format!("({t})")
    }
}

fn base_name(attr: &str) -> &str {
    attr.split(';').next().unwrap_or(attr)
}

/// A password that never shows in Debug output.
#[derive(Clone)]
struct Password(String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Reads object types from one LDAP directory. Cheap to share (`Arc` it); each import or
/// test opens its own connection.
#[derive(Debug)]
pub struct LdapConnector {
    cfg: LdapConfig,
    password: Option<Password>,
    tls: Option<Arc<rustls::ClientConfig>>,
    entries_read: AtomicU64,
}

impl LdapConnector {
    /// Validates the configuration and prepares TLS. `password` is the resolved value of
    /// `bind_password_ref`; it is required when `bind_dn` is set.
    pub fn new(cfg: LdapConfig, password: Option<String>) -> Result<Self, ConnectorError> {
        let mut problems = cfg.validate().err().unwrap_or_default();
        if cfg.bind_dn.is_some() && password.is_none() {
            problems.push(ConfigProblem::new(
                "bind_password_ref",
                "the referenced secret was not supplied; store the bind password under that name",
            ));
        }
        if !problems.is_empty() {
            return Err(ConnectorError::Config(problems));
        }
        let tls = match cfg.transport() {
            Transport::Plain => None,
            _ => Some(Arc::new(build_tls_config(cfg.ca_pem.as_deref())?)),
        };
        Ok(Self {
            cfg,
            password: password.map(Password),
            tls,
            entries_read: AtomicU64::new(0),
        })
    }

    pub fn config(&self) -> &LdapConfig {
        &self.cfg
    }

    /// Entries received from the directory by this connector so far (all imports); for
    /// progress reporting and to observe that a blocked consumer stops the reader.
    pub fn entries_read(&self) -> u64 {
        self.entries_read.load(AtomicOrdering::Relaxed)
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    /// Connects (TLS as configured) and binds.
    async fn connect(&self) -> Result<Ldap, ConnectorError> {
        let url = &self.cfg.url;
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(self.timeout())
            .set_starttls(matches!(self.cfg.transport(), Transport::StartTls));
        if let Some(tls) = &self.tls {
            settings = settings.set_config(tls.clone());
        }
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, url)
            .await
            .map_err(|e| self.connect_error(e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(error = %e, "LDAP connection ended with an error");
            }
        });
        if let (Some(dn), Some(pw)) = (&self.cfg.bind_dn, &self.password) {
            let res = ldap
                .with_timeout(self.timeout())
                .simple_bind(dn, &pw.0)
                .await
                .map_err(|e| self.op_error(e, "binding"))?;
            if res.rc != 0 {
                let reason = match res.rc {
                    49 => format!(
                        "invalid credentials for {dn}; check the DN and the password stored under bind_password_ref"
                    ),
                    13 => "the directory requires a confidential (TLS) connection; use ldaps:// or start_tls".to_string(),
                    53 => format!(
                        "the directory is unwilling to bind {dn} (account disabled or an empty password?): {}",
                        res.text
                    ),
                    _ => format!("{res}"),
                };
                return Err(ConnectorError::Bind {
                    dn: dn.clone(),
                    reason,
                });
            }
        }
        Ok(ldap)
    }

    fn connect_error(&self, e: LdapError) -> ConnectorError {
        let url = self.cfg.url.clone();
        if let Some(reason) = tls_reason(&e) {
            return ConnectorError::Tls { url, reason };
        }
        match e {
            LdapError::Timeout { .. } => ConnectorError::Timeout {
                during: format!("connecting to {url}"),
                timeout_ms: self.cfg.timeout_ms,
            },
            // A StartTLS extended operation the server refused.
            LdapError::LdapResult { result } => ConnectorError::Tls {
                url,
                reason: format!(
                    "the server refused StartTLS ({result}); enable TLS on the directory or use ldaps://"
                ),
            },
            LdapError::Io { source } => ConnectorError::Connect {
                url,
                reason: format!(
                    "{source}; check the host and port and that the directory is running and reachable"
                ),
            },
            other => ConnectorError::Connect {
                url,
                reason: other.to_string(),
            },
        }
    }

    /// Errors of an operation on an established connection.
    fn op_error(&self, e: LdapError, during: &str) -> ConnectorError {
        match e {
            LdapError::Timeout { .. } => ConnectorError::Timeout {
                during: during.to_string(),
                timeout_ms: self.cfg.timeout_ms,
            },
            other => ConnectorError::Connect {
                url: self.cfg.url.clone(),
                reason: format!("connection failed while {during}: {other}"),
            },
        }
    }

    fn object_type(&self, name: &str) -> Result<&ObjectTypeConfig, ConnectorError> {
        self.cfg
            .object_types
            .get(name)
            .ok_or_else(|| ConnectorError::UnknownObjectType {
                requested: name.to_string(),
                configured: self.cfg.object_types.keys().cloned().collect(),
            })
    }

    /// Connects, binds, reads the root DSE and looks for one entry per object type.
    pub async fn test_connection(&self) -> Result<TestReport, ConnectorError> {
        let mut report = TestReport::default();
        let mut ldap = self.connect().await?;
        let transport = match self.cfg.transport() {
            Transport::Ldaps => "LDAPS",
            Transport::StartTls => "StartTLS",
            Transport::Plain => "no TLS",
        };
        report.push(
            "connect",
            format!("connected to {} ({transport})", self.cfg.url),
        );
        report.push(
            "bind",
            match &self.cfg.bind_dn {
                Some(dn) => format!("bound as {dn}"),
                None => "anonymous".to_string(),
            },
        );

        let root = ldap
            .with_timeout(self.timeout())
            .search(
                "",
                Scope::Base,
                "(objectClass=*)",
                vec![
                    "namingContexts",
                    "supportedControl",
                    "vendorName",
                    "vendorVersion",
                ],
            )
            .await
            .map_err(|e| self.op_error(e, "reading the root DSE"))?;
        match root.success() {
            Ok((entries, _)) if !entries.is_empty() => {
                let mut contexts = Vec::new();
                let mut paged = false;
                if let Some(entry) = entries.into_iter().next().and_then(|e| parse_entry(e.0)) {
                    for (name, values) in entry.attrs {
                        let texts = values
                            .iter()
                            .map(|v| String::from_utf8_lossy(v).into_owned());
                        match name.to_ascii_lowercase().as_str() {
                            "namingcontexts" => contexts.extend(texts),
                            "supportedcontrol" => {
                                paged |= texts.clone().any(|t| t == PAGED_RESULTS_OID)
                            }
                            _ => {}
                        }
                    }
                }
                if !paged {
                    return Err(ConnectorError::Search {
                        object_type: "(root DSE)".into(),
                        reason: "the directory does not announce the Simple Paged Results control, which imports need; enable it on the directory".into(),
                    });
                }
                report.push(
                    "root_dse",
                    format!(
                        "naming contexts: {}; paged results supported",
                        if contexts.is_empty() {
                            "(none listed)".to_string()
                        } else {
                            contexts.join(", ")
                        }
                    ),
                );
            }
            _ => report.push(
                "root_dse",
                "not readable with this bind (paged-results support not verified)",
            ),
        }

        for (name, ot) in &self.cfg.object_types {
            let res = ldap
                .with_timeout(self.timeout())
                .with_search_options(SearchOptions::new().sizelimit(1))
                .search(
                    &ot.base_dn,
                    scope(ot.scope),
                    &normalize_filter(&ot.filter),
                    vec![self.cfg.anchor_attribute.as_str()],
                )
                .await
                .map_err(|e| self.op_error(e, &format!("searching object type {name}")))?;
            let (entries, result) = (res.0, res.1);
            // sizeLimitExceeded (4) is expected: we asked for one entry only.
            if result.rc != 0 && result.rc != 4 {
                return Err(self.search_error(name, ot, &result));
            }
            let found = entries.iter().filter(|e| !e.is_ref()).count();
            report.push(
                format!("object_type:{name}"),
                if found == 0 {
                    format!("{} is readable but the filter matched no entry", ot.base_dn)
                } else {
                    format!("{} is readable; the filter matches entries", ot.base_dn)
                },
            );
        }
        let _ = ldap.unbind().await;
        Ok(report)
    }

    fn search_error(
        &self,
        name: &str,
        ot: &ObjectTypeConfig,
        r: &ldap3::LdapResult,
    ) -> ConnectorError {
        let reason = match r.rc {
            32 => format!(
                "base DN \"{}\" does not exist (the directory matched only \"{}\"); fix object_types.{name}.base_dn",
                ot.base_dn, r.matched
            ),
            34 => format!(
                "base DN \"{}\" is not a valid DN; fix object_types.{name}.base_dn",
                ot.base_dn
            ),
            4 | 11 => format!(
                "the directory's size or administrative limit stopped the search ({r}); raise the limits for the bind DN"
            ),
            3 => format!(
                "the directory's time limit stopped the search ({r}); raise the time limit for the bind DN"
            ),
            12 => "the directory does not support the Simple Paged Results control; enable it".into(),
            50 => format!(
                "the bind DN may not read \"{}\" ({r}); grant it read access",
                ot.base_dn
            ),
            87 => format!(
                "the directory rejected the filter \"{}\"; fix object_types.{name}.filter",
                ot.filter
            ),
            _ => format!("{r}"),
        };
        ConnectorError::Search {
            object_type: name.to_string(),
            reason,
        }
    }

    /// Reads one object type, sending one [`Page`] per LDAP page into `tx` (awaiting each send,
    /// so a slow receiver slows the search). Full: every entry; delta: entries whose watermark
    /// attribute is at or after the given watermark (at-least-once: the boundary entry is read
    /// again). The summary's watermark is the greatest change marker seen (or the one given,
    /// when a delta saw nothing), ready for the next delta.
    pub async fn import(
        &self,
        object_type: &str,
        mode: &ImportMode,
        tx: Sender<Page>,
    ) -> Result<ImportSummary, ConnectorError> {
        let ot = self.object_type(object_type)?;
        let wm_attr = self.cfg.watermark_attribute;
        let base_filter = normalize_filter(&ot.filter);
        let (filter, mut watermark) = match mode {
            ImportMode::Full => (base_filter, None),
            ImportMode::Delta { watermark } => {
                wm_attr
                    .check(watermark)
                    .map_err(|reason| ConnectorError::Watermark {
                        watermark: watermark.clone(),
                        reason,
                    })?;
                (
                    format!(
                        "(&{base_filter}({}>={}))",
                        wm_attr.attribute_name(),
                        ldap3::ldap_escape(watermark.trim())
                    ),
                    Some(watermark.trim().to_string()),
                )
            }
        };
        let attrs = self.requested_attributes(ot);
        let page_size = self.cfg.page_size as usize;

        let mut ldap = self.connect().await?;
        let adapters: Vec<Box<dyn Adapter<'_, String, Vec<String>>>> = vec![
            Box::new(EntriesOnly::new()),
            Box::new(PagedResults::new(self.cfg.page_size as i32)),
        ];
        let mut stream = ldap
            .with_timeout(self.timeout())
            .streaming_search_with(adapters, &ot.base_dn, scope(ot.scope), &filter, attrs)
            .await
            .map_err(|e| self.op_error(e, &format!("starting the search for {object_type}")))?;

        let mut summary = ImportSummary::default();
        let mut page = Page {
            objects: Vec::new(),
            rejected: Vec::new(),
        };
        let mut in_page = 0usize;
        let mut index = 0u64;
        loop {
            let entry = match stream.next().await {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => {
                    let _ = ldap.unbind().await;
                    return Err(self.op_error(e, &format!("reading {object_type} entries")));
                }
            };
            index += 1;
            self.entries_read.fetch_add(1, AtomicOrdering::Relaxed);
            match parse_entry(entry.0) {
                None => page.rejected.push(Rejected {
                    location: format!("{object_type} entry #{index}"),
                    reason: "the directory sent a malformed search result entry".into(),
                }),
                Some(raw) => {
                    if let Some(w) = raw.first_value(wm_attr.attribute_name()) {
                        let w = String::from_utf8_lossy(w);
                        let newer = match &watermark {
                            None => true,
                            Some(cur) => {
                                wm_attr.compare(&w, cur) == Some(std::cmp::Ordering::Greater)
                            }
                        };
                        if newer && wm_attr.check(&w).is_ok() {
                            watermark = Some(w.into_owned());
                        }
                    }
                    match self.to_object(object_type, raw) {
                        Ok(o) => page.objects.push(o),
                        Err(r) => page.rejected.push(r),
                    }
                }
            }
            in_page += 1;
            if in_page >= page_size {
                in_page = 0;
                let full = std::mem::replace(
                    &mut page,
                    Page {
                        objects: Vec::new(),
                        rejected: Vec::new(),
                    },
                );
                summary.objects += full.objects.len() as u64;
                summary.rejected += full.rejected.len() as u64;
                if tx.send(full).await.is_err() {
                    // Closing the connection makes the directory stop the search.
                    let _ = ldap.unbind().await;
                    return Err(ConnectorError::Cancelled);
                }
            }
        }
        let result = stream.finish().await;
        let _ = ldap.unbind().await;
        if result.rc != 0 {
            return Err(self.search_error(object_type, ot, &result));
        }
        if !page.objects.is_empty() || !page.rejected.is_empty() {
            summary.objects += page.objects.len() as u64;
            summary.rejected += page.rejected.len() as u64;
            tx.send(page).await.map_err(|_| ConnectorError::Cancelled)?;
        }
        summary.watermark = watermark;
        Ok(summary)
    }

    /// Configured attributes plus the anchor and watermark, which OpenLDAP only returns when
    /// asked for by name (operational attributes).
    fn requested_attributes(&self, ot: &ObjectTypeConfig) -> Vec<String> {
        let mut attrs = ot.attributes.clone();
        for extra in [
            self.cfg.anchor_attribute.as_str(),
            self.cfg.watermark_attribute.attribute_name(),
        ] {
            if !attrs.iter().any(|a| a.eq_ignore_ascii_case(extra)) {
                attrs.push(extra.to_string());
            }
        }
        attrs
    }

    fn is_binary_attribute(&self, name: &str) -> bool {
        let b = base_name(name);
        self.cfg
            .binary_attributes
            .iter()
            .any(|a| base_name(a).eq_ignore_ascii_case(b))
    }

    fn to_object(&self, object_type: &str, raw: RawEntry) -> Result<ConnectorObject, Rejected> {
        let anchor_attr = &self.cfg.anchor_attribute;
        let anchor = match raw.first_value(anchor_attr) {
            Some(v) if !v.is_empty() => self.anchor_text(anchor_attr, v),
            _ => {
                return Err(Rejected {
                    location: raw.dn,
                    reason: format!(
                        "the entry has no {anchor_attr} value, so it cannot be tracked; check that the bind DN may read {anchor_attr} or change anchor_attribute"
                    ),
                })
            }
        };
        let mut attributes = Attributes::new();
        for (name, values) in raw.attrs {
            let binary = self.is_binary_attribute(&name);
            let converted = values.into_iter().map(|v| {
                if binary {
                    Value::Binary(v)
                } else {
                    match String::from_utf8(v) {
                        Ok(s) => Value::Text(s),
                        Err(e) => Value::Binary(e.into_bytes()),
                    }
                }
            });
            attributes.entry(name).or_default().extend(converted);
        }
        Ok(ConnectorObject {
            anchor,
            object_type: object_type.to_string(),
            dn: Some(raw.dn),
            attributes,
            location: None,
        })
    }

    fn anchor_text(&self, attr: &str, v: &[u8]) -> String {
        let binary = self.is_binary_attribute(attr);
        if !binary {
            if let Ok(s) = std::str::from_utf8(v) {
                return s.to_string();
            }
        }
        if base_name(attr).eq_ignore_ascii_case("objectGUID") && v.len() == 16 {
            return guid_string(v);
        }
        hex::encode(v)
    }
}

/// AD's GUID text form: Data1..Data3 are little-endian in the 16 bytes, Data4 is as stored.
fn guid_string(b: &[u8]) -> String {
    let le = |r: &[u8]| {
        r.iter()
            .rev()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    };
    format!(
        "{}-{}-{}-{}-{}",
        le(&b[0..4]),
        le(&b[4..6]),
        le(&b[6..8]),
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

fn scope(s: SearchScope) -> Scope {
    match s {
        SearchScope::Sub => Scope::Subtree,
        SearchScope::One => Scope::OneLevel,
    }
}

/// A search result entry as bytes, attribute order as returned.
struct RawEntry {
    dn: String,
    attrs: Vec<(String, Vec<Vec<u8>>)>,
}

impl RawEntry {
    fn first_value(&self, attr: &str) -> Option<&[u8]> {
        self.attrs
            .iter()
            .find(|(n, _)| base_name(n).eq_ignore_ascii_case(base_name(attr)))
            .and_then(|(_, v)| v.first())
            .map(Vec::as_slice)
    }
}

/// Decodes a SearchResultEntry without panicking (ldap3's `SearchEntry::construct` panics on
/// malformed input and splits text from binary values, losing their order).
fn parse_entry(tag: StructureTag) -> Option<RawEntry> {
    let mut parts = tag.match_id(4)?.expect_constructed()?.into_iter();
    let dn_bytes = parts.next()?.expect_primitive()?;
    // A DN is UTF-8 by definition (RFC 4514); keep what we can rather than drop the entry.
    let dn = String::from_utf8(dn_bytes)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    let mut attrs = Vec::new();
    for attr in parts.next()?.expect_constructed()? {
        let mut pa = attr.expect_constructed()?.into_iter();
        let name = String::from_utf8(pa.next()?.expect_primitive()?).ok()?;
        let values = pa
            .next()?
            .expect_constructed()?
            .into_iter()
            .map(|v| v.expect_primitive())
            .collect::<Option<Vec<_>>>()?;
        attrs.push((name, values));
    }
    Some(RawEntry { dn, attrs })
}

/// Trust the configured CA (or the web PKI roots); ring as the provider explicitly, so this
/// works whichever rustls providers the final binary links.
fn build_tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig, ConnectorError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let certs = parse_ca_pem(pem)
                .map_err(|m| ConnectorError::Config(vec![ConfigProblem::new("ca_pem", m)]))?;
            for c in certs {
                roots.add(c).map_err(|e| {
                    ConnectorError::Config(vec![ConfigProblem::new(
                        "ca_pem",
                        format!("a certificate cannot be used as a trust anchor: {e}"),
                    )])
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            ConnectorError::Config(vec![ConfigProblem::new(
                "url",
                format!("cannot set up TLS: {e}"),
            )])
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(cfg)
}

/// Finds a rustls error under an ldap3 / io error and explains it.
fn tls_reason(e: &LdapError) -> Option<String> {
    let rustls_err = match e {
        LdapError::Rustls { source } => Some(source),
        LdapError::DNSName { source } => {
            return Some(format!(
                "the host name is not usable for TLS ({source}); use the host name on the directory's certificate"
            ))
        }
        LdapError::Io { source } => source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        _ => None,
    }?;
    Some(match rustls_err {
        rustls::Error::InvalidCertificate(ce) => match ce {
            rustls::CertificateError::UnknownIssuer
            | rustls::CertificateError::BadSignature
            | rustls::CertificateError::InvalidPurpose => format!(
                "the server's certificate is not trusted ({ce:?}); add the directory's CA as ca_pem"
            ),
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => format!(
                "the server's certificate does not name the host in the URL ({ce:?}); connect by a name the certificate lists"
            ),
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired; renew it on the directory".to_string()
            }
            other => format!(
                "the server's certificate was rejected ({other:?}); check it, and add the directory's CA as ca_pem"
            ),
        },
        other => format!("{other}; check that the port speaks TLS (ldaps) or that StartTLS is enabled"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> LdapConfig {
        serde_json::from_value(serde_json::json!({
            "url": "ldaps://dc1.example.org:636",
            "bind_dn": "cn=sync,dc=example,dc=org",
            "bind_password_ref": "ldap-sync",
            "object_types": {"people": {"base_dn": "ou=people,dc=example,dc=org"}}
        }))
        .expect("valid config")
    }

    #[test]
    fn defaults_are_applied() {
        let c = valid();
        assert_eq!(c.page_size, 500);
        assert_eq!(c.timeout_ms, 30_000);
        assert_eq!(c.anchor_attribute, "entryUUID");
        assert_eq!(c.watermark_attribute, WatermarkAttribute::EntryCsn);
        assert!(c.binary_attributes.iter().any(|a| a == "objectGUID"));
        let ot = &c.object_types["people"];
        assert_eq!(ot.filter, "(objectClass=*)");
        assert_eq!(ot.scope, SearchScope::Sub);
        assert_eq!(ot.attributes, vec!["*"]);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_value::<LdapConfig>(serde_json::json!({
            "url": "ldaps://x", "object_types": {}, "bind_password": "oops"
        }))
        .unwrap_err();
        assert!(e.to_string().contains("bind_password"), "{e}");
        let w: WatermarkAttribute = serde_json::from_str("\"uSNChanged\"").unwrap();
        assert_eq!(w, WatermarkAttribute::UsnChanged);
    }

    #[test]
    fn validation_table() {
        type Edit = fn(&mut LdapConfig);
        let cases: Vec<(&str, Edit, Vec<&str>)> = vec![
            (
                "plain refused",
                |c| c.url = "ldap://dc1".into(),
                vec!["url"],
            ),
            (
                "plain allowed",
                |c| {
                    c.url = "ldap://dc1".into();
                    c.allow_plain = true;
                },
                vec![],
            ),
            (
                "starttls ok",
                |c| {
                    c.url = "ldap://dc1:389".into();
                    c.start_tls = true;
                },
                vec![],
            ),
            (
                "starttls on ldaps",
                |c| c.start_tls = true,
                vec!["start_tls"],
            ),
            ("bad scheme", |c| c.url = "http://dc1".into(), vec!["url"]),
            ("no host", |c| c.url = "ldaps://:636".into(), vec!["url"]),
            (
                "bad port",
                |c| c.url = "ldaps://dc1:99999".into(),
                vec!["url"],
            ),
            (
                "bad ca",
                |c| c.ca_pem = Some("not pem".into()),
                vec!["ca_pem"],
            ),
            (
                "dn without ref",
                |c| c.bind_password_ref = None,
                vec!["bind_password_ref"],
            ),
            ("ref without dn", |c| c.bind_dn = None, vec!["bind_dn"]),
            ("page size 0", |c| c.page_size = 0, vec!["page_size"]),
            ("page size big", |c| c.page_size = 5001, vec!["page_size"]),
            ("timeout", |c| c.timeout_ms = 0, vec!["timeout_ms"]),
            (
                "anchor",
                |c| c.anchor_attribute = "entry UUID".into(),
                vec!["anchor_attribute"],
            ),
            (
                "binary attr",
                |c| c.binary_attributes.push(String::new()),
                vec!["binary_attributes[5]"],
            ),
            (
                "no object types",
                |c| c.object_types.clear(),
                vec!["object_types"],
            ),
            (
                "several at once",
                |c| {
                    let ot = c.object_types.get_mut("people").expect("people");
                    ot.base_dn = " ".into();
                    ot.filter = "(&(objectClass=person)".into();
                    ot.attributes = vec!["cn".into(), "bad name".into()];
                    c.page_size = 0;
                },
                vec![
                    "page_size",
                    "object_types.people.base_dn",
                    "object_types.people.filter",
                    "object_types.people.attributes[1]",
                ],
            ),
            (
                "filter without parens",
                |c| {
                    c.object_types.get_mut("people").expect("people").filter =
                        "objectClass=person".into();
                },
                vec![],
            ),
        ];
        for (name, edit, want) in cases {
            let mut c = valid();
            edit(&mut c);
            let got: Vec<String> = c
                .validate()
                .err()
                .unwrap_or_default()
                .into_iter()
                .map(|p| p.path)
                .collect();
            let mut got_sorted = got.clone();
            got_sorted.sort();
            let mut want_sorted: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            want_sorted.sort();
            assert_eq!(got_sorted, want_sorted, "case {name}: {got:?}");
        }
    }

    #[test]
    fn new_needs_the_password_and_never_shows_it() {
        let e = LdapConnector::new(valid(), None).unwrap_err();
        assert!(e.to_string().contains("bind_password_ref"), "{e}");
        let c = LdapConnector::new(valid(), Some("s3cr3t-value".into())).expect("connector");
        assert!(!format!("{c:?}").contains("s3cr3t-value"));
    }

    #[test]
    fn watermarks_compare_by_kind() {
        use std::cmp::Ordering::*;
        let u = WatermarkAttribute::UsnChanged;
        assert_eq!(u.compare("999", "1000"), Some(Less));
        let t = WatermarkAttribute::ModifyTimestamp;
        assert_eq!(
            t.compare("20261126012233Z", "20261126012233.5Z"),
            Some(Less)
        );
        assert_eq!(
            t.compare("20261126012234Z", "20261126012233.5Z"),
            Some(Greater)
        );
        assert_eq!(
            t.compare("20261126012233.50Z", "20261126012233.5Z"),
            Some(Equal)
        );
        let c = WatermarkAttribute::EntryCsn;
        assert_eq!(
            c.compare(
                "20261126012233.000001Z#000000#000#000000",
                "20261126012233.000002Z#000000#000#000000"
            ),
            Some(Less)
        );
        assert!(c.check("garbage").is_err());
        assert!(u.check("12a").is_err());
    }

    #[test]
    fn guid_anchor_uses_ad_text_form() {
        let b = [
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff,
        ];
        assert_eq!(guid_string(&b), "00112233-4455-6677-8899-aabbccddeeff");
    }
}

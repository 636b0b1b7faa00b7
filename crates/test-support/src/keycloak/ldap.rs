//! Keycloak's LDAP user federation as admin-API components: the user-storage provider and its
//! group mapper. Field names follow the admin console's labels; `component` renders the keys
//! Keycloak stores (every config value is a list of strings).

use serde_json::{json, Value};

/// How Keycloak treats the directory (the console's "Edit mode").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditMode {
    ReadOnly,
    Writable,
    Unsynced,
}

impl EditMode {
    fn as_str(self) -> &'static str {
        match self {
            EditMode::ReadOnly => "READ_ONLY",
            EditMode::Writable => "WRITABLE",
            EditMode::Unsynced => "UNSYNCED",
        }
    }
}

/// An LDAP user-storage provider ("User federation → LDAP").
#[derive(Debug, Clone)]
pub struct LdapFederation {
    pub name: String,
    /// `ldaps://…` or `ldap://…`; LDAPS certificates are checked against Keycloak's truststore.
    pub connection_url: String,
    pub start_tls: bool,
    pub bind_dn: String,
    pub bind_credential: String,
    pub users_dn: String,
    pub user_object_classes: Vec<String>,
    /// Extra LDAP filter for users (empty: none).
    pub user_filter: String,
    pub username_attribute: String,
    pub rdn_attribute: String,
    pub uuid_attribute: String,
    /// Subtree below `users_dn` (otherwise one level).
    pub subtree: bool,
    pub edit_mode: EditMode,
    pub import_enabled: bool,
    pub pagination: bool,
    /// Page size of the sync's searches and users imported per transaction.
    pub batch_size: u32,
    /// Keycloak's vendor presets: `other`, `ad`, `rhds`, `tivoli`, `edirectory`.
    pub vendor: String,
}

impl LdapFederation {
    /// The settings a customer would pick for an OpenLDAP directory of `inetOrgPerson`
    /// entries: username and RDN `uid`, UUID `entryUUID`, read-only, users imported, pages of
    /// 500, subtree search.
    pub fn openldap(
        connection_url: impl Into<String>,
        bind_dn: impl Into<String>,
        bind_credential: impl Into<String>,
        users_dn: impl Into<String>,
    ) -> Self {
        LdapFederation {
            name: "ldap".into(),
            connection_url: connection_url.into(),
            start_tls: false,
            bind_dn: bind_dn.into(),
            bind_credential: bind_credential.into(),
            users_dn: users_dn.into(),
            user_object_classes: vec!["inetOrgPerson".into()],
            user_filter: String::new(),
            username_attribute: "uid".into(),
            rdn_attribute: "uid".into(),
            uuid_attribute: "entryUUID".into(),
            subtree: true,
            edit_mode: EditMode::ReadOnly,
            import_enabled: true,
            pagination: true,
            batch_size: 500,
            vendor: "other".into(),
        }
    }

    /// The component representation for `POST /admin/realms/{realm}/components`.
    pub(crate) fn component(&self, realm_id: &str) -> Value {
        let b = |v: bool| if v { "true" } else { "false" };
        json!({
            "name": self.name,
            "providerId": "ldap",
            "providerType": "org.keycloak.storage.UserStorageProvider",
            "parentId": realm_id,
            "config": {
                "enabled": ["true"],
                "priority": ["0"],
                "vendor": [self.vendor],
                "connectionUrl": [self.connection_url],
                "startTls": [b(self.start_tls)],
                "useTruststoreSpi": ["always"],
                "connectionPooling": ["true"],
                "authType": ["simple"],
                "bindDn": [self.bind_dn],
                "bindCredential": [self.bind_credential],
                "usersDn": [self.users_dn],
                "userObjectClasses": [self.user_object_classes.join(", ")],
                "customUserSearchFilter": [self.user_filter],
                "usernameLDAPAttribute": [self.username_attribute],
                "rdnLDAPAttribute": [self.rdn_attribute],
                "uuidLDAPAttribute": [self.uuid_attribute],
                "searchScope": [if self.subtree { "2" } else { "1" }],
                "editMode": [self.edit_mode.as_str()],
                "importEnabled": [b(self.import_enabled)],
                "syncRegistrations": ["false"],
                "pagination": [b(self.pagination)],
                "batchSizeForSync": [self.batch_size.to_string()],
                // Syncs only when asked: no periodic work during measurements.
                "fullSyncPeriod": ["-1"],
                "changedSyncPeriod": ["-1"],
                "trustEmail": ["false"],
                "allowKerberosAuthentication": ["false"],
                "useKerberosForPasswordAuthentication": ["false"],
            }
        })
    }
}

/// A `group-ldap-mapper`: groups under `groups_dn` become Keycloak groups, membership read from
/// the groups' member attribute.
#[derive(Debug, Clone)]
pub struct GroupMapper {
    pub name: String,
    pub groups_dn: String,
    pub name_attribute: String,
    pub object_classes: Vec<String>,
    pub membership_attribute: String,
    /// `DN` (members are DNs) or `UID`.
    pub membership_type: String,
    pub membership_user_attribute: String,
    pub mode: EditMode,
    pub preserve_inheritance: bool,
}

impl GroupMapper {
    /// `groupOfNames` groups named by `cn` with `member` DNs, read-only.
    pub fn group_of_names(groups_dn: impl Into<String>) -> Self {
        GroupMapper {
            name: "groups".into(),
            groups_dn: groups_dn.into(),
            name_attribute: "cn".into(),
            object_classes: vec!["groupOfNames".into()],
            membership_attribute: "member".into(),
            membership_type: "DN".into(),
            membership_user_attribute: "uid".into(),
            mode: EditMode::ReadOnly,
            preserve_inheritance: false,
        }
    }

    pub(crate) fn component(&self, provider_id: &str) -> Value {
        json!({
            "name": self.name,
            "providerId": "group-ldap-mapper",
            "providerType": "org.keycloak.storage.ldap.mappers.LDAPStorageMapper",
            "parentId": provider_id,
            "config": {
                "groups.dn": [self.groups_dn],
                "group.name.ldap.attribute": [self.name_attribute],
                "group.object.classes": [self.object_classes.join(", ")],
                "preserve.group.inheritance": [if self.preserve_inheritance { "true" } else { "false" }],
                "ignore.missing.groups": ["false"],
                "membership.ldap.attribute": [self.membership_attribute],
                "membership.attribute.type": [self.membership_type],
                "membership.user.ldap.attribute": [self.membership_user_attribute],
                "memberof.ldap.attribute": ["memberOf"],
                "mode": [self.mode.as_str()],
                "user.roles.retrieve.strategy": ["LOAD_GROUPS_BY_MEMBER_ATTRIBUTE"],
                "drop.non.existing.groups.during.sync": ["false"],
                "groups.path": ["/"],
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_carry_the_console_settings() {
        let mut l = LdapFederation::openldap("ldaps://127.0.0.1:636", "cn=a", "pw", "ou=people");
        l.subtree = false;
        l.batch_size = 250;
        let c = l.component("realm-id");
        assert_eq!(c["parentId"], "realm-id");
        assert_eq!(c["config"]["searchScope"], json!(["1"]));
        assert_eq!(c["config"]["batchSizeForSync"], json!(["250"]));
        assert_eq!(c["config"]["editMode"], json!(["READ_ONLY"]));
        assert_eq!(c["config"]["uuidLDAPAttribute"], json!(["entryUUID"]));
        let g = GroupMapper::group_of_names("ou=groups").component("provider-id");
        assert_eq!(g["parentId"], "provider-id");
        assert_eq!(g["config"]["groups.dn"], json!(["ou=groups"]));
        assert_eq!(g["config"]["membership.attribute.type"], json!(["DN"]));
    }
}

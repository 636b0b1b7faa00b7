//! A real Keycloak federating a real slapd over LDAPS: the full sync imports every person and,
//! through the group mapper, every group with its members; a realm created from JSON keeps its clients.

use identitymesh_connectors::testing::{
    generate_people, Slapd, GROUPS_BASE, PEOPLE_BASE, ROOT_DN, ROOT_PASSWORD,
};
use identitymesh_test_support::keycloak::{
    Distribution, GroupMapper, Keycloak, LdapFederation, Options,
};
use serde_json::json;

const PEOPLE: usize = 60;

#[tokio::test]
async fn keycloak_federates_slapd_people_and_groups() {
    let tmp = tempfile::tempdir().unwrap();
    let directory = generate_people(PEOPLE, 7);
    let groups = directory.groups.len();
    let slapd = Slapd::launch(&tmp.path().join("slapd"), Some(&directory.ldif))
        .await
        .expect("starting slapd");
    let ca = tmp.path().join("directory-ca.pem");
    std::fs::write(&ca, slapd.ca_pem()).unwrap();

    let dist = Distribution::ensure().expect("fetching Keycloak");
    let mut kc = Keycloak::start(
        &dist,
        &tmp.path().join("keycloak"),
        Options {
            trusted_ca_files: vec![ca],
            ..Options::default()
        },
    )
    .await
    .expect("starting Keycloak");
    let java = kc.java_pid().expect("Keycloak's java process");
    let admin = kc.admin().unwrap();

    admin.create_realm("corp").await.unwrap();
    let provider = admin
        .add_ldap_federation(
            "corp",
            &LdapFederation::openldap(slapd.ldaps_url(), ROOT_DN, ROOT_PASSWORD, PEOPLE_BASE),
        )
        .await
        .unwrap();
    let mapper = admin
        .add_group_mapper("corp", &provider, &GroupMapper::group_of_names(GROUPS_BASE))
        .await
        .unwrap();

    let users = admin.sync_users("corp", &provider, true).await.unwrap();
    assert_eq!(
        (users.added, users.failed),
        (PEOPLE as u64, 0),
        "user sync: {users:?}; log:\n{}",
        kc.log_tail(60)
    );
    assert_eq!(admin.user_count("corp").await.unwrap(), PEOPLE as u64);
    // "Sync all users" runs the mappers' own syncs first: the groups are there already, and a
    // group sync of its own finds each of them again.
    assert_eq!(admin.group_count("corp").await.unwrap(), groups as u64);
    let again = admin.sync_mapper("corp", &provider, &mapper).await.unwrap();
    assert_eq!(
        (again.added, again.updated, again.failed),
        (0, groups as u64, 0),
        "group sync: {again:?}"
    );

    // One person as Keycloak sees it: linked to the provider, mail mapped, and member of the
    // group the generator put them in (person i is in group i mod the group count).
    let i = 10;
    let found = admin
        .get_json(&format!(
            "/realms/corp/users?username=user{i:06}&exact=true"
        ))
        .await
        .unwrap();
    let user = &found[0];
    assert_eq!(user["federationLink"], provider.as_str(), "{found}");
    assert_eq!(user["email"], format!("user{i:06}@example.org"), "{found}");
    let id = user["id"].as_str().unwrap();
    let member_of = admin
        .get_json(&format!("/realms/corp/users/{id}/groups"))
        .await
        .unwrap();
    let names: Vec<&str> = member_of
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(
        names,
        vec![format!("group{:04}", i % groups)],
        "{member_of}"
    );

    // A realm from a representation, as the sign-in tests will load one.
    admin
        .import_realm(&json!({
            "realm": "from-json",
            "enabled": true,
            "clients": [{"clientId": "identitymesh-admin-ui", "publicClient": true,
                         "redirectUris": ["https://127.0.0.1/*"]}]
        }))
        .await
        .unwrap();
    let clients = admin
        .get_json("/realms/from-json/clients?clientId=identitymesh-admin-ui")
        .await
        .unwrap();
    assert_eq!(clients.as_array().map(Vec::len), Some(1), "{clients}");

    assert!(kc.stop(), "Keycloak did not stop on SIGTERM");
    assert!(
        !std::path::Path::new(&format!("/proc/{java}")).exists(),
        "the java process {java} outlived stop()"
    );
}

//! Each check on hand-built histories that pass and that violate it.

use super::*;
use crate::chaos::history::{
    DeltaState, DirectoryOp, Endpoint, FinalState, ImportRun, Object, Record, DELETED,
};

/// A history whose entries are 100 ms apart unless told otherwise.
#[derive(Default)]
struct H(History);

impl H {
    fn add(&mut self, e: Event) -> &mut Self {
        let at = Duration::from_millis(100 * self.0.entries.len() as u64);
        self.0.push(at, e);
        self
    }
    fn at(&mut self, secs: f64, e: Event) -> &mut Self {
        self.0.push(Duration::from_secs_f64(secs), e);
        self
    }
}

fn fence(seq: i64, kind: &str, epoch: i64, instance: &str) -> Event {
    Event::Fence(FenceRow {
        seq,
        kind: kind.into(),
        epoch,
        instance: instance.into(),
        at: 0,
    })
}
fn endpoints(ready: &[(&str, &str)]) -> Event {
    Event::Endpoints {
        ready: ready
            .iter()
            .map(|(a, i)| Endpoint {
                address: (*a).into(),
                instance: Some((*i).into()),
            })
            .collect(),
    }
}
fn role(instance: &str, role: Role, epoch: i64) -> Event {
    Event::RoleReport {
        instance: instance.into(),
        role,
        epoch,
        incarnation: None,
    }
}
fn sent(op: u64, key: &str, value: &str) -> Event {
    Event::WriteSent {
        op,
        key: key.into(),
        value: value.into(),
    }
}
fn acked(op: u64, key: &str, value: &str) -> Event {
    Event::WriteAcked {
        op,
        key: key.into(),
        value: value.into(),
    }
}
fn failed(op: u64, key: &str, value: &str) -> Event {
    Event::WriteFailed {
        op,
        key: key.into(),
        value: value.into(),
        error: "connection reset".into(),
    }
}
fn read_back(records: &[(&str, &str)]) -> Event {
    Event::ReadBack {
        records: records
            .iter()
            .map(|(k, v)| Record {
                key: (*k).into(),
                value: (*v).into(),
            })
            .collect(),
    }
}
fn obj(id: &str, cn: &str) -> Object {
    Object {
        id: id.into(),
        attributes: [("cn".to_string(), vec![cn.to_string()])].into(),
    }
}
fn inject(fault: usize, kind: FaultKind) -> Event {
    Event::FaultInjected {
        fault,
        kind,
        detail: String::new(),
    }
}
fn heal(fault: usize, kind: FaultKind) -> Event {
    Event::FaultHealed {
        fault,
        kind,
        detail: String::new(),
    }
}

const R: usize = 2;

fn messages(v: &[Violation]) -> Vec<&str> {
    v.iter().map(|v| v.message.as_str()).collect()
}

#[test]
fn fencing_passes_on_ordered_epochs() {
    let mut h = H::default();
    h.add(fence(1, "promote", 1, "a"))
        .add(fence(2, "batch", 1, "a"))
        .add(fence(3, "promote", 2, "b"))
        .add(fence(4, "batch", 2, "b"))
        // Re-read rows count once; a repeated promote of the same epoch is idempotent.
        .add(fence(4, "batch", 2, "b"))
        .add(fence(5, "promote", 2, "b"));
    assert!(check_fencing(&h.0, R).is_empty());
}

#[test]
fn fencing_orders_by_journal_sequence_not_by_recording() {
    // The old-epoch commit was read after the promotion but committed before it (seq 2 < 3).
    let mut h = H::default();
    h.add(fence(1, "promote", 1, "a"))
        .add(fence(3, "promote", 2, "b"))
        .add(fence(2, "batch", 1, "a"));
    assert!(check_fencing(&h.0, R).is_empty());
}

#[test]
fn fencing_catches_old_epoch_commit_wrong_holder_and_backwards_epoch() {
    let mut h = H::default();
    h.add(fence(1, "promote", 1, "a"))
        .add(fence(2, "promote", 2, "b"))
        .add(fence(3, "batch", 1, "a"))
        .add(fence(4, "batch", 2, "a"))
        .add(fence(5, "promote", 1, "a"));
    let v = check_fencing(&h.0, R);
    assert_eq!(v.len(), 3, "{:?}", messages(&v));
    assert_eq!(v[0].index, 2);
    assert!(
        v[0].message.contains("under epoch 1 after epoch 2"),
        "{}",
        v[0].message
    );
    assert!(v[1].message.contains("which is b's"), "{}", v[1].message);
    assert!(v[2].message.contains("epoch 1 stored for a after epoch 2"));
    // The excerpt shows the entries around the violation, the offending one marked.
    assert!(
        v[0].excerpt.lines().any(|l| l.starts_with("> #2 ")),
        "{}",
        v[0].excerpt
    );
    assert_eq!(v[0].excerpt.lines().count(), 5);
}

fn writes_ok() -> H {
    let mut h = H::default();
    h.add(sent(1, "k1", "v1"))
        .add(acked(1, "k1", "v1"))
        .add(sent(2, "k1", "v2"))
        .add(acked(2, "k1", "v2"))
        .add(sent(3, "k2", "v3"))
        .add(acked(3, "k2", "v3"))
        // Failed: unknown outcome; here it was applied, which supersedes op 3.
        .add(sent(4, "k2", "v4"))
        .add(failed(4, "k2", "v4"))
        // Never acknowledged and not applied: nothing to find.
        .add(sent(5, "k3", "v5"))
        .add(failed(5, "k3", "v5"));
    h
}

#[test]
fn writes_pass_when_latest_or_later_values_are_read() {
    let mut h = writes_ok();
    h.add(read_back(&[("k1", "v2"), ("k2", "v4")]));
    assert!(
        check_writes(&h.0, R).is_empty(),
        "{:?}",
        check_writes(&h.0, R)
    );
}

#[test]
fn writes_accept_an_earlier_unacknowledged_write_applied_late() {
    // Op 4 timed out; op 6 was acknowledged; op 4 may still have committed after it.
    let mut h = writes_ok();
    h.add(sent(6, "k2", "v6"))
        .add(acked(6, "k2", "v6"))
        .add(read_back(&[("k1", "v2"), ("k2", "v4")]));
    assert!(check_writes(&h.0, R).is_empty());
    // But never an acknowledged earlier one.
    let mut h = writes_ok();
    h.add(sent(6, "k2", "v6"))
        .add(acked(6, "k2", "v6"))
        .add(read_back(&[("k1", "v2"), ("k2", "v3")]));
    assert_eq!(
        messages(&check_writes(&h.0, R)),
        ["acknowledged write op 6 (k2 = \"v6\") lost: read back \"v3\" of earlier op 3"]
    );
}

#[test]
fn writes_catch_a_lost_acknowledged_write() {
    let mut h = writes_ok();
    h.add(read_back(&[("k1", "v1"), ("k2", "v3")]));
    let v = check_writes(&h.0, R);
    assert_eq!(v.len(), 1, "{:?}", messages(&v));
    assert!(
        v[0].message.contains("op 2 (k1 = \"v2\") lost"),
        "{}",
        v[0].message
    );
    assert_eq!(v[0].index, 3, "points at the acknowledgement");
}

#[test]
fn writes_catch_absent_duplicate_and_phantom_values() {
    let mut h = writes_ok();
    h.add(read_back(&[("k2", "v4"), ("k2", "v4"), ("k9", "x")]));
    let v = check_writes(&h.0, R);
    let m = messages(&v);
    assert_eq!(v.len(), 3, "{m:?}");
    assert!(
        m.iter().any(|m| m.contains("k2 read back 2 times")),
        "{m:?}"
    );
    assert!(m
        .iter()
        .any(|m| m.contains("k9 has \"x\", which no write sent")));
    assert!(m
        .iter()
        .any(|m| m.contains("op 2 (k1 = \"v2\") lost: key absent")));
}

/// Secrets, schedules and connectors, as the campaign's writer records them: a schedule is
/// created (its spec the value) and later deleted.
fn mixed_writes() -> H {
    let mut h = H::default();
    h.add(sent(1, "secret:s0", "v1"))
        .add(acked(1, "secret:s0", "v1"))
        .add(sent(2, "schedule:100002s", "100002s"))
        .add(acked(2, "schedule:100002s", "100002s"))
        .add(sent(3, "schedule:100003s", "100003s"))
        .add(acked(3, "schedule:100003s", "100003s"))
        .add(sent(4, "schedule:100002s", DELETED))
        .add(acked(4, "schedule:100002s", DELETED))
        // A create and a delete whose outcomes are unknown.
        .add(sent(5, "schedule:100005s", "100005s"))
        .add(failed(5, "schedule:100005s", "100005s"))
        .add(sent(6, "schedule:100003s", DELETED))
        .add(failed(6, "schedule:100003s", DELETED))
        .add(sent(7, "secret:s0", "v7"))
        .add(acked(7, "secret:s0", "v7"));
    h
}

#[test]
fn writes_with_deletes_pass_when_deleted_keys_are_absent() {
    for records in [
        // The unknown delete was applied, the unknown create was not.
        vec![("secret:s0", "v7")],
        // Or the other way round.
        vec![
            ("secret:s0", "v7"),
            ("schedule:100003s", "100003s"),
            ("schedule:100005s", "100005s"),
        ],
    ] {
        let mut h = mixed_writes();
        h.add(read_back(&records));
        let v = check_writes(&h.0, R);
        assert!(v.is_empty(), "{records:?}: {:?}", messages(&v));
    }
}

#[test]
fn writes_catch_an_undone_delete_and_a_lost_secret() {
    let mut h = mixed_writes();
    h.add(read_back(&[
        ("secret:s0", "v1"),
        ("schedule:100002s", "100002s"),
        ("schedule:100003s", "100003s"),
    ]));
    let v = check_writes(&h.0, R);
    let m = messages(&v);
    assert_eq!(
        m,
        [
            "acknowledged delete op 4 of schedule:100002s undone: read back \"100002s\" of earlier op 2",
            "acknowledged write op 7 (secret:s0 = \"v7\") lost: read back \"v1\" of earlier op 1",
        ]
    );
    // Each points at the acknowledgement of the write that was lost.
    assert_eq!((v[0].index, v[1].index), (7, 13));
}

#[test]
fn writes_never_accept_the_tombstone_as_a_value() {
    let mut h = mixed_writes();
    h.add(read_back(&[
        ("secret:s0", "v7"),
        ("schedule:100002s", DELETED),
    ]));
    assert_eq!(
        messages(&check_writes(&h.0, R)),
        ["key schedule:100002s has \"<deleted>\", which no write sent"]
    );
}

#[test]
fn writes_need_a_read_back() {
    let h = writes_ok();
    let v = check_writes(&h.0, R);
    assert_eq!(
        messages(&v),
        ["acknowledged writes but no read-back was recorded"]
    );
}

fn final_state(directory: Vec<Object>, space: Vec<Object>, ids: &[(&str, u32)]) -> Event {
    Event::FinalState(Box::new(FinalState {
        directory,
        connector_space: space,
        identities_per_person: ids.iter().map(|(p, n)| ((*p).to_string(), *n)).collect(),
        orphan_identities: Vec::new(),
        final_import: None,
        after_delta: None,
    }))
}

#[test]
fn convergence_passes_when_equal() {
    let mut h = H::default();
    h.add(final_state(
        vec![obj("uid=a", "A"), obj("uid=b", "B")],
        vec![obj("uid=b", "B"), obj("uid=a", "A")],
        &[("uid=a", 1), ("uid=b", 1)],
    ));
    assert!(check_convergence(&h.0, R).is_empty());
}

#[test]
fn convergence_catches_missing_different_extra_duplicate_and_identity_counts() {
    let mut h = H::default();
    h.add(final_state(
        vec![obj("uid=a", "A"), obj("uid=b", "B"), obj("uid=c", "C")],
        vec![
            obj("uid=b", "Bee"),
            obj("uid=c", "C"),
            obj("uid=c", "C"),
            obj("uid=z", "Z"),
        ],
        &[("uid=a", 0), ("uid=b", 2), ("uid=c", 1)],
    ));
    let v = check_convergence(&h.0, R);
    let m = messages(&v);
    assert_eq!(
        m,
        [
            "uid=c is in the connector space twice",
            "uid=a is missing from the connector space (lost)",
            "uid=b differs from the directory in cn: directory [\"B\"], connector space [\"Bee\"]",
            "uid=z is in the connector space, not the directory",
            "person uid=a has 0 identities",
            "person uid=b has 2 identities",
        ]
    );
}

/// An entry with an anchor, a DN and one more attribute, as the campaign records them.
fn entry(anchor: &str, dn: &str, cn: &str) -> Object {
    Object {
        id: anchor.into(),
        attributes: [
            ("cn".to_string(), vec![cn.to_string()]),
            ("dn".to_string(), vec![dn.to_string()]),
        ]
        .into(),
    }
}

fn change(op: DirectoryOp, dn: &str, new_dn: Option<&str>, anchor: &str) -> Event {
    Event::DirectoryChange {
        op,
        dn: dn.into(),
        new_dn: new_dn.map(str::to_string),
        anchor: Some(anchor.into()),
        error: None,
    }
}

/// A writer's history: u1 added and renamed, u2 modified, u3 deleted; then the final state.
fn directory_history(space: Vec<Object>, orphans: &[&str], status: &str) -> H {
    let mut h = H::default();
    h.add(change(DirectoryOp::Add, "uid=u1,ou=p", None, "u1"))
        .add(change(DirectoryOp::Modify, "uid=u2,ou=p", None, "u2"))
        .add(change(
            DirectoryOp::Rename,
            "uid=u1,ou=p",
            Some("uid=u1b,ou=p"),
            "u1",
        ))
        .add(change(DirectoryOp::Delete, "uid=u3,ou=p", None, "u3"))
        .add(Event::FinalState(Box::new(FinalState {
            directory: vec![
                entry("u1", "uid=u1b,ou=p", "One"),
                entry("u2", "uid=u2,ou=p", "Two v2"),
            ],
            connector_space: space,
            identities_per_person: [("u1".to_string(), 1), ("u2".to_string(), 1)].into(),
            orphan_identities: orphans.iter().map(|s| s.to_string()).collect(),
            final_import: Some(ImportRun {
                run: "r9".into(),
                mode: "full".into(),
                status: status.into(),
                detail: "added 0, updated 1, deleted 1".into(),
            }),
            after_delta: None,
        })));
    h
}

/// The converged history with the connector space after the final delta set to `after`.
fn with_delta(after: Vec<Object>, status: &str) -> H {
    let mut h = directory_history(
        vec![
            entry("u2", "uid=u2,ou=p", "Two v2"),
            entry("u1", "uid=u1b,ou=p", "One"),
        ],
        &[],
        "succeeded",
    );
    let last = h.0.entries.last_mut().unwrap();
    let Event::FinalState(state) = &mut last.event else {
        unreachable!()
    };
    state.after_delta = Some(DeltaState {
        import: ImportRun {
            run: "r8".into(),
            mode: "delta".into(),
            status: status.into(),
            detail: "updated 2".into(),
        },
        connector_space: after,
    });
    h
}

#[test]
fn convergence_after_the_final_delta_allows_only_deletions_to_remain() {
    // u3 was deleted: a delta cannot see that, the full removes it.
    let h = with_delta(
        vec![
            entry("u1", "uid=u1b,ou=p", "One"),
            entry("u2", "uid=u2,ou=p", "Two v2"),
            entry("u3", "uid=u3,ou=p", "Three"),
        ],
        "succeeded",
    );
    let v = check_convergence(&h.0, R);
    assert!(v.is_empty(), "{:?}", messages(&v));
}

#[test]
fn convergence_catches_a_change_the_final_delta_lost() {
    // The delta kept u2's old version and never saw u1's rename.
    let h = with_delta(vec![entry("u2", "uid=u2,ou=p", "Two")], "succeeded");
    let m = check_convergence(&h.0, R);
    assert_eq!(
        messages(&m),
        [
            "after the final delta import, u1 (uid=u1b,ou=p) is missing in the connector space (a delta lost a change); its last recorded change: #2 Rename",
            "after the final delta import, u2 (uid=u2,ou=p) is stale in the connector space (a delta lost a change); its last recorded change: #1 Modify",
        ]
    );
    let h = with_delta(
        vec![
            entry("u1", "uid=u1b,ou=p", "One"),
            entry("u2", "uid=u2,ou=p", "Two v2"),
        ],
        "failed",
    );
    assert_eq!(
        messages(&check_convergence(&h.0, R)),
        ["the final delta import (run r8) ended failed: updated 2"]
    );
}

#[test]
fn convergence_passes_a_converged_directory_history() {
    let h = directory_history(
        vec![
            entry("u2", "uid=u2,ou=p", "Two v2"),
            entry("u1", "uid=u1b,ou=p", "One"),
        ],
        &[],
        "succeeded",
    );
    let v = check_convergence(&h.0, R);
    assert!(v.is_empty(), "{:?}", messages(&v));
}

#[test]
fn convergence_fails_on_a_lost_entry_pointing_at_its_last_change() {
    // The renamed u1 never reached the connector space.
    let h = directory_history(vec![entry("u2", "uid=u2,ou=p", "Two v2")], &[], "succeeded");
    let v = check_convergence(&h.0, R);
    assert_eq!(
        messages(&v),
        ["u1 (uid=u1b,ou=p) is missing from the connector space (lost); its last recorded change: #2 Rename"]
    );
    assert_eq!(v[0].index, 2, "the excerpt is centred on the rename");
    assert!(v[0].excerpt.contains("> #2 "), "{}", v[0].excerpt);
}

#[test]
fn convergence_fails_on_a_resurrected_entry_and_a_stale_rename() {
    // u3 was deleted but is still imported; u1 kept its old DN.
    let h = directory_history(
        vec![
            entry("u1", "uid=u1,ou=p", "One"),
            entry("u2", "uid=u2,ou=p", "Two v2"),
            entry("u3", "uid=u3,ou=p", "Three"),
        ],
        &["identity-of-u3"],
        "succeeded",
    );
    let v = check_convergence(&h.0, R);
    let m = messages(&v);
    assert_eq!(m.len(), 3, "{m:?}");
    assert_eq!(
        m[0],
        "u1 (uid=u1b,ou=p) differs from the directory in dn: directory [\"uid=u1b,ou=p\"], \
         connector space [\"uid=u1,ou=p\"]; its last recorded change: #2 Rename"
    );
    assert_eq!(
        m[1],
        "u3 (uid=u3,ou=p) is in the connector space, not the directory (resurrected: deleted from the directory at #3)"
    );
    assert_eq!(v[1].index, 3);
    assert_eq!(
        m[2],
        "identity identity-of-u3 is linked to no directory entry (left behind)"
    );
}

#[test]
fn convergence_fails_when_the_final_import_did_not_succeed() {
    let h = directory_history(
        vec![
            entry("u2", "uid=u2,ou=p", "Two v2"),
            entry("u1", "uid=u1b,ou=p", "One"),
        ],
        &[],
        "failed",
    );
    assert_eq!(
        messages(&check_convergence(&h.0, R)),
        ["the final full import (run r9) ended failed: added 0, updated 1, deleted 1"]
    );
}

#[test]
fn convergence_needs_a_final_state() {
    let mut h = H::default();
    h.add(endpoints(&[]));
    assert_eq!(
        messages(&check_convergence(&h.0, R)),
        ["no final state was recorded"]
    );
}

#[test]
fn single_endpoint() {
    let mut h = H::default();
    h.add(endpoints(&[("10.0.0.2", "a")]))
        .add(endpoints(&[]))
        .add(endpoints(&[("10.0.0.6", "b")]));
    assert!(check_single_endpoint(&h.0, R).is_empty());
    h.add(endpoints(&[("10.0.0.2", "a"), ("10.0.0.6", "b")]));
    let v = check_single_endpoint(&h.0, R);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].index, 3);
}

#[test]
fn single_active_per_epoch() {
    let mut h = H::default();
    h.add(role("a", Role::Active, 1))
        .add(role("b", Role::Standby, 1))
        .add(role("b", Role::Active, 2))
        // A stale report of the old epoch by its own holder is not a second active.
        .add(role("a", Role::Active, 1))
        .add(role("a", Role::Fenced, 1));
    assert!(check_single_active(&h.0, R).is_empty());
    h.add(role("a", Role::Active, 2))
        .add(role("a", Role::Active, 2));
    let v = check_single_active(&h.0, R);
    assert_eq!(messages(&v), ["a reports active at epoch 2, as b did"]);
    assert_eq!(v[0].index, 5);
}

#[test]
fn faults_healed() {
    let mut h = H::default();
    h.add(inject(0, FaultKind::Partition))
        .add(inject(1, FaultKind::KillActive))
        .add(heal(0, FaultKind::Partition));
    assert!(check_faults_healed(&h.0, R).is_empty());
    h.add(inject(2, FaultKind::DiskFull));
    let v = check_faults_healed(&h.0, R);
    assert_eq!(messages(&v), ["fault #2 (disk-full) was never healed"]);
}

/// a is active; it is killed at 10 s; b is ready and active at 12.5 s.
fn failover() -> H {
    let mut h = H::default();
    h.at(0.0, endpoints(&[("10.0.0.2", "a")]))
        .at(0.5, role("a", Role::Active, 1))
        .at(10.0, inject(0, FaultKind::KillActive))
        .at(10.2, role("b", Role::Standby, 1))
        .at(11.0, endpoints(&[]))
        .at(12.0, role("b", Role::Active, 2))
        .at(12.5, endpoints(&[("10.0.0.6", "b")]));
    h
}

#[test]
fn recovery_is_measured_to_a_single_ready_active() {
    let h = failover();
    let r = recoveries(&h.0);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].from_index, 2);
    assert_eq!(r[0].recovered_index, Some(6));
    assert_eq!(r[0].time(), Some(Duration::from_millis(2500)));
    let cfg = CheckerConfig::default();
    assert!(check_recovery(&h.0, &r, &cfg).is_empty());
    // Over a 2 s bound it is a violation.
    let tight = CheckerConfig {
        bounds: [(FaultKind::KillActive, Duration::from_secs(2))].into(),
        ..cfg
    };
    let v = check_recovery(&h.0, &r, &tight);
    assert_eq!(v.len(), 1);
    assert!(
        v[0].message
            .contains("2.500s after it cleared, bound 2.000s"),
        "{}",
        v[0].message
    );
}

#[test]
fn recovery_ignores_reports_from_before_the_fault() {
    // The endpoint still lists a and a's last report said active, but both predate the kill.
    let mut h = H::default();
    h.at(0.0, endpoints(&[("10.0.0.2", "a")]))
        .at(0.5, role("a", Role::Active, 1))
        .at(10.0, inject(0, FaultKind::KillActive))
        .at(11.0, role("b", Role::Standby, 1));
    let r = recoveries(&h.0);
    assert_eq!(r[0].recovered_at, None);
    let v = check_recovery(&h.0, &r, &CheckerConfig::default());
    assert_eq!(
        messages(&v),
        ["fault #0 (kill-active): no ready active afterwards"]
    );
    // A report after the fault from a, still the one ready endpoint, is a recovery.
    h.at(12.0, role("a", Role::Active, 1));
    assert_eq!(recoveries(&h.0)[0].recovered_index, Some(4));
}

fn relay(instance: Option<&str>) -> Event {
    Event::RelayReport {
        relay: "r1".into(),
        instance: instance.map(str::to_string),
    }
}

#[test]
fn recovery_waits_for_the_relays_on_the_active() {
    // The relay is killed at 5 s and started again at 8 s; it is back on a at 9.5 s.
    let mut h = H::default();
    h.at(0.0, endpoints(&[("10.0.0.2", "a")]))
        .at(0.5, role("a", Role::Active, 1))
        .at(0.6, relay(Some("a")))
        .at(5.0, inject(0, FaultKind::RelayKill))
        .at(5.5, relay(None))
        .at(8.0, heal(0, FaultKind::RelayKill))
        .at(8.5, role("a", Role::Active, 1))
        .at(9.0, relay(None))
        .at(9.5, relay(Some("a")));
    let r = recoveries(&h.0);
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].recovered_index, Some(8));
    assert_eq!(r[0].time(), Some(Duration::from_millis(1500)));
    // After a failover the relay must follow: connected to the old active is not recovered.
    let mut h = failover();
    h.at(12.6, relay(Some("a"))).at(14.0, relay(Some("b")));
    let r = recoveries(&h.0);
    assert_eq!(r[0].time(), Some(Duration::from_secs(4)));
}

#[test]
fn recovery_of_a_timed_fault_counts_from_its_heal_and_waits_for_overlaps() {
    let mut h = H::default();
    h.at(0.0, endpoints(&[("10.0.0.2", "a")]))
        .at(1.0, inject(0, FaultKind::Partition))
        .at(2.0, inject(1, FaultKind::DbStall))
        .at(3.0, heal(1, FaultKind::DbStall))
        .at(40.0, heal(0, FaultKind::Partition))
        .at(41.0, role("a", Role::Active, 1));
    let r = recoveries(&h.0);
    assert_eq!(r.len(), 2);
    let stall = r.iter().find(|r| r.kind == FaultKind::DbStall).unwrap();
    assert_eq!(stall.from, Duration::from_secs(3));
    assert_eq!(
        stall.clear,
        Some(Duration::from_secs(40)),
        "the partition was in force"
    );
    assert_eq!(stall.time(), Some(Duration::from_secs(38)));
    let part = r.iter().find(|r| r.kind == FaultKind::Partition).unwrap();
    assert_eq!(part.time(), Some(Duration::from_secs(1)));
    // 38 s after the stall's heal, but 1 s after it could clear: within the 30 s bound.
    assert!(check_recovery(&h.0, &r, &CheckerConfig::default()).is_empty());
}

#[test]
fn recovery_stats_per_kind() {
    let r: Vec<Recovery> = (1..=100u64)
        .map(|s| Recovery {
            fault: s as usize,
            kind: FaultKind::LinkCut,
            from_index: 0,
            from: Duration::ZERO,
            clear: Some(Duration::ZERO),
            recovered_index: Some(1),
            recovered_at: Some(Duration::from_secs(s)),
        })
        .chain(std::iter::once(Recovery {
            fault: 0,
            kind: FaultKind::RelayKill,
            from_index: 0,
            from: Duration::ZERO,
            clear: Some(Duration::ZERO),
            recovered_index: None,
            recovered_at: None,
        }))
        .collect();
    let s = recovery_stats(&r);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].kind, FaultKind::LinkCut);
    assert_eq!((s[0].faults, s[0].recovered), (100, 100));
    assert_eq!(s[0].p50, Some(Duration::from_secs(50)));
    assert_eq!(s[0].p99, Some(Duration::from_secs(99)));
    assert_eq!(s[0].max, Some(Duration::from_secs(100)));
    assert_eq!((s[1].faults, s[1].recovered, s[1].p50), (1, 0, None));
}

#[test]
fn check_all_passes_a_clean_history_and_counts() {
    let mut h = failover();
    h.at(13.0, fence(1, "promote", 1, "a"))
        .at(13.0, fence(2, "promote", 2, "b"))
        .at(13.1, sent(1, "k", "v1"))
        .at(13.2, acked(1, "k", "v1"))
        .at(20.0, read_back(&[("k", "v1")]))
        .at(
            21.0,
            final_state(
                vec![obj("uid=a", "A")],
                vec![obj("uid=a", "A")],
                &[("uid=a", 1)],
            ),
        );
    let v = check_all(&h.0, &CheckerConfig::default());
    assert!(v.passed(), "{:?}", v.violations().collect::<Vec<_>>());
    assert_eq!(v.checks.len(), Check::ALL.len());
    assert_eq!((v.acknowledged_writes, v.objects_compared), (1, 1));
    assert_eq!(v.stats.len(), 1);
    // One bad event fails exactly its check.
    h.at(22.0, endpoints(&[("10.0.0.2", "a"), ("10.0.0.6", "b")]));
    let v = check_all(&h.0, &CheckerConfig::default());
    let failed: Vec<Check> = v
        .checks
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(failed, [Check::SingleEndpoint]);
}

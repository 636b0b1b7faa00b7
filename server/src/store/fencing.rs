//! The fencing rules, written once for every backend: each backend reads the fence row under
//! its lock and asks these functions what to do, so SQLite and SQL Server cannot drift apart.
//!
//! The holder of an epoch is an instance name *and* the incarnation of the process that took
//! it. Pod names are stable, so a recreated `im-b` and the old `im-b` still running on a
//! cut-off node share a name; only the incarnation (random at process start) tells them apart.

use super::{Fence, FenceToken, Heartbeat, PromoteOutcome, Role, StoreError};

/// True when `token` is exactly the stored holder of the stored epoch.
pub fn holds(fence: &Fence, token: &FenceToken) -> bool {
    fence.epoch == token.epoch
        && fence.holder == token.instance
        && fence.holder_incarnation == token.incarnation
}

/// A fenced write may commit only while its token holds the fence.
pub fn check(fence: &Fence, token: &FenceToken) -> Result<(), StoreError> {
    if holds(fence, token) {
        return Ok(());
    }
    Err(fenced(fence, token.epoch))
}

/// The error of a write, or a heartbeat, made with epoch `own` by a process that does not hold
/// the fence.
fn fenced(fence: &Fence, own: i64) -> StoreError {
    StoreError::Fenced {
        stored: fence.epoch,
        holder: fence.holder_label(),
        own,
    }
}

/// Whether a promotion to `claim.epoch` by `claim`'s process may be written. Idempotent only
/// for the very process that holds the epoch (a retry after a lost response); any other
/// process, including a new incarnation under the same name, needs a greater epoch.
pub fn promote(fence: &Fence, claim: &FenceToken) -> Result<PromoteOutcome, StoreError> {
    if holds(fence, claim) {
        return Ok(PromoteOutcome::AlreadyHeld);
    }
    if claim.epoch <= fence.epoch {
        return Err(StoreError::StaleEpoch {
            requested: claim.epoch,
            stored: fence.epoch,
            holder: fence.holder_label(),
        });
    }
    Ok(PromoteOutcome::Promoted)
}

/// The role a heartbeat records: a claim to be active that does not hold the fence is recorded
/// as fenced (and the heartbeat fails), so the registry never shows two actives.
pub fn heartbeat_role(fence: &Fence, hb: &Heartbeat) -> Role {
    let claim = FenceToken {
        instance: hb.instance.clone(),
        incarnation: hb.incarnation.clone(),
        epoch: hb.epoch,
    };
    if hb.role == Role::Active && !holds(fence, &claim) {
        Role::Fenced
    } else {
        hb.role
    }
}

/// What a heartbeat writes and what it answers: the role [`heartbeat_role`] records and, when
/// that is not the role claimed, [`StoreError::Fenced`], returned once the row is written (the
/// registry must show the demotion even though the call fails).
pub fn heartbeat(fence: &Fence, hb: &Heartbeat) -> (Role, Result<(), StoreError>) {
    let role = heartbeat_role(fence, hb);
    if role == hb.role {
        (role, Ok(()))
    } else {
        (role, Err(fenced(fence, hb.epoch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(epoch: i64, holder: &str, incarnation: &str) -> Fence {
        Fence {
            epoch,
            holder: holder.into(),
            holder_incarnation: incarnation.into(),
        }
    }

    fn token(instance: &str, incarnation: &str, epoch: i64) -> FenceToken {
        FenceToken {
            instance: instance.into(),
            incarnation: incarnation.into(),
            epoch,
        }
    }

    #[test]
    fn check_needs_name_incarnation_and_epoch() {
        let f = fence(7, "im-b", "p2");
        let cases = [
            (token("im-b", "p2", 7), true),
            // The old process of a recreated pod: same name, same epoch, other incarnation.
            (token("im-b", "p1", 7), false),
            (token("im-a", "p2", 7), false),
            (token("im-b", "p2", 6), false),
            (token("im-b", "p2", 8), false),
        ];
        for (t, ok) in cases {
            assert_eq!(check(&f, &t).is_ok(), ok, "{t:?}");
            if let Err(StoreError::Fenced { stored, own, .. }) = check(&f, &t) {
                assert_eq!((stored, own), (7, t.epoch));
            }
        }
    }

    #[test]
    fn promote_is_idempotent_only_for_the_same_process() {
        let f = fence(7, "im-b", "p2");
        let cases: [(FenceToken, Result<PromoteOutcome, i64>); 6] = [
            (token("im-b", "p2", 7), Ok(PromoteOutcome::AlreadyHeld)),
            (token("im-b", "p1", 7), Err(7)),
            (token("im-a", "x", 7), Err(7)),
            (token("im-a", "x", 3), Err(7)),
            (token("im-b", "p3", 8), Ok(PromoteOutcome::Promoted)),
            (token("im-b", "p2", 9), Ok(PromoteOutcome::Promoted)),
        ];
        for (claim, want) in cases {
            let got = promote(&f, &claim).map_err(|e| match e {
                StoreError::StaleEpoch { stored, .. } => stored,
                other => panic!("{other}"),
            });
            assert_eq!(got, want, "{claim:?}");
        }
    }

    #[test]
    fn a_stale_active_heartbeat_is_recorded_as_fenced() {
        let f = fence(7, "im-b", "p2");
        let hb = |role, incarnation: &str, epoch| Heartbeat {
            instance: "im-b".into(),
            incarnation: incarnation.into(),
            host: "h".into(),
            role,
            epoch,
            version: "v".into(),
            started_at_ms: 0,
            now_ms: 0,
        };
        assert_eq!(heartbeat_role(&f, &hb(Role::Active, "p2", 7)), Role::Active);
        assert_eq!(heartbeat_role(&f, &hb(Role::Active, "p1", 7)), Role::Fenced);
        assert_eq!(heartbeat_role(&f, &hb(Role::Active, "p2", 6)), Role::Fenced);
        // A standby claims nothing, whatever its epoch.
        assert_eq!(
            heartbeat_role(&f, &hb(Role::Standby, "p1", 6)),
            Role::Standby
        );
    }

    #[test]
    fn a_heartbeat_fails_only_when_it_records_another_role_than_claimed() {
        let f = fence(7, "im-b", "p2");
        let cases = [
            // (claimed role, incarnation, epoch) -> (recorded role, answer: Err(own epoch))
            ((Role::Active, "p2", 7), (Role::Active, Ok(()))),
            ((Role::Active, "p1", 7), (Role::Fenced, Err(7))),
            ((Role::Active, "p2", 6), (Role::Fenced, Err(6))),
            ((Role::Standby, "p1", 6), (Role::Standby, Ok(()))),
            ((Role::Fenced, "p1", 6), (Role::Fenced, Ok(()))),
        ];
        for ((role, incarnation, epoch), want) in cases {
            let hb = Heartbeat {
                instance: "im-b".into(),
                incarnation: incarnation.into(),
                host: "h".into(),
                role,
                epoch,
                version: "v".into(),
                started_at_ms: 0,
                now_ms: 0,
            };
            let (recorded, answer) = heartbeat(&f, &hb);
            let answer = answer.map_err(|e| match e {
                StoreError::Fenced { stored: 7, own, .. } => own,
                other => panic!("{other}"),
            });
            assert_eq!((recorded, answer), want, "{hb:?}");
        }
    }

    #[test]
    fn errors_name_the_holder_and_its_incarnation() {
        let f = fence(7, "im-b", "p2");
        let e = check(&f, &token("im-b", "p1", 7)).unwrap_err().to_string();
        assert!(e.contains("im-b") && e.contains("p2"), "{e}");
    }
}

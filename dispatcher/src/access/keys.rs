//! Who may manage which API key. A fleet admin manages every key. A member
//! makes member keys in its own project, and revokes only the keys it made
//! and itself: never a fleet-admin key, never another member's.

use crate::access::auth::{Caller, Role};
use crate::store::ApiKeyRow;

/// Why a caller may not revoke a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not the caller's to see: another project's key.
    NotFound,
    /// The caller sees it but may not revoke it; the reason, in words.
    Denied(&'static str),
}

/// Whether `caller` may revoke `key`.
pub(crate) fn may_revoke(caller: &Caller, key: &ApiKeyRow) -> Result<(), Refusal> {
    if caller.role == Role::FleetAdmin {
        return Ok(());
    }
    if key.project != caller.project {
        return Err(Refusal::NotFound);
    }
    if Role::parse(&key.role) == Some(Role::FleetAdmin) {
        return Err(Refusal::Denied(
            "only a fleet admin revokes a fleet-admin key",
        ));
    }
    let own = caller.key_id.as_deref() == Some(key.id.as_str());
    if own || key.creator == caller.identity() {
        Ok(())
    } else {
        Err(Refusal::Denied(
            "a member revokes only the keys it made, and itself; ask a fleet admin",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(key: &str) -> Caller {
        Caller {
            project: "p".into(),
            role: Role::Member,
            key_id: Some(key.into()),
            certificate: None,
        }
    }

    fn key(id: &str, project: &str, role: Role, creator: &str) -> ApiKeyRow {
        ApiKeyRow {
            id: id.into(),
            project: project.into(),
            role: role.as_str().into(),
            display_name: String::new(),
            creator: creator.into(),
            create_time: chrono::Utc::now(),
            revoke_time: None,
        }
    }

    #[test]
    fn a_member_revokes_the_keys_it_made_and_itself_only() {
        let m = member("m1");
        assert_eq!(
            may_revoke(&m, &key("k2", "p", Role::Member, "keys/m1")),
            Ok(())
        );
        assert_eq!(
            may_revoke(&m, &key("m1", "p", Role::Member, "bootstrap")),
            Ok(())
        );
        assert!(matches!(
            may_revoke(&m, &key("k3", "p", Role::Member, "keys/m2")),
            Err(Refusal::Denied(_))
        ));
        assert!(matches!(
            may_revoke(&m, &key("a1", "p", Role::FleetAdmin, "keys/m1")),
            Err(Refusal::Denied(_))
        ));
        assert_eq!(
            may_revoke(&m, &key("k4", "q", Role::Member, "keys/m1")),
            Err(Refusal::NotFound)
        );
    }

    #[test]
    fn a_fleet_admin_revokes_any_key() {
        let admin = Caller {
            role: Role::FleetAdmin,
            ..member("a0")
        };
        assert_eq!(
            may_revoke(&admin, &key("a1", "q", Role::FleetAdmin, "bootstrap")),
            Ok(())
        );
    }
}

//! The audit trail: who did what to which resource. Handlers record an
//! action once it has succeeded; a failure to record is logged and counted
//! (`berth_audit_failures_total`), and never undoes the action.

pub(crate) use crate::records::AuditEvent;
use crate::store::Store;

/// Records actions.
#[derive(Clone)]
pub(crate) struct Audit {
    pub store: Store,
}

impl Audit {
    /// Records that `identity` did `action` to `resource` in `project`.
    pub async fn record(
        &self,
        project: &str,
        identity: &str,
        action: &str,
        resource: &str,
        detail: serde_json::Value,
    ) {
        if let Err(e) = self
            .store
            .insert_audit(project, identity, action, resource, &detail)
            .await
        {
            metrics::counter!(crate::metrics::AUDIT_FAILURES).increment(1);
            tracing::error!(error = %e, project, identity, action, resource, "recording an audit event failed");
        }
    }

    pub async fn list(
        &self,
        project: &str,
        resource: &str,
        after: i64,
        limit: i64,
    ) -> crate::error::Result<Vec<AuditEvent>> {
        self.store.list_audit(project, resource, after, limit).await
    }
}

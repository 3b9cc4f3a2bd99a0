//! `berth.v1.Audit`.

use berth_common::time::to_timestamp;
use berth_proto::v1::{self as pb, audit_server::Audit as AuditApi};
use tonic::{Request, Response, Status};

use super::pages::{self, page_size};
use crate::access::auth::caller;
use crate::error::Error;
use crate::ops::audit::{Audit, AuditEvent};

/// Serves `berth.v1.Audit`.
#[derive(Clone)]
pub struct AuditService {
    pub(crate) audit: Audit,
}

impl From<AuditEvent> for pb::AuditEvent {
    fn from(e: AuditEvent) -> Self {
        Self {
            id: e.id,
            time: Some(to_timestamp(e.time)),
            identity: e.identity,
            action: e.action,
            resource: e.resource,
            detail_json: e.detail.to_string(),
        }
    }
}

#[tonic::async_trait]
impl AuditApi for AuditService {
    async fn list_audit_events(
        &self,
        r: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let limit = page_size(r.page_size, 100)?;
        // A bare session id is its name.
        let resource = match uuid::Uuid::parse_str(&r.resource) {
            Ok(id) => berth_common::names::session_name(id),
            Err(_) => r.resource.clone(),
        };
        let listing = format!("ListAuditEvents\n{}\n{resource}", who.project);
        let after = match pages::decode(&r.page_token, &listing)? {
            None => 0,
            Some(c) => c.parse().map_err(|_| {
                Error::invalid(
                    "page_token",
                    "not a token from a previous ListAuditEvents response",
                )
            })?,
        };
        let events = self
            .audit
            .list(&who.project, &resource, after, limit)
            .await?;
        let next_page_token = match events.last() {
            Some(last) if events.len() as i64 == limit => {
                pages::encode(&listing, &last.id.to_string())
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }
}

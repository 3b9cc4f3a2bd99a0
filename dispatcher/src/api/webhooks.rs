//! `berth.v1.Webhooks`.

use berth_common::time::to_timestamp;
use berth_proto::v1::{self as pb, webhooks_server::Webhooks as WebhooksApi};
use tonic::{Request, Response, Status};

use super::pages::{self, page_size};
use crate::access::auth::caller;
use crate::error::Error;
use crate::ops::outbound::{DeliveryRecord, Subscription, Subscriptions};
use crate::ops::webhooks::{PATH_PREFIX, Webhook, Webhooks};

/// Serves `berth.v1.Webhooks`.
#[derive(Clone)]
pub struct WebhooksService {
    pub(crate) webhooks: Webhooks,
    pub(crate) subscriptions: Subscriptions,
}

const SUBSCRIPTIONS: &str = "subscriptions/";

impl From<Subscription> for pb::Subscription {
    fn from(s: Subscription) -> Self {
        Self {
            name: format!("{SUBSCRIPTIONS}{}", s.subscription_id),
            subscription_id: s.subscription_id,
            url: s.url,
            event_types: s.event_types,
            create_time: Some(to_timestamp(s.create_time)),
            creator: s.creator,
        }
    }
}

impl From<DeliveryRecord> for pb::Delivery {
    fn from(d: DeliveryRecord) -> Self {
        let status = match d.status.as_str() {
            "delivered" => pb::DeliveryStatus::Delivered,
            "failed" => pb::DeliveryStatus::Failed,
            _ => pb::DeliveryStatus::Pending,
        };
        Self {
            id: d.id.to_string(),
            event_type: d.event_type,
            session: berth_common::names::session_name(d.session_id),
            seq: d.seq,
            status: status as i32,
            attempts: d.attempts,
            last_status_code: d.last_status_code,
            last_error: d.last_error,
            create_time: Some(to_timestamp(d.create_time)),
            next_attempt_time: (status == pb::DeliveryStatus::Pending)
                .then(|| to_timestamp(d.next_attempt_time)),
            deliver_time: d.deliver_time.map(to_timestamp),
        }
    }
}

const PREFIX: &str = "webhooks/";

fn webhook_id(name: &str) -> Result<&str, Error> {
    let id = name.strip_prefix(PREFIX).unwrap_or(name);
    if id.is_empty() {
        return Err(Error::invalid(
            "name",
            "required: `webhooks/{id}` or the id",
        ));
    }
    Ok(id)
}

impl From<Webhook> for pb::Webhook {
    fn from(w: Webhook) -> Self {
        Self {
            name: format!("{PREFIX}{}", w.webhook_id),
            path: format!("{PATH_PREFIX}{}", w.id),
            webhook_id: w.webhook_id,
            agent: w.agent,
            labels: w.labels.into_iter().collect(),
            create_time: Some(to_timestamp(w.create_time)),
            creator: w.creator,
            slack: w.slack_bot_secret.map(|id| pb::SlackApp {
                bot_token_secret: format!("secrets/{id}"),
                signing_secret: String::new(),
            }),
        }
    }
}

#[tonic::async_trait]
impl WebhooksApi for WebhooksService {
    async fn create_webhook(
        &self,
        r: Request<pb::CreateWebhookRequest>,
    ) -> Result<Response<pb::CreateWebhookResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let w = r.webhook.unwrap_or_default();
        let labels = super::convert::labels(w.labels)?;
        let (webhook, secret) = self
            .webhooks
            .create(
                &who.project,
                &who.identity(),
                &r.webhook_id,
                &w.agent,
                labels,
                w.slack.map(|s| crate::ops::webhooks::slack::NewSlackApp {
                    bot_token_secret: s.bot_token_secret,
                    signing_secret: s.signing_secret,
                }),
            )
            .await?;
        Ok(Response::new(pb::CreateWebhookResponse {
            webhook: Some(webhook.into()),
            secret,
        }))
    }

    async fn get_webhook(
        &self,
        r: Request<pb::GetWebhookRequest>,
    ) -> Result<Response<pb::Webhook>, Status> {
        let who = caller(&r)?;
        let id = webhook_id(&r.get_ref().name)?;
        Ok(Response::new(
            self.webhooks.get(&who.project, id).await?.into(),
        ))
    }

    async fn list_webhooks(
        &self,
        r: Request<pb::ListWebhooksRequest>,
    ) -> Result<Response<pb::ListWebhooksResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let limit = page_size(r.page_size, 100)?;
        let listing = format!("ListWebhooks\n{}", who.project);
        let after = pages::decode(&r.page_token, &listing)?.unwrap_or_default();
        let found = self.webhooks.list(&who.project, &after, limit).await?;
        let next_page_token = match found.last() {
            Some(last) if found.len() as i64 == limit => pages::encode(&listing, &last.webhook_id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListWebhooksResponse {
            webhooks: found.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn delete_webhook(
        &self,
        r: Request<pb::DeleteWebhookRequest>,
    ) -> Result<Response<pb::DeleteWebhookResponse>, Status> {
        let who = caller(&r)?;
        let id = webhook_id(&r.get_ref().name)?;
        self.webhooks
            .delete(&who.project, &who.identity(), id)
            .await?;
        Ok(Response::new(pb::DeleteWebhookResponse {}))
    }

    async fn create_subscription(
        &self,
        r: Request<pb::CreateSubscriptionRequest>,
    ) -> Result<Response<pb::CreateSubscriptionResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let s = r.subscription.unwrap_or_default();
        let (sub, secret) = self
            .subscriptions
            .create(
                &who.project,
                &who.identity(),
                &r.subscription_id,
                &s.url,
                s.event_types,
            )
            .await?;
        Ok(Response::new(pb::CreateSubscriptionResponse {
            subscription: Some(sub.into()),
            secret,
        }))
    }

    async fn list_subscriptions(
        &self,
        r: Request<pb::ListSubscriptionsRequest>,
    ) -> Result<Response<pb::ListSubscriptionsResponse>, Status> {
        let who = caller(&r)?;
        let subs = self.subscriptions.list(&who.project).await?;
        Ok(Response::new(pb::ListSubscriptionsResponse {
            subscriptions: subs.into_iter().map(Into::into).collect(),
        }))
    }

    async fn delete_subscription(
        &self,
        r: Request<pb::DeleteSubscriptionRequest>,
    ) -> Result<Response<pb::DeleteSubscriptionResponse>, Status> {
        let who = caller(&r)?;
        let name = &r.get_ref().name;
        let id = name.strip_prefix(SUBSCRIPTIONS).unwrap_or(name);
        self.subscriptions
            .delete(&who.project, &who.identity(), id)
            .await?;
        Ok(Response::new(pb::DeleteSubscriptionResponse {}))
    }

    async fn list_deliveries(
        &self,
        r: Request<pb::ListDeliveriesRequest>,
    ) -> Result<Response<pb::ListDeliveriesResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let id = r.name.strip_prefix(SUBSCRIPTIONS).unwrap_or(&r.name);
        let limit = page_size(r.page_size, 100)?;
        let log = self
            .subscriptions
            .deliveries(&who.project, id, limit)
            .await?;
        Ok(Response::new(pb::ListDeliveriesResponse {
            deliveries: log.into_iter().map(Into::into).collect(),
        }))
    }
}

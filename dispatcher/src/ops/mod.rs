//! The operations clients call, with no wire types: sessions (create,
//! steer, their life, reading them), agents, exports, schedules (and the
//! scheduler that fires them), inbound webhooks (and their server),
//! outbound subscriptions (and their deliverer), and the audit trail each
//! operation records into.

pub(crate) mod access;
pub(crate) mod agents;
pub(crate) mod audit;
pub(crate) mod export;
mod export_pdf;
pub(crate) mod oauth;
pub(crate) mod outbound;
pub(crate) mod schedules;
pub(crate) mod sessions;
pub(crate) mod slack_replies;
pub(crate) mod webhooks;

/// The HTTP(S) client the dispatcher calls out with (webhook subscribers,
/// OAuth token endpoints, Slack): HTTP/1.1, the system's CA roots.
pub(crate) type HttpsClient = berth_common::https::Client<http_body_util::Full<bytes::Bytes>>;

/// A new [`HttpsClient`]; fails when the system's CA roots cannot be read.
pub(crate) fn https_client() -> anyhow::Result<HttpsClient> {
    berth_common::https::client()
}

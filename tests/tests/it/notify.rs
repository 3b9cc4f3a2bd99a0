//! The outbox trigger (migration 0013) and the domain's rule of what
//! subscribers see (`berth_dispatcher::session::notify`) agree on every
//! event type the domain writes: a renamed event or status, or a payload
//! serialised differently, cannot silently stop webhooks.

use berth_common::events::{self as ev, payload};
use berth_dispatcher::session::SessionStatus;
use berth_dispatcher::session::notify::{BUDGET_REASON, SUBSCRIBER_EVENT_TYPES, subscriber_kinds};
use berth_proto::v1::{self as pb, webhooks_client::WebhooksClient};
use berth_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_trigger_agrees_with_the_domain() -> anyhow::Result<()> {
    // Deliveries go to a loopback port nothing listens on: only the queue
    // matters here.
    let cluster = TestCluster::builder()
        .configure_dispatcher(|cfg| cfg.subscription_allow_http_hosts = vec!["127.0.0.1:9".into()])
        .start()
        .await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo hi")).await?;
    stop_and_wait(&mut c, &s.name).await?;
    WebhooksClient::new(cluster.api())
        .create_subscription(pb::CreateSubscriptionRequest {
            subscription_id: "everything".into(),
            subscription: Some(pb::Subscription {
                url: "http://127.0.0.1:9/hook".into(),
                event_types: SUBSCRIBER_EVENT_TYPES
                    .iter()
                    .map(|t| t.to_string())
                    .collect(),
                ..Default::default()
            }),
        })
        .await?;

    let status = |status: SessionStatus, reason: &str| {
        (
            status.event_type(),
            payload::to_json(&payload::StatusChange {
                status: status.as_str().into(),
                reason: reason.into(),
                ..Default::default()
            }),
        )
    };
    let mut cases: Vec<(String, String)> = SessionStatus::ALL
        .into_iter()
        .map(|s| status(s, "user"))
        .collect();
    cases.push(status(SessionStatus::Stopped, BUDGET_REASON));
    cases.push(status(SessionStatus::Stopping, BUDGET_REASON));
    for t in [
        ev::AGENT_TOOL_PERMISSION,
        ev::AGENT_QUESTION,
        ev::AGENT_TOOL_PERMISSION_CANCELLED,
        ev::USER_TOOL_CONFIRMATION,
        ev::SESSION_TURN_LOST,
        ev::SESSION_ERROR,
        ev::SESSION_ACTIVITY,
    ] {
        cases.push((t.to_string(), "{}".to_string()));
    }

    let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.database_url).await?;
    for (i, (event_type, body)) in cases.iter().enumerate() {
        let seq = 1_000_000 + i as i64;
        sqlx::query(
            "INSERT INTO events (session_id, seq, id, type, payload) VALUES ($1::uuid, $2, $3, $4, $5)",
        )
        .bind(&s.id)
        .bind(seq)
        .bind(uuid::Uuid::new_v4())
        .bind(event_type)
        .bind(body)
        .execute(&mut db)
        .await?;
        let mut queued: Vec<String> = sqlx::query_scalar(
            "SELECT event_type FROM outbound_deliveries WHERE session_id = $1::uuid AND seq = $2",
        )
        .bind(&s.id)
        .bind(seq)
        .fetch_all(&mut db)
        .await?;
        queued.sort();
        let mut expected = subscriber_kinds(event_type, body);
        expected.sort();
        assert_eq!(
            queued, expected,
            "`{event_type}` {body}: the trigger queued {queued:?}, the domain says {expected:?}"
        );
    }
    cluster.shutdown().await
}

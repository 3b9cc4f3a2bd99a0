//! What the seed platforms' users rely on: schedules that fire exactly once
//! however many dispatchers run, and webhooks a sender signs.

use std::time::Duration;

use berth_proto::v1::{self as pb, schedules_client::SchedulesClient};
use berth_tests::{TEST_IMAGE, TestCluster};

/// Creates agent `id` on the test image.
async fn agent(cluster: &TestCluster, id: &str) -> anyhow::Result<()> {
    pb::agents_client::AgentsClient::new(cluster.api())
        .create_agent(pb::CreateAgentRequest {
            agent_id: id.into(),
            spec: Some(pb::AgentSpec {
                image: TEST_IMAGE.into(),
                ..Default::default()
            }),
        })
        .await?;
    Ok(())
}

fn schedule(agent: &str, cron: &str, tz: &str, input: &str) -> pb::Schedule {
    pb::Schedule {
        agent: agent.into(),
        cron: cron.into(),
        timezone: tz.into(),
        input: input.into(),
        ..Default::default()
    }
}

/// The field a refused call names, from its BadRequest detail.
fn field_of(s: &tonic::Status) -> String {
    berth_cli::errors::describe(s)
        .into_iter()
        .find_map(|d| {
            d.strip_prefix("field ")
                .and_then(|r| r.split_once(':'))
                .map(|(f, _)| f.to_string())
        })
        .unwrap_or_default()
}

fn secs(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().map_or(0, |t| t.seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_each_cron_time_once_through_a_rolling_update() -> anyhow::Result<()> {
    let mut cluster = TestCluster::builder()
        .capacity(8)
        .configure_dispatcher(|cfg| {
            cfg.schedule_poll = Duration::from_millis(200);
            cfg.schedule_min_interval = Duration::from_secs(2);
        })
        .start()
        .await?;
    // Clients of the second dispatcher: the first stops half-way.
    let mut c = cluster.add_dispatcher().await?;
    agent(&cluster, "ticker").await?;
    let mut sched = SchedulesClient::new(cluster.api_on_last_dispatcher()?);

    // Bad input names its field.
    for (cron, tz, agent_id, field) in [
        ("61 * * * *", "UTC", "ticker", "schedule.cron"),
        ("* * * * * *", "UTC", "ticker", "schedule.cron"), // every second: under the 2 s floor
        ("0 9 * * *", "Mars/Olympus", "ticker", "schedule.timezone"),
        ("0 9 * * *", "UTC", "nobody", "schedule.agent"),
    ] {
        let err = sched
            .create_schedule(pb::CreateScheduleRequest {
                schedule_id: "bad".into(),
                schedule: Some(schedule(agent_id, cron, tz, "hi")),
            })
            .await
            .expect_err(cron);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(field_of(&err), field, "{cron} {tz} {agent_id}: {err:?}");
    }

    // Cron times are read in the schedule's time zone: 09:00 in Tokyo is
    // 00:00 UTC.
    let tokyo = sched
        .create_schedule(pb::CreateScheduleRequest {
            schedule_id: "morning".into(),
            schedule: Some(schedule(
                "ticker",
                "0 9 * * *",
                "Asia/Tokyo",
                "good morning",
            )),
        })
        .await?
        .into_inner();
    assert_eq!(secs(&tokyo.next_fire_time) % 86_400, 0, "{tokyo:?}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    assert!(secs(&tokyo.next_fire_time) > now.as_secs() as i64);

    // Every 2 seconds, polled by both dispatchers every 200 ms.
    let s = sched
        .create_schedule(pb::CreateScheduleRequest {
            schedule_id: "tick".into(),
            schedule: Some(schedule("ticker", "*/2 * * * * *", "UTC", "echo tick")),
        })
        .await?
        .into_inner();
    assert_eq!(s.name, "schedules/tick");
    assert!(s.creator.starts_with("keys/"), "{}", s.creator);
    let fires = |sched: &mut SchedulesClient<_>| {
        let mut sched = sched.clone();
        async move {
            anyhow::Ok(
                sched
                    .list_schedule_fires(pb::ListScheduleFiresRequest {
                        name: "schedules/tick".into(),
                        page_size: 1000,
                        page_token: String::new(),
                    })
                    .await?
                    .into_inner()
                    .fires,
            )
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while fires(&mut sched).await?.len() < 2 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no 2 fires in 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A rolling update meanwhile: the first dispatcher stops (SIGTERM)
    // while fires go on; each fire it held is finished or taken over.
    cluster.sigterm_dispatcher().await?;
    while fires(&mut sched).await?.len() < 4 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no 4 fires in 60 s");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sched
        .suspend_schedule(pb::SuspendScheduleRequest {
            name: "tick".into(),
        })
        .await?;
    // Every fire claimed before the suspension gets its session.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let fired = loop {
        let f = fires(&mut sched).await?;
        if f.iter().all(|f| !f.session.is_empty()) {
            break f;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "fires without sessions: {f:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut times: Vec<i64> = fired.iter().map(|f| secs(&f.fire_time)).collect();
    times.sort();
    for pair in fired.windows(2) {
        // Newest first; consecutive cron times 2 s apart (more only where a
        // late fire skipped some, and says how many).
        let gap = secs(&pair[0].fire_time) - secs(&pair[1].fire_time);
        assert_eq!(gap, 2 * (1 + i64::from(pair[0].skipped)), "{fired:?}");
    }
    assert!(
        fired
            .iter()
            .all(|f| f.kind == pb::ScheduleFireKind::Cron as i32
                || f.kind == pb::ScheduleFireKind::CatchUp as i32),
        "{fired:?}"
    );
    // One session per fire, no more: the sessions labelled with the schedule
    // are exactly the fires' sessions, each opened by the schedule's input.
    let labelled = c
        .list_sessions(pb::ListSessionsRequest {
            page_size: 1000,
            labels: [("berth.schedule".to_string(), "tick".to_string())].into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .sessions;
    let mut from_fires: Vec<&str> = fired.iter().map(|f| f.session.as_str()).collect();
    let mut from_labels: Vec<&str> = labelled.iter().map(|s| s.name.as_str()).collect();
    from_fires.sort();
    from_labels.sort();
    assert_eq!(from_fires, from_labels);
    let first = berth_tests::events_of(&mut c, &labelled[0].name).await?;
    assert!(
        first
            .iter()
            .any(|e| e.r#type == "user.message" && e.payload_json.contains("echo tick")),
        "{first:?}"
    );
    // Suspended: no more fires.
    let count = fired.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fires(&mut sched).await?.len(),
        count,
        "fired while suspended"
    );

    // Trigger now, even suspended; a retried trigger is the same fire.
    let trigger = pb::TriggerScheduleRequest {
        name: "tick".into(),
        request_id: "trigger-1".into(),
    };
    let manual = sched.trigger_schedule(trigger.clone()).await?.into_inner();
    assert_eq!(manual.kind, pb::ScheduleFireKind::Manual as i32);
    assert!(!manual.session.is_empty(), "{manual:?}");
    let again = sched.trigger_schedule(trigger).await?.into_inner();
    assert_eq!(again.session, manual.session);
    assert_eq!(fires(&mut sched).await?.len(), count + 1);

    for s in from_fires.iter().copied().chain([manual.session.as_str()]) {
        berth_tests::stop_and_wait(&mut c, s).await?;
    }
    sched
        .delete_schedule(pb::DeleteScheduleRequest {
            name: "tick".into(),
        })
        .await?;
    let gone = sched
        .get_schedule(pb::GetScheduleRequest {
            name: "tick".into(),
        })
        .await
        .expect_err("deleted");
    assert_eq!(gone.code(), tonic::Code::NotFound);
    cluster.shutdown().await
}

/// `curl -X POST` as a webhook sender runs it: (status, body).
pub(crate) async fn curl_post(
    url: &str,
    headers: &[(&str, String)],
    body: &str,
) -> anyhow::Result<(u16, String)> {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sS",
        "-X",
        "POST",
        "-w",
        "\n%{http_code}",
        url,
        "--data-binary",
        body,
    ]);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    let out = cmd.output().await?;
    anyhow::ensure!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse()?, body.to_string()))
}

/// The headers of a delivery signed with `secret` at `timestamp`.
fn signed(secret: &str, timestamp: i64, delivery: &str, body: &str) -> Vec<(&'static str, String)> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{timestamp}.{body}").as_bytes());
    vec![
        ("Content-Type", "application/json".into()),
        ("Berth-Delivery", delivery.into()),
        ("Berth-Timestamp", timestamp.to_string()),
        (
            "Berth-Signature",
            format!("v1={}", hex::encode(tag.as_ref())),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_delivery_makes_one_session_and_a_bad_one_nothing() -> anyhow::Result<()> {
    let addr = berth_tests::free_addr()?;
    let cluster = TestCluster::builder()
        .configure_dispatcher(move |cfg| {
            cfg.webhook_listen = berth_common::metrics::Listen(Some(addr));
        })
        .start()
        .await?;
    let mut c = cluster.client();
    agent(&cluster, "triage").await?;
    let mut hooks = pb::webhooks_client::WebhooksClient::new(cluster.api());
    let err = hooks
        .create_webhook(pb::CreateWebhookRequest {
            webhook_id: "gh".into(),
            webhook: Some(pb::Webhook {
                agent: "nobody".into(),
                ..Default::default()
            }),
        })
        .await
        .expect_err("no such agent");
    assert_eq!(field_of(&err), "webhook.agent", "{err:?}");
    let created = hooks
        .create_webhook(pb::CreateWebhookRequest {
            webhook_id: "gh".into(),
            webhook: Some(pb::Webhook {
                agent: "triage".into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let secret = created.secret;
    let hook = created.webhook.expect("webhook");
    assert!(secret.starts_with("whsec_"), "the secret is shown once");
    let got = hooks
        .get_webhook(pb::GetWebhookRequest { name: "gh".into() })
        .await?
        .into_inner();
    assert!(!format!("{got:?}").contains(&secret), "never shown again");
    let url = format!("http://{addr}{}", hook.path);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let body = r#"{"action":"opened","issue":{"number":7,"title":"crash on start"}}"#;
    let labelled = |c: &mut berth_proto::v1::sessions_client::SessionsClient<_>| {
        let mut c = c.clone();
        async move {
            anyhow::Ok(
                c.list_sessions(pb::ListSessionsRequest {
                    labels: [("berth.webhook".to_string(), "gh".to_string())].into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .sessions,
            )
        }
    };

    // Unsigned, wrongly signed, replayed from outside the window, signed
    // with another secret: 401 each, and nothing is made.
    let mut wrong = signed(&secret, now, "d-1", body);
    wrong[3].1 = format!("v1={}", "0".repeat(64));
    for (headers, why) in [
        (signed(&secret, now, "d-1", body)[..3].to_vec(), "unsigned"),
        (wrong, "wrong signature"),
        (signed(&secret, now - 3600, "d-1", body), "an hour old"),
        (signed("whsec_other", now, "d-1", body), "another secret"),
    ] {
        let (status, reply) = curl_post(&url, &headers, body).await?;
        assert_eq!(status, 401, "{why}: {reply}");
        assert!(reply.contains("error"), "{why}: {reply}");
    }
    assert!(
        labelled(&mut c).await?.is_empty(),
        "a refused delivery made a session"
    );

    // Signed: 202 and a session whose first message is the body.
    let (status, reply) = curl_post(&url, &signed(&secret, now, "d-1", body), body).await?;
    assert_eq!(status, 202, "{reply}");
    let reply: serde_json::Value = serde_json::from_str(&reply)?;
    let session = reply["session"].as_str().unwrap_or_default().to_string();
    assert_eq!(reply["duplicate"], false);
    let reply_text = berth_tests::reply_after(&mut c, &session, 0).await?;
    assert!(reply_text.contains("crash on start"), "{reply_text}");
    let events = berth_tests::events_of(&mut c, &session).await?;
    let first = events
        .iter()
        .find(|e| e.r#type == "user.message")
        .expect("the first message");
    assert_eq!(berth_tests::payload(first)["text"], body);

    // The same delivery again (a sender's retry): the same session.
    let (status, again) = curl_post(&url, &signed(&secret, now, "d-1", body), body).await?;
    assert_eq!(status, 200, "{again}");
    let again: serde_json::Value = serde_json::from_str(&again)?;
    assert_eq!(again["session"], session.as_str());
    assert_eq!(again["duplicate"], true);
    assert_eq!(labelled(&mut c).await?.len(), 1);

    // The same signed content under a new delivery id (a captured delivery
    // replayed within the window): refused, and nothing is made.
    let (status, replay) =
        curl_post(&url, &signed(&secret, now, "d-1-replayed", body), body).await?;
    assert_eq!(status, 409, "{replay}");
    assert!(replay.contains("d-1"), "{replay}");
    assert_eq!(labelled(&mut c).await?.len(), 1, "a replay made a session");

    // Signed but not JSON: 400; an unknown path: 404.
    let (status, _) = curl_post(&url, &signed(&secret, now, "d-2", "hello"), "hello").await?;
    assert_eq!(status, 400);
    let (status, _) = curl_post(
        &format!("http://{addr}/hooks/00000000-0000-0000-0000-000000000000"),
        &signed(&secret, now, "d-3", body),
        body,
    )
    .await?;
    assert_eq!(status, 404);

    berth_tests::stop_and_wait(&mut c, &session).await?;
    hooks
        .delete_webhook(pb::DeleteWebhookRequest { name: "gh".into() })
        .await?;
    let (status, _) = curl_post(&url, &signed(&secret, now, "d-4", body), body).await?;
    assert_eq!(status, 404, "deleted");
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_trail_tells_a_sessions_whole_life_with_who_did_each_step() -> anyhow::Result<()>
{
    let cluster = TestCluster::builder().start().await?;
    let mut admin = cluster.client();
    // A second identity: a member key of the same project.
    let member = pb::api_keys_client::ApiKeysClient::new(cluster.api())
        .create_api_key(pb::CreateApiKeyRequest {
            project: "default".into(),
            role: pb::Role::Member as i32,
            display_name: "operator".into(),
        })
        .await?
        .into_inner();
    let member_id = member
        .key
        .as_ref()
        .map(|k| k.key_id.clone())
        .unwrap_or_default();
    let mut as_member =
        berth_proto::v1::sessions_client::SessionsClient::new(cluster.api_as(Some(&member.token))?);
    let admin_id = pb::api_keys_client::ApiKeysClient::new(cluster.api())
        .who_am_i(pb::WhoAmIRequest {})
        .await?
        .into_inner()
        .key_id;

    let s = admin
        .create_session(berth_tests::fake_session("echo hello"))
        .await?
        .into_inner();
    berth_tests::reply_after(&mut admin, &s.name, 0).await?;
    let asked = berth_tests::send(&mut as_member, &s.name, "edit audited.txt yes").await?;
    let events =
        berth_tests::collect_until(&mut admin, &s.name, asked, Duration::from_secs(60), |e| {
            e.r#type == "agent.tool_permission"
        })
        .await?;
    let tool_use_id = berth_tests::payload(events.last().expect("asked"))["tool_use_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    as_member
        .confirm_tool(pb::ConfirmToolRequest {
            name: s.name.clone(),
            tool_use_id: tool_use_id.clone(),
            decision: pb::ToolDecision::Allow as i32,
            ..Default::default()
        })
        .await?;
    berth_tests::reply_after(&mut admin, &s.name, asked).await?;
    berth_tests::stop_and_wait(&mut admin, &s.name).await?;
    admin
        .archive_session(pb::ArchiveSessionRequest {
            name: s.name.clone(),
        })
        .await?;
    admin
        .delete_session(pb::DeleteSessionRequest {
            name: s.name.clone(),
        })
        .await?;

    // Read after the session is gone: every step, in order, with its identity.
    let trail = pb::audit_client::AuditClient::new(cluster.api())
        .list_audit_events(pb::ListAuditEventsRequest {
            resource: s.id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .events;
    let steps: Vec<(String, String)> = trail
        .iter()
        .map(|e| (e.action.clone(), e.identity.clone()))
        .collect();
    let admin_key = format!("keys/{admin_id}");
    let member_key = format!("keys/{member_id}");
    let want: Vec<(String, String)> = [
        ("session.create", &admin_key),
        ("session.send", &member_key),
        ("session.approve", &member_key),
        ("session.stop", &admin_key),
        ("session.archive", &admin_key),
        ("session.delete", &admin_key),
    ]
    .into_iter()
    .map(|(a, i)| (a.to_string(), i.clone()))
    .collect();
    assert_eq!(steps, want, "{trail:?}");
    assert!(trail.iter().all(|e| e.resource == s.name));
    let approve: serde_json::Value = serde_json::from_str(&trail[2].detail_json)?;
    assert_eq!(approve["tool_use_id"], tool_use_id.as_str());
    assert_eq!(approve["decision"], "allow");
    let send: serde_json::Value = serde_json::from_str(&trail[1].detail_json)?;
    assert_eq!(send["seq"], asked);
    assert!(trail.windows(2).all(|w| w[0].id < w[1].id));
    // The project-wide trail has the key's creation too.
    let all = pb::audit_client::AuditClient::new(cluster.api())
        .list_audit_events(pb::ListAuditEventsRequest::default())
        .await?
        .into_inner()
        .events;
    assert!(
        all.iter().any(|e| e.action == "key.create"
            && e.resource == member_key
            && e.identity == admin_key),
        "{all:?}"
    );
    cluster.shutdown().await
}

/// A webhook receiver on loopback: records every POST; the first answers
/// 500, the second hangs past the sender's timeout, the rest 200.
#[derive(Clone, Default)]
struct Receiver {
    got: std::sync::Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>,
}

impl Receiver {
    async fn start(&self) -> anyhow::Result<std::net::SocketAddr> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let me = self.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let me = me.clone();
                async move {
                    let n = {
                        let mut got = me.got.lock().expect("lock");
                        got.push((headers, body));
                        got.len()
                    };
                    match n {
                        1 => axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        2 => {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                            axum::http::StatusCode::OK
                        }
                        _ => axum::http::StatusCode::NO_CONTENT,
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(addr)
    }

    /// Each POST: its headers, its body as sent, and the body parsed.
    fn bodies(&self) -> Vec<(axum::http::HeaderMap, String, serde_json::Value)> {
        self.got
            .lock()
            .expect("lock")
            .iter()
            .map(|(h, b)| {
                (
                    h.clone(),
                    b.clone(),
                    serde_json::from_str(b).unwrap_or_default(),
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_changes_reach_a_subscriber_signed_retried_and_logged() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let addr = receiver.start().await?;
    let cluster = TestCluster::builder()
        .configure_dispatcher(|cfg| {
            cfg.subscription_allow_http_hosts = vec!["127.0.0.1".into()];
            cfg.subscription_timeout = Duration::from_secs(1);
            cfg.subscription_retry_base = Duration::from_secs(2);
        })
        .start()
        .await?;
    let mut c = cluster.client();
    let mut hooks = pb::webhooks_client::WebhooksClient::new(cluster.api());
    let create = |url: &str, types: &[&str]| pb::CreateSubscriptionRequest {
        subscription_id: "ops".into(),
        subscription: Some(pb::Subscription {
            url: url.into(),
            event_types: types.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        }),
    };
    for (url, types, field) in [
        (
            "http://example.com/hook",
            &["session.idle"][..],
            "subscription.url",
        ),
        (
            "https://example.com/hook",
            &["session.bogus"][..],
            "subscription.event_types",
        ),
        (
            "https://example.com/hook",
            &[][..],
            "subscription.event_types",
        ),
    ] {
        let err = hooks
            .create_subscription(create(url, types))
            .await
            .expect_err(url);
        assert_eq!(field_of(&err), field, "{err:?}");
    }
    let sub = hooks
        .create_subscription(create(
            &format!("http://{addr}/hook"),
            &[
                "session.idle",
                "session.terminated",
                "session.requires_action",
            ],
        ))
        .await?
        .into_inner();
    let secret = sub.secret;

    // A turn ends: the session goes idle at once, whatever the receiver does.
    let s = c
        .create_session(berth_tests::fake_session("echo hello"))
        .await?
        .into_inner();
    berth_tests::wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Idle,
        Duration::from_secs(60),
    )
    .await?;
    // Then the agent asks for a tool, and is stopped.
    let asked = berth_tests::send(&mut c, &s.name, "edit hooked.txt x").await?;
    berth_tests::collect_until(&mut c, &s.name, asked, Duration::from_secs(60), |e| {
        e.r#type == "agent.tool_permission"
    })
    .await?;
    berth_tests::stop_and_wait(&mut c, &s.name).await?;

    // The log shows each failed attempt while its delivery waits to be
    // retried (the receiver's first answer is a 500, its second never comes
    // within the 1 s timeout); every change is delivered once in the end.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut seen_errors = std::collections::BTreeSet::new();
    let log = loop {
        let log = hooks
            .list_deliveries(pb::ListDeliveriesRequest {
                name: "ops".into(),
                page_size: 100,
            })
            .await?
            .into_inner()
            .deliveries;
        for d in &log {
            if d.status == pb::DeliveryStatus::Pending as i32 && !d.last_error.is_empty() {
                seen_errors.insert((d.last_status_code, d.last_error.clone()));
            }
        }
        if log.len() >= 3
            && log
                .iter()
                .all(|d| d.status == pb::DeliveryStatus::Delivered as i32)
        {
            break log;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not all delivered: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        seen_errors
            .iter()
            .any(|(code, e)| *code == 500 && e.contains("500")),
        "{seen_errors:?}"
    );
    assert!(
        seen_errors
            .iter()
            .any(|(code, e)| *code == 0 && e.contains("no answer within 1 s")),
        "{seen_errors:?}"
    );
    let mut types: Vec<&str> = log.iter().map(|d| d.event_type.as_str()).collect();
    types.sort();
    assert_eq!(
        types,
        [
            "session.idle",
            "session.requires_action",
            "session.terminated"
        ],
        "{log:?}"
    );
    // Two failed attempts in all, each retried.
    let attempts: i32 = log.iter().map(|d| d.attempts).sum();
    assert_eq!(attempts, log.len() as i32 + 2, "{log:?}");
    assert!(
        log.iter()
            .all(|d| d.session == s.name && d.last_status_code == 204),
        "{log:?}"
    );

    // What the receiver got: signed with the subscription's secret, one
    // body per attempt, the same delivery id across a delivery's retries.
    let got = receiver.bodies();
    assert_eq!(
        got.len(),
        log.iter().map(|d| d.attempts as usize).sum::<usize>()
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    for (headers, raw, body) in &got {
        let h = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let ts = h("berth-timestamp");
        let tag = hex::decode(h("berth-signature").trim_start_matches("v1="))?;
        assert!(
            ring::hmac::verify(&key, format!("{ts}.{raw}").as_bytes(), &tag).is_ok(),
            "the signature verifies with the subscription's secret"
        );
        assert_eq!(h("berth-delivery"), body["id"].as_str().unwrap_or_default());
        assert_eq!(body["session"], s.name.as_str());
    }
    // Each delivery's attempts carry its one id.
    for d in &log {
        let ids = got
            .iter()
            .filter(|(h, _, _)| {
                h.get("berth-delivery").and_then(|v| v.to_str().ok()) == Some(d.id.as_str())
            })
            .count();
        assert_eq!(ids as i32, d.attempts, "{d:?}");
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_get_a_name_feedback_and_are_found_by_their_text() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();

    // No display name given: one from the first message.
    let a = c
        .create_session(berth_tests::fake_session("echo a purple elephant dances"))
        .await?
        .into_inner();
    assert_eq!(a.display_name, "echo a purple elephant dances");
    let b = c
        .create_session(berth_tests::fake_session("echo a green frog sings"))
        .await?
        .into_inner();
    berth_tests::reply_after(&mut c, &a.name, 0).await?;
    berth_tests::reply_after(&mut c, &b.name, 0).await?;

    // Search finds the session by the agent's words, with a snippet.
    let found = c
        .search_sessions(pb::SearchSessionsRequest {
            query: "elephant".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .matches;
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].session.as_ref().map(|s| s.name.as_str()),
        Some(a.name.as_str())
    );
    assert!(
        found[0].snippet.contains("**elephant**"),
        "{}",
        found[0].snippet
    );
    let both = c
        .search_sessions(pb::SearchSessionsRequest {
            query: "elephant or frog".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .matches;
    assert_eq!(both.len(), 2, "{both:?}");
    let err = c
        .search_sessions(pb::SearchSessionsRequest::default())
        .await
        .expect_err("empty query");
    assert_eq!(field_of(&err), "query");
    // Another project's key finds nothing of this one.
    let other = pb::api_keys_client::ApiKeysClient::new(cluster.api())
        .create_api_key(pb::CreateApiKeyRequest {
            project: "other".into(),
            role: pb::Role::Member as i32,
            display_name: "other".into(),
        })
        .await?
        .into_inner();
    let mut as_other =
        berth_proto::v1::sessions_client::SessionsClient::new(cluster.api_as(Some(&other.token))?);
    let none = as_other
        .search_sessions(pb::SearchSessionsRequest {
            query: "elephant".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .matches;
    assert!(none.is_empty(), "{none:?}");

    // Feedback on the session and on its turn; again replaces.
    let rate = |turn: i64, rating: i32, comment: &str| pb::SubmitFeedbackRequest {
        name: a.name.clone(),
        turn,
        rating,
        comment: comment.into(),
    };
    c.submit_feedback(rate(0, 4, "good overall")).await?;
    c.submit_feedback(rate(1, 2, "slow")).await?;
    c.submit_feedback(rate(1, 5, "actually great")).await?;
    for (req, field) in [
        (rate(1, 6, ""), "rating"),
        (rate(2, 3, ""), "turn"),
        (rate(-1, 3, ""), "turn"),
    ] {
        let err = c.submit_feedback(req).await.expect_err(field);
        assert_eq!(field_of(&err), field, "{err:?}");
    }
    let fb = c
        .list_feedback(pb::ListFeedbackRequest {
            name: a.name.clone(),
        })
        .await?
        .into_inner()
        .feedback;
    let got: Vec<(i64, i32, &str)> = fb
        .iter()
        .map(|f| (f.turn, f.rating, f.comment.as_str()))
        .collect();
    assert_eq!(got, [(0, 4, "good overall"), (1, 5, "actually great")]);
    assert!(fb.iter().all(|f| f.identity.starts_with("keys/")));

    for s in [&a.name, &b.name] {
        berth_tests::stop_and_wait(&mut c, s).await?;
    }
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_exports_as_a_pdf_a_reader_opens() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = c
        .create_session(berth_tests::fake_session("tool echo exported café"))
        .await?
        .into_inner();
    berth_tests::reply_after(&mut c, &s.name, 0).await?;
    let r = c
        .export_session(pb::ExportSessionRequest {
            name: s.name.clone(),
            format: pb::ExportFormat::Pdf as i32,
        })
        .await?
        .into_inner();
    assert_eq!(r.content_type, "application/pdf");
    assert!(r.data.starts_with(b"%PDF-"), "a PDF");
    let path = std::env::temp_dir().join(format!("berth-export-{}.pdf", s.id));
    std::fs::write(&path, &r.data)?;
    if let Ok(keep) = std::env::var("BERTH_KEEP_PDF") {
        std::fs::copy(&path, keep)?;
    }
    // A PDF reader's text extraction finds the transcript in it.
    let out = tokio::process::Command::new("pdftotext")
        .arg(&path)
        .arg("-")
        .output()
        .await
        .map_err(|e| {
            anyhow::anyhow!("pdftotext (Debian's poppler-utils; scripts/setup.sh installs it): {e}")
        })?;
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        s.display_name.as_str(),
        "tool echo exported café",
        "Bash",
        "page 1 of",
    ] {
        assert!(
            text.contains(want),
            "`{want}` is not in the PDF's text:\n{text}"
        );
    }
    berth_tests::stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_parameters_reach_the_runtime_or_are_refused_by_name() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let with = |p: pb::RunParams| {
        let mut req = berth_tests::fake_session("echo tuned");
        req.run_params = Some(p);
        req
    };
    for (p, field) in [
        (
            pb::RunParams {
                temperature: Some(0.3),
                ..Default::default()
            },
            "run_params.temperature",
        ),
        (
            pb::RunParams {
                temperature: Some(1.5),
                ..Default::default()
            },
            "run_params.temperature",
        ),
        (
            pb::RunParams {
                max_output_tokens: Some(0),
                ..Default::default()
            },
            "run_params.max_output_tokens",
        ),
    ] {
        let err = c.create_session(with(p)).await.expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(field_of(&err), field, "{err:?}");
    }
    let s = c
        .create_session(with(pb::RunParams {
            max_output_tokens: Some(2048),
            ..Default::default()
        }))
        .await?
        .into_inner();
    berth_tests::reply_after(&mut c, &s.name, 0).await?;
    // Claude Code reads its output cap from this variable.
    let containers = berth_tests::containers_of(&s.id).await?;
    let environ = berth_tests::exec_output(
        &containers[0],
        &["sh", "-c", "cat /proc/*/environ | tr '\\0' '\\n'"],
    )
    .await?;
    assert!(
        environ
            .lines()
            .any(|l| l == "CLAUDE_CODE_MAX_OUTPUT_TOKENS=2048"),
        "{environ}"
    );
    berth_tests::stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

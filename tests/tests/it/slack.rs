//! Slack threads as sessions: a webhook that is a Slack app's Events API
//! endpoint, signed requests from the tests, and a loopback stand-in for
//! Slack's Web API that receives the replies.

use std::sync::{Arc, Mutex};

use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;
use serde_json::{Value, json};

use crate::credentials::bearer_credential;

/// Slack's Web API on loopback: `chat.postMessage` with the bot token
/// records the message; without it, `invalid_auth`.
struct SlackApi {
    addr: std::net::SocketAddr,
    posts: Arc<Mutex<Vec<Value>>>,
    server: berth_tests::loopback::Loopback,
}

impl SlackApi {
    async fn start(token: &str) -> anyhow::Result<Self> {
        let posts = Arc::new(Mutex::new(Vec::new()));
        let (seen, expected) = (posts.clone(), format!("Bearer {token}"));
        let app = axum::Router::new().route(
            "/api/chat.postMessage",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (seen, expected) = (seen.clone(), expected.clone());
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    if auth != expected {
                        return json!({"ok": false, "error": "invalid_auth"}).to_string();
                    }
                    let msg: Value = serde_json::from_str(&body).unwrap_or_default();
                    seen.lock().expect("lock").push(msg);
                    json!({"ok": true, "ts": "1.0"}).to_string()
                }
            }),
        );
        let server = berth_tests::loopback::Loopback::serve(app).await?;
        Ok(Self {
            addr: server.addr,
            posts,
            server,
        })
    }

    /// The texts posted to `thread_ts`, in order.
    fn thread(&self, thread_ts: &str) -> Vec<String> {
        self.posts
            .lock()
            .expect("lock")
            .iter()
            .filter(|p| p["thread_ts"] == thread_ts)
            .map(|p| p["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Waits until `thread_ts` has `n` posts: up to 60 s, since a post may
    /// wait for a cold start while the suite runs other clusters on the
    /// same two cores (30 s was once not enough there).
    async fn wait_for(&self, thread_ts: &str, n: usize) -> anyhow::Result<Vec<String>> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let got = self.thread(thread_ts);
            if got.len() >= n {
                return Ok(got);
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "thread {thread_ts} got {got:?}, wanted {n} posts"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Slack's signature headers for `body` at `timestamp`.
fn signed(secret: &str, timestamp: i64, body: &str) -> Vec<(&'static str, String)> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, format!("v0:{timestamp}:{body}").as_bytes());
    vec![
        ("X-Slack-Request-Timestamp", timestamp.to_string()),
        (
            "X-Slack-Signature",
            format!("v0={}", hex::encode(tag.as_ref())),
        ),
        ("Content-Type", "application/json".into()),
    ]
}

fn message(event_id: &str, ts: &str, thread_ts: Option<&str>, text: &str) -> String {
    let mut event =
        json!({"type": "message", "channel": "C1", "user": "U1", "ts": ts, "text": text});
    if let Some(t) = thread_ts {
        event["thread_ts"] = json!(t);
    }
    json!({"type": "event_callback", "team_id": "T1", "event_id": event_id, "event": event})
        .to_string()
}

/// POSTs `body`; the status and the JSON answer.
async fn post(url: &str, headers: &[(&str, String)], body: &str) -> anyhow::Result<(u16, Value)> {
    let (status, text) = crate::seed::curl_post(url, headers, body).await?;
    Ok((status, serde_json::from_str(&text).unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_threads_are_sessions_one_per_thread_answered_in_the_thread() -> anyhow::Result<()> {
    let bot_token = format!("xoxb-{}", uuid::Uuid::new_v4().simple());
    let slack = SlackApi::start(&bot_token).await?;
    let hook_addr = free_addr()?;
    let api = format!("http://{}/api", slack.addr);
    let cluster = TestCluster::builder()
        .configure_dispatcher(move |cfg| {
            cfg.webhook_listen = berth_common::metrics::Listen(Some(hook_addr));
            cfg.slack_api_url = api.clone();
        })
        .start()
        .await?;
    pb::agents_client::AgentsClient::new(cluster.api())
        .create_agent(pb::CreateAgentRequest {
            agent_id: "helper".into(),
            spec: Some(pb::AgentSpec {
                image: TEST_IMAGE.into(),
                ..Default::default()
            }),
        })
        .await?;
    let mut hooks = pb::webhooks_client::WebhooksClient::new(cluster.api());
    let app = |bot: &pb::Secret| pb::CreateWebhookRequest {
        webhook_id: "slack".into(),
        webhook: Some(pb::Webhook {
            agent: "helper".into(),
            slack: Some(pb::SlackApp {
                bot_token_secret: bot.name.clone(),
                signing_secret: "slack-signing-secret".into(),
            }),
            ..Default::default()
        }),
    };
    // The bot token must be a credential for the Slack API's host.
    let elsewhere = bearer_credential(cluster.api(), &bot_token, &["slack.example".into()]).await?;
    let err = hooks
        .create_webhook(app(&elsewhere))
        .await
        .expect_err("wrong host");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("webhook.slack.bot_token_secret"),
        "{}",
        err.message()
    );
    let bot = bearer_credential(cluster.api(), &bot_token, &[slack.addr.to_string()]).await?;
    let hook = hooks
        .create_webhook(app(&bot))
        .await?
        .into_inner()
        .webhook
        .expect("webhook");
    assert!(hook.slack.is_some());
    let url = format!("http://{hook_addr}{}", hook.path);
    let secret = "slack-signing-secret";

    // Slack's URL verification.
    let body = json!({"type": "url_verification", "challenge": "ch-42"}).to_string();
    let (status, reply) = post(&url, &signed(secret, now(), &body), &body).await?;
    assert_eq!((status, reply["challenge"].as_str()), (200, Some("ch-42")));

    // Refused: a bad signature, a stale timestamp.
    let first = message("Ev1", "100.1", None, "echo first answer");
    let mut bad = signed(secret, now(), &first);
    bad[1].1 = format!("v0={}", "0".repeat(64));
    for (headers, why) in [
        (bad, "bad signature"),
        (signed(secret, now() - 600, &first), "stale"),
    ] {
        let (status, reply) = post(&url, &headers, &first).await?;
        assert_eq!(status, 401, "{why}: {reply}");
    }
    let mut c = SessionsClient::new(cluster.api());
    let sessions = |c: &mut SessionsClient<Api>| {
        let mut c = c.clone();
        async move {
            anyhow::Ok(
                c.list_sessions(pb::ListSessionsRequest {
                    labels: [("berth.webhook".to_string(), "slack".to_string())].into(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .sessions,
            )
        }
    };
    assert!(
        sessions(&mut c).await?.is_empty(),
        "a refused request made a session"
    );

    // The thread's first message makes its session; a replay is refused and
    // a retry (same event, signed anew) changes nothing.
    let headers = signed(secret, now(), &first);
    let (status, reply) = post(&url, &headers, &first).await?;
    assert_eq!(status, 200, "{reply}");
    let session = reply["session"].as_str().expect("session").to_string();
    let (status, _) = post(&url, &headers, &first).await?;
    assert_eq!(status, 409, "a replay");
    let mut retry = signed(secret, now() + 1, &first);
    retry.push(("X-Slack-Retry-Num", "1".into()));
    let (status, reply) = post(&url, &retry, &first).await?;
    assert_eq!((status, reply["duplicate"].as_bool()), (200, Some(true)));
    // A reply in the thread goes to the same session; bots and edits are
    // ignored.
    let second = message("Ev2", "100.2", Some("100.1"), "echo second answer");
    let (_, reply) = post(&url, &signed(secret, now(), &second), &second).await?;
    assert_eq!(reply["session"].as_str(), Some(session.as_str()));
    for (n, ignored) in [
        json!({"type": "message", "channel": "C1", "ts": "100.3", "thread_ts": "100.1", "text": "from a bot", "bot_id": "B1"}),
        json!({"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "100.4", "thread_ts": "100.1"}),
    ]
    .into_iter()
    .enumerate()
    {
        let body = json!({"type": "event_callback", "team_id": "T1", "event_id": format!("EvI{n}"), "event": ignored}).to_string();
        let (status, reply) = post(&url, &signed(secret, now(), &body), &body).await?;
        assert_eq!((status, reply.get("ignored").is_some()), (200, true), "{reply}");
    }
    // One message per turn, in the thread, in order.
    let posted = slack.wait_for("100.1", 2).await?;
    assert_eq!(posted[..2], ["first answer", "second answer"], "{posted:?}");
    let events = events_of(&mut c, &session).await?;
    let users: Vec<String> = events
        .iter()
        .filter(|e| e.r#type == "user.message")
        .map(|e| payload(e)["text"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(users, ["echo first answer", "echo second answer"]);

    // An agent that waits for an approval: a notice in its thread.
    let asks = message("Ev3", "200.1", None, "edit notes.txt hello");
    post(&url, &signed(secret, now(), &asks), &asks).await?;
    let notice = slack.wait_for("200.1", 1).await?;
    assert!(notice[0].contains("berth sessions approve"), "{notice:?}");
    assert_eq!(sessions(&mut c).await?.len(), 2, "one session per thread");

    // A thread whose session ended starts a new one, and says so.
    stop_and_wait(&mut c, &session).await?;
    let later = message("Ev4", "100.5", Some("100.1"), "echo after the end");
    let (_, reply) = post(&url, &signed(secret, now(), &later), &later).await?;
    let next = reply["session"].as_str().expect("session").to_string();
    assert_ne!(next, session);
    let posted = slack.wait_for("100.1", 4).await?;
    assert!(posted[2].contains("previous session ended"), "{posted:?}");
    assert_eq!(posted[3], "after the end");
    assert_eq!(sessions(&mut c).await?.len(), 3);
    // The bot token is in no event or row.
    assert!(
        !crate::access::all_rows(&cluster)
            .await?
            .contains(&bot_token)
    );
    cluster.shutdown().await?;
    slack.server.stop().await;
    Ok(())
}

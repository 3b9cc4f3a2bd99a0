//! Slack apps: a webhook bound to an agent that takes Slack's Events API.
//! Each Slack thread is one session of the agent at a time: the thread's
//! first message creates it, each reply is sent to it, and a reply to a
//! thread whose session ended starts the next one (and says so). Requests
//! are verified with the app's signing secret (`v0=` HMAC-SHA256 of
//! `v0:{timestamp}:{body}`) within the replay window; a retry of an event
//! (`X-Slack-Retry-Num`, same `event_id`) changes nothing, and a replayed
//! request is refused. The replies go back through [`super::super::slack_replies`].

use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{Webhook, Webhooks, unavailable};
use crate::error::{Error, Result};
use crate::session::NewSession;
use crate::store::ThreadKey;

const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
const SIGNATURE_HEADER: &str = "x-slack-signature";

/// A Slack app as created.
#[derive(Debug, Clone)]
pub(crate) struct NewSlackApp {
    /// The credential holding the bot token.
    pub bot_token_secret: String,
    pub signing_secret: String,
}

/// What a verified Events API request asks.
#[derive(Debug, PartialEq)]
pub(crate) enum SlackEvent {
    /// `url_verification`: answer the challenge.
    Challenge(String),
    /// A person's message in a channel or thread.
    Message(SlackMessage),
    /// Not for the agent: why.
    Ignored(&'static str),
}

/// A person's message: its event, where it was written, and its text.
#[derive(Debug, PartialEq)]
pub(crate) struct SlackMessage {
    pub event_id: String,
    pub team: String,
    pub channel: String,
    /// The thread (the message's own ts when it starts one).
    pub thread_ts: String,
    pub text: String,
}

impl SlackMessage {
    /// The thread it belongs to, for `w`'s agent.
    fn thread<'a>(&'a self, w: &'a Webhook) -> ThreadKey<'a> {
        ThreadKey {
            project: &w.project,
            agent: &w.agent,
            team: &self.team,
            channel: &self.channel,
            thread_ts: &self.thread_ts,
        }
    }
}

/// `v0=` + hex HMAC-SHA256 of `v0:{timestamp}:{body}` under `secret`.
#[cfg(test)]
fn slack_signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(b"v0:");
    ctx.update(timestamp.as_bytes());
    ctx.update(b":");
    ctx.update(body);
    format!("v0={}", hex::encode(ctx.sign().as_ref()))
}

fn verified(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let message = [b"v0:", timestamp.as_bytes(), b":", body].concat();
    signature
        .strip_prefix("v0=")
        .and_then(|h| hex::decode(h).ok())
        .is_some_and(|tag| ring::hmac::verify(&key, &message, &tag).is_ok())
}

/// Reads an Events API body.
pub(crate) fn classify(body: &Value) -> SlackEvent {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match body["type"].as_str() {
        Some("url_verification") => return SlackEvent::Challenge(s(&body["challenge"])),
        Some("event_callback") => {}
        _ => return SlackEvent::Ignored("not an event callback"),
    }
    let e = &body["event"];
    if !matches!(e["type"].as_str(), Some("message" | "app_mention")) {
        return SlackEvent::Ignored("not a message");
    }
    // Bots (this app's own replies too), edits, deletions, joins.
    if e.get("bot_id").is_some_and(|b| !b.is_null()) {
        return SlackEvent::Ignored("a bot's message");
    }
    if e.get("subtype").is_some_and(|t| !t.is_null()) {
        return SlackEvent::Ignored("an edit or other message subtype");
    }
    let text = strip_mentions(e["text"].as_str().unwrap_or_default());
    if text.is_empty() {
        return SlackEvent::Ignored("no text");
    }
    let ts = s(&e["ts"]);
    let thread_ts = e["thread_ts"].as_str().map_or(ts, String::from);
    let (team, channel, event_id) = (s(&body["team_id"]), s(&e["channel"]), s(&body["event_id"]));
    if team.is_empty() || channel.is_empty() || thread_ts.is_empty() || event_id.is_empty() {
        return SlackEvent::Ignored("no team, channel, ts or event_id");
    }
    SlackEvent::Message(SlackMessage {
        event_id,
        team,
        channel,
        thread_ts,
        text,
    })
}

/// The text without `<@U…>` mentions of the app, trimmed.
fn strip_mentions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("<@") {
        out.push_str(&rest[..i]);
        rest = match rest[i..].find('>') {
            Some(j) => &rest[i + j + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out.trim().to_string()
}

impl Webhooks {
    /// A Slack app's bot token must be a credential of `project` for the
    /// Web API's host. Returns its id.
    pub(super) async fn check_slack_app(&self, project: &str, app: &NewSlackApp) -> Result<Uuid> {
        let field = "webhook.slack.bot_token_secret";
        if app.signing_secret.trim().is_empty() {
            return Err(Error::invalid("webhook.slack.signing_secret", "required"));
        }
        let given = app.bot_token_secret.trim();
        let id: Uuid = given
            .strip_prefix("secrets/")
            .unwrap_or(given)
            .parse()
            .map_err(|_| Error::invalid(field, format!("`{given}` is not a secret id")))?;
        let found = self.store.sealed_secrets(project, &[id]).await?;
        let secret = found
            .first()
            .ok_or_else(|| Error::NotFound(format!("{field}: secret secrets/{id} not found")))?;
        // Checked at start (`Config::validate`).
        let (host, port) =
            berth_common::credentials::target_of(&self.slack_api).ok_or_else(|| {
                Error::Internal(format!("--slack-api-url `{}` has no host", self.slack_api))
            })?;
        if secret.usage != crate::store::USAGE_HTTP_HEADER
            || !berth_common::credentials::covers(&secret.hosts, &host, port)
        {
            return Err(Error::invalid(
                field,
                format!(
                    "secret secrets/{id} must be a credential (SECRET_USAGE_HTTP_HEADER) for {host}:{port}, the Slack API's host"
                ),
            ));
        }
        Ok(id)
    }

    /// One Events API request to Slack app `w` (`secret`: its signing
    /// secret).
    pub(super) async fn slack_event(
        &self,
        w: &Webhook,
        secret: &[u8],
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> (StatusCode, &'static str, Value) {
        let refuse = |status, outcome, why: String| (status, outcome, json!({ "error": why }));
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
        let (timestamp, signature) = (header(TIMESTAMP_HEADER), header(SIGNATURE_HEADER));
        let window = super::signature::within_window(
            "X-Slack-Request-Timestamp",
            timestamp,
            now,
            self.tolerance,
        );
        if let Err(why) = window {
            return refuse(StatusCode::UNAUTHORIZED, "unauthorized", why);
        }
        if !verified(secret, timestamp, body, signature) {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "`X-Slack-Signature` does not verify with the app's signing secret".into(),
            );
        }
        let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                "the body must be JSON".into(),
            );
        };
        let m = match classify(&parsed) {
            SlackEvent::Challenge(c) => {
                return (StatusCode::OK, "challenge", json!({ "challenge": c }));
            }
            SlackEvent::Ignored(why) => {
                return (StatusCode::OK, "ignored", json!({ "ignored": why }));
            }
            SlackEvent::Message(m) => m,
        };
        // A retry (same event, new signature) is answered as the first; a
        // replay (the same signed request again) is refused.
        let content = super::signature::content_sha256(timestamp, body);
        match self
            .store
            .deliveries_like(w.id, &m.event_id, &content)
            .await
        {
            Ok(seen)
                if seen
                    .iter()
                    .any(|d| d.content_sha256.as_deref() == Some(content.as_slice())) =>
            {
                return refuse(
                    StatusCode::CONFLICT,
                    "replay",
                    "this signed request was delivered before".into(),
                );
            }
            Ok(seen) if !seen.is_empty() => {
                let reply = json!({"session": berth_common::names::session_name(seen[0].session_id), "duplicate": true});
                return (StatusCode::OK, "duplicate", reply);
            }
            Ok(_) => {}
            Err(e) => return unavailable(e),
        }
        let key = m.thread(w);
        match self.thread_message(w, &key, &m.text).await {
            Ok(session) => {
                if let Err(e) = self
                    .store
                    .record_delivery(w.id, &m.event_id, session, &content)
                    .await
                {
                    tracing::warn!(error = %e, "could not record a Slack event; a retry may send it again");
                }
                tracing::info!(webhook = %w.webhook_id, event_id = %m.event_id, %session, "Slack message");
                let reply = json!({"session": berth_common::names::session_name(session), "duplicate": false});
                (StatusCode::OK, "created", reply)
            }
            Err(e) if e.is_transient() => unavailable(e),
            Err(e) => refuse(StatusCode::UNPROCESSABLE_ENTITY, "error", e.to_string()),
        }
    }

    /// Sends `text` to the thread's session, creating it first (or the next
    /// one, when its session ended). Returns the session.
    async fn thread_message(&self, w: &Webhook, key: &ThreadKey<'_>, text: &str) -> Result<Uuid> {
        let by = format!("webhooks/{}", w.webhook_id);
        let bound = self.store.slack_thread(key).await?;
        let session = match bound {
            Some((id, generation)) => {
                let live = match self.sessions.get(&w.project, id).await {
                    Ok(s) => s.status.accepts_input(),
                    Err(Error::SessionNotFound(_)) => false,
                    Err(e) => return Err(e),
                };
                if live {
                    id
                } else {
                    let next = self.thread_session(w, key, generation + 1).await?;
                    // The replies say so (generation > 0). Another request
                    // may have moved it on first: its session, then.
                    self.store.next_slack_session(key, next, generation).await?;
                    self.store
                        .slack_thread(key)
                        .await?
                        .map_or(next, |(id, _)| id)
                }
            }
            None => {
                let id = self.thread_session(w, key, 0).await?;
                self.store.bind_slack_thread(w.id, key, id).await?;
                // Bound first by a racing request: the same session, by its
                // request id.
                self.store.slack_thread(key).await?.map_or(id, |(id, _)| id)
            }
        };
        self.sessions
            .send_message(&w.project, session, text, None, &by)
            .await?;
        Ok(session)
    }

    /// The thread's session number `generation`, made once (by request id).
    async fn thread_session(
        &self,
        w: &Webhook,
        key: &ThreadKey<'_>,
        generation: i32,
    ) -> Result<Uuid> {
        let mut labels = w.labels.clone();
        labels.insert(super::WEBHOOK_LABEL.into(), w.webhook_id.clone());
        labels.insert("slack.channel".into(), key.channel.to_string());
        let request_id = format!(
            "slack/{}/{}/{}/{}/{generation}",
            w.id, key.team, key.channel, key.thread_ts
        );
        let mut new = NewSession::of_agent(
            &w.agent,
            String::new(),
            labels,
            format!("Slack {} {}", key.channel, key.thread_ts),
            request_id,
        );
        new.initial_message = None;
        let origin = crate::ops::sessions::Origin::Webhook {
            delivery: format!("slack {} {}", key.channel, key.thread_ts),
            agent: w.agent.clone(),
        };
        let by = format!("webhooks/{}", w.webhook_id);
        Ok(self.sessions.create(&w.project, new, &by, origin).await?.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_map_to_threads_and_the_rest_is_ignored() {
        let msg = |event: Value| json!({"type": "event_callback", "team_id": "T1", "event_id": "Ev1", "event": event});
        assert_eq!(
            classify(&msg(
                json!({"type": "message", "channel": "C1", "ts": "1.1", "text": "<@U9> hi"})
            )),
            SlackEvent::Message(SlackMessage {
                event_id: "Ev1".into(),
                team: "T1".into(),
                channel: "C1".into(),
                thread_ts: "1.1".into(),
                text: "hi".into()
            })
        );
        let reply = classify(&msg(
            json!({"type": "message", "channel": "C1", "ts": "1.2", "thread_ts": "1.1", "text": "more"}),
        ));
        assert!(matches!(reply, SlackEvent::Message(ref m) if m.thread_ts == "1.1"));
        for ignored in [
            json!({"type": "message", "channel": "C1", "ts": "1", "text": "x", "bot_id": "B1"}),
            json!({"type": "message", "subtype": "message_changed", "channel": "C1", "ts": "1"}),
            json!({"type": "reaction_added"}),
        ] {
            assert!(matches!(classify(&msg(ignored)), SlackEvent::Ignored(_)));
        }
        assert_eq!(
            classify(&json!({"type": "url_verification", "challenge": "c"})),
            SlackEvent::Challenge("c".into())
        );
    }

    #[test]
    fn signatures_are_slacks_v0_scheme() {
        // Slack's documented example.
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let sig = slack_signature(b"8f742231b10e8888abcd99yyyzzz85a5", "1531420618", body);
        assert_eq!(
            sig,
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
        assert!(verified(
            b"8f742231b10e8888abcd99yyyzzz85a5",
            "1531420618",
            body,
            &sig
        ));
        assert!(!verified(b"other", "1531420618", body, &sig));
    }
}

//! Replies to Slack threads: every dispatcher leases threads whose session
//! has events not yet posted (a lease per thread, in its row), and posts to
//! each thread through the Web API's `chat.postMessage` with the app's bot
//! token (a credential, opened here only):
//!
//! - one message per agent turn: the turn's text, when its result comes;
//! - a notice when the agent waits for an approval or asks questions, with
//!   the CLI command that answers;
//! - a short notice when the session fails (its reason's first line, never
//!   a stack trace);
//! - a notice on a thread's new session (its previous one had ended).
//!
//! A post that fails is tried again on the next pass, from the same event.

use std::time::Duration;

use berth_common::events::{self as ev, payload};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::session::Event;
use crate::store::{DueThread, Store, secret_context};

use super::HttpsClient;

/// How often a dispatcher looks for threads to answer.
const POLL: Duration = Duration::from_millis(500);
/// How long one dispatcher holds a thread.
const LEASE: Duration = Duration::from_secs(30);
/// Events read per thread per pass.
const BATCH: i64 = 500;
/// Longest a post may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Slack's limit on a message's text is 40,000 characters; replies stay
/// well under it.
const MAX_TEXT: usize = 3_000;

/// Posts replies to Slack threads until shutdown.
pub(crate) struct SlackReplies {
    pub store: Store,
    /// The Web API's base URL (`https://slack.com/api`).
    pub api: String,
    pub owner: String,
    pub shutdown: CancellationToken,
}

/// What to post for a thread's new events, and how far they account for.
#[derive(Debug, PartialEq)]
pub(crate) struct Posts {
    /// `(seq of the event it answers, text)`, in order.
    pub posts: Vec<(i64, String)>,
    /// Every event up to here is answered (a turn still going is not).
    pub through: i64,
}

fn cut(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() <= MAX_TEXT {
        return text.to_string();
    }
    let kept: String = text.chars().take(MAX_TEXT).collect();
    format!("{kept}… (cut; the whole reply is in the session)")
}

/// What a thread hears of `events` (after `after`). `session` names the
/// session in notices; `new_session`: it follows one that ended; `full`:
/// the batch is as long as a read gets, so a turn still open at its end is
/// posted as far as it went (else a turn longer than a batch would never be
/// answered).
pub(crate) fn replies(
    events: &[Event],
    after: i64,
    session: Uuid,
    new_session: bool,
    full: bool,
) -> Posts {
    let name = berth_common::names::session_name(session);
    let mut posts = Vec::new();
    if new_session && after == 0 {
        posts.push((
            0,
            format!("This thread's previous session ended, so this is a new one ({name})."),
        ));
    }
    let mut through = after;
    let mut turn: Vec<String> = Vec::new();
    for e in events {
        let text_of = || {
            payload::parse::<payload::AgentText>(&e.payload)
                .map(|t| t.text)
                .unwrap_or_default()
        };
        match e.kind.as_str() {
            ev::AGENT_MESSAGE => turn.push(text_of()),
            ev::AGENT_RESULT => {
                let text = turn.join("\n\n");
                let text = if text.trim().is_empty() {
                    "(no text in this turn)".into()
                } else {
                    text
                };
                posts.push((e.seq, cut(&text)));
                turn.clear();
            }
            ev::AGENT_TOOL_PERMISSION => {
                let p: payload::ToolPermission = payload::parse(&e.payload).unwrap_or_default();
                let notice = if p.tool_name == ev::ASK_USER_QUESTION {
                    format!(
                        ":question: The agent has questions for you. Answer with `berth sessions answer {name} --answer \"QUESTION=ANSWER\"`, or in the console."
                    )
                } else {
                    format!(
                        ":lock: The agent asks to use `{}`. Allow it with `berth sessions approve {name} {}` (or deny it), or in the console.",
                        p.tool_name, p.tool_use_id
                    )
                };
                posts.push((e.seq, notice));
            }
            ev::SESSION_CREDENTIAL_FAILED => {
                let credential = payload::parse::<payload::CredentialFailed>(&e.payload)
                    .map(|p| p.credential)
                    .unwrap_or_default();
                posts.push((e.seq, format!(":warning: Credential {credential} could not be refreshed; the agent's calls with it fail.")));
            }
            k if k == "session.status_failed" || k == "session.status_timeout" => {
                let p: payload::StatusChange = payload::parse(&e.payload).unwrap_or_default();
                let reason: String = p
                    .reason
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect();
                posts.push((
                    e.seq,
                    format!(":warning: The session ended ({}): {reason}", p.status),
                ));
            }
            _ => {}
        }
        // A turn in progress is answered when it ends.
        if turn.is_empty() {
            through = e.seq;
        }
    }
    if full
        && !turn.is_empty()
        && let Some(last) = events.last()
    {
        posts.push((last.seq, cut(&format!("{} (continued)", turn.join("\n\n")))));
        through = last.seq;
    }
    Posts { posts, through }
}

impl SlackReplies {
    pub(crate) async fn run(self) {
        let client = match super::https_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "Slack replies off: cannot load the system's CA roots");
                return;
            }
        };
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(POLL) => {}
            }
            let due = match self.store.claim_slack_threads(&self.owner, LEASE).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(error = %e, "Slack replies: claim failed");
                    continue;
                }
            };
            for t in due {
                let through = self.answer(&client, &t).await;
                if let Err(e) = self
                    .store
                    .slack_posted(t.session_id, &self.owner, through)
                    .await
                {
                    tracing::warn!(session_id = %t.session_id, error = %e, "Slack replies: could not record what was posted");
                }
            }
        }
    }

    /// Posts what `t` should hear; returns through which seq it has.
    async fn answer(&self, client: &HttpsClient, t: &DueThread) -> i64 {
        let events = match self
            .store
            .list_events(t.session_id, t.posted_seq, BATCH)
            .await
        {
            Ok(e) => e,
            Err(_) => return t.posted_seq,
        };
        let full = events.len() as i64 == BATCH;
        let plan = replies(&events, t.posted_seq, t.session_id, t.generation > 0, full);
        if plan.posts.is_empty() {
            return plan.through;
        }
        let token = match self.bot_token(t).await {
            Ok(h) => h,
            Err(why) => {
                tracing::warn!(session_id = %t.session_id, %why, "Slack replies: no bot token");
                return t.posted_seq;
            }
        };
        for (seq, text) in &plan.posts {
            if let Err(why) = self
                .post(client, &token, &t.channel, &t.thread_ts, text)
                .await
            {
                tracing::warn!(session_id = %t.session_id, %why, "Slack reply failed; trying again on the next pass");
                // Everything before this post is answered.
                return (seq - 1).max(t.posted_seq);
            }
        }
        plan.through
    }

    /// The app's bot token header (`Authorization: Bearer xoxb-…`).
    async fn bot_token(&self, t: &DueThread) -> Result<(String, String), String> {
        let (w, _) = self
            .store
            .webhook_by_id(t.webhook)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the Slack app was deleted")?;
        let id = w.slack_bot_secret.ok_or("not a Slack app")?;
        let rows = self
            .store
            .sealed_secrets(&t.project, &[id])
            .await
            .map_err(|e| e.to_string())?;
        let row = rows.first().ok_or("its bot token secret was deleted")?;
        let value = self
            .store
            .sealer()
            .open(&secret_context(&t.project), &row.sealed)
            .map_err(|e| e.to_string())?;
        let value = String::from_utf8(value).map_err(|_| "the bot token is not UTF-8")?;
        let header = berth_common::credentials::HttpHeader::with_defaults(
            &row.header_name,
            &row.header_prefix,
        );
        Ok((header.name.clone(), header.value(&value)))
    }

    async fn post(
        &self,
        client: &HttpsClient,
        (name, value): &(String, String),
        channel: &str,
        thread_ts: &str,
        text: &str,
    ) -> Result<(), String> {
        let url = format!("{}/chat.postMessage", self.api.trim_end_matches('/'));
        let body = json!({"channel": channel, "thread_ts": thread_ts, "text": text}).to_string();
        let mut auth = http::HeaderValue::from_str(value).map_err(|_| "bad bot token")?;
        auth.set_sensitive(true);
        let req = http::Request::post(&url)
            .header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .header(name.as_str(), auth)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let call = async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(TIMEOUT, call)
            .await
            .map_err(|_| "chat.postMessage timed out".to_string())??;
        let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if status.is_success() && answer["ok"] == true {
            Ok(())
        } else {
            Err(format!(
                "chat.postMessage: HTTP {status}, {}",
                answer["error"]
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, kind: &str, payload: serde_json::Value) -> Event {
        Event {
            session_id: Uuid::nil(),
            seq,
            id: Uuid::nil(),
            kind: kind.into(),
            create_time: chrono::Utc::now(),
            payload: payload.to_string(),
            raw: None,
            line_seq: 0,
            traceparent: None,
        }
    }

    #[test]
    fn one_post_per_turn_and_a_turn_in_progress_waits() {
        let events = vec![
            event(1, "user.message", json!({"text": "hi"})),
            event(2, ev::AGENT_MESSAGE, json!({"text": "first"})),
            event(3, ev::AGENT_MESSAGE, json!({"text": "second"})),
            event(4, ev::AGENT_RESULT, json!({})),
            event(5, ev::AGENT_MESSAGE, json!({"text": "still going"})),
        ];
        let p = replies(&events, 0, Uuid::nil(), false, false);
        assert_eq!(p.posts, vec![(4, "first\n\nsecond".to_string())]);
        assert_eq!(p.through, 4, "the open turn is posted when it ends");
        // A batch as long as a read: the open turn goes out as far as it went.
        let p = replies(&events, 0, Uuid::nil(), false, true);
        assert_eq!(p.posts.len(), 2);
        assert_eq!(p.posts[1], (5, "still going (continued)".to_string()));
        assert_eq!(p.through, 5);
        let asks = vec![event(
            7,
            ev::AGENT_TOOL_PERMISSION,
            json!({"tool_name": "Bash", "tool_use_id": "toolu_1"}),
        )];
        let p = replies(&asks, 6, Uuid::nil(), true, false);
        assert_eq!(
            p.posts.len(),
            1,
            "the new-session notice is for the first pass only"
        );
        assert!(
            p.posts[0].1.contains("berth sessions approve") && p.posts[0].1.contains("toolu_1")
        );
    }
}

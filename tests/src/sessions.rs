//! Session helpers: requests, turns, waits and the checks every
//! end-to-end test makes of a session's log.

use super::*;

/// A create request for the fake agent with `prompt` as the first message.
pub fn fake_session(prompt: &str) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        spec: Some(pb::AgentSpec {
            image: TEST_IMAGE.into(),
            ..Default::default()
        }),
        initial_message: prompt.into(),
        ..Default::default()
    }
}

/// Reads the session's events from `after_seq` until `done` says stop (or the
/// stream ends), within `timeout`.
pub async fn collect_until(
    client: &mut SessionsClient<Api>,
    name: &str,
    after_seq: i64,
    timeout: Duration,
    mut done: impl FnMut(&pb::Event) -> bool,
) -> anyhow::Result<Vec<pb::Event>> {
    let mut stream = client
        .stream_events(pb::StreamEventsRequest {
            name: name.into(),
            after_seq,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    let read = async {
        while let Some(e) = stream.next().await {
            let e = e?;
            let stop = done(&e);
            out.push(e);
            if stop {
                return anyhow::Ok(());
            }
        }
        let (last, why) = out
            .last()
            .map(|e| (e.r#type.clone(), e.payload_json.clone()))
            .unwrap_or_default();
        anyhow::bail!(
            "the event stream of {name} ended after {} events (last `{last}`: {why}) before the awaited event",
            out.len()
        )
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow::anyhow!("timed out waiting for events of {name}"))??;
    Ok(out)
}

/// Reads events until the session's first turn has ended (usage recorded, idle).
pub async fn until_turn_ends(
    client: &mut SessionsClient<Api>,
    name: &str,
    after_seq: i64,
) -> anyhow::Result<Vec<pb::Event>> {
    let mut usage_seen = false;
    collect_until(client, name, after_seq, Duration::from_secs(60), |e| {
        usage_seen |= e.r#type == "session.usage";
        usage_seen && e.r#type == "session.status_idle"
    })
    .await
}

/// Waits until the session satisfies `pred`; `what` describes it for the
/// error when it does not within `timeout`.
pub async fn wait_for_session(
    client: &mut SessionsClient<Api>,
    name: &str,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&pb::Session) -> bool,
) -> anyhow::Result<pb::Session> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let s = client
            .get_session(pb::GetSessionRequest { name: name.into() })
            .await?
            .into_inner();
        if pred(&s) {
            return Ok(s);
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "session {name} is not {what} within {timeout:?}: {:?} ({}) on `{}` at epoch {}",
                pb::SessionStatus::try_from(s.status),
                s.status_reason,
                s.node,
                s.epoch
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the session reaches `status`.
pub async fn wait_for_status(
    client: &mut SessionsClient<Api>,
    name: &str,
    status: pb::SessionStatus,
    timeout: Duration,
) -> anyhow::Result<pb::Session> {
    wait_for_session(client, name, timeout, &format!("{status:?}"), |s| {
        s.status == status as i32
    })
    .await
}

/// Every persisted event of a session (up to 1000), as ListEvents returns them.
pub async fn events_of(
    client: &mut SessionsClient<Api>,
    name: &str,
) -> anyhow::Result<Vec<pb::Event>> {
    Ok(client
        .list_events(pb::ListEventsRequest {
            name: name.into(),
            page_size: 1000,
            ..Default::default()
        })
        .await?
        .into_inner()
        .events)
}

/// Parses an event's JSON payload.
pub fn payload(e: &pb::Event) -> serde_json::Value {
    serde_json::from_str(&e.payload_json).unwrap_or(serde_json::Value::Null)
}

/// The agent's lines, byte for byte, in order: each is carried once, by the
/// first event made from it.
pub fn agent_lines(events: &[pb::Event]) -> Vec<Vec<u8>> {
    events
        .iter()
        .filter(|e| e.line_seq == e.seq && e.line_seq != 0)
        .map(|e| e.raw.clone())
        .collect()
}

/// An agent line as JSON (the line the event at `line_seq` carries).
pub fn line_json(events: &[pb::Event], e: &pb::Event) -> serde_json::Value {
    events
        .iter()
        .find(|l| l.seq == e.line_seq)
        .and_then(|l| serde_json::from_slice(&l.raw).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// Checks what every event of an agent's line must hold: the line is
/// carried once, by the first of its events, and the rest point back to it
/// from the seqs right after.
pub fn assert_lines_well_formed(events: &[pb::Event]) {
    let mut current = 0;
    for e in events {
        if e.line_seq == 0 {
            assert!(
                e.raw.is_empty(),
                "an event not from a line carries one: {e:?}"
            );
            continue;
        }
        if e.line_seq == e.seq {
            current = e.seq;
        } else {
            assert_eq!(
                e.line_seq, current,
                "event {} points to another line",
                e.seq
            );
            assert!(e.raw.is_empty(), "line stored twice at {}", e.seq);
        }
    }
}

/// Sends `text` to the session; returns the seq of its `user.message`.
pub async fn send(c: &mut SessionsClient<Api>, name: &str, text: &str) -> anyhow::Result<i64> {
    Ok(c.send_message(pb::SendMessageRequest {
        name: name.into(),
        text: text.into(),
        ..Default::default()
    })
    .await?
    .into_inner()
    .seq)
}

/// Creates a session and waits until its first turn has ended.
pub async fn idle_session(
    c: &mut SessionsClient<Api>,
    req: pb::CreateSessionRequest,
) -> anyhow::Result<pb::Session> {
    let s = c.create_session(req).await?.into_inner();
    reply_after(c, &s.name, 0).await?;
    Ok(s)
}

/// Sends `text` and waits for its turn to end; returns the agent's reply.
pub async fn turn(c: &mut SessionsClient<Api>, name: &str, text: &str) -> anyhow::Result<String> {
    let seq = send(c, name, text).await?;
    reply_after(c, name, seq).await
}

/// The agent's reply to the turn whose input is at `seq`.
pub async fn reply_after(
    c: &mut SessionsClient<Api>,
    name: &str,
    seq: i64,
) -> anyhow::Result<String> {
    let mut usage = false;
    let events = collect_until(c, name, seq, Duration::from_secs(60), |e| {
        usage |= e.r#type == "session.usage";
        usage && e.r#type == "session.status_idle"
    })
    .await?;
    Ok(events
        .iter()
        .filter(|e| e.r#type == "agent.message")
        .map(|e| payload(e)["text"].as_str().unwrap_or_default().to_string())
        .collect::<Vec<_>>()
        .join("\n"))
}

pub async fn get(c: &mut SessionsClient<Api>, name: &str) -> anyhow::Result<pb::Session> {
    Ok(c.get_session(pb::GetSessionRequest { name: name.into() })
        .await?
        .into_inner())
}

/// Pauses a session and waits until it is `paused` (its snapshot stored),
/// within `within`.
pub async fn pause_and_wait(
    c: &mut SessionsClient<Api>,
    name: &str,
    within: Duration,
) -> anyhow::Result<pb::Session> {
    c.pause_session(pb::PauseSessionRequest { name: name.into() })
        .await?;
    wait_for_status(c, name, pb::SessionStatus::Paused, within).await
}

/// Stops a session and waits until it is `stopped` (its snapshot saved).
pub async fn stop_and_wait(c: &mut SessionsClient<Api>, name: &str) -> anyhow::Result<pb::Session> {
    c.stop_session(pb::StopSessionRequest { name: name.into() })
        .await?;
    wait_for_status(c, name, pb::SessionStatus::Stopped, Duration::from_secs(60)).await
}

/// The next ack on a `Connect` stream (events before it are passed over),
/// within 20 s.
pub async fn next_ack(
    stream: &mut tonic::Streaming<pb::ConnectResponse>,
) -> anyhow::Result<pb::ConnectAck> {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(m) = stream.next().await {
            if let Some(pb::connect_response::Kind::Ack(a)) = m?.kind {
                return anyhow::Ok(a);
            }
        }
        anyhow::bail!("the stream ended before the ack")
    })
    .await?
}

//! A client's retries: a message sent again under its request id (as after
//! a call that failed with no answer) reaches the agent once.

use berth_proto::v1 as pb;
use berth_tests::*;

fn message(name: &str, text: &str, request_id: &str) -> pb::SendMessageRequest {
    pb::SendMessageRequest {
        name: name.into(),
        text: text.into(),
        request_id: request_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_retried_under_its_request_id_reaches_the_agent_once() -> anyhow::Result<()> {
    let cluster = TestCluster::builder().start().await?;
    let mut c = cluster.client();
    let s = idle_session(&mut c, fake_session("echo first")).await?;
    let first = c
        .send_message(message(&s.name, "echo once", "retry-1"))
        .await?
        .into_inner()
        .seq;
    let again = c
        .send_message(message(&s.name, "echo once", "retry-1"))
        .await?
        .into_inner()
        .seq;
    assert_eq!(again, first, "the retry is the first call's message");

    // A request id names one message: another under it is refused.
    let other = c
        .send_message(message(&s.name, "echo other", "retry-1"))
        .await
        .expect_err("another message under a used request id");
    assert_eq!(other.code(), tonic::Code::InvalidArgument);
    assert!(
        other.message().contains("request_id"),
        "{}",
        other.message()
    );
    let long = c
        .send_message(message(&s.name, "echo long", &"k".repeat(129)))
        .await
        .expect_err("a request id over 128 characters");
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert!(long.message().contains("request_id"), "{}", long.message());

    until_turn_ends(&mut c, &s.name, first - 1).await?;
    // Once the turn is over, a late retry still changes nothing.
    let late = c
        .send_message(message(&s.name, "echo once", "retry-1"))
        .await?
        .into_inner()
        .seq;
    assert_eq!(late, first);
    // Any text can be sent under a request id, a NUL escape too.
    let nul = message(&s.name, "echo nul:\u{0}:end", "retry-nul");
    let first_nul = c.send_message(nul.clone()).await?.into_inner().seq;
    assert_eq!(c.send_message(nul).await?.into_inner().seq, first_nul);
    until_turn_ends(&mut c, &s.name, first_nul - 1).await?;

    let events = events_of(&mut c, &s.name).await?;
    let sent: Vec<i64> = events
        .iter()
        .filter(|e| e.r#type == "user.message" && payload(e)["text"] == "echo once")
        .map(|e| e.seq)
        .collect();
    assert_eq!(sent, [first], "the message is logged once");
    let turns = events
        .iter()
        .filter(|e| e.r#type == "session.usage" && e.seq > first)
        .count();
    assert_eq!(turns, 2, "the agent answered each once");
    let last = events.last().map_or(0, |e| e.seq);
    let s = c
        .get_session(pb::GetSessionRequest { name: s.name })
        .await?
        .into_inner();
    assert_eq!(s.last_seq, last, "the late retry logged nothing");
    cluster.shutdown().await
}

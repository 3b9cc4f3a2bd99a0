//! Turn accounting when many sessions end turns at once: the dispatcher's
//! writer commits their lines and usage together, and each session must
//! still be accounted exactly once per turn, its usage right after the line
//! that ended the turn.

use std::time::Duration;

use berth_proto::v1 as pb;
use berth_tests::*;

/// A line program that answers every message with a message and a turn end
/// of 5 input tokens, 7 output tokens and $0.25.
const SCRIPT: &str = r#"while IFS= read -r line; do echo '{"type":"message","text":"got it"}'; echo '{"type":"turn_end","usage":{"input_tokens":5,"output_tokens":7,"cost_usd":0.25,"model":"sh"}}'; done"#;

const SESSIONS: usize = 6;
const TURNS: i64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_ending_together_are_each_accounted_once_after_their_line() -> anyhow::Result<()> {
    let cluster = TestCluster::builder()
        .capacity(SESSIONS as u32)
        .start()
        .await?;
    let mut c = cluster.client();
    let mut names = Vec::new();
    for _ in 0..SESSIONS {
        let mut req = fake_session("turn 1");
        if let Some(spec) = req.spec.as_mut() {
            spec.runtime = pb::Runtime::Jsonl as i32;
            spec.runtime_args = vec!["sh".into(), "-c".into(), SCRIPT.into()];
        }
        names.push(c.create_session(req).await?.into_inner().name);
    }
    for turn in 1..=TURNS {
        // Every session's turn ends at about the same time.
        let waits = names.iter().map(|name| {
            let mut c = cluster.client();
            async move {
                if turn > 1 {
                    send(&mut c, name, &format!("turn {turn}")).await?;
                }
                let mut usages = 0;
                collect_until(&mut c, name, 0, Duration::from_secs(90), |e| {
                    usages += i64::from(e.r#type == "session.usage");
                    usages == turn
                })
                .await
            }
        });
        futures::future::try_join_all(waits).await?;
    }
    for name in &names {
        let s = c
            .get_session(pb::GetSessionRequest { name: name.clone() })
            .await?
            .into_inner();
        let u = s.usage.expect("usage");
        assert_eq!(
            (u.turns, u.input_tokens, u.output_tokens, u.cost_usd),
            (TURNS, 5 * TURNS, 7 * TURNS, 0.25 * TURNS as f64),
            "{name}: every turn counted once"
        );
        let events = events_of(&mut c, name).await?;
        let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
        let mut usages = 0;
        for (i, e) in events.iter().enumerate() {
            if e.r#type != "session.usage" {
                continue;
            }
            usages += 1;
            let before = &events[i - 1];
            assert_eq!(
                before.r#type, "agent.result",
                "{name}: usage {} follows the line that ended its turn",
                e.seq
            );
            assert_eq!(payload(e)["turn"]["number"], usages, "{name}");
        }
        assert_eq!(usages, TURNS, "{name}");
    }
    cluster.shutdown().await
}

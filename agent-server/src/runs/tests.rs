//! The re-attach journal without Docker: a run fed outputs through its
//! channel, dispatcher streams as channels.

use std::sync::Arc;
use std::time::Duration;

use berth_proto::node::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{FrameTx, JournalConfig, Run, Runs};
use crate::session::{Command, Output, StartPath};

const GRACE: Duration = Duration::from_millis(100);

struct Harness {
    runs: Arc<Runs>,
    run: Arc<Run>,
    outputs: mpsc::Sender<Output>,
    commands: mpsc::Receiver<Command>,
}

/// A run of session `s` at epoch 1, its first stream `link`, journal of
/// `max_bytes`.
fn start(max_bytes: usize, link: FrameTx) -> Harness {
    let runs = Arc::new(Runs::new(
        JournalConfig {
            max_bytes,
            grace: GRACE,
        },
        TaskTracker::new(),
        CancellationToken::new(),
    ));
    let (cmd_tx, commands) = mpsc::channel(8);
    let (outputs, out_rx) = mpsc::channel(64);
    let run = runs.start(
        "s",
        1,
        link,
        (cmd_tx, out_rx),
        super::Kept {
            evict_snapshot_key: "evict-key".into(),
            ..Default::default()
        },
    );
    Harness {
        runs,
        run,
        outputs,
        commands,
    }
}

fn accepted() -> Output {
    Output::Accepted {
        container_id: "c1".into(),
        start: StartPath::Cold,
    }
}

fn checkpoint(n: u64) -> Output {
    Output::Checkpoint {
        key: format!("k{n}"),
        bytes: n,
    }
}

async fn next(rx: &mut mpsc::Receiver<Result<pb::NodeFrame, tonic::Status>>) -> pb::NodeFrame {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a frame in time")
        .expect("the stream is open")
        .expect("a frame, not an error")
}

#[tokio::test]
async fn a_reattach_gets_every_frame_its_owner_had_not_persisted() {
    let (link, mut first) = mpsc::channel(64);
    let h = start(1 << 20, link);
    h.outputs.send(accepted()).await.expect("send");
    for n in 1..=3 {
        h.outputs.send(checkpoint(n)).await.expect("send");
    }
    let seqs: Vec<u64> = [
        next(&mut first).await,
        next(&mut first).await,
        next(&mut first).await,
        next(&mut first).await,
    ]
    .iter()
    .map(|f| f.node_seq)
    .collect();
    assert_eq!(seqs, [1, 2, 3, 4]);
    // The first owner persisted up to 2, then its stream dropped.
    h.run.ack(&h.runs, 2);
    h.run.detach(&h.runs, 0);

    let (link, mut second) = mpsc::channel(64);
    let (run, _generation) = h.runs.attach("s", 2, 2, link).await.expect("re-attached");
    assert_eq!(run.epoch(), 2);
    let hello = next(&mut second).await;
    let Some(pb::node_frame::Kind::Accepted(a)) = hello.kind else {
        panic!("the re-attach is answered Accepted first: {hello:?}");
    };
    assert!(a.attached);
    assert_eq!(a.container_id, "c1");
    assert_eq!(next(&mut second).await.node_seq, 3);
    assert_eq!(next(&mut second).await.node_seq, 4);
    // New output goes to the new owner, after the replay.
    h.outputs.send(checkpoint(4)).await.expect("send");
    assert_eq!(next(&mut second).await.node_seq, 5);
}

#[tokio::test]
async fn an_attach_from_an_older_or_the_same_epoch_is_refused() {
    let (link, mut rx) = mpsc::channel(64);
    let h = start(1 << 20, link);
    h.outputs.send(accepted()).await.expect("send");
    next(&mut rx).await;
    let (link, _rx2) = mpsc::channel(64);
    let err = h.runs.attach("s", 1, 0, link).await.err().expect("refused");
    assert!(err.contains("epoch 1"), "{err}");
    let (link, _rx3) = mpsc::channel(64);
    let err = h
        .runs
        .attach("other", 5, 0, link)
        .await
        .err()
        .expect("refused");
    assert!(err.contains("no run"), "{err}");
}

#[tokio::test]
async fn a_message_delivered_before_is_not_delivered_again() {
    let (link, _rx) = mpsc::channel(64);
    let h = start(1 << 20, link);
    assert!(h.run.deliver(5));
    assert!(!h.run.deliver(5), "the same message again");
    assert!(!h.run.deliver(3), "an older one");
    assert!(h.run.deliver(6));
    assert!(h.run.deliver(0), "unnumbered input is always new");
}

#[tokio::test]
async fn a_full_journal_stops_reading_until_an_ack_makes_room() {
    let (link, mut rx) = mpsc::channel(64);
    // Room for one frame.
    let one = prost::Message::encoded_len(&super::frame(1, checkpoint(1)));
    let h = start(one, link);
    h.outputs.send(checkpoint(1)).await.expect("send");
    h.outputs.send(checkpoint(2)).await.expect("send");
    assert_eq!(next(&mut rx).await.node_seq, 1);
    let waited = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
    assert!(waited.is_err(), "the second frame waits for room");
    h.run.ack(&h.runs, 1);
    assert_eq!(next(&mut rx).await.node_seq, 2);
}

#[tokio::test]
async fn with_no_reattach_in_time_the_run_stops_with_a_snapshot() {
    let (link, mut rx) = mpsc::channel(64);
    let mut h = start(1 << 20, link);
    h.outputs.send(accepted()).await.expect("send");
    next(&mut rx).await;
    h.run.detach(&h.runs, 0);
    let cmd = tokio::time::timeout(GRACE * 20, h.commands.recv())
        .await
        .expect("a command in time")
        .expect("the run's commands are open");
    let Command::Stop {
        snapshot_key,
        abandoned,
        ..
    } = cmd
    else {
        panic!("a stop");
    };
    assert_eq!(snapshot_key, "evict-key");
    assert!(abandoned, "the stop says no dispatcher re-attached");
}

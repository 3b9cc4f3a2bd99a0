//! Large workspaces in bounded memory: snapshots and restores stream
//! through S3 multipart uploads, a 2 GiB workspace round-trips while the
//! node's memory stays small, and an S3 server killed mid-upload leaves the
//! previous snapshot the session's last good one.

use std::time::{Duration, Instant};

use berth_common::objects::{ObjectStore, PART_BYTES};
use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use berth_tests::*;
use tokio::io::AsyncReadExt;

/// `n` bytes that do not compress, the same for every call.
fn noise(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let sha = |b: &[u8]| {
        ring::digest::digest(&ring::digest::SHA256, b)
            .as_ref()
            .to_vec()
    };
    let mut block = sha(b"berth");
    while out.len() < n {
        block = sha(&block);
        out.extend_from_slice(&block);
    }
    out.truncate(n);
    out
}

/// A body that yields `data`, then fails: a writer that died mid-upload.
fn cut_short(data: Vec<u8>) -> impl tokio::io::AsyncRead + Unpin + Send {
    let failing = futures::stream::iter([
        Ok(bytes::Bytes::from(data)),
        Err(std::io::Error::other("the packer died")),
    ]);
    tokio_util::io::StreamReader::new(failing)
}

#[tokio::test]
async fn objects_upload_in_parts_and_a_failed_upload_leaves_the_old_object() -> anyhow::Result<()> {
    let s3 = s3::S3Server::start().await?;
    let store = ObjectStore::open(&s3.args()).await?;
    let big = noise(2 * PART_BYTES + 1000);
    let size = store.put_stream("big/1", &big[..]).await?;
    assert_eq!(size, big.len() as u64);
    assert_eq!(s3.parts_received(), 3, "two full parts and the rest");
    let mut back = Vec::new();
    store
        .get_stream("big/1")
        .await?
        .expect("stored")
        .read_to_end(&mut back)
        .await?;
    assert!(back == big, "the object reads back as written");

    // A small object is one PUT, no multipart.
    store.put_stream("small/1", &b"tiny"[..]).await?;
    assert_eq!(s3.parts_received(), 3);

    // A body that fails after two parts: the upload is aborted and the
    // object is what it was.
    let err = store
        .put_stream("big/1", cut_short(noise(PART_BYTES + 5)))
        .await
        .expect_err("a failed body fails the upload");
    assert!(err.to_string().contains("the packer died"), "{err}");
    assert!(s3.parts_received() > 3, "the failed upload had begun");
    assert_eq!(store.get("big/1").await?.map(|b| b.len()), Some(big.len()));
    assert_eq!(store.list("big/").await?, ["big/1"]);
    Ok(())
}

/// Runs `script` in the session's container; its stdout.
async fn sh(session_id: &str, script: &str) -> anyhow::Result<String> {
    let container = containers_of(session_id)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the session has no container"))?;
    Ok(exec_output(&container, &["sh", "-c", script])
        .await?
        .trim()
        .to_string())
}

/// The sha256 of a file in the session's workspace.
async fn checksum(session_id: &str, path: &str) -> anyhow::Result<String> {
    let out = sh(session_id, &format!("sha256sum {path}")).await?;
    let sum = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    anyhow::ensure!(sum.len() == 64, "sha256sum {path}: {out}");
    Ok(sum)
}

/// Resumes `name` and waits until its agent answers again.
async fn resume(c: &mut SessionsClient<Api>, name: &str, within: Duration) -> anyhow::Result<()> {
    c.resume_session(pb::ResumeSessionRequest { name: name.into() })
        .await?;
    wait_for_session(c, name, within, "running or idle", |s| {
        s.status == pb::SessionStatus::Running as i32 || s.status == pb::SessionStatus::Idle as i32
    })
    .await?;
    assert_eq!(turn(c, name, "echo back").await?, "back");
    Ok(())
}

const GIB: u64 = 1 << 30;
/// The node's memory may not pass this while it moves 2 GiB.
const RSS_LIMIT: u64 = 256 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2_gib_workspace_pauses_and_resumes_intact_in_bounded_node_memory() -> anyhow::Result<()>
{
    let mut cluster = TestCluster::builder().nodes(1).start().await?;
    let node = ProcessNode::start(
        &cluster,
        &[
            "--capacity",
            "1",
            "--checkpoint-interval",
            "0",
            "--memory-mib",
            "1024",
        ],
    )
    .await?;
    // Only a dispatcher of the node process places sessions.
    let mut c = cluster.add_dispatcher_for(&[&node]).await?;
    cluster.sigterm_dispatcher().await?;
    let s = c
        .create_session(fake_session("echo ready"))
        .await?
        .into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    let started = Instant::now();
    sh(
        &s.id,
        &format!("head -c {} /dev/urandom > /workspace/big", 2 * GIB),
    )
    .await?;
    let before = checksum(&s.id, "/workspace/big").await?;
    eprintln!("2 GiB written and summed in {:?}", started.elapsed());

    let started = Instant::now();
    let paused = pause_and_wait(&mut c, &s.name, Duration::from_secs(600)).await?;
    let snap = paused.snapshot.expect("a snapshot");
    eprintln!(
        "paused in {:?}: {} bytes stored",
        started.elapsed(),
        snap.size_bytes
    );
    assert!(
        snap.size_bytes as u64 > 2 * GIB,
        "random data does not shrink"
    );
    let started = Instant::now();
    resume(&mut c, &s.name, Duration::from_secs(600)).await?;
    eprintln!("resumed in {:?}", started.elapsed());
    assert_eq!(
        checksum(&s.id, "/workspace/big").await?,
        before,
        "the 2 GiB file came back intact"
    );
    let peak = node.peak_rss()?;
    eprintln!("node peak RSS: {} MiB", peak >> 20);
    assert!(
        peak < RSS_LIMIT,
        "the node held {} MiB at its peak (limit {} MiB)",
        peak >> 20,
        RSS_LIMIT >> 20
    );
    stop_and_wait(&mut c, &s.name).await?;
    drop(node);
    cluster.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_killed_mid_upload_leaves_the_previous_snapshot_good() -> anyhow::Result<()> {
    // No checkpoints: the session's last good snapshot is its first pause's.
    let cluster = TestCluster::builder()
        .nodes(1)
        .configure_node(|_, cfg, _| cfg.checkpoint_interval = Duration::ZERO)
        .start()
        .await?;
    let mut c = cluster.client();
    let s = c
        .create_session(fake_session("write notes.txt first"))
        .await?
        .into_inner();
    reply_after(&mut c, &s.name, 0).await?;
    let first = pause_and_wait(&mut c, &s.name, Duration::from_secs(60))
        .await?
        .snapshot
        .expect("a first snapshot");
    resume(&mut c, &s.name, Duration::from_secs(60)).await?;

    // Enough for several parts, then pause and kill S3 once parts flow.
    turn(&mut c, &s.name, "write notes.txt second").await?;
    sh(&s.id, "head -c 67108864 /dev/urandom > /workspace/noise").await?;
    let parts = cluster.s3.parts_received();
    c.pause_session(pb::PauseSessionRequest {
        name: s.name.clone(),
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.s3.parts_received() == parts {
        anyhow::ensure!(Instant::now() < deadline, "no part was ever uploaded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.s3.kill();
    let ended = wait_for_status(
        &mut c,
        &s.name,
        pb::SessionStatus::Stopped,
        Duration::from_secs(120),
    )
    .await?;
    cluster.s3.restart().await?;
    let events = events_of(&mut c, &s.name).await?;
    let status = events
        .iter()
        .rev()
        .find(|e| {
            e.r#type
                .starts_with(berth_common::events::SESSION_STATUS_PREFIX)
        })
        .map(|e| e.payload_json.clone())
        .unwrap_or_default();
    assert!(
        status.contains("pause failed, stopped instead: snapshot: storing"),
        "the pause says why it failed: {status}"
    );
    assert_eq!(
        ended.snapshot.as_ref().map(|s| &s.key),
        Some(&first.key),
        "the session's last good snapshot is still the first"
    );
    let failed_key = first.key.replace("/1.tar.zst", "/2.tar.zst");
    let store = ObjectStore::open(&cluster.s3.args()).await?;
    assert_eq!(
        store.get(&failed_key).await?.map(|b| b.len()),
        None,
        "no partial snapshot was stored"
    );
    // It resumes from the first snapshot: the file as it was then.
    resume(&mut c, &s.name, Duration::from_secs(60)).await?;
    assert_eq!(turn(&mut c, &s.name, "read notes.txt").await?, "first");
    stop_and_wait(&mut c, &s.name).await?;
    cluster.shutdown().await
}

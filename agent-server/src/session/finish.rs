//! A run's end: what is kept of it (its snapshot, its memory stores'
//! write-back), its container removed, and the words for how it ended.

use std::sync::Arc;

use crate::node::{Node, Slot};
use crate::spec::SessionSpec;

use super::Exit;
use super::start::Started;

/// What the run's loop saw of its end.
#[derive(Debug, Default)]
pub(super) struct Ended {
    /// Why it was stopped; `None`: the agent ended by itself.
    pub stop_reason: Option<String>,
    /// Where to save a snapshot ('' for none).
    pub snapshot_key: String,
    /// The container was killed (no exit code to read).
    pub killed: bool,
    pub evicted: bool,
    pub abandoned: bool,
    pub stderr_tail: Vec<u8>,
}

/// Saves what the run asked to keep, removes its container, and says how
/// it ended. A fenced run keeps nothing: its session lives on elsewhere.
pub(super) async fn finish(
    node: &Arc<Node>,
    slot: &Slot,
    spec: &SessionSpec,
    started: Started,
    ended: Ended,
) -> Exit {
    let runtime = &node.runtime;
    let Started {
        container_id,
        guard,
        process,
        ..
    } = started;
    let code = if ended.killed {
        None
    } else {
        runtime.exit_code(&process.exec_id).await
    };
    // Killed by SIGKILL with no stop asked: the kernel's OOM killer, if the
    // container's memory cgroup counted a kill.
    let oom = code == Some(137)
        && ended.stop_reason.is_none()
        && runtime
            .oom_kills(&container_id)
            .await
            .is_some_and(|n| n > 0);
    let stderr_tail = String::from_utf8_lossy(&ended.stderr_tail).into_owned();
    if slot.lease.is_fenced() {
        tracing::warn!("run fenced: removing its container without a snapshot or write-back");
        guard.remove().await;
        return Exit {
            code: code.unwrap_or(-1),
            reason: "stopped: superseded by a newer run of the session".into(),
            stderr_tail,
            stopped: true,
            ..Exit::failed("")
        };
    }
    // Save what the run asked to keep while the container still exists.
    let (snapshot, snapshot_error) = match ended.snapshot_key.as_str() {
        "" => (None, String::new()),
        key => match save(node, &container_id, key).await {
            Ok(bytes) => (Some((key.to_string(), bytes)), String::new()),
            Err(e) => (None, e),
        },
    };
    let memory_errors = crate::workspace::write_back_memory(
        runtime,
        &node.objects,
        &node.workspace,
        &container_id,
        spec,
    )
    .await;
    for e in &memory_errors {
        tracing::warn!(error = %e, "memory store write-back failed");
    }
    guard.remove().await;
    Exit {
        code: code.unwrap_or(-1),
        reason: exit_reason(ended.stop_reason.as_deref(), code, oom),
        stderr_tail,
        stopped: ended.stop_reason.is_some(),
        snapshot,
        snapshot_error,
        memory_errors,
        evicted: ended.evicted,
        abandoned: ended.abandoned,
        oom,
    }
}

/// Saves the container's snapshot to `key`: its compressed size, or why not.
async fn save(node: &Node, container_id: &str, key: &str) -> Result<u64, String> {
    let started = std::time::Instant::now();
    let saved = crate::workspace::snapshot(
        &node.runtime,
        &node.objects,
        &node.workspace,
        container_id,
        key,
    )
    .await;
    let result = if saved.is_ok() { "ok" } else { "error" };
    metrics::histogram!(crate::metrics::SNAPSHOT, "result" => result)
        .record(started.elapsed().as_secs_f64());
    match &saved {
        Ok(bytes) => {
            tracing::info!(%key, bytes, "snapshot saved");
            metrics::histogram!(crate::metrics::SNAPSHOT_BYTES).record(*bytes as f64);
        }
        Err(e) => tracing::warn!(%key, error = %e, "snapshot failed"),
    }
    saved
}

/// How a run ended, in words: the reason of `Exit`.
pub(super) fn exit_reason(stop_reason: Option<&str>, code: Option<i64>, oom: bool) -> String {
    match (stop_reason, code) {
        _ if oom => "oom: the agent ran out of memory (the container's memory limit)".to_string(),
        (Some(r), _) => format!("stopped: {r}"),
        (None, Some(0)) => "agent exited".to_string(),
        (None, Some(c)) => format!("agent exited with code {c}"),
        (None, None) => "agent ended without an exit code".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_reason_says_how_the_run_ended() {
        assert_eq!(exit_reason(None, Some(0), false), "agent exited");
        assert_eq!(
            exit_reason(None, Some(3), false),
            "agent exited with code 3"
        );
        assert_eq!(
            exit_reason(None, None, false),
            "agent ended without an exit code"
        );
        assert_eq!(exit_reason(Some("user"), Some(0), false), "stopped: user");
        // The kernel's kill wins over everything else.
        assert!(exit_reason(None, Some(137), true).starts_with("oom:"));
    }
}

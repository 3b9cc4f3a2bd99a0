//! Checkpoints of a run: after a turn ends, at most one per interval, one
//! at a time, in the background; the run waits for one under way before
//! its container goes.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::node::Node;
use crate::spec::SessionSpec;

use super::Output;

/// Checkpoints of one run: after a turn ends, at most one per interval,
/// one at a time, in the background.
pub(super) struct Checkpoints {
    interval: std::time::Duration,
    last: Option<tokio::time::Instant>,
    running: Option<tokio::task::JoinHandle<()>>,
    taken: u64,
}

impl Checkpoints {
    pub(super) fn new(interval: std::time::Duration) -> Self {
        Self {
            interval,
            last: None,
            running: None,
            taken: 0,
        }
    }

    /// A turn ended: starts a checkpoint if one is due.
    pub(super) fn turn_ended(
        &mut self,
        node: &Arc<Node>,
        spec: &SessionSpec,
        epoch: i64,
        container_id: &str,
        out: &mpsc::Sender<Output>,
    ) {
        if self.interval.is_zero() || spec.checkpoint_key_prefix.is_empty() {
            return;
        }
        if self.running.as_ref().is_some_and(|h| !h.is_finished())
            || self.last.is_some_and(|t| t.elapsed() < self.interval)
        {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        let key = format!(
            "{}{epoch}-{}.tar.zst",
            spec.checkpoint_key_prefix,
            self.taken % 2
        );
        self.taken += 1;
        let (node, container_id, out) = (node.clone(), container_id.to_string(), out.clone());
        self.running = Some(tokio::spawn(async move {
            let mut ws = node.workspace.clone();
            ws.snapshot_max_bytes = ws.snapshot_max_bytes.min(node.cfg.checkpoint_max_bytes);
            let started = std::time::Instant::now();
            match crate::workspace::snapshot(&node.runtime, &node.objects, &ws, &container_id, &key)
                .await
            {
                Ok(bytes) => {
                    tracing::debug!(%key, bytes, took = ?started.elapsed(), "checkpoint saved");
                    let _ = out.send(Output::Checkpoint { key, bytes }).await;
                }
                Err(e) => {
                    tracing::warn!(%key, error = %e, "checkpoint failed; the last one stands")
                }
            }
        }));
    }

    /// Waits for a checkpoint under way (before the container goes).
    pub(super) async fn finish(&mut self) {
        if let Some(h) = self.running.take() {
            let _ = h.await;
        }
    }
}

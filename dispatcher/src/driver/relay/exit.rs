//! How a run's end lands in the session: a pure [`outcome`] of the node's
//! `Exited` frame and what this relay asked, and the relay's step that
//! records it (errors, snapshot, the status change).

use berth_common::events::payload::StatusDetail;
use berth_proto::node::v1 as pb;

use super::state::{Flow, Relay, StopAsked};
use crate::driver::ctx::durably;
use crate::error::{Error, Result};
use crate::session::{NewEvent, StatusEvent};

/// What a run's end makes of its session.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Outcome {
    /// The run moved (a drain, or no dispatcher re-attached in time): the
    /// session is re-queued, resuming from the run's snapshot if it saved
    /// one.
    Moved(String),
    /// The session's run is over: this status change, for this reason.
    Ended(StatusEvent, String),
}

/// The outcome of `x`, the node's account of the run's end on `node`, given
/// the stop this relay asked for, if any.
pub(super) fn outcome(x: &pb::Exited, asked: Option<&StopAsked>, node: &str) -> Outcome {
    if x.evicted {
        return Outcome::Moved(format!("node {node} drained; re-queued"));
    }
    if x.abandoned {
        return Outcome::Moved(format!(
            "node {node} stopped the run: no dispatcher re-attached within its grace period; re-queued"
        ));
    }
    let success = x.exit_code == 0;
    let stopped = StatusEvent::Exited {
        success,
        stopped: true,
    };
    match (asked, x.stopped) {
        (Some(StopAsked { pause: true, .. }), true) if !x.snapshot_key.is_empty() => {
            Outcome::Ended(StatusEvent::Paused, "user".into())
        }
        (Some(StopAsked { pause: true, .. }), true) => Outcome::Ended(
            stopped,
            format!(
                "pause failed, stopped instead: snapshot: {}",
                x.snapshot_error
            ),
        ),
        (Some(asked), true) => Outcome::Ended(stopped, asked.reason.clone()),
        (_, false) if x.oom => Outcome::Ended(
            StatusEvent::Exited {
                success: false,
                stopped: false,
            },
            "oom".into(),
        ),
        // Stopped with no stop asked of this relay: asked of the run's
        // earlier owner, by a user.
        (None, true) => Outcome::Ended(stopped, "user".into()),
        (_, false) => Outcome::Ended(
            StatusEvent::Exited {
                success,
                stopped: false,
            },
            x.reason.clone(),
        ),
    }
}

impl Relay<'_> {
    pub(super) async fn on_exit(&mut self, x: pb::Exited) -> Result<Flow> {
        let id = self.session.id;
        let pause = self.stop_asked.as_ref().is_some_and(|s| s.pause);
        let why = if x.stopped {
            self.stop_asked
                .as_ref()
                .map_or_else(|| "stopped".to_string(), |s| s.reason.clone())
        } else {
            x.reason.clone()
        };
        self.close_tools(&format!("the agent's run ended: {why}"), pause)
            .await?;
        let snapshot_error = Some(&x.snapshot_error).filter(|e| !e.is_empty());
        for e in x.memory_errors.iter().chain(snapshot_error) {
            self.ctx
                .log
                .append_queued(id, self.session.epoch, NewEvent::error(e))
                .await?;
        }
        if !x.snapshot_key.is_empty() {
            let ctx = self.ctx;
            durably(ctx, || {
                ctx.store
                    .record_snapshot(id, &x.snapshot_key, x.snapshot_bytes)
            })
            .await?;
        }
        let node = self.link.placed.link.name();
        let (event, reason, detail) = match outcome(&x, self.stop_asked.as_ref(), &node) {
            // The run moves, with its snapshot: another node resumes it.
            Outcome::Moved(why) => {
                let from = if x.snapshot_key.is_empty() {
                    "restarts without a snapshot"
                } else {
                    "resumes from its snapshot"
                };
                tracing::info!(snapshot = %x.snapshot_key, "{why}: the session {from}");
                let detail = StatusDetail {
                    snapshot: Some(x.snapshot_key),
                    snapshot_error: Some(x.snapshot_error),
                    ..StatusDetail::default()
                };
                (StatusEvent::NodeLost, why, detail)
            }
            Outcome::Ended(event, reason) => {
                let detail = StatusDetail {
                    exit_code: Some(x.exit_code),
                    stderr_tail: Some(x.stderr_tail),
                    detail: Some(x.reason),
                    snapshot: Some(x.snapshot_key),
                    ..StatusDetail::default()
                };
                (event, reason, detail)
            }
        };
        match self.transition(event, &reason, detail).await {
            Ok(()) => Ok(Flow::Done),
            // A run that ended on its own after the session left it.
            Err(Error::Transition(_) | Error::Superseded { .. })
                if event != StatusEvent::NodeLost =>
            {
                Ok(Flow::Done)
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(f: impl FnOnce(&mut pb::Exited)) -> pb::Exited {
        let mut x = pb::Exited::default();
        f(&mut x);
        x
    }

    fn asked(pause: bool) -> StopAsked {
        StopAsked {
            reason: if pause { "user" } else { "inactivity" }.into(),
            pause,
        }
    }

    #[test]
    fn a_run_the_node_ended_on_its_own_moves() {
        let drained = exited(|x| x.evicted = true);
        assert_eq!(
            outcome(&drained, None, "n1"),
            Outcome::Moved("node n1 drained; re-queued".into())
        );
        let abandoned = exited(|x| {
            x.abandoned = true;
            x.stopped = true;
        });
        let Outcome::Moved(why) = outcome(&abandoned, None, "n1") else {
            panic!("an abandoned run must move");
        };
        assert!(why.contains("no dispatcher re-attached"), "{why}");
    }

    #[test]
    fn a_pause_ends_paused_only_with_its_snapshot() {
        let saved = exited(|x| {
            x.stopped = true;
            x.snapshot_key = "k".into();
        });
        assert_eq!(
            outcome(&saved, Some(&asked(true)), "n"),
            Outcome::Ended(StatusEvent::Paused, "user".into())
        );
        let failed = exited(|x| {
            x.stopped = true;
            x.snapshot_error = "disk full".into();
        });
        let Outcome::Ended(StatusEvent::Exited { stopped: true, .. }, why) =
            outcome(&failed, Some(&asked(true)), "n")
        else {
            panic!("a failed pause stops");
        };
        assert!(why.contains("disk full"), "{why}");
    }

    #[test]
    fn a_stop_keeps_its_reason_and_an_exit_its_words() {
        let stopped = exited(|x| x.stopped = true);
        assert_eq!(
            outcome(&stopped, Some(&asked(false)), "n"),
            Outcome::Ended(
                StatusEvent::Exited {
                    success: true,
                    stopped: true
                },
                "inactivity".into()
            )
        );
        let crashed = exited(|x| {
            x.exit_code = 3;
            x.reason = "agent exited with code 3".into();
        });
        assert_eq!(
            outcome(&crashed, None, "n"),
            Outcome::Ended(
                StatusEvent::Exited {
                    success: false,
                    stopped: false
                },
                "agent exited with code 3".into()
            )
        );
        let oom = exited(|x| {
            x.exit_code = 137;
            x.oom = true;
        });
        assert_eq!(
            outcome(&oom, None, "n"),
            Outcome::Ended(
                StatusEvent::Exited {
                    success: false,
                    stopped: false
                },
                "oom".into()
            )
        );
    }
}

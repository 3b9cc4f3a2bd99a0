//! The session status machine: one enum, one pure transition function.
//!
//! ```text
//! pending → starting → running ⇄ idle
//!              ↘         ↘       ↘
//!               failed    stopping → stopped        (resumable)
//!                         paused                     (resumable)
//!                         completed | failed | timeout
//! any live state → rescheduling (node lost) → starting …
//! stopped | paused | completed | failed | timeout → archived
//! ```
//!
//! Every persisted change goes through [`SessionStatus::transition`] and is
//! written with compare-and-set on the previous status.

use std::fmt;
use std::str::FromStr;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStatus {
    /// Queued, waiting for a node.
    Pending,
    /// Claimed and placed; the container and agent are starting.
    Starting,
    /// A turn is in flight.
    Running,
    /// Waiting for user input.
    Idle,
    /// A stop was requested; the agent is being shut down.
    Stopping,
    /// Stopped by the user, inactivity or budget. Resumable.
    Stopped,
    /// Snapshot saved, container freed. Resumable.
    Paused,
    /// The agent exited cleanly.
    Completed,
    /// The agent, its container or its start failed.
    Failed,
    /// The hard session timeout elapsed.
    Timeout,
    /// Its node was lost; queued to run again.
    Rescheduling,
    /// Read-only.
    Archived,
}

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusEvent {
    /// A dispatcher claimed it from the queue.
    Claimed,
    /// The node accepted it; `busy` when input is already waiting.
    Started { busy: bool },
    /// Input reached the agent.
    TurnStarted,
    /// The agent finished its turn.
    TurnEnded,
    /// Someone asked it to stop.
    StopRequested,
    /// Someone asked it to pause: stop with a snapshot and end `paused`.
    PauseRequested,
    /// The agent process ended; `stopped` when a stop preceded it.
    Exited { success: bool, stopped: bool },
    /// It could not be started, or failed outside the agent.
    Failed,
    /// The hard timeout elapsed.
    TimedOut,
    /// Its node was lost.
    NodeLost,
    /// Its snapshot was saved and container freed.
    Paused,
    /// Asked to run again after a stop or pause.
    Resumed,
    /// Made read-only.
    Archived,
}

/// A transition the machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {from} session cannot take `{event:?}`")]
pub struct InvalidTransition {
    pub from: SessionStatus,
    pub event: StatusEvent,
}

impl SessionStatus {
    /// Every status, for exhaustive tests and metrics.
    pub const ALL: [SessionStatus; 12] = [
        Self::Pending,
        Self::Starting,
        Self::Running,
        Self::Idle,
        Self::Stopping,
        Self::Stopped,
        Self::Paused,
        Self::Completed,
        Self::Failed,
        Self::Timeout,
        Self::Rescheduling,
        Self::Archived,
    ];

    /// Statuses the queue claims from.
    pub const CLAIMABLE: [SessionStatus; 2] = [Self::Pending, Self::Rescheduling];

    /// The next status. Pure: no I/O. An event that changes nothing (a second
    /// stop request, a turn starting while one runs) returns `self`.
    pub fn transition(self, event: StatusEvent) -> Result<SessionStatus, InvalidTransition> {
        use SessionStatus::*;
        use StatusEvent as E;
        let next = match (self, event) {
            (Pending | Rescheduling, E::Claimed) => Starting,
            (Starting, E::Started { busy: true }) => Running,
            (Starting, E::Started { busy: false }) => Idle,
            (Idle | Running, E::TurnStarted) => Running,
            (Running | Idle, E::TurnEnded) => Idle,
            // Turn bookkeeping arriving while a stop is under way changes nothing.
            (Stopping, E::TurnStarted | E::TurnEnded) => Stopping,
            (Pending | Rescheduling, E::StopRequested) => Stopped,
            (Starting | Running | Idle, E::StopRequested) => Stopping,
            (Stopping | Stopped, E::StopRequested) => self,
            (Running | Idle, E::PauseRequested) => Stopping,
            (Stopping, E::Exited { .. }) => Stopped,
            (Starting | Running | Idle, E::Exited { stopped: true, .. }) => Stopped,
            (
                Starting | Running | Idle,
                E::Exited {
                    success: true,
                    stopped: false,
                },
            ) => Completed,
            (
                Starting | Running | Idle,
                E::Exited {
                    success: false,
                    stopped: false,
                },
            ) => Failed,
            (Pending | Starting | Running | Idle | Stopping | Rescheduling, E::Failed) => Failed,
            (Pending | Starting | Running | Idle | Stopping | Rescheduling, E::TimedOut) => Timeout,
            (Starting | Running | Idle, E::NodeLost) => Rescheduling,
            // A user's stop is never turned into a restart: a run lost
            // while stopping ends stopped (its last snapshot, if any, kept).
            (Stopping, E::NodeLost) => Stopped,
            (Running | Idle | Stopping, E::Paused) => Paused,
            (Stopped | Paused, E::Resumed) => Pending,
            (Stopped | Paused | Completed | Failed | Timeout, E::Archived) => Archived,
            (from, event) => return Err(InvalidTransition { from, event }),
        };
        Ok(next)
    }

    /// Whether a container may be running for this session (or soon will be).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Self::Pending
                | Self::Starting
                | Self::Running
                | Self::Idle
                | Self::Stopping
                | Self::Rescheduling
        )
    }

    /// Whether the session has not ended: live, or paused (counted by the
    /// metrics sampler).
    pub fn is_open(self) -> bool {
        self.is_live() || self == Self::Paused
    }

    /// Whether this status ends a run (what `berth_sessions_ended_total` counts).
    pub fn ends_run(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Stopped | Self::Failed | Self::Timeout | Self::Paused
        )
    }

    /// Whether the session accepts user messages.
    pub fn accepts_input(self) -> bool {
        matches!(
            self,
            Self::Pending | Self::Starting | Self::Running | Self::Idle | Self::Rescheduling
        )
    }

    /// The lowercase name stored in the database and used in event types.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Idle => "idle",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Rescheduling => "rescheduling",
            Self::Archived => "archived",
        }
    }

    /// The event type recording a change to this status.
    pub fn event_type(self) -> String {
        format!(
            "{}{}",
            berth_common::events::SESSION_STATUS_PREFIX,
            self.as_str()
        )
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SessionStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| format!("unknown session status `{s}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::SessionStatus::*;
    use super::StatusEvent as E;
    use super::*;

    const EVENTS: [StatusEvent; 16] = [
        E::Claimed,
        E::Started { busy: true },
        E::Started { busy: false },
        E::TurnStarted,
        E::TurnEnded,
        E::StopRequested,
        E::PauseRequested,
        E::Exited {
            success: true,
            stopped: false,
        },
        E::Exited {
            success: false,
            stopped: false,
        },
        E::Exited {
            success: false,
            stopped: true,
        },
        E::Failed,
        E::TimedOut,
        E::NodeLost,
        E::Paused,
        E::Resumed,
        E::Archived,
    ];

    #[test]
    fn the_happy_path() {
        let s = Pending
            .transition(E::Claimed)
            .and_then(|s| s.transition(E::Started { busy: true }));
        assert_eq!(s, Ok(Running));
        assert_eq!(Running.transition(E::TurnEnded), Ok(Idle));
        assert_eq!(Idle.transition(E::TurnStarted), Ok(Running));
        assert_eq!(Idle.transition(E::StopRequested), Ok(Stopping));
        assert_eq!(
            Stopping.transition(E::Exited {
                success: true,
                stopped: true
            }),
            Ok(Stopped)
        );
    }

    #[test]
    fn agent_exits_decide_completed_or_failed() {
        assert_eq!(
            Running.transition(E::Exited {
                success: false,
                stopped: false
            }),
            Ok(Failed)
        );
        assert_eq!(
            Idle.transition(E::Exited {
                success: true,
                stopped: false
            }),
            Ok(Completed)
        );
        assert_eq!(Starting.transition(E::Failed), Ok(Failed));
    }

    #[test]
    fn nothing_leaves_archived_and_terminal_states_only_archive() {
        for e in EVENTS {
            assert!(Archived.transition(e).is_err(), "archived took {e:?}");
            for t in [Completed, Failed, Timeout] {
                assert_eq!(t.transition(e).is_ok(), e == E::Archived, "{t} took {e:?}");
            }
        }
    }

    #[test]
    fn only_queued_sessions_are_claimed_and_claims_start_them() {
        for s in SessionStatus::ALL {
            let claimed = s.transition(E::Claimed);
            assert_eq!(
                claimed.is_ok(),
                SessionStatus::CLAIMABLE.contains(&s),
                "{s}"
            );
            if let Ok(next) = claimed {
                assert_eq!(next, Starting);
            }
        }
    }

    #[test]
    fn every_result_is_a_known_status_and_names_round_trip() {
        for s in SessionStatus::ALL {
            assert_eq!(s.as_str().parse::<SessionStatus>(), Ok(s));
            for e in EVENTS {
                if let Ok(next) = s.transition(e) {
                    assert!(SessionStatus::ALL.contains(&next));
                    // Leaving a live state for a dead one never needs another hop.
                    if !next.is_live() && s.is_live() {
                        assert!(!matches!(next, Pending | Starting));
                    }
                }
            }
        }
    }

    #[test]
    fn only_running_or_idle_sessions_pause() {
        for s in SessionStatus::ALL {
            let paused = s.transition(E::PauseRequested);
            assert_eq!(paused.is_ok(), matches!(s, Running | Idle), "{s}");
        }
        assert_eq!(Idle.transition(E::PauseRequested), Ok(Stopping));
    }

    #[test]
    fn a_run_lost_while_stopping_ends_stopped_never_restarts() {
        assert_eq!(Stopping.transition(E::NodeLost), Ok(Stopped));
        assert_eq!(Running.transition(E::NodeLost), Ok(Rescheduling));
    }

    #[test]
    fn stop_requests_are_idempotent() {
        assert_eq!(Stopping.transition(E::StopRequested), Ok(Stopping));
        assert_eq!(Stopped.transition(E::StopRequested), Ok(Stopped));
        assert_eq!(Pending.transition(E::StopRequested), Ok(Stopped));
        assert!(Completed.transition(E::StopRequested).is_err());
    }
}

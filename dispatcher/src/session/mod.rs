//! The session domain: what a session is, with no wire or SQL types.

pub mod notify;
pub(crate) mod questions;
pub mod status;
pub(crate) mod tool_requests;
pub mod usage;

use std::collections::BTreeMap;
use std::time::Duration;

use berth_common::events::{self as ev, payload};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use berth_common::TurnUsage;
pub use status::{InvalidTransition, SessionStatus, StatusEvent};

pub use berth_common::spec::{AgentSpec, Limits, Runtime, Skill, limits};

/// Something copied into the container before the agent starts. Stored as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// An uploaded file, `files/{id}`.
    File { file_id: Uuid, path: String },
    /// A per-agent memory store.
    Memory {
        store: String,
        path: String,
        read_write: bool,
    },
    /// A git repository, cloned by the node.
    Git {
        url: String,
        #[serde(default)]
        git_ref: String,
        path: String,
        /// The secret (id) holding the SSH key to clone with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ssh_key_secret: Option<String>,
        /// The credential (id) to clone `https://` with, through the gateway.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<String>,
    },
}

/// The newest snapshot of a session.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub key: String,
    pub size_bytes: i64,
    pub create_time: DateTime<Utc>,
}

/// Object key of a session's `n`th snapshot.
pub fn snapshot_key(id: Uuid, n: i64) -> String {
    format!("sessions/{id}/snapshots/{n}.tar.zst")
}

/// Prefix of every object a session owns.
pub fn session_prefix(id: Uuid) -> String {
    format!("sessions/{id}/")
}

/// The project of anonymous callers (`--allow-anonymous`) and of rows made
/// before projects existed.
pub const DEFAULT_PROJECT: &str = "default";

/// Object key of an agent's memory store. The default project keeps the
/// keys it had before projects existed.
pub fn memory_key(project: &str, agent_id: &str, store: &str) -> String {
    if project == DEFAULT_PROJECT {
        format!("agents/{agent_id}/memory/{store}.tar.zst")
    } else {
        format!("projects/{project}/agents/{agent_id}/memory/{store}.tar.zst")
    }
}

/// Object key of an uploaded file.
pub fn file_key(id: Uuid) -> String {
    format!("files/{id}")
}

/// Longest a session may sit idle when neither it nor the deployment says.
pub const DEFAULT_INACTIVITY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Token usage and cost summed over a session.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_input_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub cost_usd: f64,
    pub turns: i64,
    /// The same per model, largest cost first (empty where not read).
    pub models: Vec<berth_common::usage::ModelFigures>,
}

/// A session as stored.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: Uuid,
    /// The project it belongs to; other projects never see it.
    pub project: String,
    pub request_id: Option<String>,
    pub display_name: String,
    pub status: SessionStatus,
    pub status_reason: String,
    /// Its env holds the names only; the values are in `env_sealed`.
    pub spec: AgentSpec,
    /// The env values, sealed (see `Store::session_env`); `None`: no env.
    pub env_sealed: Option<Vec<u8>>,
    pub labels: BTreeMap<String, String>,
    /// The node running it, or empty.
    pub node: String,
    /// The node frame of the current run last persisted (re-attach cursor).
    pub node_seq: i64,
    /// The dispatcher driving it, or empty.
    pub owner: String,
    pub epoch: i64,
    pub last_seq: i64,
    /// Seq of the last user event forwarded to the runtime.
    pub input_seq: i64,
    pub runtime_session_id: String,
    pub usage: Usage,
    /// The runtime's running totals after its last turn: the next turn's baseline.
    pub runtime_totals: usage::RunningTotals,
    pub timeout: Option<Duration>,
    /// The agent and version it was made from.
    pub agent: Option<(String, i64)>,
    pub resources: Vec<Resource>,
    /// The session's own inactivity timeout (the deployment's applies if `None`).
    pub inactivity_timeout: Option<Duration>,
    pub budget_usd: Option<f64>,
    pub queue_timeout: Option<Duration>,
    pub queue_deadline: Option<DateTime<Utc>>,
    pub snapshot: Option<Snapshot>,
    /// Snapshots taken so far.
    pub snapshots: i64,
    pub archive_time: Option<DateTime<Utc>>,
    pub create_time: DateTime<Utc>,
    pub update_time: DateTime<Utc>,
    pub start_time: Option<DateTime<Utc>>,
    pub end_time: Option<DateTime<Utc>>,
    /// Tool permission requests waiting for an answer.
    pub pending_tools: i64,
    /// The trace context it was created in (W3C `traceparent`): its
    /// placement joins that trace. `None` when traces were off.
    pub traceparent: Option<String>,
}

/// What a session's agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    Working,
    Idle,
    WaitingInput,
}

impl Activity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Working => "working",
            Self::Idle => "idle",
            Self::WaitingInput => "waiting_input",
        }
    }
}

impl Session {
    /// `None` while no agent runs (queued, stopping, paused, ended…).
    pub fn activity(&self) -> Option<Activity> {
        use SessionStatus::*;
        match self.status {
            Starting | Running | Idle if self.pending_tools > 0 => Some(Activity::WaitingInput),
            Starting | Running => Some(Activity::Working),
            Idle => Some(Activity::Idle),
            _ => None,
        }
    }
}

/// A validated create request.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub request_id: Option<String>,
    pub display_name: String,
    pub spec: AgentSpec,
    pub labels: BTreeMap<String, String>,
    pub initial_message: Option<String>,
    pub timeout: Option<Duration>,
    /// `agents/{id}` (with `@{version}` to pin), resolved at creation.
    pub agent: Option<String>,
    pub resources: Vec<Resource>,
    pub inactivity_timeout: Option<Duration>,
    pub budget_usd: Option<f64>,
    pub queue_timeout: Option<Duration>,
    /// The agent version `agent` resolved to; set by the operations layer,
    /// which also fills `spec` from that version.
    pub pinned: Option<(String, i64)>,
    /// Sampling parameters, applied (as the runtime's env) once the runtime
    /// is known.
    pub run_params: RunParams,
}

impl NewSession {
    /// What identifies this request, so that a `request_id` reused for
    /// another request is refused (AIP-155): SHA-256 over every field as
    /// asked, env values aside (they may be secrets, and are never hashed
    /// into a row). Computed before the agent is resolved, so a retry after
    /// the agent got a new version is the same request.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut spec = self.spec.clone();
        for v in spec.env.values_mut() {
            v.clear();
        }
        let canonical = serde_json::json!({
            "display_name": self.display_name,
            "spec": spec,
            "labels": self.labels,
            "initial_message": self.initial_message,
            "timeout_ms": self.timeout.map(|d| d.as_millis()),
            "agent": self.agent,
            "resources": self.resources,
            "inactivity_timeout_ms": self.inactivity_timeout.map(|d| d.as_millis()),
            "budget_usd": self.budget_usd,
            "queue_timeout_ms": self.queue_timeout.map(|d| d.as_millis()),
            "run_params": format!("{:?}", self.run_params),
        });
        ring::digest::digest(&ring::digest::SHA256, canonical.to_string().as_bytes())
            .as_ref()
            .to_vec()
    }

    /// A session of `agent` that `message` opens, as a schedule or a
    /// webhook starts it: `request_id` makes its creation idempotent.
    pub fn of_agent(
        agent: &str,
        message: String,
        labels: BTreeMap<String, String>,
        display_name: String,
        request_id: String,
    ) -> Self {
        Self {
            request_id: Some(request_id),
            display_name,
            spec: AgentSpec::default(),
            labels,
            initial_message: Some(message),
            timeout: None,
            agent: Some(agent.to_string()),
            resources: Vec::new(),
            inactivity_timeout: None,
            budget_usd: None,
            queue_timeout: None,
            pinned: None,
            run_params: RunParams::default(),
        }
    }
}

/// Sampling parameters a session asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunParams {
    pub max_output_tokens: Option<i32>,
    pub temperature: Option<f64>,
}

impl RunParams {
    /// The env that applies these to `runtime`, or INVALID_ARGUMENT naming
    /// a parameter the runtime cannot apply.
    pub fn env(
        &self,
        runtime: Runtime,
    ) -> Result<Vec<(String, String)>, berth_common::spec::FieldError> {
        let mut env = Vec::new();
        match runtime {
            Runtime::ClaudeCode => {
                if self.temperature.is_some() {
                    return Err(berth_common::spec::FieldError::new(
                        "run_params.temperature",
                        "the claude_code runtime (Claude Code) takes no temperature; leave it unset",
                    ));
                }
                if let Some(n) = self.max_output_tokens {
                    env.push(("CLAUDE_CODE_MAX_OUTPUT_TOKENS".into(), n.to_string()));
                }
            }
            Runtime::Jsonl => {
                if let Some(n) = self.max_output_tokens {
                    env.push(("BERTH_MAX_OUTPUT_TOKENS".into(), n.to_string()));
                }
                if let Some(t) = self.temperature {
                    env.push(("BERTH_TEMPERATURE".into(), t.to_string()));
                }
            }
        }
        Ok(env)
    }
}

/// One persisted event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub session_id: Uuid,
    pub seq: i64,
    pub id: Uuid,
    pub kind: String,
    pub create_time: DateTime<Utc>,
    /// A JSON object.
    pub payload: String,
    /// The agent's line, byte for byte, on the first event made from it.
    pub raw: Option<Vec<u8>>,
    /// Seq of the event carrying this event's line; 0 when not from a line.
    pub line_seq: i64,
    /// The trace context it was written in (W3C `traceparent`).
    pub traceparent: Option<String>,
}

impl Event {
    /// Whether this event moves its session to a status where nothing runs:
    /// live tails end after it.
    pub fn ends_run(&self) -> bool {
        self.kind
            .strip_prefix(ev::SESSION_STATUS_PREFIX)
            .and_then(|s| s.parse::<SessionStatus>().ok())
            .is_some_and(|s| !s.is_live())
    }
}

/// An event about to be persisted: the log assigns its seq.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub id: Uuid,
    pub kind: String,
    pub payload: String,
    /// The agent's line, on the first event made from it.
    pub raw: Option<Vec<u8>>,
    /// The event's place among its line's events; `None` when not from a line.
    pub line_part: Option<i32>,
    /// The trace context it is written in: the current span's, when made.
    pub traceparent: Option<String>,
    /// A message's idempotency key (unique per session).
    pub request_id: Option<String>,
}

impl NewEvent {
    pub fn new(kind: impl Into<String>, payload: impl Into<String>) -> Self {
        Self {
            id: Uuid::now_v7(),
            kind: kind.into(),
            payload: payload.into(),
            raw: None,
            line_part: None,
            traceparent: berth_common::traces::current(),
            request_id: None,
        }
    }

    /// `user.message` with `text`, under the caller's idempotency key.
    pub fn user_message(text: &str, request_id: Option<&str>) -> Self {
        let p = payload::UserMessage {
            text: text.into(),
            request_id: request_id.map(String::from),
        };
        Self {
            request_id: p.request_id.clone(),
            ..Self::new(ev::USER_MESSAGE, payload::to_json(&p))
        }
    }

    /// `user.interrupt`.
    pub fn user_interrupt() -> Self {
        Self::new(
            ev::USER_INTERRUPT,
            payload::to_json(&payload::UserInterrupt {}),
        )
    }

    /// `session.error` with `message`.
    pub fn error(message: &str) -> Self {
        let p = payload::SessionError {
            message: message.into(),
        };
        Self::new(ev::SESSION_ERROR, payload::to_json(&p))
    }

    /// `session.credential_failed`: credential `id` could not be refreshed.
    pub fn credential_failed(id: uuid::Uuid, message: &str) -> Self {
        let p = payload::CredentialFailed {
            credential: format!("secrets/{id}"),
            message: message.into(),
        };
        Self::new(ev::SESSION_CREDENTIAL_FAILED, payload::to_json(&p))
    }
}

/// One version of an agent.
#[derive(Debug, Clone)]
pub struct Agent {
    pub project: String,
    pub id: String,
    pub version: i64,
    pub latest_version: i64,
    /// What this version runs (image, runtime, prompt, env, limits, skills).
    pub spec: AgentSpec,
    pub archived: bool,
    pub create_time: DateTime<Utc>,
    pub version_create_time: DateTime<Utc>,
}

/// An uploaded file's metadata; its bytes are the object `files/{id}`.
#[derive(Debug, Clone)]
pub struct FileInfo {
    pub id: Uuid,
    pub project: String,
    pub display_name: String,
    pub size_bytes: i64,
    pub sha256: String,
    pub create_time: DateTime<Utc>,
}

#[cfg(test)]
mod run_params_tests {
    use super::*;

    #[test]
    fn each_runtime_takes_what_it_can_apply() {
        let both = RunParams {
            max_output_tokens: Some(2048),
            temperature: Some(0.2),
        };
        let e = both.env(Runtime::ClaudeCode).expect_err("no temperature");
        assert!(e.to_string().contains("run_params.temperature"), "{e}");
        let tokens = RunParams {
            max_output_tokens: Some(2048),
            temperature: None,
        };
        assert_eq!(
            tokens.env(Runtime::ClaudeCode).expect("tokens"),
            [(
                "CLAUDE_CODE_MAX_OUTPUT_TOKENS".to_string(),
                "2048".to_string()
            )]
        );
        assert_eq!(
            both.env(Runtime::Jsonl).expect("both"),
            [
                ("BERTH_MAX_OUTPUT_TOKENS".to_string(), "2048".to_string()),
                ("BERTH_TEMPERATURE".to_string(), "0.2".to_string())
            ]
        );
        assert!(
            RunParams::default()
                .env(Runtime::ClaudeCode)
                .expect("none")
                .is_empty()
        );
    }
}

//! Event type names. One place, so the node's adapters, the dispatcher's relay,
//! the CLI and the export all agree.

/// A message the user sent.
pub const USER_MESSAGE: &str = "user.message";
/// The user interrupted the current turn.
pub const USER_INTERRUPT: &str = "user.interrupt";
/// Assistant text.
pub const AGENT_MESSAGE: &str = "agent.message";
/// Assistant thinking.
pub const AGENT_THINKING: &str = "agent.thinking";
/// The agent called a tool.
pub const AGENT_TOOL_USE: &str = "agent.tool_use";
/// A tool's result came back to the agent.
pub const AGENT_TOOL_RESULT: &str = "agent.tool_result";
/// A content block of a type berth does not know, kept whole under `block`.
pub const AGENT_BLOCK: &str = "agent.block";
/// The runtime ended a turn (Claude Code's `result` line).
pub const AGENT_RESULT: &str = "agent.result";
/// The runtime started and reported its session id (Claude Code's `system/init`).
pub const RUNTIME_INIT: &str = "runtime.init";
/// A recognised runtime bookkeeping line (Claude Code's other `system` lines,
/// `rate_limit_event`, `control_response`, user-role echoes of sub-agent prompts).
pub const RUNTIME_SYSTEM: &str = "runtime.system";
/// A line the adapter did not recognise: kept whole, never dropped.
pub const RUNTIME_RAW: &str = "runtime.raw";
/// A turn's token usage and cost.
pub const SESSION_USAGE: &str = "session.usage";
/// A turn was lost with its node: the agent never finished it.
pub const SESSION_TURN_LOST: &str = "session.turn_lost";
/// Something went wrong that the user should see.
pub const SESSION_ERROR: &str = "session.error";
/// An OAuth credential of the session could not be refreshed: the gateway
/// refuses its requests, saying so, until a refresh works again.
pub const SESSION_CREDENTIAL_FAILED: &str = "session.credential_failed";
/// The agent asks a person to allow a tool call (Claude Code's
/// `control_request` `can_use_tool`).
pub const AGENT_TOOL_PERMISSION: &str = "agent.tool_permission";
/// The agent asks a person clarifying questions (Claude Code's
/// `AskUserQuestion` tool, which asks through `can_use_tool`): the payload
/// of [`AGENT_TOOL_PERMISSION`], whose `input.questions` hold each
/// question, its header, its options and `multiSelect`. It waits as a
/// permission request does, and is answered with `AnswerQuestion`.
pub const AGENT_QUESTION: &str = "agent.question";
/// The tool through which Claude Code asks questions.
pub const ASK_USER_QUESTION: &str = "AskUserQuestion";

/// Whether an event of `kind` is a request the agent waits on a person for
/// (a tool permission, or questions).
pub fn asks(kind: &str) -> bool {
    kind == AGENT_TOOL_PERMISSION || kind == AGENT_QUESTION
}

/// The event kind of a permission request for `tool`.
pub fn ask_kind(tool: &str) -> &'static str {
    if tool == ASK_USER_QUESTION {
        AGENT_QUESTION
    } else {
        AGENT_TOOL_PERMISSION
    }
}
/// The agent withdrew a permission request (an interrupt, or its turn
/// ended): it no longer waits for the answer.
pub const AGENT_TOOL_PERMISSION_CANCELLED: &str = "agent.tool_permission_cancelled";
/// The answer to a tool permission request, from a person or the policy's
/// timeout.
pub const USER_TOOL_CONFIRMATION: &str = "user.tool_confirmation";
/// A permission request closed without an answer because its run ended
/// (a pause, a stop, a lost node).
pub const SESSION_TOOL_PERMISSION_CANCELLED: &str = "session.tool_permission_cancelled";
/// The agent's activity changed to or from `waiting_input`.
pub const SESSION_ACTIVITY: &str = "session.activity";
/// Prefix of status-change events: `session.status_idle`, `session.status_failed`…
pub const SESSION_STATUS_PREFIX: &str = "session.status_";

/// Payload types of the events berth itself writes or reads back. Every
/// reader (the relay, the budget check, the export, the CLI) goes through
/// these; none indexes into untyped JSON.
pub mod payload {
    use serde::{Deserialize, Serialize};

    fn is_false(b: &bool) -> bool {
        !*b
    }

    /// `user.message`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct UserMessage {
        pub text: String,
        /// The caller's idempotency key, when it gave one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub request_id: Option<String>,
    }

    /// `user.interrupt`: no fields.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct UserInterrupt {}

    /// `session.status_*`: the new status, the one before, why, and what
    /// else the change is about.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct StatusChange {
        pub status: String,
        #[serde(default)]
        pub previous: String,
        #[serde(default)]
        pub reason: String,
        /// On `session.status_stopping`: the stop is a pause (keep the
        /// container's state as a snapshot and end `paused`).
        #[serde(default, skip_serializing_if = "is_false")]
        pub pause: bool,
        #[serde(flatten)]
        pub detail: StatusDetail,
    }

    /// Facts a status change may carry. Absent fields are left out.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct StatusDetail {
        /// The node a run started on or left.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub node: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub epoch: Option<i64>,
        /// Started in a warm container (with or without its agent process).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub warm: Option<bool>,
        /// How the agent started: `warm_process` (a pre-started process),
        /// `warm_container` (the process started in a warm container) or
        /// `cold`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub start: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub exit_code: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub stderr_tail: Option<String>,
        /// The node's own words about an exit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub detail: Option<String>,
        /// The snapshot a run was saved to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub snapshot: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub snapshot_error: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub budget_usd: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cost_usd: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub inactivity_timeout_s: Option<f64>,
        /// The dispatcher that abandoned the session.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub owner: Option<String>,
        /// The agent's activity after a turn starts (`working`) or ends (`idle`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub activity: Option<String>,
    }

    /// One turn's figures in `session.usage`: all models, and each model
    /// the turn used (a sub-agent on another model has its own entry).
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct TurnFigures {
        pub number: i64,
        /// The model the runtime runs (its main agent).
        #[serde(default)]
        pub model: String,
        #[serde(flatten)]
        pub figures: crate::usage::Figures,
        #[serde(default)]
        pub models: Vec<crate::usage::ModelFigures>,
    }

    /// The session's totals in `session.usage`, also per model.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct UsageTotals {
        pub turns: i64,
        #[serde(flatten)]
        pub figures: crate::usage::Figures,
        #[serde(default)]
        pub models: Vec<crate::usage::ModelFigures>,
    }

    /// `session.usage`: a turn and the totals after it.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct Usage {
        pub turn: TurnFigures,
        pub total: UsageTotals,
    }

    /// `session.turn_lost`: the turn whose input starts at `message_seq`
    /// was lost with `node`; `redelivered` when its input goes to the agent
    /// again.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct TurnLost {
        pub message_seq: i64,
        pub node: String,
        pub reason: String,
        pub redelivered: bool,
    }

    /// `agent.tool_permission`: what the agent asks to run, and why.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct ToolPermission {
        /// The runtime's id for the request; answers carry it back.
        #[serde(default)]
        pub request_id: String,
        #[serde(default)]
        pub tool_use_id: String,
        #[serde(default)]
        pub tool_name: String,
        #[serde(default)]
        pub input: serde_json::Value,
        /// Why the agent asks, in words.
        #[serde(default)]
        pub reason: String,
        /// What "always allow" applies (Claude Code's `permission_suggestions`).
        #[serde(default)]
        pub suggestions: serde_json::Value,
    }

    /// `agent.tool_permission_cancelled` and `session.tool_permission_cancelled`.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct ToolPermissionCancelled {
        #[serde(default)]
        pub request_id: String,
        #[serde(default)]
        pub tool_use_id: String,
        #[serde(default)]
        pub reason: String,
    }

    /// `user.tool_confirmation`: the answer, and who gave it.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct ToolConfirmation {
        pub tool_use_id: String,
        #[serde(default)]
        pub request_id: String,
        #[serde(default)]
        pub tool_name: String,
        /// `allow` or `deny`.
        pub decision: String,
        /// Allow: the input the tool runs with, when a person edited it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub updated_input: Option<serde_json::Value>,
        /// Allow: calls like this one run without asking from now on.
        #[serde(default, skip_serializing_if = "is_false")]
        pub always: bool,
        /// Allow with `always`: the permission updates applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub updated_permissions: Option<serde_json::Value>,
        /// Deny: what the agent is told.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub message: String,
        /// Deny: the turn is interrupted too.
        #[serde(default, skip_serializing_if = "is_false")]
        pub interrupt: bool,
        /// `user`, or `timeout` when the policy's default decision applied.
        pub by: String,
        /// The API key (`keys/{id}`) or certificate behind a person's answer.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub identity: String,
        /// Seconds the request waited.
        #[serde(default)]
        pub waited_s: f64,
    }

    /// `session.activity`.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct Activity {
        /// `working`, `idle` or `waiting_input`.
        pub activity: String,
        /// Permission requests still waiting.
        #[serde(default)]
        pub pending: i64,
    }

    /// `session.error`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct SessionError {
        pub message: String,
    }

    /// `session.credential_failed`: which credential (`secrets/{id}`), and
    /// the refresh's error (never a token).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct CredentialFailed {
        pub credential: String,
        pub message: String,
    }

    /// `runtime.raw` made by the dispatcher from a node event it could not
    /// store as sent (a bad type name, or a payload that is not a JSON
    /// object). The agent's line is the event's `raw`, as always.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct InvalidNodeEvent {
        /// The payload the node sent, as text.
        pub payload: String,
        /// The type the node sent.
        pub node_type: String,
        pub invalid: bool,
        /// What was wrong with it.
        #[serde(default)]
        pub reason: String,
    }

    /// The fields of `agent.message`, `agent.thinking` and echoed prompts
    /// that readers show.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct AgentText {
        #[serde(default)]
        pub text: String,
    }

    /// `runtime.raw` for a line the node cut short: its length. (The line
    /// itself is the event's `raw`, like every agent line's.)
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct TruncatedLine {
        #[serde(default)]
        pub truncated: bool,
        #[serde(default)]
        pub total_bytes: u64,
    }

    /// The fields of `agent.tool_use` that readers show.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct ToolUse {
        #[serde(default)]
        pub tool_use_id: String,
        #[serde(default)]
        pub name: String,
        #[serde(default)]
        pub input: serde_json::Value,
    }

    /// The fields of `agent.tool_result` that readers show.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    pub struct ToolResult {
        #[serde(default)]
        pub tool_use_id: String,
        /// The tool the matching `agent.tool_use` called; empty when no
        /// earlier tool_use of the run has this id.
        #[serde(default)]
        pub name: String,
        /// A string, or a list of content blocks.
        #[serde(default)]
        pub content: serde_json::Value,
        #[serde(default)]
        pub is_error: bool,
    }

    /// A payload as JSON text. The types above hold only strings, numbers and
    /// JSON values, so serialising cannot fail.
    pub fn to_json<T: Serialize>(p: &T) -> String {
        serde_json::to_string(p).unwrap_or_else(|_| "{}".to_string())
    }

    /// Reads a payload, `None` when it does not have the type's shape.
    pub fn parse<'a, T: Deserialize<'a>>(json: &'a str) -> Option<T> {
        serde_json::from_str(json).ok()
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_pause_request_round_trips_and_plain_stops_leave_it_out() {
            let p = StatusChange {
                status: "stopping".into(),
                previous: "idle".into(),
                reason: "pausing".into(),
                pause: true,
                detail: StatusDetail::default(),
            };
            let json = to_json(&p);
            assert_eq!(parse::<StatusChange>(&json), Some(p.clone()));
            let stop = StatusChange { pause: false, ..p };
            assert!(!to_json(&stop).contains("pause"));
        }

        #[test]
        fn status_details_flatten_into_the_payload() {
            let p = StatusChange {
                status: "failed".into(),
                detail: StatusDetail {
                    exit_code: Some(3),
                    ..Default::default()
                },
                ..Default::default()
            };
            let v: serde_json::Value = serde_json::from_str(&to_json(&p)).expect("json");
            assert_eq!(v["exit_code"], 3);
            assert!(v.get("node").is_none());
        }
    }
}

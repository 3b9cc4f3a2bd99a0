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
/// Something went wrong that the user should see.
pub const SESSION_ERROR: &str = "session.error";
/// Prefix of status-change events: `session.status_idle`, `session.status_failed`…
pub const SESSION_STATUS_PREFIX: &str = "session.status_";

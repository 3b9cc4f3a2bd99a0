//! Runtime adapters: how to start an agent, how to write user input to its
//! stdin, and how to map each line it writes to an event.
//!
//! Invariant: every output line becomes exactly one event. A line an adapter
//! does not recognise is kept whole as `runtime.raw`.

mod claude_code;
mod jsonl;

pub use claude_code::ClaudeCode;
pub use jsonl::Jsonl;

pub use berth_common::TurnUsage;

use crate::spec::{Runtime, SessionSpec};

/// One event decoded from one output line.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEvent {
    /// Event type, one of [`berth_common::events`].
    pub kind: &'static str,
    /// JSON object; runtime lines keep the original under `raw`.
    pub payload: String,
    /// Set on the line that ends a turn.
    pub turn_end: Option<TurnUsage>,
    /// Set when the line reports the runtime's own session id.
    pub runtime_session_id: Option<String>,
}

impl AgentEvent {
    fn new(
        kind: &'static str,
        mut fields: serde_json::Map<String, serde_json::Value>,
        raw: &str,
    ) -> Self {
        fields.insert("raw".into(), raw.into());
        Self {
            kind,
            payload: serde_json::Value::Object(fields).to_string(),
            turn_end: None,
            runtime_session_id: None,
        }
    }

    /// A line nobody recognised, kept whole.
    pub fn raw(line: &str) -> Self {
        Self::new(berth_common::events::RUNTIME_RAW, Default::default(), line)
    }
}

/// Speaks one runtime's protocol.
pub trait Adapter: Send {
    /// The command that starts the agent.
    fn command(&self, spec: &SessionSpec) -> Vec<String>;
    /// Bytes to write to stdin for a user message (one line, newline included).
    fn encode_message(&mut self, text: &str) -> Vec<u8>;
    /// Bytes to write to stdin to interrupt the current turn.
    fn encode_interrupt(&mut self) -> Vec<u8>;
    /// Maps one output line (without its newline) to an event.
    fn decode(&mut self, line: &str) -> AgentEvent;
}

/// The adapter for a runtime.
pub fn for_runtime(kind: Runtime) -> Box<dyn Adapter> {
    match kind {
        Runtime::ClaudeCode => Box::new(ClaudeCode::default()),
        Runtime::Jsonl => Box::new(Jsonl),
    }
}

/// Reads a token count: 0 when absent, not an integer, or negative (a
/// runtime's bad figure never makes a negative turn).
fn int(v: &serde_json::Value, key: &str) -> i64 {
    v.get(key)
        .and_then(serde_json::Value::as_i64)
        .unwrap_or(0)
        .max(0)
}

/// Reads a cost in USD: `None` when absent, not a number, negative or not finite.
fn usd(v: &serde_json::Value, key: &str) -> Option<f64> {
    v.get(key)
        .and_then(serde_json::Value::as_f64)
        .filter(|c| c.is_finite() && *c >= 0.0)
}

//! Runtime adapters: how to start an agent, how to write user input to its
//! stdin, and how to map each line it writes to events.
//!
//! Invariants: every output line decodes to at least one event, one per
//! content block where the line has blocks. The line itself travels with its
//! events, byte for byte, and is stored once. A line an adapter does not
//! recognise is one `runtime.raw` event.

mod claude_code;
mod jsonl;

pub use claude_code::ClaudeCode;
pub use jsonl::Jsonl;

pub use berth_common::TurnUsage;
use berth_common::usage::{Figures, Reported};

use crate::spec::{Runtime, SessionSpec};

/// One event made from a line: a content block, or the whole line.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Event type, one of [`berth_common::events`].
    pub kind: &'static str,
    /// JSON object: the block's fields.
    pub payload: String,
}

impl Block {
    fn new(kind: &'static str, fields: serde_json::Map<String, serde_json::Value>) -> Self {
        Self {
            kind,
            payload: serde_json::Value::Object(fields).to_string(),
        }
    }
}

/// What one output line decoded to.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// At least one.
    pub events: Vec<Block>,
    /// Set on the line that ends a turn.
    pub turn_end: Option<TurnUsage>,
    /// Set when the line reports the runtime's own session id.
    pub runtime_session_id: Option<String>,
}

impl Decoded {
    fn one(block: Block) -> Self {
        Self {
            events: vec![block],
            turn_end: None,
            runtime_session_id: None,
        }
    }

    /// Replaces the events of a line whose events would not fit beside it in
    /// one message (`budget` bytes for the line and its payloads) with one
    /// `runtime.raw` saying so: the line itself is still kept whole.
    pub fn fit(&mut self, line_bytes: usize, budget: usize) {
        let n = self.events.len();
        let size = line_bytes
            + self
                .events
                .iter()
                .map(|e| e.payload.len() + 64)
                .sum::<usize>();
        if size <= budget {
            return;
        }
        let mut f = serde_json::Map::new();
        f.insert("oversize".into(), true.into());
        f.insert("events_dropped".into(), n.into());
        f.insert(
            "reason".into(),
            format!("the line's {n} events and the line exceed one message ({size} > {budget} bytes); the line is kept whole")
                .into(),
        );
        self.events = vec![Block::new(berth_common::events::RUNTIME_RAW, f)];
    }

    /// A line too long to keep whole: one `runtime.raw` event with its length.
    pub fn truncated(total_bytes: u64) -> Self {
        let p = berth_common::events::payload::TruncatedLine {
            truncated: true,
            total_bytes,
        };
        Self::one(Block {
            kind: berth_common::events::RUNTIME_RAW,
            payload: berth_common::events::payload::to_json(&p),
        })
    }

    /// A line nobody recognised: one `runtime.raw` event (the line itself
    /// travels beside it).
    pub fn raw() -> Self {
        Self::one(Block::new(
            berth_common::events::RUNTIME_RAW,
            Default::default(),
        ))
    }
}

/// Speaks one runtime's protocol.
pub trait Adapter: Send {
    /// The command that starts the agent; `gateway_port` when the node's
    /// gateway serves its container (declared routes point at it).
    fn command(&self, spec: &SessionSpec, gateway_port: Option<u16>) -> Vec<String>;
    /// Bytes to write to stdin for a user message (one line, newline included).
    fn encode_message(&mut self, text: &str) -> Vec<u8>;
    /// Bytes to write to stdin to interrupt the current turn.
    fn encode_interrupt(&mut self) -> Vec<u8>;
    /// Maps one output line (without its newline; any bytes) to events.
    fn decode(&mut self, line: &[u8]) -> Decoded;
    /// Bytes answering a tool permission request; `None` when the agent is
    /// not waiting on that request (answered before, withdrawn, or asked
    /// by an earlier process).
    fn encode_tool_decision(&mut self, d: &ToolDecision) -> Option<Vec<u8>>;
    /// A request a pre-started process answers before it is offered, so
    /// that it pays its one-time setup ahead of the session (Claude Code's
    /// `initialize`, as its SDK sends first); `None`: the runtime has none.
    fn warm_up(&self) -> Option<WarmUp> {
        None
    }
}

/// What an answer line says about a [`WarmUp`] request.
#[derive(Debug, PartialEq, Eq)]
pub enum WarmUpAnswer {
    /// Not the answer (another line): kept for the session.
    Unrelated,
    Ready,
    Refused(String),
}

/// A warm-up request: the line to write, and how to read its answer.
pub struct WarmUp {
    /// One line, newline included.
    pub request: Vec<u8>,
    /// Reads one output line (without its newline).
    pub answer: fn(&[u8]) -> WarmUpAnswer,
}

pub use berth_proto::node::v1::ToolDecision;

/// Requests the agent asked and has not had answered, by request id: the
/// tool_use id, and the tool's input as asked (for an allow that does not
/// edit it).
#[derive(Debug, Default)]
struct Asked(std::collections::HashMap<String, (String, serde_json::Value)>);

impl Asked {
    /// Most requests kept: an agent asks one at a time, a few at most.
    const MAX: usize = 1024;

    fn ask(&mut self, request_id: &str, tool_use_id: &str, input: &serde_json::Value) {
        if !request_id.is_empty() && self.0.len() < Self::MAX {
            self.0.insert(
                request_id.to_string(),
                (tool_use_id.to_string(), input.clone()),
            );
        }
    }

    /// The request's tool_use id and input, once: a second answer (or a
    /// withdrawal after the answer) finds nothing.
    fn take(&mut self, request_id: &str) -> Option<(String, serde_json::Value)> {
        self.0.remove(request_id)
    }
}

/// A JSON text field of a decision, parsed; `None` when empty or not JSON.
fn json_field(text: &str) -> Option<serde_json::Value> {
    if text.is_empty() {
        return None;
    }
    serde_json::from_str(text).ok()
}

/// The adapter for a runtime.
pub fn for_runtime(kind: Runtime) -> Box<dyn Adapter> {
    match kind {
        Runtime::ClaudeCode => Box::new(ClaudeCode::default()),
        Runtime::Jsonl => Box::new(Jsonl::default()),
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

/// Figures under the given key names (input, output, cache read, cache
/// creation, cost), clamped; and whether the cost was unreadable.
fn figures(v: &serde_json::Value, keys: [&str; 5]) -> (Figures, bool) {
    let cost = usd(v, keys[4]);
    let f = Figures {
        input_tokens: int(v, keys[0]),
        output_tokens: int(v, keys[1]),
        cache_read_input_tokens: int(v, keys[2]),
        cache_creation_input_tokens: int(v, keys[3]),
        cost_usd: cost.unwrap_or(0.0),
    };
    (f, cost.is_none())
}

fn reported(model: &str, (figures, cost_unknown): (Figures, bool)) -> Reported {
    Reported {
        model: model.to_string(),
        figures,
        cost_unknown,
    }
}

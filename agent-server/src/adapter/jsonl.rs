//! The `jsonl` runtime: any program that reads JSON lines on stdin and writes
//! JSON lines on stdout.
//!
//! In: `{"type":"user","text":"..."}` and `{"type":"interrupt"}`.
//! Out: objects with a `type` of `message`, `thinking`, `tool_use`,
//! `tool_result` or `turn_end` (which may carry `usage`: `input_tokens`,
//! `output_tokens`, `cache_read_input_tokens`, `cache_creation_input_tokens`,
//! `cost_usd`, `model`). Anything else is kept as `runtime.raw`.

use berth_common::events as ev;
use serde_json::{Value, json};

use super::{Adapter, AgentEvent, TurnUsage, int, usd};
use crate::spec::SessionSpec;

/// Stateless.
#[derive(Debug, Default)]
pub struct Jsonl;

impl Adapter for Jsonl {
    fn command(&self, spec: &SessionSpec) -> Vec<String> {
        spec.agent.runtime_args.clone()
    }

    fn encode_message(&mut self, text: &str) -> Vec<u8> {
        let mut b = json!({"type": "user", "text": text})
            .to_string()
            .into_bytes();
        b.push(b'\n');
        b
    }

    fn encode_interrupt(&mut self) -> Vec<u8> {
        b"{\"type\":\"interrupt\"}\n".to_vec()
    }

    fn decode(&mut self, raw: &str) -> AgentEvent {
        let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(raw) else {
            return AgentEvent::raw(raw);
        };
        let kind = match fields.remove("type").as_ref().and_then(Value::as_str) {
            Some("message") => ev::AGENT_MESSAGE,
            Some("thinking") => ev::AGENT_THINKING,
            Some("tool_use") => ev::AGENT_TOOL_USE,
            Some("tool_result") => ev::AGENT_TOOL_RESULT,
            Some("turn_end") => ev::AGENT_RESULT,
            _ => return AgentEvent::raw(raw),
        };
        let usage = fields.get("usage").cloned();
        let mut e = AgentEvent::new(kind, fields, raw);
        if kind == ev::AGENT_RESULT {
            let u = usage.unwrap_or(Value::Null);
            e.turn_end = Some(TurnUsage {
                input_tokens: int(&u, "input_tokens"),
                output_tokens: int(&u, "output_tokens"),
                cache_read_input_tokens: int(&u, "cache_read_input_tokens"),
                cache_creation_input_tokens: int(&u, "cache_creation_input_tokens"),
                cost_usd: usd(&u, "cost_usd").unwrap_or(0.0),
                model: u["model"].as_str().unwrap_or_default().to_string(),
                // The jsonl protocol reports each turn's own figures.
                cumulative_cost: false,
                cumulative_tokens: false,
            });
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_known_types_and_keeps_the_rest() {
        let mut a = Jsonl;
        assert_eq!(
            a.decode(r#"{"type":"message","text":"hi"}"#).kind,
            ev::AGENT_MESSAGE
        );
        let end = a.decode(r#"{"type":"turn_end","usage":{"input_tokens":3,"cost_usd":0.5}}"#);
        assert_eq!(end.kind, ev::AGENT_RESULT);
        let u = end.turn_end.expect("turn end");
        assert_eq!((u.input_tokens, u.cost_usd), (3, 0.5));
        assert_eq!(a.decode(r#"{"type":"mystery"}"#).kind, ev::RUNTIME_RAW);
        assert_eq!(a.decode("not json").kind, ev::RUNTIME_RAW);
    }
}

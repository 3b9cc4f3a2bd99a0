//! The `jsonl` runtime: any program that reads JSON lines on stdin and writes
//! JSON lines on stdout.
//!
//! In: `{"type":"user","text":"..."}` and `{"type":"interrupt"}`.
//! Out: objects with a `type` of `message`, `thinking`, `tool_use`,
//! `tool_result` or `turn_end` (which may carry `usage`: `input_tokens`,
//! `output_tokens`, `cache_read_input_tokens`, `cache_creation_input_tokens`,
//! `cost_usd`, `model`), one event each; the turn's own figures, not running
//! totals. Anything else is kept as `runtime.raw`.

use berth_common::events as ev;
use serde_json::{Value, json};

use super::{Adapter, Block, Decoded, TurnUsage, figures, reported};
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

    fn decode(&mut self, raw: &[u8]) -> Decoded {
        let Ok(Value::Object(mut fields)) = serde_json::from_slice::<Value>(raw) else {
            return Decoded::raw();
        };
        let kind = match fields.remove("type").as_ref().and_then(Value::as_str) {
            Some("message") => ev::AGENT_MESSAGE,
            Some("thinking") => ev::AGENT_THINKING,
            Some("tool_use") => ev::AGENT_TOOL_USE,
            Some("tool_result") => ev::AGENT_TOOL_RESULT,
            Some("turn_end") => ev::AGENT_RESULT,
            _ => return Decoded::raw(),
        };
        let usage = fields.get("usage").cloned();
        let mut d = Decoded::one(Block::new(kind, fields));
        if kind == ev::AGENT_RESULT {
            let u = usage.unwrap_or(Value::Null);
            let model = u["model"].as_str().unwrap_or_default();
            d.turn_end = Some(TurnUsage {
                total: reported(
                    model,
                    figures(
                        &u,
                        [
                            "input_tokens",
                            "output_tokens",
                            "cache_read_input_tokens",
                            "cache_creation_input_tokens",
                            "cost_usd",
                        ],
                    ),
                ),
                models: Vec::new(),
                // The jsonl protocol reports each turn's own figures.
                cumulative_cost: false,
                cumulative_tokens: false,
            });
        }
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_known_types_and_keeps_the_rest() {
        let mut a = Jsonl;
        assert_eq!(
            a.decode(br#"{"type":"message","text":"hi"}"#).events[0].kind,
            ev::AGENT_MESSAGE
        );
        let end = a.decode(br#"{"type":"turn_end","usage":{"input_tokens":3,"cost_usd":0.5}}"#);
        assert_eq!(end.events[0].kind, ev::AGENT_RESULT);
        let u = end.turn_end.expect("turn end");
        assert_eq!(
            (u.total.figures.input_tokens, u.total.figures.cost_usd),
            (3, 0.5)
        );
        assert_eq!(
            a.decode(br#"{"type":"mystery"}"#).events[0].kind,
            ev::RUNTIME_RAW
        );
        assert_eq!(a.decode(b"not json").events[0].kind, ev::RUNTIME_RAW);
        assert_eq!(a.decode(b"\xff\xfe{}").events[0].kind, ev::RUNTIME_RAW);
    }
}

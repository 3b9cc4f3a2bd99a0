//! The `jsonl` runtime: any program that reads JSON lines on stdin and writes
//! JSON lines on stdout.
//!
//! In: `{"type":"user","text":"..."}`, `{"type":"interrupt"}`, and
//! `{"type":"tool_decision","request_id","tool_use_id","decision":"allow"|"deny",
//! "updated_input"?,"message"?,"interrupt"?}` answering a request.
//! Out: objects with a `type` of `message`, `thinking`, `tool_use`,
//! `tool_result`, `tool_permission` (a request: `request_id`,
//! `tool_use_id`, `tool_name`, `input`, `reason`; the agent waits for the
//! decision), `tool_permission_cancelled` (`request_id`: withdrawn)
//! or `turn_end` (which may carry `usage`: `input_tokens`,
//! `output_tokens`, `cache_read_input_tokens`, `cache_creation_input_tokens`,
//! `cost_usd`, `model`), one event each; the turn's own figures, not running
//! totals. Anything else is kept as `runtime.raw`.

use berth_common::events as ev;
use serde_json::{Value, json};

use super::{
    Adapter, Asked, Block, Decoded, ToolDecision, TurnUsage, figures, json_field, reported,
};
use crate::spec::SessionSpec;

/// Keeps only the requests the agent waits on.
#[derive(Debug, Default)]
pub struct Jsonl {
    asked: Asked,
}

impl Adapter for Jsonl {
    fn command(&self, spec: &SessionSpec, _gateway_port: Option<u16>) -> Vec<String> {
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

    fn encode_tool_decision(&mut self, d: &ToolDecision) -> Option<Vec<u8>> {
        self.asked.take(&d.request_id)?;
        let mut v = json!({"type": "tool_decision", "request_id": d.request_id,
                           "tool_use_id": d.tool_use_id,
                           "decision": if d.allow { "allow" } else { "deny" }});
        if let Some(input) = json_field(&d.updated_input_json) {
            v["updated_input"] = input;
        }
        if !d.allow {
            v["message"] = d.message.clone().into();
            v["interrupt"] = d.interrupt.into();
        }
        let mut b = v.to_string().into_bytes();
        b.push(b'\n');
        Some(b)
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
            Some("tool_permission") => {
                let field = |k: &str| fields.get(k).and_then(Value::as_str).unwrap_or_default();
                let input = fields.get("input").unwrap_or(&Value::Null);
                self.asked
                    .ask(field("request_id"), field("tool_use_id"), input);
                ev::ask_kind(field("tool_name"))
            }
            Some("tool_permission_cancelled") => {
                let id = fields.get("request_id").and_then(Value::as_str);
                self.asked.take(id.unwrap_or_default());
                ev::AGENT_TOOL_PERMISSION_CANCELLED
            }
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
        let mut a = Jsonl::default();
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

    #[test]
    fn a_permission_request_is_answered_once() {
        let mut a = Jsonl::default();
        let d = a.decode(br#"{"type":"tool_permission","request_id":"r1","tool_use_id":"t1","tool_name":"Write","input":{"path":"x"}}"#);
        assert_eq!(d.events[0].kind, ev::AGENT_TOOL_PERMISSION);
        let deny = ToolDecision {
            request_id: "r1".into(),
            tool_use_id: "t1".into(),
            allow: false,
            message: "no".into(),
            ..Default::default()
        };
        let line = a.encode_tool_decision(&deny).expect("asked");
        let v: Value = serde_json::from_slice(&line).expect("json");
        assert_eq!(
            (v["decision"].as_str(), v["message"].as_str()),
            (Some("deny"), Some("no"))
        );
        assert!(a.encode_tool_decision(&deny).is_none(), "answered once");
        let unknown = ToolDecision {
            request_id: "r9".into(),
            ..deny
        };
        assert!(a.encode_tool_decision(&unknown).is_none());
    }
}

//! Claude Code's stream-json protocol.
//!
//! Started as `claude -p --input-format stream-json --output-format stream-json
//! --verbose`. User messages and the interrupt control request go to stdin; each
//! stdout line is one JSON object. A `result` line ends a turn and carries the
//! turn's `usage` and `total_cost_usd`.

use berth_common::events as ev;
use serde_json::{Map, Value, json};

use super::{Adapter, AgentEvent, TurnUsage, int, usd};
use crate::spec::SessionSpec;

/// State kept across lines: the model the runtime reported, for usage rows.
#[derive(Debug, Default)]
pub struct ClaudeCode {
    model: String,
    interrupts: u64,
}

impl Adapter for ClaudeCode {
    fn command(&self, spec: &SessionSpec) -> Vec<String> {
        let mut cmd: Vec<String> = [
            "claude",
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
        ]
        .map(String::from)
        .into();
        if !spec.agent.model.is_empty() {
            cmd.extend(["--model".into(), spec.agent.model.clone()]);
        }
        if !spec.agent.system_prompt.is_empty() {
            cmd.extend([
                "--append-system-prompt".into(),
                spec.agent.system_prompt.clone(),
            ]);
        }
        if !spec.resume_id.is_empty() {
            cmd.extend(["--resume".into(), spec.resume_id.clone()]);
        }
        cmd.extend(spec.agent.runtime_args.iter().cloned());
        cmd
    }

    fn encode_message(&mut self, text: &str) -> Vec<u8> {
        let msg = json!({"type": "user", "message": {"role": "user", "content": [{"type": "text", "text": text}]}});
        line(&msg)
    }

    fn encode_interrupt(&mut self) -> Vec<u8> {
        self.interrupts += 1;
        let req = json!({"type": "control_request", "request_id": format!("berth-interrupt-{}", self.interrupts),
                         "request": {"subtype": "interrupt"}});
        line(&req)
    }

    fn decode(&mut self, raw: &str) -> AgentEvent {
        let Ok(Value::Object(v)) = serde_json::from_str::<Value>(raw) else {
            return AgentEvent::raw(raw);
        };
        let v = Value::Object(v);
        let mut f = Map::new();
        let kind = match v["type"].as_str().unwrap_or_default() {
            "system" if v["subtype"] == "init" => {
                if let Some(m) = v["model"].as_str() {
                    self.model = m.to_string();
                }
                copy(&v, &mut f, &["session_id", "model", "cwd"]);
                let mut e = AgentEvent::new(ev::RUNTIME_INIT, f, raw);
                e.runtime_session_id = v["session_id"].as_str().map(String::from);
                return e;
            }
            "system" | "rate_limit_event" | "control_response" | "stream_event" => {
                let subtype = v["subtype"]
                    .as_str()
                    .or(v["type"].as_str())
                    .unwrap_or_default();
                f.insert("subtype".into(), subtype.into());
                ev::RUNTIME_SYSTEM
            }
            "assistant" => match assistant(&v, &mut f) {
                Some(kind) => kind,
                None => return AgentEvent::raw(raw),
            },
            "user" => user(&v, &mut f),
            "result" => {
                copy(
                    &v,
                    &mut f,
                    &[
                        "subtype",
                        "is_error",
                        "result",
                        "num_turns",
                        "duration_ms",
                        "stop_reason",
                        "session_id",
                    ],
                );
                let mut e = AgentEvent::new(ev::AGENT_RESULT, f, raw);
                e.turn_end = Some(self.usage(&v));
                return e;
            }
            _ => return AgentEvent::raw(raw),
        };
        AgentEvent::new(kind, f, raw)
    }
}

impl ClaudeCode {
    /// The turn's usage as Claude Code reports it on a `result` line. Under
    /// stream-json input, `total_cost_usd` and `modelUsage` are running
    /// totals of the conversation (continued across `--resume`), while
    /// `usage` is only the main agent's tokens for this turn. So: cost is the
    /// running `total_cost_usd`; tokens are the running sums over
    /// `modelUsage` (sub-agents included), or, from a CLI that sends no
    /// `modelUsage`, this turn's `usage`. A cost that is missing, negative or
    /// not a number is reported as 0 for the turn, not as a running total,
    /// so it moves no baseline. The dispatcher turns running totals into
    /// the turn's rise.
    fn usage(&self, v: &Value) -> TurnUsage {
        let models = v["modelUsage"].as_object().filter(|m| !m.is_empty());
        let model = if self.model.is_empty() {
            // No init line seen: the model that cost the most so far.
            models
                .and_then(|m| {
                    m.iter()
                        .max_by(|a, b| {
                            let cost = |x: &Value| usd(x, "costUSD").unwrap_or(0.0);
                            cost(a.1).total_cmp(&cost(b.1))
                        })
                        .map(|(k, _)| k.clone())
                })
                .unwrap_or_default()
        } else {
            self.model.clone()
        };
        let total_cost = usd(v, "total_cost_usd");
        let mut u = TurnUsage {
            cost_usd: total_cost.unwrap_or(0.0),
            cumulative_cost: total_cost.is_some(),
            model,
            ..TurnUsage::default()
        };
        match models {
            Some(models) => {
                let sum = |key: &str| {
                    models
                        .values()
                        .map(|m| int(m, key))
                        .fold(0i64, i64::saturating_add)
                };
                u.input_tokens = sum("inputTokens");
                u.output_tokens = sum("outputTokens");
                u.cache_read_input_tokens = sum("cacheReadInputTokens");
                u.cache_creation_input_tokens = sum("cacheCreationInputTokens");
                u.cumulative_tokens = true;
            }
            None => {
                let turn = &v["usage"];
                u.input_tokens = int(turn, "input_tokens");
                u.output_tokens = int(turn, "output_tokens");
                u.cache_read_input_tokens = int(turn, "cache_read_input_tokens");
                u.cache_creation_input_tokens = int(turn, "cache_creation_input_tokens");
            }
        }
        u
    }
}

/// Maps an assistant line by its first content block.
fn assistant(v: &Value, f: &mut Map<String, Value>) -> Option<&'static str> {
    let blocks = v["message"]["content"].as_array()?;
    let first = blocks.first()?;
    copy(v, f, &["parent_tool_use_id"]);
    if let Some(id) = v["message"]["id"].as_str() {
        f.insert("message_id".into(), id.into());
    }
    let kind = match first["type"].as_str()? {
        "text" => {
            let text: String = blocks
                .iter()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("");
            f.insert("text".into(), text.into());
            ev::AGENT_MESSAGE
        }
        "thinking" => {
            f.insert("text".into(), first["thinking"].clone());
            ev::AGENT_THINKING
        }
        "redacted_thinking" => ev::AGENT_THINKING,
        "tool_use" | "server_tool_use" => {
            f.insert("tool_use_id".into(), first["id"].clone());
            f.insert("name".into(), first["name"].clone());
            f.insert("input".into(), first["input"].clone());
            ev::AGENT_TOOL_USE
        }
        _ => return None,
    };
    Some(kind)
}

/// Maps a user-role line: tool results, or echoes of prompts (sub-agents).
fn user(v: &Value, f: &mut Map<String, Value>) -> &'static str {
    copy(v, f, &["parent_tool_use_id"]);
    let content = &v["message"]["content"];
    if let Some(result) = content
        .as_array()
        .and_then(|b| b.iter().find(|b| b["type"] == "tool_result"))
    {
        f.insert("tool_use_id".into(), result["tool_use_id"].clone());
        f.insert("content".into(), result["content"].clone());
        f.insert(
            "is_error".into(),
            result["is_error"].as_bool().unwrap_or(false).into(),
        );
        return ev::AGENT_TOOL_RESULT;
    }
    let text = match content {
        Value::String(s) => s.clone(),
        Value::Array(b) => b
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    };
    f.insert("subtype".into(), "user_echo".into());
    f.insert("text".into(), text.into());
    ev::RUNTIME_SYSTEM
}

fn copy(v: &Value, f: &mut Map<String, Value>, keys: &[&str]) {
    for k in keys {
        if let Some(x) = v.get(*k) {
            f.insert((*k).to_string(), x.clone());
        }
    }
}

fn line(v: &Value) -> Vec<u8> {
    let mut out = v.to_string().into_bytes();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public capture, read in place from `../shared` (never copied in).
    fn fixture() -> String {
        let dir = std::env::var_os("BERTH_SHARED_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../shared/fixtures/claude-code")
            });
        let path = dir.join("explore_count_files.jsonl");
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    #[test]
    fn every_fixture_line_is_one_event_and_the_result_carries_usage() {
        let transcript = fixture();
        let mut a = ClaudeCode::default();
        let events: Vec<_> = transcript.lines().map(|l| a.decode(l)).collect();
        assert_eq!(events.len(), transcript.lines().count());
        assert_eq!(events[0].kind, ev::RUNTIME_INIT);
        assert_eq!(
            events[0].runtime_session_id.as_deref(),
            Some("4e3453f9-129a-4da9-bc25-a287453d58d9")
        );
        assert!(
            events.iter().all(|e| e.kind != ev::RUNTIME_RAW),
            "the fixture has only known line types"
        );
        let kinds: Vec<_> = events.iter().map(|e| e.kind).collect();
        for k in [
            ev::AGENT_THINKING,
            ev::AGENT_MESSAGE,
            ev::AGENT_TOOL_USE,
            ev::AGENT_TOOL_RESULT,
        ] {
            assert!(kinds.contains(&k), "missing {k}");
        }
        let last = events
            .last()
            .and_then(|e| e.turn_end.clone())
            .expect("result ends the turn");
        // Running totals over `modelUsage`: the main agent (sonnet) and its
        // Explore sub-agent (haiku), whose tokens `usage` leaves out.
        assert_eq!(
            last,
            TurnUsage {
                input_tokens: 4 + 573,
                output_tokens: 576 + 134,
                cache_read_input_tokens: 40618 + 7699,
                cache_creation_input_tokens: 7281 + 7824,
                cost_usd: 0.0763163,
                model: "claude-sonnet-4-6".into(),
                cumulative_cost: true,
                cumulative_tokens: true,
            }
        );
        // The original line is kept verbatim.
        for (line, e) in transcript.lines().zip(&events) {
            let p: Value = serde_json::from_str(&e.payload).expect("payload is JSON");
            assert_eq!(p["raw"].as_str(), Some(line));
        }
    }

    #[test]
    fn bad_figures_never_make_negative_or_false_totals() {
        let mut a = ClaudeCode::default();
        let line = r#"{"type":"result","total_cost_usd":"lots","usage":{"input_tokens":-5,"output_tokens":"x"}}"#;
        let u = a.decode(line).turn_end.expect("a result ends the turn");
        assert_eq!((u.input_tokens, u.output_tokens, u.cost_usd), (0, 0, 0.0));
        assert!(
            !u.cumulative_cost,
            "an unreadable cost moves no running total"
        );
        assert!(!u.cumulative_tokens, "no modelUsage: the turn's own usage");
        let line = r#"{"type":"result","total_cost_usd":-1,"modelUsage":{"m":{"inputTokens":-3,"outputTokens":4,"costUSD":-2}}}"#;
        let u = a.decode(line).turn_end.expect("a result ends the turn");
        assert_eq!((u.input_tokens, u.output_tokens, u.cost_usd), (0, 4, 0.0));
        assert!(!u.cumulative_cost && u.cumulative_tokens);
    }

    #[test]
    fn lines_that_are_not_json_are_kept_raw() {
        let mut a = ClaudeCode::default();
        let e = a.decode("Segmentation fault (core dumped)");
        assert_eq!(e.kind, ev::RUNTIME_RAW);
        assert!(e.payload.contains("Segmentation fault"));
        assert_eq!(
            a.decode(r#"{"type":"brand_new_thing"}"#).kind,
            ev::RUNTIME_RAW
        );
        assert_eq!(a.decode("[1,2]").kind, ev::RUNTIME_RAW);
    }

    #[test]
    fn input_is_stream_json() {
        let mut a = ClaudeCode::default();
        let m: Value = serde_json::from_slice(&a.encode_message("hi \"there\"")).expect("json");
        assert_eq!(m["type"], "user");
        assert_eq!(m["message"]["content"][0]["text"], "hi \"there\"");
        let i: Value = serde_json::from_slice(&a.encode_interrupt()).expect("json");
        assert_eq!(i["request"]["subtype"], "interrupt");
    }
}

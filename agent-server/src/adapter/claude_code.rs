//! Claude Code's stream-json protocol.
//!
//! Started as `claude -p --input-format stream-json --output-format stream-json
//! --verbose --permission-prompt-tool stdio` (+ the tool policy's
//! `--permission-mode`, `--allowedTools`, `--disallowedTools`). User
//! messages, the interrupt control request and the answers to the CLI's
//! permission requests (`control_response`) go to stdin; each
//! stdout line is one JSON object. An assistant line may carry several
//! content blocks (thinking, text, tool_use, …) and a user line several
//! tool_results: each block is one event. A `result` line ends a turn and
//! carries the conversation's running totals (see [`ClaudeCode::usage`]).
//!
//! Events per line:
//! - `system/init` → `runtime.init`; other `system`, `rate_limit_event`,
//!   `control_response`, `stream_event`, control requests other than
//!   `can_use_tool` → `runtime.system`;
//! - `control_request` `can_use_tool` → `agent.tool_permission` (the CLI
//!   waits for the answer); `control_cancel_request` →
//!   `agent.tool_permission_cancelled` (it no longer does);
//! - `assistant` → per block: `text` → `agent.message`, `thinking` and
//!   `redacted_thinking` → `agent.thinking`, `tool_use` and
//!   `server_tool_use` → `agent.tool_use`, any other type → `agent.block`
//!   (kept whole); no blocks → one `runtime.system` (`empty_message`);
//! - `user` → per block: `tool_result` → `agent.tool_result` (with the name
//!   of the tool its `tool_use_id` called), `text` → `runtime.system`
//!   (`user_echo`: a sub-agent's prompt), others → `agent.block`;
//! - `result` → `agent.result`; anything else → `runtime.raw`.
//!
//! Every block event carries `block_index` (its place in the line's
//! content), `message_id`, and `parent_tool_use_id` when the line is a
//! sub-agent's.

use std::collections::HashMap;

use berth_common::events as ev;
use berth_common::usage::Reported;
use serde_json::{Map, Value, json};

use super::{
    Adapter, Asked, Block, Decoded, ToolDecision, TurnUsage, figures, json_field, reported, usd,
};
use crate::spec::SessionSpec;

/// Tool calls awaiting their result: at most this many names are kept.
const MAX_OPEN_TOOL_CALLS: usize = 4096;

/// State kept across lines.
#[derive(Debug, Default)]
pub struct ClaudeCode {
    /// The model the init line reported: the main agent's.
    model: String,
    interrupts: u64,
    /// Tool names by tool_use id, until their result comes back.
    open_tools: HashMap<String, String>,
    /// Permission requests the CLI waits on.
    asked: Asked,
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
            "--permission-prompt-tool",
            "stdio",
        ]
        .map(String::from)
        .into();
        if let Some(p) = &spec.agent.tool_policy {
            cmd.extend([
                "--permission-mode".into(),
                p.permission_mode.as_str().into(),
            ]);
            for rule in &p.allowed_tools {
                cmd.extend(["--allowedTools".into(), rule.clone()]);
            }
            for rule in &p.disallowed_tools {
                cmd.extend(["--disallowedTools".into(), rule.clone()]);
            }
        }
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

    fn encode_tool_decision(&mut self, d: &ToolDecision) -> Option<Vec<u8>> {
        let (_, asked_input) = self.asked.take(&d.request_id)?;
        // The shapes of claude-agent-sdk's `_internal/query.py`.
        let response = if d.allow {
            let mut r = json!({"behavior": "allow",
                               "updatedInput": json_field(&d.updated_input_json).unwrap_or(asked_input)});
            if let Some(updates) = json_field(&d.updated_permissions_json) {
                r["updatedPermissions"] = updates;
            }
            r
        } else {
            let mut r = json!({"behavior": "deny", "message": d.message});
            if d.interrupt {
                r["interrupt"] = true.into();
            }
            r
        };
        Some(line(&json!({"type": "control_response", "response": {
            "subtype": "success", "request_id": d.request_id, "response": response}})))
    }

    fn decode(&mut self, raw: &[u8]) -> Decoded {
        let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(raw) else {
            return Decoded::raw();
        };
        let mut f = Map::new();
        match v["type"].as_str().unwrap_or_default() {
            "system" if v["subtype"] == "init" => {
                if let Some(m) = v["model"].as_str() {
                    self.model = m.to_string();
                }
                copy(&v, &mut f, &["session_id", "model", "cwd"]);
                let mut d = Decoded::one(Block::new(ev::RUNTIME_INIT, f));
                d.runtime_session_id = v["session_id"].as_str().map(String::from);
                d
            }
            "control_request" if v["request"]["subtype"] == "can_use_tool" => {
                let r = &v["request"];
                let request_id = v["request_id"].as_str().unwrap_or_default();
                let tool_use_id = r["tool_use_id"].as_str().unwrap_or_default();
                let input = r.get("input").cloned().unwrap_or(json!({}));
                self.asked.ask(request_id, tool_use_id, &input);
                // The CLI's own words, most specific first.
                let reason = ["decision_reason", "description", "title", "blocked_path"]
                    .iter()
                    .find_map(|k| r[*k].as_str().filter(|s| !s.is_empty()))
                    .unwrap_or_default();
                f.insert("request_id".into(), request_id.into());
                f.insert("tool_use_id".into(), tool_use_id.into());
                f.insert("tool_name".into(), r["tool_name"].clone());
                f.insert("input".into(), input);
                f.insert("reason".into(), reason.into());
                f.insert(
                    "suggestions".into(),
                    r.get("permission_suggestions")
                        .cloned()
                        .unwrap_or(json!([])),
                );
                copy(r, &mut f, &["display_name", "blocked_path", "agent_id"]);
                Decoded::one(Block::new(ev::AGENT_TOOL_PERMISSION, f))
            }
            "control_cancel_request" => {
                let request_id = v["request_id"].as_str().unwrap_or_default();
                let tool_use_id = self
                    .asked
                    .take(request_id)
                    .map(|(t, _)| t)
                    .unwrap_or_default();
                f.insert("request_id".into(), request_id.into());
                f.insert("tool_use_id".into(), tool_use_id.into());
                f.insert("reason".into(), "withdrawn by the agent".into());
                Decoded::one(Block::new(ev::AGENT_TOOL_PERMISSION_CANCELLED, f))
            }
            "system" | "rate_limit_event" | "control_response" | "control_request"
            | "stream_event" => {
                let subtype = v["subtype"]
                    .as_str()
                    .or(v["type"].as_str())
                    .unwrap_or_default();
                f.insert("subtype".into(), subtype.into());
                Decoded::one(Block::new(ev::RUNTIME_SYSTEM, f))
            }
            "assistant" => self.blocks(&v, Role::Assistant),
            "user" => self.blocks(&v, Role::User),
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
                let mut d = Decoded::one(Block::new(ev::AGENT_RESULT, f));
                d.turn_end = Some(self.usage(&v));
                d
            }
            _ => Decoded::raw(),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Assistant,
    User,
}

impl ClaudeCode {
    /// One event per content block of an assistant or user line.
    fn blocks(&mut self, v: &Value, role: Role) -> Decoded {
        let mut common = Map::new();
        if let Some(p) = v.get("parent_tool_use_id").filter(|p| !p.is_null()) {
            common.insert("parent_tool_use_id".into(), p.clone());
        }
        if let Some(id) = v["message"]["id"].as_str() {
            common.insert("message_id".into(), id.into());
        }
        let content = &v["message"]["content"];
        // Borrowed: an assistant line is decoded on every event's path.
        let echoed;
        let blocks: &[Value] = match content {
            Value::Array(b) => b,
            // A user line may carry a plain string (a sub-agent's prompt).
            Value::String(s) => {
                echoed = [json!({"type": "text", "text": s})];
                &echoed
            }
            _ => &[],
        };
        if blocks.is_empty() {
            let mut f = common;
            f.insert("subtype".into(), "empty_message".into());
            return Decoded::one(Block::new(ev::RUNTIME_SYSTEM, f));
        }
        let events = blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut f = common.clone();
                f.insert("block_index".into(), i.into());
                let kind = self.block(b, role, &mut f);
                Block::new(kind, f)
            })
            .collect();
        Decoded {
            events,
            turn_end: None,
            runtime_session_id: None,
        }
    }

    /// One content block's event type and fields.
    fn block(&mut self, b: &Value, role: Role, f: &mut Map<String, Value>) -> &'static str {
        let text = |key: &str| b.get(key).cloned().unwrap_or_else(|| "".into());
        match (role, b["type"].as_str().unwrap_or_default()) {
            (Role::Assistant, "text") => {
                f.insert("text".into(), text("text"));
                ev::AGENT_MESSAGE
            }
            (Role::Assistant, "thinking") => {
                f.insert("text".into(), text("thinking"));
                ev::AGENT_THINKING
            }
            (Role::Assistant, "redacted_thinking") => {
                f.insert("redacted".into(), true.into());
                ev::AGENT_THINKING
            }
            (Role::Assistant, t @ ("tool_use" | "server_tool_use")) => {
                let id = b["id"].as_str().unwrap_or_default();
                let name = b["name"].as_str().unwrap_or_default();
                if !id.is_empty() && self.open_tools.len() < MAX_OPEN_TOOL_CALLS {
                    self.open_tools.insert(id.to_string(), name.to_string());
                }
                f.insert("tool_use_id".into(), id.into());
                f.insert("name".into(), name.into());
                f.insert("input".into(), b.get("input").cloned().unwrap_or(json!({})));
                if t == "server_tool_use" {
                    f.insert("server".into(), true.into());
                }
                ev::AGENT_TOOL_USE
            }
            (Role::User, "tool_result") => {
                let id = b["tool_use_id"].as_str().unwrap_or_default();
                let name = self.open_tools.remove(id).unwrap_or_default();
                f.insert("tool_use_id".into(), id.into());
                f.insert("name".into(), name.into());
                f.insert(
                    "content".into(),
                    b.get("content").cloned().unwrap_or(Value::Null),
                );
                f.insert(
                    "is_error".into(),
                    b["is_error"].as_bool().unwrap_or(false).into(),
                );
                ev::AGENT_TOOL_RESULT
            }
            (Role::User, "text") => {
                f.insert("subtype".into(), "user_echo".into());
                f.insert("text".into(), text("text"));
                ev::RUNTIME_SYSTEM
            }
            (_, t) => {
                f.insert("block_type".into(), t.into());
                f.insert("block".into(), b.clone());
                ev::AGENT_BLOCK
            }
        }
    }

    /// The turn's usage as Claude Code reports it on a `result` line. Under
    /// stream-json input, `total_cost_usd` and `modelUsage` are running
    /// totals of the conversation (continued across `--resume`), while
    /// `usage` is only the main agent's tokens for this turn. So:
    /// - the turn's cost is the running `total_cost_usd`, each model's its
    ///   running `costUSD`;
    /// - tokens are the running sums over `modelUsage` (sub-agents
    ///   included), each model's its own;
    /// - a CLI that sends no (or an empty) `modelUsage` gives this turn's
    ///   `usage` as per-turn tokens, all under the init line's model;
    /// - a cost that is missing, negative or not a number counts 0 for the
    ///   turn and moves no baseline; a bad token count counts 0.
    ///
    /// The dispatcher turns running totals into the turn's rise.
    fn usage(&self, v: &Value) -> TurnUsage {
        const KEYS: [&str; 5] = [
            "inputTokens",
            "outputTokens",
            "cacheReadInputTokens",
            "cacheCreationInputTokens",
            "costUSD",
        ];
        let models: Vec<Reported> = v["modelUsage"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(name, m)| reported(name, figures(m, KEYS)))
                    .collect()
            })
            .unwrap_or_default();
        let model = if self.model.is_empty() {
            // No init line seen: the model that cost the most so far.
            models
                .iter()
                .max_by(|a, b| a.figures.cost_usd.total_cmp(&b.figures.cost_usd))
                .map(|m| m.model.clone())
                .unwrap_or_default()
        } else {
            self.model.clone()
        };
        let total_cost = usd(v, "total_cost_usd");
        let cumulative_tokens = !models.is_empty();
        let mut total = if cumulative_tokens {
            let mut t = berth_common::usage::Figures::default();
            for m in &models {
                t.add(&m.figures);
            }
            reported(&model, (t, false))
        } else {
            reported(
                &model,
                figures(
                    &v["usage"],
                    [
                        "input_tokens",
                        "output_tokens",
                        "cache_read_input_tokens",
                        "cache_creation_input_tokens",
                        "",
                    ],
                ),
            )
        };
        total.figures.cost_usd = total_cost.unwrap_or(0.0);
        total.cost_unknown = total_cost.is_none();
        TurnUsage {
            total,
            models,
            cumulative_cost: total_cost.is_some(),
            cumulative_tokens,
        }
    }
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
    use berth_common::usage::Figures;

    /// The public captures' directory, read in place (never copied in).
    fn fixtures() -> std::path::PathBuf {
        std::env::var_os("BERTH_SHARED_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../shared/fixtures/claude-code")
            })
    }

    fn fixture(name: &str) -> String {
        let path = fixtures().join(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
    }

    fn decode_all(transcript: &str) -> Vec<Decoded> {
        let mut a = ClaudeCode::default();
        transcript.lines().map(|l| a.decode(l.as_bytes())).collect()
    }

    fn kinds(d: &Decoded) -> Vec<&'static str> {
        d.events.iter().map(|e| e.kind).collect()
    }

    fn payload(b: &Block) -> Value {
        serde_json::from_str(&b.payload).expect("payload is JSON")
    }

    #[test]
    fn every_public_capture_decodes_one_event_per_block() {
        let mut dirs = vec![fixtures(), fixtures().join("public")];
        let mut files = Vec::new();
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).expect("fixtures dir") {
                let p = e.expect("entry").path();
                if p.extension().is_some_and(|x| x == "jsonl") {
                    files.push(p);
                }
            }
        }
        assert!(files.len() >= 9, "captures found: {files:?}");
        for path in files {
            let text = std::fs::read_to_string(&path).expect("read");
            let mut a = ClaudeCode::default();
            for line in text.lines().filter(|l| !l.is_empty()) {
                let d = a.decode(line.as_bytes());
                let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
                let blocks = match (&v["type"], &v["message"]["content"]) {
                    (t, Value::Array(b)) if t == "assistant" || t == "user" => b.len().max(1),
                    _ => 1,
                };
                assert_eq!(d.events.len(), blocks, "{}: {line}", path.display());
                for e in &d.events {
                    assert!(payload(e).is_object());
                }
                if let Some(u) = &d.turn_end {
                    assert!(u.total.figures.cost_usd >= 0.0);
                    assert!(u.total.figures.tokens().iter().all(|t| *t >= 0));
                }
            }
        }
    }

    #[test]
    fn the_explore_capture_has_both_models_running_totals() {
        let events = decode_all(&fixture("explore_count_files.jsonl"));
        assert_eq!(kinds(&events[0]), [ev::RUNTIME_INIT]);
        assert_eq!(
            events[0].runtime_session_id.as_deref(),
            Some("4e3453f9-129a-4da9-bc25-a287453d58d9")
        );
        let all: Vec<_> = events.iter().flat_map(kinds).collect();
        assert!(!all.contains(&ev::RUNTIME_RAW), "only known line types");
        for k in [
            ev::AGENT_THINKING,
            ev::AGENT_MESSAGE,
            ev::AGENT_TOOL_USE,
            ev::AGENT_TOOL_RESULT,
        ] {
            assert!(all.contains(&k), "missing {k}");
        }
        // Sub-agent lines carry their parent tool call.
        assert!(
            events
                .iter()
                .flat_map(|d| &d.events)
                .any(|e| { payload(e)["parent_tool_use_id"].as_str().is_some() })
        );
        let u = events
            .last()
            .and_then(|e| e.turn_end.clone())
            .expect("result ends the turn");
        assert!(u.cumulative_cost && u.cumulative_tokens);
        assert_eq!(u.total.model, "claude-sonnet-4-6");
        assert_eq!(
            u.total.figures,
            Figures {
                input_tokens: 4 + 573,
                output_tokens: 576 + 134,
                cache_read_input_tokens: 40618 + 7699,
                cache_creation_input_tokens: 7281 + 7824,
                cost_usd: 0.0763163,
            }
        );
        let mut models: Vec<_> = u.models.iter().map(|m| m.model.as_str()).collect();
        models.sort();
        assert_eq!(models, ["claude-haiku-4-5-20251001", "claude-sonnet-4-6"]);
        let sum: f64 = u.models.iter().map(|m| m.figures.cost_usd).sum();
        assert!((sum - 0.0763163).abs() < 1e-12);
    }

    #[test]
    fn a_multi_block_line_is_one_event_per_block_and_results_find_their_tool() {
        let mut a = ClaudeCode::default();
        let line = br#"{"type":"assistant","message":{"id":"m1","content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"Let me look."},{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"ls"}},{"type":"tool_use","id":"t2","name":"Read","input":{"file_path":"a"}},{"type":"future_block","x":1}]},"parent_tool_use_id":null}"#;
        let d = a.decode(line);
        assert_eq!(
            kinds(&d),
            [
                ev::AGENT_THINKING,
                ev::AGENT_MESSAGE,
                ev::AGENT_TOOL_USE,
                ev::AGENT_TOOL_USE,
                ev::AGENT_BLOCK
            ]
        );
        let p: Vec<Value> = d.events.iter().map(payload).collect();
        assert_eq!(p[1]["text"], "Let me look.");
        assert_eq!(
            (p[3]["name"].as_str(), p[3]["block_index"].as_u64()),
            (Some("Read"), Some(3))
        );
        assert_eq!(p[4]["block"]["x"], 1);
        assert!(
            p.iter()
                .all(|p| p["message_id"] == "m1" && p.get("parent_tool_use_id").is_none())
        );
        let results = br#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t2","content":"data"},{"type":"tool_result","tool_use_id":"t1","content":"a\nb","is_error":true},{"type":"tool_result","tool_use_id":"nope","content":""}]},"parent_tool_use_id":"toolu_parent"}"#;
        let d = a.decode(results);
        assert_eq!(kinds(&d), [ev::AGENT_TOOL_RESULT; 3]);
        let p: Vec<Value> = d.events.iter().map(payload).collect();
        assert_eq!(
            (p[0]["name"].as_str(), p[0]["content"].as_str()),
            (Some("Read"), Some("data"))
        );
        assert_eq!(
            (p[1]["name"].as_str(), p[1]["is_error"].as_bool()),
            (Some("Bash"), Some(true))
        );
        assert_eq!(p[2]["name"], "", "an unknown id matches no tool");
        assert!(p.iter().all(|p| p["parent_tool_use_id"] == "toolu_parent"));
        assert!(a.open_tools.is_empty(), "matched calls are forgotten");
    }

    /// The real CLI's request (Claude Code 2.1.332, `--permission-prompt-tool
    /// stdio`), answered the way claude-agent-sdk answers.
    #[test]
    fn a_permission_request_becomes_an_event_and_is_answered_once() {
        let mut a = ClaudeCode::default();
        let ask = br#"{"type":"control_request","request_id":"9c19","request":{"subtype":"can_use_tool","tool_name":"Write","display_name":"Write","input":{"file_path":"/workspace/f.txt","content":"hello"},"description":"f.txt","permission_suggestions":[{"type":"setMode","mode":"acceptEdits","destination":"session"}],"tool_use_id":"toolu_1"}}"#;
        let d = a.decode(ask);
        assert_eq!(kinds(&d), [ev::AGENT_TOOL_PERMISSION]);
        let p: Value = serde_json::from_str(&d.events[0].payload).expect("json");
        assert_eq!(p["tool_use_id"], "toolu_1");
        assert_eq!(p["tool_name"], "Write");
        assert_eq!(p["reason"], "f.txt");
        assert_eq!(p["input"]["content"], "hello");
        assert_eq!(p["suggestions"][0]["mode"], "acceptEdits");

        let allow = ToolDecision {
            request_id: "9c19".into(),
            tool_use_id: "toolu_1".into(),
            allow: true,
            ..Default::default()
        };
        let out: Value =
            serde_json::from_slice(&a.encode_tool_decision(&allow).expect("asked")).expect("json");
        assert_eq!(out["type"], "control_response");
        assert_eq!(out["response"]["request_id"], "9c19");
        // No edit: the input as asked goes back.
        assert_eq!(
            out["response"]["response"]["updatedInput"]["content"],
            "hello"
        );
        assert!(a.encode_tool_decision(&allow).is_none(), "answered once");

        // A denial with its message; a withdrawn request takes no answer.
        a.decode(ask);
        let deny = ToolDecision {
            allow: false,
            message: "not here".into(),
            interrupt: true,
            ..allow.clone()
        };
        let out: Value =
            serde_json::from_slice(&a.encode_tool_decision(&deny).expect("asked")).expect("json");
        assert_eq!(out["response"]["response"]["behavior"], "deny");
        assert_eq!(out["response"]["response"]["message"], "not here");
        assert_eq!(out["response"]["response"]["interrupt"], true);
        a.decode(ask);
        let c = a.decode(br#"{"type":"control_cancel_request","request_id":"9c19"}"#);
        assert_eq!(kinds(&c), [ev::AGENT_TOOL_PERMISSION_CANCELLED]);
        assert!(c.events[0].payload.contains("toolu_1"));
        assert!(a.encode_tool_decision(&allow).is_none());
    }

    #[test]
    fn bad_figures_never_make_negative_or_false_totals() {
        let mut a = ClaudeCode::default();
        let line = br#"{"type":"result","total_cost_usd":"lots","usage":{"input_tokens":-5,"output_tokens":"x"}}"#;
        let u = a.decode(line).turn_end.expect("a result ends the turn");
        assert_eq!(u.total.figures, Figures::default());
        assert!(
            u.total.cost_unknown && !u.cumulative_cost,
            "an unreadable cost moves no running total"
        );
        assert!(!u.cumulative_tokens, "no modelUsage: the turn's own usage");
        let line = br#"{"type":"result","total_cost_usd":-1,"modelUsage":{"m":{"inputTokens":-3,"outputTokens":4,"costUSD":-2}}}"#;
        let u = a.decode(line).turn_end.expect("a result ends the turn");
        assert_eq!(
            (
                u.total.figures.input_tokens,
                u.total.figures.output_tokens,
                u.total.figures.cost_usd
            ),
            (0, 4, 0.0)
        );
        assert!(!u.cumulative_cost && u.cumulative_tokens);
        assert!(u.models[0].cost_unknown);
    }

    #[test]
    fn lines_that_are_not_json_objects_are_one_raw_event() {
        let mut a = ClaudeCode::default();
        for line in [
            &b"Segmentation fault (core dumped)"[..],
            br#"{"type":"brand_new_thing"}"#,
            b"[1,2]",
            b"\xff\x00 not utf-8",
        ] {
            assert_eq!(kinds(&a.decode(line)), [ev::RUNTIME_RAW]);
        }
        let empty = a.decode(br#"{"type":"assistant","message":{"content":[]}}"#);
        assert_eq!(kinds(&empty), [ev::RUNTIME_SYSTEM]);
    }

    #[test]
    fn events_too_big_to_travel_with_their_line_become_one_explicit_event() {
        let mut a = ClaudeCode::default();
        let text = "x".repeat(4000);
        let line = format!(
            r#"{{"type":"assistant","message":{{"content":[{{"type":"text","text":"{text}"}},{{"type":"text","text":"{text}"}}]}}}}"#
        );
        let mut d = a.decode(line.as_bytes());
        d.fit(line.len(), 1 << 20);
        assert_eq!(d.events.len(), 2, "fits: unchanged");
        d.fit(line.len(), 10_000);
        assert_eq!(kinds(&d), [ev::RUNTIME_RAW]);
        let p = payload(&d.events[0]);
        assert_eq!(
            (p["oversize"].as_bool(), p["events_dropped"].as_u64()),
            (Some(true), Some(2))
        );
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

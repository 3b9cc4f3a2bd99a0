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
//!   waits for the answer), or `agent.question` for `AskUserQuestion`;
//!   `control_cancel_request` → `agent.tool_permission_cancelled` (it no
//!   longer does);
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
    Adapter, Asked, Block, Decoded, ToolDecision, TurnUsage, WarmUp, WarmUpAnswer, figures,
    json_field, reported, usd,
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
    fn warm_up(&self) -> Option<WarmUp> {
        let request = serde_json::json!({
            "type": "control_request",
            "request_id": WARM_UP_ID,
            "request": {"subtype": "initialize", "hooks": null},
        });
        let mut line = request.to_string().into_bytes();
        line.push(b'\n');
        Some(WarmUp {
            request: line,
            answer: initialize_answer,
        })
    }

    fn command(&self, spec: &SessionSpec, gateway_port: Option<u16>) -> Vec<String> {
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
        if !spec.agent.mcp_servers.is_empty() {
            let gateway = gateway_port.map(|p| format!("http://127.0.0.1:{p}"));
            let config =
                berth_common::spec::mcp::claude_config(&spec.agent.mcp_servers, gateway.as_deref());
            cmd.extend(["--mcp-config".into(), config.to_string()]);
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
                let kind = ev::ask_kind(r["tool_name"].as_str().unwrap_or_default());
                Decoded::one(Block::new(kind, f))
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

/// The request id of the warm-up `initialize` (no session's request uses
/// it: the CLI's own ids are UUIDs).
const WARM_UP_ID: &str = "berth-warm-up";

/// Reads a line for the answer to the warm-up `initialize`:
/// `{"type":"control_response","response":{"subtype":"success"|"error",
/// "request_id":…,…}}`, as the CLI writes it.
fn initialize_answer(line: &[u8]) -> WarmUpAnswer {
    let Ok(v) = serde_json::from_slice::<Value>(line) else {
        return WarmUpAnswer::Unrelated;
    };
    let r = &v["response"];
    if v["type"] != "control_response" || r["request_id"] != WARM_UP_ID {
        return WarmUpAnswer::Unrelated;
    }
    match r["subtype"].as_str() {
        Some("success") => WarmUpAnswer::Ready,
        _ => WarmUpAnswer::Refused(
            r["error"]
                .as_str()
                .unwrap_or("initialize failed")
                .to_string(),
        ),
    }
}

#[cfg(test)]
mod tests;

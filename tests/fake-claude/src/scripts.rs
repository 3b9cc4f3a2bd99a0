//! The longer scripted turns of the fake agent.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::{Agent, SUB_MODEL, Wait, nonce};

impl Agent {
    /// `replay PATH [PACE_MS]`: a capture's lines, as they were.
    pub(crate) fn replay(&mut self, prompt: &str, rest: &[&str], started: Instant) -> bool {
        let num =
            |i: usize, default: u64| rest.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
        let Some(path) = rest.first() else {
            self.ensure_init();
            self.text("replay needs a path");
            self.result(prompt, 0, started, false);
            return true;
        };
        let pace = Duration::from_millis(num(1, 0));
        let body = match std::fs::read_to_string(path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("fake-claude: cannot read {path}: {e}");
                std::process::exit(2);
            }
        };
        self.init_sent = true;
        for line in body.lines().filter(|l| !l.trim().is_empty()) {
            self.emit_raw(line);
            if !pace.is_zero() {
                match self.wait(Some(pace)) {
                    Wait::Elapsed => {}
                    Wait::Interrupted => {
                        self.result(prompt, 0, started, true);
                        return true;
                    }
                    Wait::Eof => return false,
                }
            }
        }
        true
    }

    /// `multi`: two tool calls in one assistant message, and their results.
    pub(crate) fn multi(&mut self) -> String {
        let (a, b) = (
            format!("toolu_fake_{}", nonce()),
            format!("toolu_fake_{}", nonce()),
        );
        let line = json!({
            "type": "assistant",
            "message": {"id": format!("msg_fake_{}", nonce()), "type": "message", "role": "assistant",
                        "model": self.model, "stop_reason": "tool_use", "content": [
                {"type": "thinking", "thinking": "Two tools at once.", "signature": "sig"},
                {"type": "text", "text": "Running both."},
                {"type": "tool_use", "id": a, "name": "Bash", "input": {"command": "echo one"}},
                {"type": "tool_use", "id": b, "name": "Read", "input": {"file_path": "/etc/hostname"}},
            ]},
            "parent_tool_use_id": null, "session_id": self.session_id,
        });
        self.emit(&line);
        let results = json!({
            "type": "user",
            "message": {"role": "user", "content": [
                {"tool_use_id": a, "type": "tool_result", "content": "one", "is_error": false},
                {"tool_use_id": b, "type": "tool_result", "content": "no such file", "is_error": true}]},
            "parent_tool_use_id": null, "session_id": self.session_id,
        });
        self.emit(&results);
        "multi done".to_string()
    }

    /// `subagent TEXT`: a Task tool call whose sub-agent answers on another model.
    pub(crate) fn subagent(&mut self, prompt: &str, rest: &[&str], started: Instant) -> bool {
        let text = rest.join(" ");
        let task = format!("toolu_fake_{}", nonce());
        let sub_prompt = format!("Say: {text}");
        self.assistant(json!({"type": "tool_use", "id": task, "name": "Task",
            "input": {"description": "sub-agent", "prompt": sub_prompt, "subagent_type": "general-purpose"}}));
        self.emit(&json!({
            "type": "user", "parent_tool_use_id": task, "session_id": self.session_id,
            "message": {"role": "user", "content": [{"type": "text", "text": sub_prompt}]},
        }));
        self.emit(&json!({
            "type": "assistant", "parent_tool_use_id": task, "session_id": self.session_id,
            "message": {"id": format!("msg_fake_{}", nonce()), "type": "message", "role": "assistant",
                        "model": SUB_MODEL, "content": [{"type": "text", "text": text}], "stop_reason": "end_turn"},
        }));
        self.emit(&json!({
            "type": "user", "parent_tool_use_id": null, "session_id": self.session_id,
            "message": {"role": "user", "content": [
                {"tool_use_id": task, "type": "tool_result", "content": [{"type": "text", "text": text}]}]},
        }));
        let reply = format!("The sub-agent said: {text}");
        self.text(&reply);
        let sub = (sub_prompt.len() as u64, text.len() as u64);
        self.result_with(prompt, reply.len(), started, false, Some(sub));
        self.remember(prompt);
        true
    }
}

//! Tool permissions as the real CLI asks for them (see the crate's docs):
//! the `control_request` `can_use_tool`, the `control_response` it waits
//! for, and what each answer does to the tool call.

use std::time::Instant;

use serde_json::{Value, json};

use super::{Agent, Input, nonce};

/// The permission flags the CLI was started with.
#[derive(Debug, Default)]
pub(super) struct Policy {
    /// `--permission-prompt-tool stdio`: ask on stdout.
    pub prompt_tool: bool,
    pub mode: String,
    pub allowed: Vec<String>,
    pub disallowed: Vec<String>,
}

/// What became of a tool call that may need permission.
enum Outcome {
    /// Run it, with this input.
    Run(Value),
    /// Refused; the tool_result says why.
    Refused(String),
    /// Refused and the turn interrupted.
    Interrupted,
    /// An interrupt withdrew the request (acknowledged).
    Withdrawn,
    /// stdin closed while the CLI waited.
    Closed,
}

/// The real CLI's message when the answer can no longer come.
const CLOSED: &str = "Tool permission request failed: AbortError: Tool permission stream closed before response received";
/// The real CLI's tool_result for a denial that interrupts.
const REJECTED: &str = "The user doesn't want to proceed with this tool use. The tool use was rejected (eg. if it was a file edit, the new_string was NOT written to the file). STOP what you are doing and wait for the user to tell you how to proceed.";

impl Policy {
    fn lists(list: &[String], tool: &str) -> bool {
        list.iter()
            .any(|r| r == tool || r.starts_with(&format!("{tool}(")))
    }

    /// Whether the policy refuses `tool` outright (it is then not offered).
    pub(super) fn refuses(&self, tool: &str) -> bool {
        Self::lists(&self.disallowed, tool)
    }

    /// Whether `tool` runs without asking; `None`: it must ask.
    fn decides(&self, tool: &str, edit: bool) -> Option<bool> {
        if Self::lists(&self.disallowed, tool) {
            return Some(false);
        }
        if Self::lists(&self.allowed, tool) || self.mode == "bypassPermissions" {
            return Some(true);
        }
        if edit && self.mode == "acceptEdits" {
            return Some(true);
        }
        None
    }
}

impl Agent {
    /// `edit PATH TEXT`: a Write tool call.
    pub(super) fn edit(&mut self, prompt: &str, rest: &[&str], started: Instant) -> bool {
        let path = rest.first().copied().unwrap_or("out.txt");
        let text = rest.get(1..).map(|w| w.join(" ")).unwrap_or_default();
        let input = json!({"file_path": path, "content": text});
        self.tool_call(prompt, "Write", input, started, |input| {
            let path = input["file_path"].as_str().unwrap_or("out.txt");
            let content = input["content"].as_str().unwrap_or_default();
            match std::fs::write(path, content) {
                Ok(()) => (format!("File created successfully at: {path}"), false),
                Err(e) => (format!("cannot write {path}: {e}"), true),
            }
        })
    }

    /// `ask`: an AskUserQuestion call (the questions fake-anthropic's `ask`
    /// makes the real CLI ask), which always asks the host; the answers
    /// come back in the allowed input, and the tool result reads as the
    /// real CLI's.
    pub(super) fn ask_user(&mut self, prompt: &str, started: Instant) -> bool {
        let input = json!({"questions": [
            {"question": "Which color should the button be?", "header": "Color", "multiSelect": false,
             "options": [{"label": "Red", "description": "Warm and loud"},
                         {"label": "Blue", "description": "Calm"}]},
            {"question": "Which sizes should ship?", "header": "Sizes", "multiSelect": true,
             "options": [{"label": "Small", "description": "Phones"},
                         {"label": "Medium", "description": "Tablets"},
                         {"label": "Large", "description": "Desktops"}]},
        ]});
        self.tool_call(prompt, "AskUserQuestion", input, started, |input| {
            let answers: Vec<String> = input["answers"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(q, a)| format!("\"{q}\"=\"{}\"", a.as_str().unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            if answers.is_empty() {
                return ("The user did not answer the questions.".into(), true);
            }
            (
                format!(
                    "Your questions have been answered: {}. You can now continue with these answers in mind.",
                    answers.join(", ")
                ),
                false,
            )
        })
    }

    /// `tool COMMAND` whose command writes (redirects): a Bash call that asks.
    pub(super) fn bash_asking(&mut self, prompt: &str, command: &str, started: Instant) -> bool {
        let input = json!({"command": command});
        self.tool_call(prompt, "Bash", input, started, |input| {
            (
                format!("ran: {}", input["command"].as_str().unwrap_or_default()),
                false,
            )
        })
    }

    /// A tool call that may need permission, its result, and the reply.
    pub(super) fn tool_call(
        &mut self,
        prompt: &str,
        tool: &str,
        input: Value,
        started: Instant,
        run: impl FnOnce(&Value) -> (String, bool),
    ) -> bool {
        let id = format!("toolu_fake_{}", nonce());
        self.assistant(json!({"type": "tool_use", "id": id, "name": tool, "input": input}));
        let outcome = match self.permission.decides(tool, tool == "Write") {
            Some(true) => Outcome::Run(input.clone()),
            Some(false) => Outcome::Refused(format!(
                "<tool_use_error>Error: No such tool available: {tool}. {tool} is disabled for this session.</tool_use_error>"
            )),
            None if !self.permission.prompt_tool => Outcome::Refused(format!(
                "Claude requested permissions to use {tool}, but you haven't granted it yet."
            )),
            None => self.ask(tool, &id, &input),
        };
        let (content, is_error) = match outcome {
            Outcome::Run(input) => run(&input),
            Outcome::Refused(why) => (why, true),
            Outcome::Closed => (CLOSED.to_string(), true),
            Outcome::Interrupted | Outcome::Withdrawn => {
                self.tool_result(&id, REJECTED, true);
                self.emit(&json!({"type": "user", "parent_tool_use_id": null, "session_id": self.session_id,
                    "message": {"role": "user", "content": [{"type": "text", "text": "[Request interrupted by user for tool use]"}]}}));
                self.remember(prompt);
                self.result(prompt, 0, started, true);
                return true;
            }
        };
        self.tool_result(&id, &content, is_error);
        let reply = format!("done: {content}");
        self.remember(prompt);
        self.text(&reply);
        self.result(prompt, reply.len(), started, false);
        true
    }

    fn tool_result(&mut self, id: &str, content: &str, is_error: bool) {
        self.emit(&json!({"type": "user", "parent_tool_use_id": null, "session_id": self.session_id,
            "message": {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": id, "content": content, "is_error": is_error}]}}));
    }

    /// Asks on stdout and waits for the answer (other input is queued).
    fn ask(&mut self, tool: &str, tool_use_id: &str, input: &Value) -> Outcome {
        let request_id = format!("req_fake_{}", nonce());
        let description = input["file_path"]
            .as_str()
            .or(input["command"].as_str())
            .unwrap_or_default()
            .to_string();
        self.emit(&json!({"type": "control_request", "request_id": request_id, "request": {
            "subtype": "can_use_tool", "tool_name": tool, "display_name": tool, "input": input,
            "description": description,
            "permission_suggestions": [{"type": "setMode", "mode": "acceptEdits", "destination": "session"}],
            "tool_use_id": tool_use_id}}));
        loop {
            match self.rx.recv().unwrap_or(Input::Eof) {
                Input::User(text) => self.queued.push_back(text),
                Input::Initialize(id) => self.initialized(&id),
                Input::Response(id, r) if id == request_id => {
                    return match r["behavior"].as_str() {
                        Some("allow") => {
                            let modes = r["updatedPermissions"].as_array().cloned().unwrap_or_default();
                            for u in modes.iter().filter(|u| u["type"] == "setMode") {
                                if let Some(m) = u["mode"].as_str() {
                                    self.permission.mode = m.to_string();
                                }
                            }
                            Outcome::Run(r.get("updatedInput").cloned().unwrap_or(input.clone()))
                        }
                        Some("deny") if r["interrupt"] == true => Outcome::Interrupted,
                        Some("deny") => {
                            Outcome::Refused(r["message"].as_str().unwrap_or_default().into())
                        }
                        _ => Outcome::Refused(
                            "The canUseTool callback returned an invalid permission result. Expected {behavior: 'allow', updatedInput?: object} or {behavior: 'deny', message: string}.".into(),
                        ),
                    };
                }
                Input::Response(..) => {}
                Input::Interrupt(id) => {
                    self.emit(&json!({"type": "control_cancel_request", "request_id": request_id}));
                    self.control_ack(&id);
                    return Outcome::Withdrawn;
                }
                Input::Eof => {
                    self.eof = true;
                    return Outcome::Closed;
                }
            }
        }
    }
}

//! `fake-claude`: a stand-in for the Claude Code CLI, installed as `claude` in
//! berth's test image so a node runs exactly what it runs in production.
//!
//! It accepts the real CLI's flags, reads stream-json user messages and control
//! requests on stdin, and writes stream-json lines on stdout. What it does is
//! scripted by the text of each user message (first word):
//!
//! | message                 | behaviour                                                        |
//! |-------------------------|------------------------------------------------------------------|
//! | `echo TEXT`             | replies TEXT                                                      |
//! | `tool COMMAND`          | a Bash tool_use, its tool_result, then a reply                    |
//! | `delay MS [TEXT]`       | waits MS (interruptible), then replies                            |
//! | `events N [BYTES]`      | N assistant text events of BYTES bytes each (default 64), of     |
//! |                         | pseudo-random letters (storage cannot compress them away)         |
//! | `longline BYTES`        | one assistant event whose text is BYTES long                      |
//! | `garbage`               | writes a line that is not JSON, then replies                      |
//! | `crash [CODE]`          | writes one event, then exits with CODE (default 3) mid-turn       |
//! | `hang`                  | never answers; an interrupt ends the turn                         |
//! | `exit [CODE]`           | exits with CODE (default 0) without ending the turn               |
//! | `replay PATH [MS]`      | writes the recorded transcript at PATH line by line, MS apart     |
//! | `write PATH TEXT`       | writes TEXT to the file PATH (relative to the cwd), then replies  |
//! | `read PATH`             | replies the file's contents, or `missing: PATH`                   |
//! | `history`               | replies the conversation's earlier prompts, joined by ` | `        |
//! | `multi`                 | one assistant line with four blocks (thinking, text, two         |
//! |                         | tool_uses), one user line with both tool_results, then a reply   |
//! | `oom`                   | allocates memory until the kernel kills it                        |
//! | `subagent TEXT`         | a Task tool call whose sub-agent (on `claude-haiku-4-5`, lines   |
//! |                         | carrying `parent_tool_use_id`) replies TEXT, then a reply        |
//! | `edit PATH TEXT`        | a Write tool call, asking permission as the real CLI does (see   |
//! |                         | below), then `done: RESULT` as fake-anthropic replies            |
//! | `ask`                   | an AskUserQuestion call (a single- and a multi-select question), |
//! |                         | asked as a permission request, then `done: RESULT` with the      |
//! |                         | answers as the real CLI words them                               |
//! | `mcp SERVER TOOL JSON`  | a call of the MCP tool `mcp__SERVER__TOOL` (servers from          |
//! |                         | `--mcp-config`, listed in `system/init`), asking permission as    |
//! |                         | the real CLI does, then `done: RESULT`                            |
//! | anything else           | replies `You said: …`                                             |
//!
//! Permissions, as the real CLI: with `--permission-prompt-tool stdio`, a
//! Write (`edit`) in the `default` or `plan` mode, and a Bash call (`tool`)
//! whose command redirects output (`>`), write a `control_request`
//! `can_use_tool` and wait for its `control_response` (allow, with an
//! edited input or `updatedPermissions`, or deny, with a message and maybe
//! `interrupt`). An interrupt meanwhile withdraws the request
//! (`control_cancel_request`); stdin closing fails the call ("Tool
//! permission stream closed before response received"). `--allowedTools
//! Write|Bash` runs them without asking, `--disallowedTools` refuses them,
//! and without the prompt tool a call that would ask is denied.
//!
//! Like the real CLI it keeps its conversation in
//! `$HOME/.claude/projects/{cwd with / as -}/{session_id}.jsonl`, one prompt a
//! line. `--resume ID` needs that file (else it exits 1 with the real CLI's
//! "No conversation found" error), continues it, and reports a fresh session
//! id, as the real CLI may.
//!
//! Every turn but `replay` (which carries its own) ends with a `result` line
//! whose usage is deterministic: input tokens = bytes of the message, output
//! tokens = bytes of the reply, cost = (3·in + 15·out) / 1e6 USD; a
//! sub-agent's, on its own model: its prompt's and reply's bytes, at
//! (1·in + 5·out) / 1e6. As in the real CLI, `usage` is the main agent's for
//! the turn, while `total_cost_usd` and `modelUsage` (per model) are running
//! totals of the conversation, continued across `--resume` (they are kept in
//! the conversation file).
//!
//! With `CLAUDE_CODE_ENABLE_TELEMETRY=1`, `OTEL_METRICS_EXPORTER=otlp` and
//! `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`, it exports the
//! conversation's token and cost metrics at exit as the real CLI does
//! (see `telemetry.rs`).

use std::io::Write;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

mod args;
mod input;
mod mcp;
mod permission;
mod scripts;
mod telemetry;

use args::parse_args;
use input::{Input, read_stdin};

/// The model fake sub-agents run on.
const SUB_MODEL: &str = "claude-haiku-4-5";

struct Agent {
    out: std::io::Stdout,
    rx: Receiver<Input>,
    session_id: String,
    model: String,
    init_sent: bool,
    /// Where the conversation is kept, and its earlier prompts.
    transcript: std::path::PathBuf,
    history: Vec<String>,
    /// The conversation's running totals per model: input and output
    /// tokens, cost.
    totals: std::collections::BTreeMap<String, (u64, u64, f64)>,
    /// Messages that arrived while a turn was running, answered in order.
    queued: std::collections::VecDeque<String>,
    eof: bool,
    permission: permission::Policy,
    /// `--mcp-config`'s servers.
    mcp: mcp::Servers,
}

/// How a wait inside a turn ended.
enum Wait {
    Elapsed,
    Interrupted,
    Eof,
}

impl Agent {
    fn emit(&mut self, v: &Value) {
        let mut out = self.out.lock();
        // A broken stdout means berth went away: nothing left to do.
        if writeln!(out, "{v}").and_then(|()| out.flush()).is_err() {
            std::process::exit(141);
        }
    }

    fn emit_raw(&mut self, line: &str) {
        let mut out = self.out.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            std::process::exit(141);
        }
    }

    fn ensure_init(&mut self) {
        if self.init_sent {
            return;
        }
        self.init_sent = true;
        let cwd = std::env::current_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        self.mcp.start();
        let mut tools = vec!["Bash".to_string(), "Read".into(), "Write".into()];
        tools.extend(self.mcp.tool_names());
        // Like the real CLI, a tool the policy refuses is not offered.
        tools.retain(|t| !self.permission.refuses(t));
        let init = json!({
            "type": "system", "subtype": "init", "cwd": cwd, "session_id": self.session_id,
            "tools": tools, "mcp_servers": self.mcp.statuses(), "model": self.model,
            "permissionMode": "default", "apiKeySource": "none", "claude_code_version": "fake",
        });
        self.emit(&init);
    }

    fn assistant(&mut self, content: Value) {
        let msg = json!({
            "type": "assistant",
            "message": {"id": format!("msg_fake_{}", nonce()), "type": "message", "role": "assistant",
                        "model": self.model, "content": [content], "stop_reason": null},
            "parent_tool_use_id": null, "session_id": self.session_id,
        });
        self.emit(&msg);
    }

    fn text(&mut self, text: &str) {
        self.assistant(json!({"type": "text", "text": text}));
    }

    fn result(&mut self, prompt: &str, reply_bytes: usize, started: Instant, interrupted: bool) {
        self.result_with(prompt, reply_bytes, started, interrupted, None);
    }

    /// Ends the turn; `sub` is a sub-agent's (input, output) tokens on
    /// [`SUB_MODEL`].
    fn result_with(
        &mut self,
        prompt: &str,
        reply_bytes: usize,
        started: Instant,
        interrupted: bool,
        sub: Option<(u64, u64)>,
    ) {
        let input = prompt.len() as u64;
        let output = reply_bytes as u64;
        let mut add = |model: &str, i: u64, o: u64, cost: f64| {
            let t = self.totals.entry(model.to_string()).or_default();
            *t = (t.0 + i, t.1 + o, t.2 + cost);
        };
        add(
            &self.model.clone(),
            input,
            output,
            (3 * input + 15 * output) as f64 / 1e6,
        );
        if let Some((i, o)) = sub {
            add(SUB_MODEL, i, o, (i + 5 * o) as f64 / 1e6);
        }
        let models: serde_json::Map<String, Value> = self
            .totals
            .iter()
            .map(|(m, (i, o, c))| (m.clone(), json!({"input": i, "output": o, "cost": c})))
            .collect();
        self.save(&json!({"type": "totals", "models": models}));
        let cost: f64 = self.totals.values().map(|t| t.2).sum();
        let model_usage: serde_json::Map<String, Value> = self
            .totals
            .iter()
            .map(|(m, (i, o, c))| {
                (
                    m.clone(),
                    json!({"inputTokens": i, "outputTokens": o, "cacheReadInputTokens": 0,
                                   "cacheCreationInputTokens": 0, "costUSD": c}),
                )
            })
            .collect();
        let result = json!({
            "type": "result",
            "subtype": if interrupted { "error_during_execution" } else { "success" },
            "is_error": interrupted,
            "duration_ms": started.elapsed().as_millis() as u64,
            "num_turns": 1,
            "result": if interrupted { "interrupted" } else { "ok" },
            "stop_reason": if interrupted { "interrupted" } else { "end_turn" },
            "session_id": self.session_id,
            "total_cost_usd": cost,
            "usage": {"input_tokens": input, "output_tokens": output,
                      "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            "modelUsage": model_usage,
        });
        self.emit(&result);
    }

    /// Waits up to `d` (forever if `None`) for an interrupt; other input is queued.
    fn wait(&mut self, d: Option<Duration>) -> Wait {
        let deadline = d.map(|d| Instant::now() + d);
        loop {
            let got = match deadline {
                Some(dl) => {
                    let left = dl.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Wait::Elapsed;
                    }
                    self.rx.recv_timeout(left)
                }
                None => self.rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match got {
                Ok(Input::User(text)) => self.queued.push_back(text),
                Ok(Input::Interrupt(id)) => {
                    self.control_ack(&id);
                    return Wait::Interrupted;
                }
                Ok(Input::Initialize(id)) => self.initialized(&id),
                // An answer to no request waiting: ignored, as the CLI does.
                Ok(Input::Response(..)) => {}
                Ok(Input::Eof) | Err(RecvTimeoutError::Disconnected) => {
                    self.eof = true;
                    return Wait::Eof;
                }
                Err(RecvTimeoutError::Timeout) => return Wait::Elapsed,
            }
        }
    }

    /// Appends a prompt to the conversation file, as the real CLI keeps its sessions.
    fn remember(&mut self, prompt: &str) {
        self.history.push(prompt.to_string());
        self.save(&json!({"type": "user", "prompt": prompt}));
    }

    /// Appends one line to the conversation file.
    fn save(&self, v: &Value) {
        let line = v.to_string();
        let write = || -> std::io::Result<()> {
            if let Some(dir) = self.transcript.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.transcript)?;
            writeln!(f, "{line}")
        };
        if let Err(e) = write() {
            eprintln!("fake-claude: cannot save the conversation: {e}");
        }
    }

    /// Answers `initialize` as the CLI does: what it offers (commands,
    /// agents, output styles, models, account) and its pid.
    fn initialized(&mut self, request_id: &str) {
        let answer = json!({"type": "control_response", "response": {
        "subtype": "success", "request_id": request_id, "response": {
            "commands": [], "agents": [], "output_style": "default",
            "available_output_styles": ["default"], "models": [],
            "account": {}, "pid": std::process::id(),
        }}});
        self.emit(&answer);
    }

    fn control_ack(&mut self, request_id: &str) {
        let ack = json!({"type": "control_response",
                         "response": {"subtype": "success", "request_id": request_id}});
        self.emit(&ack);
    }

    /// Runs one turn. Returns false when the process should exit.
    fn turn(&mut self, prompt: &str) -> bool {
        let started = Instant::now();
        let mut words = prompt.split_whitespace();
        let cmd = words.next().unwrap_or_default();
        let rest: Vec<&str> = words.collect();
        let num =
            |i: usize, default: u64| rest.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
        if cmd != "replay" {
            self.ensure_init();
        }
        let reply = match cmd {
            "echo" => rest.join(" "),
            "edit" => return self.edit(prompt, &rest, started),
            "ask" => return self.ask_user(prompt, started),
            "mcp" => return self.mcp_call(prompt, &rest, started),
            "tool" if rest.contains(&">") || rest.iter().any(|w| w.starts_with('>')) => {
                return self.bash_asking(prompt, &rest.join(" "), started);
            }
            "tool" => {
                let command = rest.join(" ");
                let id = format!("toolu_fake_{}", nonce());
                self.assistant(json!({"type": "tool_use", "id": id, "name": "Bash",
                                      "input": {"command": command}}));
                let tool_result = json!({
                    "type": "user",
                    "message": {"role": "user", "content": [
                        {"tool_use_id": id, "type": "tool_result", "content": format!("ran: {command}"), "is_error": false}]},
                    "parent_tool_use_id": null, "session_id": self.session_id,
                });
                self.emit(&tool_result);
                format!("Ran `{command}`.")
            }
            "delay" => {
                match self.wait(Some(Duration::from_millis(num(0, 1000)))) {
                    Wait::Elapsed => {}
                    Wait::Interrupted => {
                        self.result(prompt, 0, started, true);
                        return true;
                    }
                    Wait::Eof => return false,
                }
                rest.get(1..).map(|w| w.join(" ")).unwrap_or_default()
            }
            "events" => {
                let n = num(0, 10);
                let size = num(1, 64) as usize;
                for i in 0..n {
                    let prefix = format!("event {i} ");
                    let pad = size.saturating_sub(prefix.len());
                    self.text(&format!("{prefix}{}", filler(i, pad)));
                }
                format!("sent {n} events")
            }
            "longline" => "L".repeat(num(0, 1 << 20) as usize),
            "garbage" => {
                self.emit_raw("this line is not JSON {{{");
                "after garbage".to_string()
            }
            "crash" => {
                self.text("crashing now");
                eprintln!("fake-claude: crashing on request");
                std::process::exit(num(0, 3) as i32);
            }
            "exit" => std::process::exit(num(0, 0) as i32),
            "hang" => {
                return match self.wait(None) {
                    Wait::Interrupted => {
                        self.result(prompt, 0, started, true);
                        true
                    }
                    _ => false,
                };
            }
            "replay" => return self.replay(prompt, &rest, started),
            "write" => {
                let path = rest.first().copied().unwrap_or("out.txt");
                let text = rest.get(1..).map(|w| w.join(" ")).unwrap_or_default();
                match std::fs::write(path, &text) {
                    Ok(()) => format!("wrote {} bytes to {path}", text.len()),
                    Err(e) => format!("cannot write {path}: {e}"),
                }
            }
            "read" => {
                let path = rest.first().copied().unwrap_or("out.txt");
                std::fs::read_to_string(path).unwrap_or_else(|_| format!("missing: {path}"))
            }
            "history" => self.history.join(" | "),
            "oom" => {
                // Touch every page, so the memory is really used.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "multi" => self.multi(),
            "subagent" => return self.subagent(prompt, &rest, started),
            _ => format!("You said: {prompt}"),
        };
        self.remember(prompt);
        self.text(&reply);
        self.result(prompt, reply.len(), started, false);
        true
    }

    fn run(&mut self) {
        loop {
            let next = match self.queued.pop_front() {
                Some(text) => Input::User(text),
                None if self.eof => return,
                None => self.rx.recv().unwrap_or(Input::Eof),
            };
            match next {
                Input::User(text) => {
                    if !self.turn(&text) {
                        return;
                    }
                }
                // No turn in flight: acknowledge and carry on.
                Input::Interrupt(id) => self.control_ack(&id),
                Input::Initialize(id) => self.initialized(&id),
                Input::Response(..) => {}
                Input::Eof => return,
            }
        }
    }
}

fn nonce() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", nanos, std::process::id())
}

/// `$HOME/.claude/projects/{cwd, / as -}/{id}.jsonl`, where the real CLI keeps sessions.
fn transcript_path(id: &str) -> std::path::PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    let cwd = std::env::current_dir()
        .map(|p| p.display().to_string().replace('/', "-"))
        .unwrap_or_default();
    std::path::Path::new(&home)
        .join(".claude/projects")
        .join(cwd)
        .join(format!("{id}.jsonl"))
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let session_id = match (&args.resume, &args.session_id) {
        // The real CLI may report a fresh id after --resume; so does this one.
        (Some(_), _) => format!("resumed-{}", nonce()),
        (None, Some(id)) => id.clone(),
        (None, None) => format!("fake-{}", nonce()),
    };
    // The conversation file is named by the first id: a resumed run keeps
    // appending to the original, whatever id it reports.
    let conversation_id = args.resume.clone().unwrap_or_else(|| session_id.clone());
    let transcript = transcript_path(&conversation_id);
    let saved: Vec<Value> = match (&args.resume, std::fs::read_to_string(&transcript)) {
        (_, Ok(body)) => body
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect(),
        (Some(id), Err(_)) => {
            eprintln!("No conversation found with session ID: {id}");
            std::process::exit(1);
        }
        (None, Err(_)) => Vec::new(),
    };
    let history = saved
        .iter()
        .filter_map(|v| v["prompt"].as_str().map(String::from))
        .collect();
    let totals = saved
        .iter()
        .rev()
        .find(|v| v["type"] == "totals")
        .and_then(|v| v["models"].as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let t = (
                        v["input"].as_u64().unwrap_or(0),
                        v["output"].as_u64().unwrap_or(0),
                        v["cost"].as_f64().unwrap_or(0.0),
                    );
                    (k.clone(), t)
                })
                .collect()
        })
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || read_stdin(tx));
    let mut agent = Agent {
        out: std::io::stdout(),
        rx,
        session_id,
        model: args.model,
        init_sent: false,
        transcript,
        history,
        totals,
        queued: Default::default(),
        eof: false,
        permission: args.permission,
        mcp: mcp::Servers::default(),
    };
    if let Some(config) = args.mcp_config {
        agent.mcp.configure(config);
    }
    agent.run();
    telemetry::export_at_exit(&agent.session_id, &agent.totals);
}

/// `len` pseudo-random letters (xorshift from `seed`): text that neither
/// Postgres nor a transport can compress to nothing, like real output.
fn filler(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

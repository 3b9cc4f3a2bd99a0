//! MCP servers from `--mcp-config`, as the real CLI uses them: connected
//! when the session starts (streamable HTTP with a small HTTP/1.1 client on
//! loopback, or a stdio child), listed in `system/init` (`mcp_servers` with
//! their status, their tools as `mcp__{server}__{tool}`), and called by the
//! `mcp SERVER TOOL JSON` script.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use serde_json::{Value, json};

use crate::Agent;

/// Longest a stdio server may take to answer one request.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Forwards a stdio server's lines until it closes its stdout.
fn read_lines(mut out: BufReader<ChildStdout>, tx: &std::sync::mpsc::Sender<String>) {
    loop {
        let mut line = String::new();
        match out.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if tx.send(line).is_err() => return,
            Ok(_) => {}
        }
    }
}

/// How one server is reached.
enum Link {
    Http {
        addr: String,
        path: String,
    },
    Stdio {
        child: Child,
        /// Reads `lines`; ends when the server closes its stdout, and is
        /// joined when the link drops (the server killed first).
        reader: Option<std::thread::JoinHandle<()>>,
        stdin: ChildStdin,
        /// The server's lines, read by a thread of their own, so a server
        /// that never answers costs a timeout, not the session.
        lines: std::sync::mpsc::Receiver<String>,
    },
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Link::Stdio { child, reader, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(r) = reader.take() {
                let _ = r.join();
            }
        }
    }
}

struct Server {
    name: String,
    link: Option<Link>,
    tools: Vec<String>,
    next_id: u64,
}

/// The configured servers (connected on first use of [`Servers::start`]).
#[derive(Default)]
pub(crate) struct Servers {
    config: Option<String>,
    servers: Vec<Server>,
    started: bool,
}

impl Servers {
    /// `--mcp-config`: JSON, or a file holding it.
    pub(crate) fn configure(&mut self, value: String) {
        self.config = Some(value);
    }

    /// Connects every server once: initialize, then the tool list.
    pub(crate) fn start(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let Some(raw) = self.config.take() else {
            return;
        };
        let text = if raw.trim_start().starts_with('{') {
            raw
        } else {
            std::fs::read_to_string(&raw).unwrap_or_default()
        };
        let config: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let Some(map) = config["mcpServers"].as_object() else {
            return;
        };
        for (name, entry) in map {
            let mut s = Server {
                name: name.clone(),
                link: connect(entry),
                tools: Vec::new(),
                next_id: 0,
            };
            let ok = s
                .request("initialize", json!({"protocolVersion": "2025-06-18", "capabilities": {},
                                              "clientInfo": {"name": "fake-claude", "version": "1"}}))
                .is_some();
            if ok {
                s.notify("notifications/initialized");
                s.tools = s
                    .request("tools/list", json!({}))
                    .and_then(|r| r["tools"].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|t| t["name"].as_str().map(String::from))
                    .collect();
            } else {
                s.link = None;
            }
            self.servers.push(s);
        }
    }

    /// `mcp_servers` of `system/init`.
    pub(crate) fn statuses(&self) -> Value {
        self.servers
            .iter()
            .map(|s| {
                let status = if s.link.is_some() {
                    "connected"
                } else {
                    "failed"
                };
                json!({"name": s.name, "status": status})
            })
            .collect()
    }

    /// Every tool, as the model sees it (`mcp__{server}__{tool}`).
    pub(crate) fn tool_names(&self) -> Vec<String> {
        self.servers
            .iter()
            .flat_map(|s| s.tools.iter().map(move |t| format!("mcp__{}__{t}", s.name)))
            .collect()
    }

    /// Calls `tool` of `server`: its text, and whether it is an error.
    fn call(&mut self, server: &str, tool: &str, input: &Value) -> (String, bool) {
        let Some(s) = self.servers.iter_mut().find(|s| s.name == server) else {
            return (
                format!("No such tool available: mcp__{server}__{tool}"),
                true,
            );
        };
        match s.call_raw("tools/call", json!({"name": tool, "arguments": input})) {
            Ok(r) => {
                let text: Vec<&str> = r["content"]
                    .as_array()
                    .map(|c| c.iter().filter_map(|b| b["text"].as_str()).collect())
                    .unwrap_or_default();
                (text.join("\n"), r["isError"] == true)
            }
            Err(why) => (format!("MCP server \"{server}\" failed: {why}"), true),
        }
    }
}

fn connect(entry: &Value) -> Option<Link> {
    match entry["type"].as_str().unwrap_or("stdio") {
        "http" => {
            let url = entry["url"].as_str()?;
            let rest = url.strip_prefix("http://")?;
            let (addr, path) = rest.split_once('/').unwrap_or((rest, ""));
            Some(Link::Http {
                addr: addr.to_string(),
                path: format!("/{path}"),
            })
        }
        "stdio" => {
            let args: Vec<&str> = entry["args"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut child = Command::new(entry["command"].as_str()?)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            let (stdin, stdout) = (child.stdin.take()?, child.stdout.take()?);
            let (tx, lines) = std::sync::mpsc::channel();
            let reader = std::thread::spawn(move || read_lines(BufReader::new(stdout), &tx));
            Some(Link::Stdio {
                child,
                reader: Some(reader),
                stdin,
                lines,
            })
        }
        _ => None,
    }
}

impl Server {
    fn request(&mut self, method: &str, params: Value) -> Option<Value> {
        self.call_raw(method, params).ok()
    }

    /// A request's result, or what went wrong (the server's words).
    fn call_raw(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let msg = json!({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params});
        let reply = self.send(&msg)?;
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| format!("MCP error: {}", reply["error"]))
    }

    fn notify(&mut self, method: &str) {
        let _ = self.send(&json!({"jsonrpc": "2.0", "method": method}));
    }

    /// Sends one message; the answer (`Null` for a notification), or why
    /// there is none.
    fn send(&mut self, msg: &Value) -> Result<Value, String> {
        let notification = msg.get("id").is_none();
        let gone = || "the server is not connected".to_string();
        let io = |e: std::io::Error| e.to_string();
        match self.link.as_mut().ok_or_else(gone)? {
            Link::Http { addr, path } => {
                let body = msg.to_string();
                let mut conn = std::net::TcpStream::connect(addr.as_str()).map_err(io)?;
                conn.set_read_timeout(Some(ANSWER_WITHIN)).map_err(io)?;
                write!(
                    conn,
                    "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .map_err(io)?;
                let mut raw = Vec::new();
                conn.read_to_end(&mut raw).map_err(io)?;
                let text = String::from_utf8_lossy(&raw);
                let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
                let status = head.split(' ').nth(1).unwrap_or_default();
                if !status.starts_with('2') {
                    return Err(format!("HTTP {status}: {}", body.trim()));
                }
                if notification {
                    return Ok(Value::Null);
                }
                // JSON, or one SSE event carrying it.
                let json = body
                    .lines()
                    .find_map(|l| l.strip_prefix("data:"))
                    .unwrap_or(body);
                serde_json::from_str(json.trim()).map_err(|e| e.to_string())
            }
            Link::Stdio { stdin, lines, .. } => {
                writeln!(stdin, "{msg}")
                    .and_then(|()| stdin.flush())
                    .map_err(io)?;
                if notification {
                    return Ok(Value::Null);
                }
                let line = lines
                    .recv_timeout(ANSWER_WITHIN)
                    .map_err(|_| format!("no answer within {ANSWER_WITHIN:?}"))?;
                serde_json::from_str(&line).map_err(|e| e.to_string())
            }
        }
    }
}

impl Agent {
    /// `mcp SERVER TOOL JSON`: a call of `mcp__SERVER__TOOL`, asked for
    /// like the real CLI asks for MCP tools, then `done: RESULT`.
    pub(crate) fn mcp_call(&mut self, prompt: &str, rest: &[&str], started: Instant) -> bool {
        let server = rest.first().copied().unwrap_or_default().to_string();
        let tool = rest.get(1).copied().unwrap_or_default().to_string();
        let input: Value =
            serde_json::from_str(&rest.get(2..).map(|w| w.join(" ")).unwrap_or_default())
                .unwrap_or(json!({}));
        let name = format!("mcp__{server}__{tool}");
        let known = self.mcp.tool_names().contains(&name);
        let mut mcp = std::mem::take(&mut self.mcp);
        let done = self.tool_call(prompt, &name, input, started, |input| {
            if known {
                mcp.call(&server, &tool, input)
            } else {
                (
                    format!(
                        "<tool_use_error>Error: No such tool available: {name}</tool_use_error>"
                    ),
                    true,
                )
            }
        });
        self.mcp = mcp;
        done
    }
}

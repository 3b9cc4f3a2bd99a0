//! A small MCP server (protocol 2025-06-18), for the tests of MCP servers:
//! over streamable HTTP at `POST /mcp` (JSON responses; `GET` is 405, as
//! the transport allows), and over stdio (`fake-anthropic mcp-stdio`).
//!
//! Tools:
//! - `lookup {query}` → `looked up: QUERY` (over HTTP: `… (authorized)`
//!   when the request carried the server's token);
//! - `whoami` → `stdio server in the container` over stdio, `http server`
//!   over HTTP.

use std::io::{BufRead, Write};

use serde_json::{Value, json};

/// Which transport answers: it shapes `whoami`.
#[derive(Clone, Copy)]
pub enum Transport {
    Http,
    Stdio,
}

/// The answer to one JSON-RPC message; `None` for a notification.
pub fn answer(msg: &Value, transport: Transport) -> Option<Value> {
    let id = msg.get("id")?.clone();
    let method = msg["method"].as_str().unwrap_or_default();
    let result = match method {
        "initialize" => json!({
            "protocolVersion": msg["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18"),
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "berth-test-mcp", "version": "1.0.0"},
        }),
        "ping" => json!({}),
        "tools/list" => json!({"tools": [
            {"name": "lookup", "description": "Looks a word up.",
             "inputSchema": {"type": "object", "properties": {"query": {"type": "string"}},
                             "required": ["query"]}},
            {"name": "whoami", "description": "Says which server answers.",
             "inputSchema": {"type": "object", "properties": {}}},
        ]}),
        "tools/call" => {
            let args = &msg["params"]["arguments"];
            let text = match msg["params"]["name"].as_str() {
                Some("lookup") => {
                    format!("looked up: {}", args["query"].as_str().unwrap_or_default())
                }
                Some("whoami") => match transport {
                    Transport::Stdio => "stdio server in the container".into(),
                    Transport::Http => "http server".into(),
                },
                other => {
                    return Some(json!({"jsonrpc": "2.0", "id": id, "result": {
                        "isError": true,
                        "content": [{"type": "text", "text": format!("no tool {other:?}")}]}}));
                }
            };
            json!({"content": [{"type": "text", "text": text}]})
        }
        _ => {
            return Some(json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32601, "message": format!("no method {method}")}}));
        }
    };
    Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
}

/// Serves MCP on stdin and stdout, one JSON message a line, until stdin
/// ends.
pub fn serve_stdio() -> std::process::ExitCode {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if let Some(reply) = answer(&msg, Transport::Stdio)
            && writeln!(out, "{reply}").and_then(|()| out.flush()).is_err()
        {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}

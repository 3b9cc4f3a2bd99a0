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
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
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

/// One MCP message over streamable HTTP: logged (`{"mcp": METHOD,
/// "authorization": HEADER}`), refused with 401 without the token when one
/// is required, else answered as JSON (202 for a notification).
pub(crate) async fn http(
    axum::extract::State(state): axum::extract::State<Arc<crate::State>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let Ok(msg) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "body is not JSON").into_response();
    };
    if let Some(log) = &state.log {
        let line = json!({"mcp": msg["method"], "authorization": auth});
        let _ = writeln!(log.lock().unwrap_or_else(|p| p.into_inner()), "{line}");
    }
    let given = auth.strip_prefix("Bearer ").unwrap_or_default();
    if let Some(token) = &state.mcp_token
        && given != token
    {
        return (StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response();
    }
    if let Some(file) = &state.mcp_token_file
        && !valid_in(file, given)
    {
        return (
            StatusCode::UNAUTHORIZED,
            "missing, wrong or expired bearer token",
        )
            .into_response();
    }
    match answer(&msg, Transport::Http) {
        Some(reply) => (
            [(header::CONTENT_TYPE, "application/json")],
            reply.to_string(),
        )
            .into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    }
}

/// Whether `token` is a line of `file` (`TOKEN EXPIRES_MS`) not yet expired.
fn valid_in(file: &str, token: &str) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .any(|(t, e)| !token.is_empty() && t == token && e.parse::<u128>().is_ok_and(|e| e > now))
}

/// This server offers no server-to-client stream (the transport allows it).
pub(crate) async fn no_stream() -> Response {
    StatusCode::METHOD_NOT_ALLOWED.into_response()
}

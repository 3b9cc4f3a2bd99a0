//! `fake-anthropic`: a scripted stand-in for the Anthropic Messages API, so
//! the real Claude Code CLI runs offline (`ANTHROPIC_BASE_URL`). It serves
//! `POST /v1/messages` (SSE when `stream` is true, JSON otherwise) and
//! `POST /v1/messages/count_tokens`, and appends every request it gets, one
//! JSON object a line, to `--log`, so tests can see what the CLI sent.
//!
//! The reply is chosen by the user's text: the last text block of the last
//! `user` message (the CLI adds `<system-reminder>` blocks; those are
//! skipped). Scripts, by first word:
//!
//! - `say TEXT`: one text block;
//! - `think TEXT`: a thinking block, then TEXT;
//! - `bash CMD` / `write PATH TEXT` / `read PATH`: a Bash / Write / Read
//!   tool_use, which the CLI runs; the next request (carrying the
//!   tool_result) is answered with `done: RESULT`;
//! - `ask`: an AskUserQuestion tool_use (a single-select and a
//!   multi-select question), answered like the others with `done: RESULT`;
//! - `multi`: thinking, text and a Bash tool_use in one message;
//! - `task TEXT`: a Task tool_use: a sub-agent on haiku (a second model)
//!   whose prompt is `say sub TEXT`;
//! - `slow N`: N text deltas 200 ms apart (for interrupts);
//! - `fail 429|500|529`: that API error;
//! - `cache TEXT`: TEXT, with cache read and write tokens in the usage;
//! - `recall`: `recall: ` and the user's earlier messages in this request,
//!   joined by ` | ` (what the CLI sent of its conversation);
//! - `mcp SERVER TOOL JSON`: a call of the MCP tool `mcp__SERVER__TOOL`
//!   with JSON as its input;
//! - anything else: `ok: TEXT`.
//!
//! It is also a small MCP server (see `mcp.rs`): at `POST /mcp` (with
//! `--mcp-token T`, only requests with `Authorization: Bearer T` are
//! served, with `--mcp-token-file F` only the unexpired tokens listed in F
//! (`TOKEN EXPIRES_MS` lines); the others get 401), and on stdio as
//! `fake-anthropic mcp-stdio`.
//!
//! Usage is deterministic: 10 input tokens plus one per message, 5 output
//! tokens plus 3 per block.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::io::Write;

mod mcp;

struct State {
    /// With `--require-key`: the only `x-api-key` accepted (401 otherwise).
    key: Option<String>,
    /// With `--mcp-token`: the only bearer token `/mcp` serves.
    mcp_token: Option<String>,
    /// With `--mcp-token-file`: the bearer tokens `/mcp` serves, a
    /// `TOKEN EXPIRES_MS` line each, read per request.
    mcp_token_file: Option<String>,
    ids: AtomicU64,
    log: Option<std::sync::Mutex<std::fs::File>>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let mut listen = "127.0.0.1:8787".to_string();
    let mut log = None;
    let mut key = None;
    let mut mcp_token = None;
    let mut mcp_token_file = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "mcp-stdio" => return mcp::serve_stdio(),
            "--mcp-token" => mcp_token = args.next(),
            "--mcp-token-file" => mcp_token_file = args.next(),
            "--listen" => listen = args.next().unwrap_or(listen),
            "--log" => log = args.next(),
            "--require-key" => key = args.next(),
            "--help" | "-h" => {
                println!(
                    "usage: fake-anthropic [--listen ADDR] [--log FILE] [--require-key KEY] [--mcp-token TOKEN] [--mcp-token-file FILE]\n       fake-anthropic mcp-stdio"
                );
                return std::process::ExitCode::SUCCESS;
            }
            other => {
                eprintln!("fake-anthropic: unknown argument `{other}` (see --help)");
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    let log = match log {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            Ok(f) => Some(std::sync::Mutex::new(f)),
            Err(e) => {
                eprintln!("fake-anthropic: cannot open the log {path}: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // Ids are unique across processes, like the real API's: a resumed
    // conversation (a new container, a new stand-in) must not reuse the ids
    // of its earlier tool calls, or the CLI takes them for the same call.
    let first_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
        .saturating_mul(1000);
    let state = Arc::new(State {
        ids: AtomicU64::new(first_id),
        log,
        key,
        mcp_token,
        mcp_token_file,
    });
    let mcp_routes = Router::new()
        .route("/mcp", post(mcp::http).get(mcp::no_stream))
        .with_state(state.clone());
    let app = Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found_error", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_key,
        ))
        .with_state(state)
        .merge(mcp_routes);
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake-anthropic: cannot listen on {listen}: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match axum::serve(listener, app).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-anthropic: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// As the real API: a request without the right `x-api-key` gets 401.
async fn check_key(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &state.key {
        let given = req.headers().get("x-api-key").and_then(|v| v.to_str().ok());
        if given != Some(key.as_str()) {
            return error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
            );
        }
    }
    next.run(req).await
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn count_tokens(body: Bytes) -> Response {
    let n = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["messages"].as_array().map(Vec::len))
        .unwrap_or(0);
    let body = json!({"input_tokens": 10 + n});
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What the last user message asks for.
enum Asked {
    /// The CLI sent back a tool's result.
    ToolResult(String),
    Text(String),
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The user's own text in each user message of the request (tool results
/// and the CLI's reminders left out), oldest first.
fn user_texts(req: &Value) -> Vec<String> {
    req["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "user")
                .filter_map(|m| match &m["content"] {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(blocks) => blocks
                        .iter()
                        .filter(|b| b["type"] == "text")
                        .filter_map(|b| b["text"].as_str())
                        .rfind(|t| !t.trim_start().starts_with('<'))
                        .map(|t| t.trim().to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn asked(req: &Value) -> Asked {
    let last_user = req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"));
    let Some(content) = last_user.map(|m| &m["content"]) else {
        return Asked::Text(String::new());
    };
    if let Some(r) = content
        .as_array()
        .and_then(|b| b.iter().find(|b| b["type"] == "tool_result"))
    {
        let text = text_of(&r["content"]);
        let own = text.split("<system-reminder>").next().unwrap_or_default();
        return Asked::ToolResult(own.trim().to_string());
    }
    let text = match content {
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .rfind(|t| !t.trim_start().starts_with('<'))
            .unwrap_or_default()
            .to_string(),
        other => text_of(other),
    };
    Asked::Text(text.trim().to_string())
}

/// `ask`'s questions: one single-select, one multi-select (the same two
/// fake-claude asks).
fn ask_input() -> Value {
    json!({"questions": [
        {"question": "Which color should the button be?", "header": "Color", "multiSelect": false,
         "options": [{"label": "Red", "description": "Warm and loud"},
                     {"label": "Blue", "description": "Calm"}]},
        {"question": "Which sizes should ship?", "header": "Sizes", "multiSelect": true,
         "options": [{"label": "Small", "description": "Phones"},
                     {"label": "Medium", "description": "Tablets"},
                     {"label": "Large", "description": "Desktops"}]},
    ]})
}

/// One content block of the reply.
enum Block {
    Text(String),
    Thinking(String),
    Tool { name: String, input: Value },
}

struct Reply {
    blocks: Vec<Block>,
    /// Deltas per text block, and the pause between them.
    deltas: usize,
    pause: Duration,
    cache: bool,
}

fn reply(asked: Asked) -> Result<Reply, (u16, String)> {
    let simple = |blocks| Reply {
        blocks,
        deltas: 1,
        pause: Duration::ZERO,
        cache: false,
    };
    let text = match asked {
        Asked::ToolResult(r) => {
            let r: String = r.chars().take(200).collect();
            return Ok(simple(vec![Block::Text(format!("done: {r}"))]));
        }
        Asked::Text(t) => t,
    };
    let (word, rest) = text.split_once(' ').unwrap_or((text.as_str(), ""));
    let rest = rest.trim().to_string();
    Ok(match word {
        "say" => simple(vec![Block::Text(rest)]),
        "think" => simple(vec![
            Block::Thinking(format!("thinking about {rest}")),
            Block::Text(rest),
        ]),
        "bash" => simple(vec![Block::Tool {
            name: "Bash".into(),
            input: json!({"command": rest, "description": "run the command"}),
        }]),
        "write" => {
            let (path, body) = rest.split_once(' ').unwrap_or((rest.as_str(), ""));
            simple(vec![Block::Tool {
                name: "Write".into(),
                input: json!({"file_path": path, "content": body}),
            }])
        }
        "ask" => simple(vec![Block::Tool {
            name: "AskUserQuestion".into(),
            input: ask_input(),
        }]),
        // `mcp SERVER TOOL JSON`: a call of the MCP tool `mcp__SERVER__TOOL`.
        "mcp" => {
            let mut parts = rest.splitn(3, ' ');
            let (server, tool) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let input = serde_json::from_str(parts.next().unwrap_or("{}")).unwrap_or(json!({}));
            simple(vec![Block::Tool {
                name: format!("mcp__{server}__{tool}"),
                input,
            }])
        }
        "read" => simple(vec![Block::Tool {
            name: "Read".into(),
            input: json!({"file_path": rest}),
        }]),
        "multi" => simple(vec![
            Block::Thinking("several blocks".into()),
            Block::Text("first a text block".into()),
            Block::Tool {
                name: "Bash".into(),
                input: json!({"command": "echo multi", "description": "echo"}),
            },
        ]),
        "task" => simple(vec![Block::Tool {
            name: "Task".into(),
            input: json!({"description": "a sub-agent", "prompt": format!("say sub {rest}"),
                          "subagent_type": "general-purpose", "model": "haiku"}),
        }]),
        "slow" => {
            let n = rest.parse::<usize>().unwrap_or(10).max(1);
            Reply {
                blocks: vec![Block::Text("slow ".repeat(n))],
                deltas: n,
                pause: Duration::from_millis(200),
                cache: false,
            }
        }
        "fail" => {
            let code = rest.parse::<u16>().unwrap_or(500);
            return Err((code, format!("scripted failure {code}")));
        }
        "cache" => Reply {
            cache: true,
            ..simple(vec![Block::Text(rest)])
        },
        _ => simple(vec![Block::Text(format!("ok: {text}"))]),
    })
}

async fn messages(
    axum::extract::State(state): axum::extract::State<Arc<State>>,
    body: Bytes,
) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "body is not JSON",
        );
    };
    if let Some(log) = &state.log {
        let mut line = body.to_vec();
        line.push(b'\n');
        // One small write per request; a poisoned lock still holds a file.
        let _ = log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&line);
    }
    let asked = match asked(&req) {
        // What the conversation held before this message, as the CLI sent it.
        Asked::Text(t) if t == "recall" => {
            let mut earlier = user_texts(&req);
            earlier.pop();
            Asked::Text(format!("say recall: {}", earlier.join(" | ")))
        }
        other => other,
    };
    let reply = match reply(asked) {
        Ok(r) => r,
        Err((code, message)) => {
            let (status, kind) = match code {
                429 => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"),
                529 => (
                    StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                    "overloaded_error",
                ),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "api_error"),
            };
            return error(status, kind, &message);
        }
    };
    let id = state.ids.fetch_add(1, Ordering::Relaxed) + 1;
    let model = req["model"]
        .as_str()
        .unwrap_or("claude-sonnet-4-5")
        .to_string();
    let messages = req["messages"].as_array().map_or(0, Vec::len) as u64;
    let usage = json!({
        "input_tokens": 10 + messages,
        "output_tokens": 5 + 3 * reply.blocks.len() as u64,
        "cache_creation_input_tokens": if reply.cache { 200 } else { 0 },
        "cache_read_input_tokens": if reply.cache { 1000 } else { 0 },
    });
    let stop = if reply.blocks.iter().any(|b| matches!(b, Block::Tool { .. })) {
        "tool_use"
    } else {
        "end_turn"
    };
    let blocks: Vec<Value> = reply
        .blocks
        .iter()
        .enumerate()
        .map(|(i, b)| match b {
            Block::Text(t) => json!({"type": "text", "text": t}),
            Block::Thinking(t) => json!({"type": "thinking", "thinking": t, "signature": "sig"}),
            Block::Tool { name, input } => {
                json!({"type": "tool_use", "id": format!("toolu_{id:04}_{i}"),
                                                  "name": name, "input": input})
            }
        })
        .collect();
    if req["stream"].as_bool() != Some(true) {
        let body = json!({"id": format!("msg_{id:06}"), "type": "message", "role": "assistant",
                          "model": model, "content": blocks, "stop_reason": stop,
                          "stop_sequence": null, "usage": usage});
        return (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    let events = stream_events(id, &model, &usage, stop, &reply, &blocks);
    let stream = futures::stream::unfold(events.into_iter(), |mut it| async move {
        let (event, pause) = it.next()?;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let kind = event["type"].as_str().unwrap_or_default().to_string();
        let frame = format!("event: {kind}\ndata: {event}\n\n");
        Some((Ok::<_, std::convert::Infallible>(Bytes::from(frame)), it))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "bad response",
            )
        })
}

/// The server-sent events of a streamed reply: the message, each block's
/// start, deltas (`reply.pause` apart) and stop, and the message's end.
fn stream_events(
    id: u64,
    model: &str,
    usage: &Value,
    stop: &str,
    reply: &Reply,
    blocks: &[Value],
) -> Vec<(Value, Duration)> {
    let mut events: Vec<(Value, Duration)> = Vec::new();
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    events.push((
        json!({"type": "message_start", "message": {"id": format!("msg_{id:06}"), "type": "message",
               "role": "assistant", "model": model, "content": [], "stop_reason": null,
               "stop_sequence": null, "usage": start_usage}}),
        Duration::ZERO,
    ));
    for (i, (b, full)) in reply.blocks.iter().zip(blocks).enumerate() {
        let (start, deltas): (Value, Vec<Value>) = match b {
            Block::Text(t) => (
                json!({"type": "text", "text": ""}),
                split(t.as_str(), reply.deltas)
                    .into_iter()
                    .map(|p| json!({"type": "text_delta", "text": p}))
                    .collect(),
            ),
            Block::Thinking(t) => (
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                vec![
                    json!({"type": "thinking_delta", "thinking": t}),
                    json!({"type": "signature_delta", "signature": "sig"}),
                ],
            ),
            Block::Tool { input, .. } => {
                let mut start = full.clone();
                start["input"] = json!({});
                (
                    start,
                    vec![json!({"type": "input_json_delta", "partial_json": input.to_string()})],
                )
            }
        };
        events.push((
            json!({"type": "content_block_start", "index": i, "content_block": start}),
            Duration::ZERO,
        ));
        for d in deltas {
            events.push((
                json!({"type": "content_block_delta", "index": i, "delta": d}),
                reply.pause,
            ));
        }
        events.push((
            json!({"type": "content_block_stop", "index": i}),
            Duration::ZERO,
        ));
    }
    events.push((
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
               "usage": {"output_tokens": usage["output_tokens"]}}),
        Duration::ZERO,
    ));
    events.push((json!({"type": "message_stop"}), Duration::ZERO));
    events
}

/// `t` in `n` roughly equal pieces (by characters).
fn split(t: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = t.chars().collect();
    let size = chars.len().div_ceil(n.max(1)).max(1);
    let parts: Vec<String> = chars.chunks(size).map(|c| c.iter().collect()).collect();
    if parts.is_empty() {
        vec![String::new()]
    } else {
        parts
    }
}

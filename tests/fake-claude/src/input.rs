//! What arrives on stdin: stream-json user messages and control messages.

use std::io::BufRead;
use std::sync::mpsc;

use serde_json::Value;

/// What arrives on stdin.
pub(crate) enum Input {
    User(String),
    Interrupt(String),
    /// The SDK's first request (`initialize`): its request id.
    Initialize(String),
    /// A `control_response`: its request id and response.
    Response(String, Value),
    Eof,
}

pub(crate) fn read_stdin(tx: mpsc::Sender<Input>) {
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            eprintln!("fake-claude: ignoring a stdin line that is not JSON: {line}");
            continue;
        };
        let input = match v["type"].as_str() {
            Some("user") => Input::User(message_text(&v["message"]["content"])),
            Some("control_request") if v["request"]["subtype"] == "interrupt" => {
                Input::Interrupt(v["request_id"].as_str().unwrap_or_default().to_string())
            }
            Some("control_request") if v["request"]["subtype"] == "initialize" => {
                Input::Initialize(v["request_id"].as_str().unwrap_or_default().to_string())
            }
            Some("control_response") => Input::Response(
                v["response"]["request_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                v["response"]["response"].clone(),
            ),
            _ => {
                eprintln!("fake-claude: ignoring stdin line: {line}");
                continue;
            }
        };
        if tx.send(input).is_err() {
            return;
        }
    }
    let _ = tx.send(Input::Eof);
}

/// The text of a user message's content: a string, or text blocks.
pub(crate) fn message_text(content: &Value) -> String {
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

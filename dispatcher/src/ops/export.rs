//! `ExportSession`: a session as a readable Markdown transcript, or as JSON.
//!
//! The Markdown keeps what a reader follows: user messages, agent messages,
//! thinking, tool calls with their input and results, per-turn usage and the
//! status changes that end or pause a run. Runtime bookkeeping (init, system
//! lines, turn results) is left to the JSON export, which holds every event.

use std::fmt::Write;

use berth_common::events::{self as ev, payload};
use serde_json::{Value, json};

use crate::session::{Event, Session, SessionStatus, questions};

/// The transcript as Markdown.
pub(crate) fn markdown(s: &Session, events: &[Event]) -> String {
    let mut out = String::new();
    let title = if s.display_name.is_empty() {
        format!("Session {}", s.id)
    } else {
        s.display_name.clone()
    };
    let _ = writeln!(out, "# {title}\n");
    let _ = writeln!(out, "- Session: `sessions/{}`", s.id);
    let reason = if s.status_reason.is_empty() {
        String::new()
    } else {
        format!(" ({})", s.status_reason)
    };
    let _ = writeln!(out, "- Status: {}{reason}", s.status);
    if let Some((agent, version)) = &s.agent {
        let _ = writeln!(out, "- Agent: `agents/{agent}@{version}`");
    }
    let _ = writeln!(out, "- Image: `{}`", s.spec.image);
    if !s.spec.model.is_empty() {
        let _ = writeln!(out, "- Model: `{}`", s.spec.model);
    }
    let _ = writeln!(out, "- Created: {}", s.create_time.to_rfc3339());
    let u = &s.usage;
    let _ = writeln!(
        out,
        "- Usage: {} turns, {} input / {} output tokens, {} cache read / {} cache write, ${:.6}",
        u.turns,
        u.input_tokens,
        u.output_tokens,
        u.cache_read_input_tokens,
        u.cache_creation_input_tokens,
        u.cost_usd
    );
    for m in &u.models {
        let _ = writeln!(out, "  - `{}`: {}", m.model, figures_text(&m.figures));
    }
    out.push_str("\n---\n");
    for e in events {
        transcript_entry(&mut out, e);
    }
    out
}

/// One event's lines in the Markdown transcript (none for bookkeeping).
fn transcript_entry(out: &mut String, e: &Event) {
    let text = || {
        payload::parse::<payload::AgentText>(&e.payload)
            .unwrap_or_default()
            .text
    };
    match e.kind.as_str() {
        ev::USER_MESSAGE => {
            let m = payload::parse::<payload::UserMessage>(&e.payload);
            let _ = write!(
                out,
                "\n## User\n\n{}\n",
                m.map(|m| m.text).unwrap_or_default()
            );
        }
        ev::USER_INTERRUPT => out.push_str("\n_The user interrupted the turn._\n"),
        ev::AGENT_MESSAGE => {
            let _ = write!(out, "\n## Assistant\n\n{}\n", text());
        }
        ev::AGENT_THINKING => {
            let t = text();
            if !t.is_empty() {
                out.push_str("\n> _Thinking:_ ");
                out.push_str(&t.replace('\n', "\n> "));
                out.push('\n');
            }
        }
        ev::AGENT_TOOL_USE => {
            let t: payload::ToolUse = payload::parse(&e.payload).unwrap_or_default();
            let input = serde_json::to_string_pretty(&t.input).unwrap_or_default();
            let _ = write!(
                out,
                "\n**Tool call** `{}` ({})\n\n{}",
                t.name,
                t.tool_use_id,
                fenced("json", &input)
            );
        }
        ev::AGENT_TOOL_RESULT => {
            let r: payload::ToolResult = payload::parse(&e.payload).unwrap_or_default();
            let error = if r.is_error { " (error)" } else { "" };
            let _ = write!(
                out,
                "\n**Tool result**{error} ({})\n\n{}",
                r.tool_use_id,
                fenced("", &tool_result_text(&r.content))
            );
        }
        ev::AGENT_TOOL_PERMISSION => {
            let p: payload::ToolPermission = payload::parse(&e.payload).unwrap_or_default();
            let reason = Some(&p.reason)
                .filter(|r| !r.is_empty())
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            let _ = write!(
                out,
                "\n**Permission asked** to run `{}` ({}){reason}\n",
                p.tool_name, p.tool_use_id
            );
        }
        ev::AGENT_QUESTION => asked(out, e),
        ev::USER_TOOL_CONFIRMATION => confirmation(out, e),
        ev::AGENT_TOOL_PERMISSION_CANCELLED | ev::SESSION_TOOL_PERMISSION_CANCELLED => {
            let c: payload::ToolPermissionCancelled =
                payload::parse(&e.payload).unwrap_or_default();
            let _ = write!(
                out,
                "\n_Permission request ({}) closed without an answer: {}_\n",
                c.tool_use_id, c.reason
            );
        }
        ev::SESSION_USAGE => usage(out, e),
        ev::SESSION_ERROR => {
            let m = payload::parse::<payload::SessionError>(&e.payload);
            let _ = write!(
                out,
                "\n_Error: {}_\n",
                m.map(|m| m.message).unwrap_or_default()
            );
        }
        kind => status_change(out, kind, e),
    }
}

/// A person's (or the timeout's) answer to a permission request.
fn confirmation(out: &mut String, e: &Event) {
    let a: payload::ToolConfirmation = payload::parse(&e.payload).unwrap_or_default();
    let verb = if a.decision == "allow" {
        "Allowed"
    } else {
        "Denied"
    };
    let who = match (a.by.as_str(), a.identity.as_str()) {
        ("timeout", _) => " by the timeout".to_string(),
        (_, "") => String::new(),
        (_, id) => format!(" by {id}"),
    };
    let mut extra = Vec::new();
    if a.always {
        extra.push("always, for this session".to_string());
    }
    if a.updated_input.is_some() {
        extra.push("with edited input".to_string());
    }
    if a.interrupt {
        extra.push("and the turn interrupted".to_string());
    }
    if !a.message.is_empty() {
        extra.push(format!("\"{}\"", a.message));
    }
    let extra = if extra.is_empty() {
        String::new()
    } else {
        format!(": {}", extra.join(", "))
    };
    let answers = a
        .updated_input
        .as_ref()
        .map(questions::answers_of)
        .unwrap_or_default();
    if a.tool_name == ev::ASK_USER_QUESTION && !answers.is_empty() {
        let _ = writeln!(out, "\n**Answered**{who} ({}):\n", a.tool_use_id);
        for (q, answer) in answers {
            let _ = writeln!(out, "- {q} → **{answer}**");
        }
        return;
    }
    let _ = write!(
        out,
        "\n**{verb}**{who} `{}` ({}) after {:.1}s{extra}\n",
        a.tool_name, a.tool_use_id, a.waited_s
    );
}

/// The agent's questions, each with its options.
fn asked(out: &mut String, e: &Event) {
    let p: payload::ToolPermission = payload::parse(&e.payload).unwrap_or_default();
    let _ = writeln!(out, "\n**The agent asks** ({})\n", p.tool_use_id);
    for q in questions::questions(&p.input) {
        let header = Some(&q.header)
            .filter(|h| !h.is_empty())
            .map(|h| format!("**{h}**: "))
            .unwrap_or_default();
        let options = match (q.options.is_empty(), q.multi_select) {
            (true, _) => String::new(),
            (false, false) => format!(" ({})", q.options.join(" / ")),
            (false, true) => format!(" (any of: {})", q.options.join(", ")),
        };
        let _ = writeln!(out, "- {header}{}{options}", q.question);
    }
}

/// A turn's usage; a turn that used more than one model lists each.
fn usage(out: &mut String, e: &Event) {
    let t = payload::parse::<payload::Usage>(&e.payload)
        .unwrap_or_default()
        .turn;
    let model = Some(&t.model)
        .filter(|m| !m.is_empty())
        .map(|m| format!(" ({m})"))
        .unwrap_or_default();
    let _ = write!(
        out,
        "\n_Turn {} usage: {}{model}_\n",
        t.number,
        figures_text(&t.figures)
    );
    // A turn that used more than one model (a sub-agent) lists each.
    if t.models.len() > 1 {
        for m in &t.models {
            let _ = writeln!(out, "- _`{}`: {}_", m.model, figures_text(&m.figures));
        }
    }
}

/// A notable status change (see [`notable`]), with its reason.
fn status_change(out: &mut String, kind: &str, e: &Event) {
    let status = kind
        .strip_prefix(ev::SESSION_STATUS_PREFIX)
        .and_then(|s| s.parse::<SessionStatus>().ok());
    if let Some(status) = status.filter(|s| notable(*s)) {
        let change: payload::StatusChange = payload::parse(&e.payload).unwrap_or_default();
        let reason = if change.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", change.reason)
        };
        let _ = write!(out, "\n_Session {status}{reason}_\n");
    }
}

/// Statuses worth a line in a transcript: where a run ends or resumes.
fn notable(s: SessionStatus) -> bool {
    !matches!(
        s,
        SessionStatus::Starting | SessionStatus::Running | SessionStatus::Idle
    )
}

/// A tool result's content: a string, or text blocks.
fn tool_result_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .map(|b| match b["text"].as_str() {
                Some(t) => t.to_string(),
                None => b.to_string(),
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A code block whose fence is longer than any backtick run in `body`.
fn fenced(lang: &str, body: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in body.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    let fence = "`".repeat(longest.max(2) + 1);
    format!("{fence}{lang}\n{}\n{fence}\n", body.trim_end_matches('\n'))
}

/// Tokens and cost in words.
fn figures_text(f: &berth_common::usage::Figures) -> String {
    format!(
        "{} input / {} output tokens, {} cache read / {} cache write, ${:.6}",
        f.input_tokens,
        f.output_tokens,
        f.cache_read_input_tokens,
        f.cache_creation_input_tokens,
        f.cost_usd
    )
}

/// The session and every event, as JSON. An agent's line is under `raw`
/// on the first event made from it (as text, or as `raw_bytes` when it is
/// not UTF-8), and every event from a line has its `line_seq`.
pub(crate) fn json(s: &Session, events: &[Event]) -> String {
    let events: Vec<Value> = events
        .iter()
        .map(|e| {
            let mut v = json!({
                "seq": e.seq,
                "id": e.id.to_string(),
                "type": e.kind,
                "create_time": e.create_time.to_rfc3339(),
                "payload": serde_json::from_str::<Value>(&e.payload).unwrap_or(Value::Null),
            });
            if e.line_seq != 0 {
                v["line_seq"] = e.line_seq.into();
            }
            match e.raw.as_deref().map(std::str::from_utf8) {
                Some(Ok(text)) => v["raw"] = text.into(),
                Some(Err(_)) => v["raw_bytes"] = e.raw.clone().unwrap_or_default().into(),
                None => {}
            }
            v
        })
        .collect();
    let session = json!({
        "name": format!("sessions/{}", s.id),
        "id": s.id.to_string(),
        "display_name": s.display_name,
        "status": s.status.as_str(),
        "status_reason": s.status_reason,
        "agent": s.agent.as_ref().map(|(a, v)| format!("agents/{a}@{v}")),
        "image": s.spec.image,
        "model": s.spec.model,
        "labels": s.labels,
        "runtime_session_id": s.runtime_session_id,
        "create_time": s.create_time.to_rfc3339(),
        "usage": {
            "turns": s.usage.turns,
            "input_tokens": s.usage.input_tokens,
            "output_tokens": s.usage.output_tokens,
            "cache_read_input_tokens": s.usage.cache_read_input_tokens,
            "cache_creation_input_tokens": s.usage.cache_creation_input_tokens,
            "cost_usd": s.usage.cost_usd,
            "models": s.usage.models,
        },
    });
    let doc = json!({ "session": session, "events": events });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_outgrow_backticks_in_the_body() {
        assert_eq!(fenced("", "a"), "```\na\n```\n");
        assert_eq!(fenced("", "x ```` y"), "`````\nx ```` y\n`````\n");
    }

    #[test]
    fn tool_results_read_as_text() {
        assert_eq!(tool_result_text(&json!("12 files")), "12 files");
        let blocks = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(tool_result_text(&blocks), "a\nb");
    }
}

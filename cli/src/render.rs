//! Human and JSON rendering of sessions and events.

use berth_proto::v1 as pb;
use comfy_table::{Cell, Table};
use serde_json::Value;

use crate::output::{Out, age};

/// The lowercase status name (`idle`, `failed`…).
pub fn status_name(status: i32) -> String {
    pb::SessionStatus::try_from(status)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("SESSION_STATUS_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("status({status})"))
}

pub fn parse_status(s: &str) -> Option<pb::SessionStatus> {
    pb::SessionStatus::from_str_name(&format!("SESSION_STATUS_{}", s.to_uppercase()))
}

/// A time as RFC 3339 with milliseconds; empty when unset.
pub(crate) fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(berth_common::time::from_timestamp)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// `working`, `idle`, `waiting_input`, or empty while no agent runs.
pub fn activity_name(a: i32) -> &'static str {
    match pb::Activity::try_from(a) {
        Ok(pb::Activity::Working) => "working",
        Ok(pb::Activity::Idle) => "idle",
        Ok(pb::Activity::WaitingInput) => "waiting_input",
        _ => "",
    }
}

/// Sessions as a table: ID, STATUS, AGENT, NODE, COST, AGE; wide adds
/// activity, turns, tokens, events, display name, labels and waiting tools.
pub(crate) fn session_table(out: &Out, sessions: &[pb::Session]) -> Table {
    let mut header = vec!["ID", "STATUS", "AGENT", "NODE", "COST", "AGE"];
    if out.wide() {
        header.extend([
            "ACTIVITY",
            "TURNS",
            "TOKENS IN/OUT",
            "EVENTS",
            "NAME",
            "LABELS",
            "WAITING",
        ]);
    }
    let mut t = out.table(&header);
    for s in sessions {
        let u = s.usage.clone().unwrap_or_default();
        let agent = if s.agent.is_empty() {
            s.spec.as_ref().map(|x| x.image.clone()).unwrap_or_default()
        } else {
            format!("{}@{}", s.agent, s.agent_version)
        };
        let mut row = vec![
            Cell::new(&s.id),
            out.status(&status_name(s.status)),
            Cell::new(agent),
            Cell::new(dash(&s.node)),
            Cell::new(format!("${:.4}", u.cost_usd)),
            Cell::new(age(&s.create_time)),
        ];
        if out.wide() {
            let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let waiting: Vec<_> = s
                .pending_tool_requests
                .iter()
                .map(|r| format!("{} {}", r.tool_name, r.tool_use_id))
                .collect();
            row.extend([
                Cell::new(dash(activity_name(s.activity))),
                Cell::new(u.turns),
                Cell::new(format!("{}/{}", u.input_tokens, u.output_tokens)),
                Cell::new(s.last_seq),
                Cell::new(dash(&s.display_name)),
                Cell::new(dash(&labels.join(","))),
                Cell::new(dash(&waiting.join(", "))),
            ]);
        }
        t.add_row(row);
    }
    t
}

/// `-` for an empty column.
pub(crate) fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

pub fn session_details(s: &pb::Session) -> String {
    let u = s.usage.clone().unwrap_or_default();
    let spec = s.spec.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<20} {v}\n"));
    line("session", s.name.clone());
    line(
        "status",
        format!(
            "{}{}",
            status_name(s.status),
            if s.status_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", s.status_reason)
            }
        ),
    );
    let activity = activity_name(s.activity);
    if !activity.is_empty() {
        line("activity", activity.into());
    }
    for r in &s.pending_tool_requests {
        if r.tool_name == berth_common::events::ASK_USER_QUESTION {
            let input = serde_json::from_str(&r.input_json).unwrap_or_default();
            line("waiting", questions_line(&input, &s.id, &r.tool_use_id));
            continue;
        }
        line(
            "waiting",
            format!(
                "{} {} ({}): berth sessions approve|deny {} {}",
                r.tool_name,
                clip(&r.input_json, 80),
                r.reason,
                s.id,
                r.tool_use_id
            ),
        );
    }
    if !s.agent.is_empty() {
        line("agent", format!("{}@{}", s.agent, s.agent_version));
    }
    line("image", spec.image);
    line("node", s.node.clone());
    if let Some(snap) = &s.snapshot {
        line(
            "snapshot",
            format!(
                "{} ({} bytes, {})",
                snap.key,
                snap.size_bytes,
                time(&snap.create_time)
            ),
        );
    }
    if s.budget_usd > 0.0 {
        line("budget", format!("${:.6}", s.budget_usd));
    }
    line("epoch", s.epoch.to_string());
    line("events", s.last_seq.to_string());
    line("runtime session", s.runtime_session_id.clone());
    line("turns", u.turns.to_string());
    line(
        "tokens",
        format!(
            "in {} / out {} / cache read {} / cache write {}",
            u.input_tokens,
            u.output_tokens,
            u.cache_read_input_tokens,
            u.cache_creation_input_tokens
        ),
    );
    line("cost", format!("${:.6}", u.cost_usd));
    for m in &u.models {
        line(
            "  model",
            format!(
                "{}: in {} / out {} / cache read {} / cache write {}, ${:.6}",
                m.model,
                m.input_tokens,
                m.output_tokens,
                m.cache_read_input_tokens,
                m.cache_creation_input_tokens,
                m.cost_usd
            ),
        );
    }
    line("created", time(&s.create_time));
    line("started", time(&s.start_time));
    line("ended", time(&s.end_time));
    out
}

pub(crate) fn clip(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        format!("{}…", one_line.chars().take(n).collect::<String>())
    }
}

/// A readable line for an event, or `None` for bookkeeping events.
pub fn event_text(e: &pb::Event) -> Option<String> {
    use berth_common::events::{self as ev, payload};
    let json = e.payload_json.as_str();
    let text = || {
        payload::parse::<payload::AgentText>(json)
            .unwrap_or_default()
            .text
    };
    let line = match e.r#type.as_str() {
        ev::USER_MESSAGE => format!("> {}", text()),
        ev::USER_INTERRUPT => "> (interrupt)".to_string(),
        ev::AGENT_MESSAGE => text(),
        ev::AGENT_THINKING => format!("(thinking) {}", clip(&text(), 160)),
        ev::AGENT_TOOL_USE => {
            let t: payload::ToolUse = payload::parse(json).unwrap_or_default();
            format!("→ {} {}", t.name, clip(&t.input.to_string(), 160))
        }
        ev::AGENT_TOOL_RESULT => {
            let r: payload::ToolResult = payload::parse(json).unwrap_or_default();
            let c = match r.content {
                Value::String(x) => x,
                other => other.to_string(),
            };
            format!("  ← {} {}", r.name, clip(&c, 160))
        }
        ev::AGENT_BLOCK => format!(
            "[{} block]",
            payload::parse::<serde_json::Value>(json)
                .and_then(|v| v["block_type"].as_str().map(String::from))
                .unwrap_or_default()
        ),
        ev::AGENT_RESULT | ev::RUNTIME_INIT | ev::RUNTIME_SYSTEM => return None,
        ev::AGENT_TOOL_PERMISSION => {
            let p: payload::ToolPermission = payload::parse(json).unwrap_or_default();
            format!(
                "? {} {} asks permission ({}): berth sessions approve|deny {} {}",
                p.tool_name,
                clip(&p.input.to_string(), 120),
                p.reason,
                e.session_id,
                p.tool_use_id
            )
        }
        ev::AGENT_QUESTION => {
            let p: payload::ToolPermission = payload::parse(json).unwrap_or_default();
            questions_line(&p.input, &e.session_id, &p.tool_use_id)
        }
        ev::SESSION_ACTIVITY => {
            let a: payload::Activity = payload::parse(json).unwrap_or_default();
            format!("[{}]", a.activity.replace('_', " "))
        }
        ev::USER_TOOL_CONFIRMATION => {
            let a: payload::ToolConfirmation = payload::parse(json).unwrap_or_default();
            let by = if a.by == "timeout" {
                " (timed out)"
            } else {
                ""
            };
            format!("> {} {}{by}", a.decision, a.tool_name)
        }
        ev::SESSION_USAGE => {
            let t = payload::parse::<payload::Usage>(json)
                .unwrap_or_default()
                .turn;
            format!(
                "[turn {}] tokens in {} out {}  ${:.6}",
                t.number, t.figures.input_tokens, t.figures.output_tokens, t.figures.cost_usd
            )
        }
        ev::RUNTIME_RAW => format!("[raw] {}", clip(&String::from_utf8_lossy(&e.raw), 200)),
        t if t.starts_with(ev::SESSION_STATUS_PREFIX) => {
            let change: payload::StatusChange = payload::parse(json).unwrap_or_default();
            let reason = if change.reason.is_empty() {
                String::new()
            } else {
                format!(" {}", change.reason)
            };
            let code = change
                .detail
                .exit_code
                .map(|c| format!(" exit code {c}"))
                .unwrap_or_default();
            format!(
                "[{}]{reason}{code}",
                t.trim_start_matches(ev::SESSION_STATUS_PREFIX)
            )
        }
        other => format!("[{other}]"),
    };
    Some(line)
}

/// The lowercase node state name (`up`, `draining`, `down`).
fn node_state(state: i32) -> String {
    pb::NodeState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("NODE_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| format!("state({state})"))
}

/// Nodes as a table; wide adds address, generation, report age and
/// sessions.
pub(crate) fn node_table(out: &Out, nodes: &[pb::Node]) -> Table {
    let mut header = vec!["NAME", "STATE", "RUN/CAP", "MINE", "CPU", "MEM", "WARM"];
    if out.wide() {
        header.extend([
            "ADDRESS",
            "GENERATION",
            "REPORTED",
            "SESSIONS",
            "LAST ERROR",
        ]);
    }
    let mut t = out.table(&header);
    for n in nodes {
        let warm = if n.warm.is_empty() {
            "-".to_string()
        } else {
            n.warm
                .iter()
                .map(|w| {
                    if w.agent_key.is_empty() {
                        format!("{}={}", w.image, w.ready)
                    } else {
                        format!("{}[{}]={}", w.image, w.agent_key, w.ready)
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        let mem = if n.memory_total_bytes > 0 {
            format!(
                "{:.0}%",
                100.0 * n.memory_used_bytes as f64 / n.memory_total_bytes as f64
            )
        } else {
            "-".into()
        };
        let mut row = vec![
            Cell::new(&n.name),
            out.status(&node_state(n.state)),
            Cell::new(format!("{}/{}", n.running, n.capacity)),
            Cell::new(n.inflight),
            Cell::new(format!("{:.0}%", 100.0 * n.cpu_utilization)),
            Cell::new(mem),
            Cell::new(warm),
        ];
        if out.wide() {
            row.extend([
                Cell::new(dash(&n.address)),
                Cell::new(n.generation),
                Cell::new(format!("{} ms ago", n.report_age_ms)),
                Cell::new(n.session_ids.len()),
                Cell::new(dash(&n.last_error)),
            ]);
        }
        t.add_row(row);
    }
    t
}

/// The agent's questions on one line, with how to answer them.
fn questions_line(input: &serde_json::Value, session: &str, tool_use_id: &str) -> String {
    let asked: Vec<String> = berth_common::questions::questions(input)
        .iter()
        .map(|q| {
            let sep = if q.multi_select { ", " } else { "/" };
            format!("{}: {} [{}]", q.header, q.question, q.options.join(sep))
        })
        .collect();
    format!(
        "? the agent asks: {}; answer with: berth sessions answer {session} {tool_use_id} --answer \"HEADER=ANSWER\"",
        asked.join("; ")
    )
}

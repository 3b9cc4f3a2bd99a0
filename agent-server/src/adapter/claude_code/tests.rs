//! The Claude Code adapter against the public captures and the CLI's
//! stream-json protocol.

use super::*;
use berth_common::usage::Figures;

/// The public captures' directory, read in place (never copied in).
fn fixtures() -> std::path::PathBuf {
    std::env::var_os("BERTH_SHARED_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../shared/fixtures/claude-code")
        })
}

fn fixture(name: &str) -> String {
    let path = fixtures().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn decode_all(transcript: &str) -> Vec<Decoded> {
    let mut a = ClaudeCode::default();
    transcript.lines().map(|l| a.decode(l.as_bytes())).collect()
}

fn kinds(d: &Decoded) -> Vec<&'static str> {
    d.events.iter().map(|e| e.kind).collect()
}

fn payload(b: &Block) -> Value {
    serde_json::from_str(&b.payload).expect("payload is JSON")
}

#[test]
fn every_public_capture_decodes_one_event_per_block() {
    let mut dirs = vec![fixtures(), fixtures().join("public")];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("fixtures dir") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "jsonl") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 9, "captures found: {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("read");
        let mut a = ClaudeCode::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let d = a.decode(line.as_bytes());
            let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            let blocks = match (&v["type"], &v["message"]["content"]) {
                (t, Value::Array(b)) if t == "assistant" || t == "user" => b.len().max(1),
                _ => 1,
            };
            assert_eq!(d.events.len(), blocks, "{}: {line}", path.display());
            for e in &d.events {
                assert!(payload(e).is_object());
            }
            if let Some(u) = &d.turn_end {
                assert!(u.total.figures.cost_usd >= 0.0);
                assert!(u.total.figures.tokens().iter().all(|t| *t >= 0));
            }
        }
    }
}

#[test]
fn the_explore_capture_has_both_models_running_totals() {
    let events = decode_all(&fixture("explore_count_files.jsonl"));
    assert_eq!(kinds(&events[0]), [ev::RUNTIME_INIT]);
    assert_eq!(
        events[0].runtime_session_id.as_deref(),
        Some("4e3453f9-129a-4da9-bc25-a287453d58d9")
    );
    let all: Vec<_> = events.iter().flat_map(kinds).collect();
    assert!(!all.contains(&ev::RUNTIME_RAW), "only known line types");
    for k in [
        ev::AGENT_THINKING,
        ev::AGENT_MESSAGE,
        ev::AGENT_TOOL_USE,
        ev::AGENT_TOOL_RESULT,
    ] {
        assert!(all.contains(&k), "missing {k}");
    }
    // Sub-agent lines carry their parent tool call.
    assert!(
        events
            .iter()
            .flat_map(|d| &d.events)
            .any(|e| { payload(e)["parent_tool_use_id"].as_str().is_some() })
    );
    let u = events
        .last()
        .and_then(|e| e.turn_end.clone())
        .expect("result ends the turn");
    assert!(u.cumulative_cost && u.cumulative_tokens);
    assert_eq!(u.total.model, "claude-sonnet-4-6");
    assert_eq!(
        u.total.figures,
        Figures {
            input_tokens: 4 + 573,
            output_tokens: 576 + 134,
            cache_read_input_tokens: 40618 + 7699,
            cache_creation_input_tokens: 7281 + 7824,
            cost_usd: 0.0763163,
        }
    );
    let mut models: Vec<_> = u.models.iter().map(|m| m.model.as_str()).collect();
    models.sort();
    assert_eq!(models, ["claude-haiku-4-5-20251001", "claude-sonnet-4-6"]);
    let sum: f64 = u.models.iter().map(|m| m.figures.cost_usd).sum();
    assert!((sum - 0.0763163).abs() < 1e-12);
}

#[test]
fn a_multi_block_line_is_one_event_per_block_and_results_find_their_tool() {
    let mut a = ClaudeCode::default();
    let line = br#"{"type":"assistant","message":{"id":"m1","content":[{"type":"thinking","thinking":"hmm"},{"type":"text","text":"Let me look."},{"type":"tool_use","id":"t1","name":"Bash","input":{"command":"ls"}},{"type":"tool_use","id":"t2","name":"Read","input":{"file_path":"a"}},{"type":"future_block","x":1}]},"parent_tool_use_id":null}"#;
    let d = a.decode(line);
    assert_eq!(
        kinds(&d),
        [
            ev::AGENT_THINKING,
            ev::AGENT_MESSAGE,
            ev::AGENT_TOOL_USE,
            ev::AGENT_TOOL_USE,
            ev::AGENT_BLOCK
        ]
    );
    let p: Vec<Value> = d.events.iter().map(payload).collect();
    assert_eq!(p[1]["text"], "Let me look.");
    assert_eq!(
        (p[3]["name"].as_str(), p[3]["block_index"].as_u64()),
        (Some("Read"), Some(3))
    );
    assert_eq!(p[4]["block"]["x"], 1);
    assert!(
        p.iter()
            .all(|p| p["message_id"] == "m1" && p.get("parent_tool_use_id").is_none())
    );
    let results = br#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t2","content":"data"},{"type":"tool_result","tool_use_id":"t1","content":"a\nb","is_error":true},{"type":"tool_result","tool_use_id":"nope","content":""}]},"parent_tool_use_id":"toolu_parent"}"#;
    let d = a.decode(results);
    assert_eq!(kinds(&d), [ev::AGENT_TOOL_RESULT; 3]);
    let p: Vec<Value> = d.events.iter().map(payload).collect();
    assert_eq!(
        (p[0]["name"].as_str(), p[0]["content"].as_str()),
        (Some("Read"), Some("data"))
    );
    assert_eq!(
        (p[1]["name"].as_str(), p[1]["is_error"].as_bool()),
        (Some("Bash"), Some(true))
    );
    assert_eq!(p[2]["name"], "", "an unknown id matches no tool");
    assert!(p.iter().all(|p| p["parent_tool_use_id"] == "toolu_parent"));
    assert!(a.open_tools.is_empty(), "matched calls are forgotten");
}

/// The real CLI's request (Claude Code 2.1.332, `--permission-prompt-tool
/// stdio`), answered the way claude-agent-sdk answers.
#[test]
fn a_permission_request_becomes_an_event_and_is_answered_once() {
    let mut a = ClaudeCode::default();
    let ask = br#"{"type":"control_request","request_id":"9c19","request":{"subtype":"can_use_tool","tool_name":"Write","display_name":"Write","input":{"file_path":"/workspace/f.txt","content":"hello"},"description":"f.txt","permission_suggestions":[{"type":"setMode","mode":"acceptEdits","destination":"session"}],"tool_use_id":"toolu_1"}}"#;
    let d = a.decode(ask);
    assert_eq!(kinds(&d), [ev::AGENT_TOOL_PERMISSION]);
    let p: Value = serde_json::from_str(&d.events[0].payload).expect("json");
    assert_eq!(p["tool_use_id"], "toolu_1");
    assert_eq!(p["tool_name"], "Write");
    assert_eq!(p["reason"], "f.txt");
    assert_eq!(p["input"]["content"], "hello");
    assert_eq!(p["suggestions"][0]["mode"], "acceptEdits");

    let allow = ToolDecision {
        request_id: "9c19".into(),
        tool_use_id: "toolu_1".into(),
        allow: true,
        ..Default::default()
    };
    let out: Value =
        serde_json::from_slice(&a.encode_tool_decision(&allow).expect("asked")).expect("json");
    assert_eq!(out["type"], "control_response");
    assert_eq!(out["response"]["request_id"], "9c19");
    // No edit: the input as asked goes back.
    assert_eq!(
        out["response"]["response"]["updatedInput"]["content"],
        "hello"
    );
    assert!(a.encode_tool_decision(&allow).is_none(), "answered once");

    // A denial with its message; a withdrawn request takes no answer.
    a.decode(ask);
    let deny = ToolDecision {
        allow: false,
        message: "not here".into(),
        interrupt: true,
        ..allow.clone()
    };
    let out: Value =
        serde_json::from_slice(&a.encode_tool_decision(&deny).expect("asked")).expect("json");
    assert_eq!(out["response"]["response"]["behavior"], "deny");
    assert_eq!(out["response"]["response"]["message"], "not here");
    assert_eq!(out["response"]["response"]["interrupt"], true);
    a.decode(ask);
    let c = a.decode(br#"{"type":"control_cancel_request","request_id":"9c19"}"#);
    assert_eq!(kinds(&c), [ev::AGENT_TOOL_PERMISSION_CANCELLED]);
    assert!(c.events[0].payload.contains("toolu_1"));
    assert!(a.encode_tool_decision(&allow).is_none());
}

#[test]
fn bad_figures_never_make_negative_or_false_totals() {
    let mut a = ClaudeCode::default();
    let line = br#"{"type":"result","total_cost_usd":"lots","usage":{"input_tokens":-5,"output_tokens":"x"}}"#;
    let u = a.decode(line).turn_end.expect("a result ends the turn");
    assert_eq!(u.total.figures, Figures::default());
    assert!(
        u.total.cost_unknown && !u.cumulative_cost,
        "an unreadable cost moves no running total"
    );
    assert!(!u.cumulative_tokens, "no modelUsage: the turn's own usage");
    let line = br#"{"type":"result","total_cost_usd":-1,"modelUsage":{"m":{"inputTokens":-3,"outputTokens":4,"costUSD":-2}}}"#;
    let u = a.decode(line).turn_end.expect("a result ends the turn");
    assert_eq!(
        (
            u.total.figures.input_tokens,
            u.total.figures.output_tokens,
            u.total.figures.cost_usd
        ),
        (0, 4, 0.0)
    );
    assert!(!u.cumulative_cost && u.cumulative_tokens);
    assert!(u.models[0].cost_unknown);
}

#[test]
fn lines_that_are_not_json_objects_are_one_raw_event() {
    let mut a = ClaudeCode::default();
    for line in [
        &b"Segmentation fault (core dumped)"[..],
        br#"{"type":"brand_new_thing"}"#,
        b"[1,2]",
        b"\xff\x00 not utf-8",
    ] {
        assert_eq!(kinds(&a.decode(line)), [ev::RUNTIME_RAW]);
    }
    let empty = a.decode(br#"{"type":"assistant","message":{"content":[]}}"#);
    assert_eq!(kinds(&empty), [ev::RUNTIME_SYSTEM]);
}

#[test]
fn events_too_big_to_travel_with_their_line_become_one_explicit_event() {
    let mut a = ClaudeCode::default();
    let text = "x".repeat(4000);
    let line = format!(
        r#"{{"type":"assistant","message":{{"content":[{{"type":"text","text":"{text}"}},{{"type":"text","text":"{text}"}}]}}}}"#
    );
    let mut d = a.decode(line.as_bytes());
    d.fit(line.len(), 1 << 20);
    assert_eq!(d.events.len(), 2, "fits: unchanged");
    d.fit(line.len(), 10_000);
    assert_eq!(kinds(&d), [ev::RUNTIME_RAW]);
    let p = payload(&d.events[0]);
    assert_eq!(
        (p["oversize"].as_bool(), p["events_dropped"].as_u64()),
        (Some(true), Some(2))
    );
}

#[test]
fn input_is_stream_json() {
    let mut a = ClaudeCode::default();
    let m: Value = serde_json::from_slice(&a.encode_message("hi \"there\"")).expect("json");
    assert_eq!(m["type"], "user");
    assert_eq!(m["message"]["content"][0]["text"], "hi \"there\"");
    let i: Value = serde_json::from_slice(&a.encode_interrupt()).expect("json");
    assert_eq!(i["request"]["subtype"], "interrupt");
}

//! The questions of Claude Code's `AskUserQuestion` tool, as its input
//! holds them (`questions`: `question`, `header`, `options` of `label` and
//! `description`, `multiSelect`), read the same way by the dispatcher (which
//! checks answers against them) and the CLI (which shows them).

use serde_json::Value;

/// One question as the agent asked it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub question: String,
    pub header: String,
    /// The options' labels, in order.
    pub options: Vec<String>,
    pub multi_select: bool,
}

/// The questions of a request's input (empty if it holds none).
pub fn questions(input: &Value) -> Vec<Question> {
    let Some(list) = input["questions"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|q| Question {
            question: q["question"].as_str().unwrap_or_default().to_string(),
            header: q["header"].as_str().unwrap_or_default().to_string(),
            options: q["options"]
                .as_array()
                .map(|o| {
                    o.iter()
                        .filter_map(|o| o["label"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            multi_select: q["multiSelect"].as_bool().unwrap_or(false),
        })
        .collect()
}

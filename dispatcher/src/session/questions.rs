//! The agent's clarifying questions (Claude Code's `AskUserQuestion`) and
//! the rules of answering them.
//!
//! The CLI asks through a tool permission request whose input holds
//! `questions` (each: `question`, `header`, `options` of `label` and
//! `description`, `multiSelect`). It is answered by allowing the call with
//! that input plus `answers`: for each question's text, the chosen label,
//! the chosen labels joined by `, ` (as the CLI joins them), or the
//! person's own words ("Other", or a question without options).

pub(crate) use berth_common::questions::{Question, questions};
use serde_json::{Map, Value};

/// A person's answer to one question.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The question's text (or its header).
    pub question: String,
    /// Chosen option labels: one, or several where `multiSelect` is set.
    pub labels: Vec<String>,
    /// Free text: "Other", or the answer to a question without options.
    pub text: String,
}

/// Upper bounds on what a person sends.
const MAX_ANSWER_BYTES: usize = 4096;

/// The tool's input with the answers added, or what is wrong with them
/// (naming the answer: `answers[1].labels[0]: …`). Every question needs
/// exactly one answer.
pub(crate) fn answered_input(input: &Value, answers: &[Answer]) -> Result<Value, String> {
    let asked = questions(input);
    if asked.is_empty() {
        return Err("the request holds no questions".into());
    }
    let mut out = Map::new();
    for (i, a) in answers.iter().enumerate() {
        let at = format!("answers[{i}]");
        let q = asked
            .iter()
            .find(|q| q.question == a.question)
            .or_else(|| {
                asked
                    .iter()
                    .find(|q| !q.header.is_empty() && q.header == a.question)
            })
            .ok_or_else(|| {
                let names: Vec<&str> = asked.iter().map(|q| q.question.as_str()).collect();
                format!(
                    "{at}.question: `{}` was not asked; the questions are {names:?}",
                    a.question
                )
            })?;
        if out.contains_key(&q.question) {
            return Err(format!("{at}: `{}` is answered twice", q.question));
        }
        out.insert(q.question.clone(), Value::String(value(q, a, &at)?));
    }
    if let Some(q) = asked.iter().find(|q| !out.contains_key(&q.question)) {
        return Err(format!("answers: `{}` has no answer", q.question));
    }
    let mut input = input.clone();
    input["answers"] = Value::Object(out);
    Ok(input)
}

/// One answer's value, checked against its question.
fn value(q: &Question, a: &Answer, at: &str) -> Result<String, String> {
    for (j, label) in a.labels.iter().enumerate() {
        if !q.options.contains(label) {
            return Err(format!(
                "{at}.labels[{j}]: `{label}` is not an option of `{}` ({})",
                q.question,
                q.options.join(", ")
            ));
        }
    }
    let text = a.text.trim();
    if text.len() > MAX_ANSWER_BYTES || a.labels.iter().any(|l| l.len() > MAX_ANSWER_BYTES) {
        return Err(format!("{at}: longer than {MAX_ANSWER_BYTES} bytes"));
    }
    if text.contains('\0') {
        return Err(format!("{at}.text: holds a NUL character"));
    }
    match (a.labels.len(), text.is_empty()) {
        (0, true) => Err(format!(
            "{at}: choose a label of {} or write an answer",
            q.options.join(", ")
        )),
        (n, _) if n > 1 && !q.multi_select => Err(format!(
            "{at}.labels: `{}` takes one answer, not {n}",
            q.question
        )),
        (n, false) if n > 0 && !q.multi_select => Err(format!(
            "{at}: `{}` takes a label or your own words, not both",
            q.question
        )),
        _ => {
            let mut parts: Vec<&str> = a.labels.iter().map(String::as_str).collect();
            if !text.is_empty() {
                parts.push(text);
            }
            Ok(parts.join(", "))
        }
    }
}

/// The answers an allowed request's input carries: (question, answer).
pub(crate) fn answers_of(input: &Value) -> Vec<(String, String)> {
    input["answers"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(q, a)| {
                    (
                        q.clone(),
                        a.as_str().map_or_else(|| a.to_string(), String::from),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// An input for tests: two questions, one single and one multi select.
#[cfg(test)]
pub(crate) fn sample() -> Value {
    serde_json::json!({"questions": [
        {"question": "Which color?", "header": "Color", "multiSelect": false,
         "options": [{"label": "Red", "description": "warm"}, {"label": "Blue", "description": "cool"}]},
        {"question": "Which sizes?", "header": "Sizes", "multiSelect": true,
         "options": [{"label": "S", "description": ""}, {"label": "M", "description": ""}, {"label": "L", "description": ""}]},
    ]})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(q: &str, labels: &[&str], text: &str) -> Answer {
        Answer {
            question: q.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            text: text.into(),
        }
    }

    #[test]
    fn answers_join_as_the_cli_joins_them() {
        let input = answered_input(
            &sample(),
            &[
                answer("Color", &["Blue"], ""),
                answer("Which sizes?", &["S", "L"], "XXL"),
            ],
        )
        .expect("valid");
        assert_eq!(
            input["answers"],
            json!({"Which color?": "Blue", "Which sizes?": "S, L, XXL"})
        );
        assert_eq!(
            input["questions"],
            sample()["questions"],
            "the questions go back as asked"
        );
        assert_eq!(
            answers_of(&input),
            vec![
                ("Which color?".to_string(), "Blue".to_string()),
                ("Which sizes?".to_string(), "S, L, XXL".to_string())
            ]
        );
        let other = answered_input(
            &sample(),
            &[
                answer("Which color?", &[], "green"),
                answer("Sizes", &["M"], ""),
            ],
        )
        .expect("Other is free text");
        assert_eq!(other["answers"]["Which color?"], "green");
    }

    #[test]
    fn a_wrong_answer_names_itself() {
        let err = |answers: &[Answer]| answered_input(&sample(), answers).expect_err("invalid");
        let both = [
            answer("Which color?", &["Red"], ""),
            answer("Which sizes?", &["S"], ""),
        ];
        let e = err(&[answer("Which color?", &["Purple"], ""), both[1].clone()]);
        assert!(e.starts_with("answers[0].labels[0]: `Purple`"), "{e}");
        let e = err(&[
            answer("Which color?", &["Red", "Blue"], ""),
            both[1].clone(),
        ]);
        assert!(e.starts_with("answers[0].labels:"), "{e}");
        let e = err(&[both[0].clone()]);
        assert!(e.contains("`Which sizes?` has no answer"), "{e}");
        let e = err(&[
            both[0].clone(),
            both[1].clone(),
            answer("Color", &["Red"], ""),
        ]);
        assert!(e.contains("answered twice"), "{e}");
        let e = err(&[answer("Which shape?", &["Red"], ""), both[1].clone()]);
        assert!(e.starts_with("answers[0].question:"), "{e}");
        let e = err(&[answer("Which color?", &[], " "), both[1].clone()]);
        assert!(e.contains("choose a label"), "{e}");
        assert!(answered_input(&json!({"command": "ls"}), &both).is_err());
    }
}

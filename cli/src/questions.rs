//! The agent's questions at a terminal (`berth run`, `berth attach`): each
//! question shown with numbered options, answered by a line of numbers
//! (`2`, or `1 3` where several may be chosen) or by your own words.

use berth_common::events::{self as ev, payload};
use berth_common::questions::{Question, questions};
use berth_proto::v1 as pb;

/// Questions being answered, one typed line per question.
#[derive(Debug, Clone)]
pub struct Asking {
    pub tool_use_id: String,
    questions: Vec<Question>,
    answers: Vec<pb::QuestionAnswer>,
}

impl Asking {
    /// The questions an `agent.question` event asks.
    pub fn from_event(e: &pb::Event) -> Option<Self> {
        if e.r#type != ev::AGENT_QUESTION {
            return None;
        }
        let p: payload::ToolPermission = payload::parse(&e.payload_json)?;
        Self::new(p.tool_use_id, &p.input)
    }

    /// The questions a pending request's input holds.
    pub fn new(tool_use_id: String, input: &serde_json::Value) -> Option<Self> {
        let questions = questions(input);
        (!questions.is_empty()).then(|| Self {
            tool_use_id,
            questions,
            answers: Vec::new(),
        })
    }

    /// The question to answer next, with its numbered options.
    pub fn prompt(&self) -> String {
        let Some(q) = self.questions.get(self.answers.len()) else {
            return String::new();
        };
        let mut out = format!(
            "? [{}/{}] {}{}\n",
            self.answers.len() + 1,
            self.questions.len(),
            Some(&q.header)
                .filter(|h| !h.is_empty())
                .map(|h| format!("{h}: "))
                .unwrap_or_default(),
            q.question
        );
        for (i, o) in q.options.iter().enumerate() {
            out.push_str(&format!("  {}) {o}\n", i + 1));
        }
        out.push_str(match (q.options.is_empty(), q.multi_select) {
            (true, _) => "  type your answer: ",
            (false, false) => "  a number, or your own words: ",
            (false, true) => "  numbers (e.g. 1 3), or your own words: ",
        });
        out
    }

    /// Takes a typed line as the current question's answer: `Ok(true)`
    /// once every question has one, `Err` (say it again) for a number out
    /// of range or two for a single-choice question.
    pub fn take(&mut self, line: &str) -> Result<bool, String> {
        let Some(q) = self.questions.get(self.answers.len()) else {
            return Ok(true);
        };
        let line = line.trim();
        if line.is_empty() {
            return Err("type a number or your own words".into());
        }
        let tokens: Vec<&str> = line
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .collect();
        let numbers: Option<Vec<usize>> = tokens.iter().map(|t| t.parse().ok()).collect();
        let mut answer = pb::QuestionAnswer {
            question: q.question.clone(),
            ..Default::default()
        };
        match numbers {
            Some(numbers) if !q.options.is_empty() => {
                if numbers.len() > 1 && !q.multi_select {
                    return Err("this question takes one answer".into());
                }
                for n in numbers {
                    let label = n
                        .checked_sub(1)
                        .and_then(|i| q.options.get(i))
                        .ok_or_else(|| format!("{n} is not one of 1–{}", q.options.len()))?;
                    answer.labels.push(label.clone());
                }
            }
            _ => answer.text = line.to_string(),
        }
        self.answers.push(answer);
        Ok(self.answers.len() == self.questions.len())
    }

    /// The `AnswerQuestion` request, once every question has an answer.
    pub fn request(&self, session: &str) -> pb::AnswerQuestionRequest {
        pb::AnswerQuestionRequest {
            name: session.to_string(),
            tool_use_id: self.tool_use_id.clone(),
            answers: self.answers.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asking() -> Asking {
        Asking::new(
            "toolu_1".into(),
            &serde_json::json!({"questions": [
                {"question": "Which color?", "header": "Color", "options": [{"label": "Red"}, {"label": "Blue"}]},
                {"question": "Which sizes?", "header": "Sizes", "multiSelect": true,
                 "options": [{"label": "S"}, {"label": "M"}, {"label": "L"}]},
                {"question": "Anything else?", "header": "Notes"}]}),
        )
        .expect("questions")
    }

    #[test]
    fn numbers_pick_options_and_words_are_other() {
        let mut a = asking();
        assert!(
            a.prompt()
                .contains("[1/3] Color: Which color?\n  1) Red\n  2) Blue")
        );
        assert!(a.take("1 2").is_err(), "one answer only");
        assert!(a.take("3").is_err(), "out of range");
        assert_eq!(a.take("2"), Ok(false));
        assert!(a.prompt().contains("numbers (e.g. 1 3)"));
        assert_eq!(a.take("1, 3"), Ok(false));
        assert_eq!(a.take("ship it friday"), Ok(true));
        let r = a.request("sessions/x");
        assert_eq!(r.answers[0].labels, ["Blue"]);
        assert_eq!(r.answers[1].labels, ["S", "L"]);
        assert_eq!(r.answers[2].text, "ship it friday");
    }
}

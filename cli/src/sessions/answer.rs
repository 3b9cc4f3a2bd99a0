//! `berth sessions answer`: answering the agent's clarifying questions off
//! a terminal, one `--answer "QUESTION=ANSWER"` per choice.

use berth_proto::v1 as pb;

use super::Ctx;
use crate::CliError;

use berth_common::questions::Question;

fn asked(input_json: &str) -> Vec<Question> {
    berth_common::questions::questions(&serde_json::from_str(input_json).unwrap_or_default())
}

/// `QUESTION=ANSWER` pairs as answers: the question by its text or header
/// (case-insensitive), an option's label as that label, anything else as
/// the person's own words. The same question again adds a choice (a
/// multi-select question).
fn answers(questions: &[Question], pairs: &[String]) -> Result<Vec<pb::QuestionAnswer>, String> {
    let mut out: Vec<pb::QuestionAnswer> = Vec::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--answer `{pair}`: write QUESTION=ANSWER"))?;
        let (key, value) = (key.trim(), value.trim());
        let q = questions
            .iter()
            .find(|q| q.question.eq_ignore_ascii_case(key) || q.header.eq_ignore_ascii_case(key))
            .ok_or_else(|| {
                let names: Vec<String> = questions
                    .iter()
                    .map(|q| format!("`{}` ({})", q.header, q.question))
                    .collect();
                format!(
                    "--answer `{pair}`: no such question; asked: {}",
                    names.join(", ")
                )
            })?;
        let i = match out.iter().position(|a| a.question == q.question) {
            Some(i) => i,
            None => {
                out.push(pb::QuestionAnswer {
                    question: q.question.clone(),
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        let a = &mut out[i];
        match q.options.iter().find(|o| o.eq_ignore_ascii_case(value)) {
            Some(label) => a.labels.push(label.clone()),
            None if a.text.is_empty() => a.text = value.to_string(),
            None => a.text = format!("{}, {value}", a.text),
        }
    }
    Ok(out)
}

/// Answers the session's question request (`tool_use_id`, or the only one
/// waiting).
pub(super) async fn answer(
    c: &mut Ctx<'_>,
    session: &str,
    tool_use_id: Option<&str>,
    pairs: &[String],
) -> Result<(), CliError> {
    let s = c
        .client
        .get_session(pb::GetSessionRequest {
            name: session.into(),
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    let waiting: Vec<&pb::ToolRequest> = s
        .pending_tool_requests
        .iter()
        .filter(|r| r.tool_name == berth_common::events::ASK_USER_QUESTION)
        .filter(|r| tool_use_id.is_none_or(|id| r.tool_use_id == id))
        .collect();
    let request = match waiting.as_slice() {
        [one] => *one,
        [] => {
            return Err(CliError::new(format!(
                "session {} has no questions waiting{}",
                s.id,
                tool_use_id
                    .map(|id| format!(" under {id}"))
                    .unwrap_or_default()
            )));
        }
        many => {
            let ids: Vec<&str> = many.iter().map(|r| r.tool_use_id.as_str()).collect();
            return Err(CliError::new(format!(
                "session {} has {} question requests waiting; name one: {}",
                s.id,
                many.len(),
                ids.join(", ")
            )));
        }
    };
    let answers = answers(&asked(&request.input_json), pairs).map_err(CliError::new)?;
    let r = c
        .client
        .answer_question(pb::AnswerQuestionRequest {
            name: session.into(),
            tool_use_id: request.tool_use_id.clone(),
            answers,
        })
        .await
        .map_err(|e| c.explain(Some(session), e))?
        .into_inner();
    let id = request.tool_use_id.clone();
    c.out.object(&r, &id, || {
        if r.already_answered {
            format!("{id}: already answered (seq {})", r.seq)
        } else {
            format!("{id}: answered (seq {})", r.seq)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_become_labels_or_words() {
        let qs = asked(
            r#"{"questions": [
                {"question": "Which color?", "header": "Color", "options": [{"label": "Red"}, {"label": "Blue"}]},
                {"question": "Which sizes?", "header": "Sizes", "multiSelect": true,
                 "options": [{"label": "Small"}, {"label": "Large"}]}]}"#,
        );
        let pairs = [
            "color=blue",
            "Sizes=Small",
            "Which sizes?=large",
            "Sizes=XXL",
        ]
        .map(String::from);
        let a = answers(&qs, &pairs).expect("valid");
        assert_eq!(a[0].question, "Which color?");
        assert_eq!(a[0].labels, ["Blue"]);
        assert_eq!(a[1].labels, ["Small", "Large"]);
        assert_eq!(a[1].text, "XXL");
        let e = answers(&qs, &["Shape=round".to_string()]).expect_err("unknown");
        assert!(
            e.contains("no such question") && e.contains("`Color`"),
            "{e}"
        );
        assert!(answers(&qs, &["blue".to_string()]).is_err());
    }
}

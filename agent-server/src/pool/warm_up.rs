//! Warming a pre-started process up: the adapter's request (Claude Code's
//! `initialize`) is written, and its answer awaited, before the process is
//! offered. The CLI does its one-time setup then, not in the session's first
//! turn; an answer also proves the process reads its stdin.
//!
//! Nothing else the process writes meanwhile is lost: the output it wrote
//! besides the answer is put back in front of its stream, in order, for the
//! session to read.

use bollard::container::LogOutput;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use crate::adapter::{WarmUp, WarmUpAnswer};
use crate::container::AgentProcess;

/// Most output kept while waiting for the answer.
const MAX_KEPT_BYTES: usize = 1 << 20;

/// Writes `w.request` to the process and waits, up to `timeout`, for its
/// answer. Errors say why the process is not fit to offer.
pub async fn warm_up(
    process: &mut AgentProcess,
    w: WarmUp,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let mut kept = Kept::default();
    let waited = tokio::time::timeout(timeout, async {
        process
            .input
            .write_all(&w.request)
            .await
            .map_err(|e| format!("writing the warm-up request: {e}"))?;
        process
            .input
            .flush()
            .await
            .map_err(|e| format!("writing the warm-up request: {e}"))?;
        while let Some(chunk) = process.output.next().await {
            match chunk.map_err(|e| format!("reading the agent: {e}"))? {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    if let Some(answer) = kept.stdout(&message, w.answer)? {
                        return answer;
                    }
                }
                other => kept.other.push(other),
            }
        }
        Err("the agent exited before it answered the warm-up request".to_string())
    })
    .await;
    let result = match waited {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer to the warm-up request within {timeout:?}"
        )),
    };
    // What the session would have read, first.
    let replay = kept.into_chunks();
    if !replay.is_empty() {
        let rest = std::mem::replace(&mut process.output, Box::pin(futures::stream::empty()));
        process.output = Box::pin(futures::stream::iter(replay.into_iter().map(Ok)).chain(rest));
    }
    result
}

/// Output read while waiting: stdout (minus the answer) and the rest.
#[derive(Default)]
struct Kept {
    /// Stdout bytes not yet split into lines, and lines that were not the
    /// answer, in order.
    stdout: Vec<u8>,
    /// How far `stdout` has been searched for complete lines.
    scanned: usize,
    other: Vec<LogOutput>,
}

impl Kept {
    /// Adds a stdout chunk; `Some` once a complete line is the answer (that
    /// line is dropped, everything else kept).
    fn stdout(
        &mut self,
        chunk: &[u8],
        answer: fn(&[u8]) -> WarmUpAnswer,
    ) -> Result<Option<Result<(), String>>, String> {
        self.stdout.extend_from_slice(chunk);
        while let Some(n) = self.stdout[self.scanned..].iter().position(|b| *b == b'\n') {
            let (start, end) = (self.scanned, self.scanned + n);
            let verdict = answer(&self.stdout[start..end]);
            if verdict == WarmUpAnswer::Unrelated {
                self.scanned = end + 1;
                continue;
            }
            self.stdout.drain(start..=end);
            return Ok(Some(match verdict {
                WarmUpAnswer::Refused(why) => Err(format!("the agent refused the warm-up: {why}")),
                _ => Ok(()),
            }));
        }
        if self.stdout.len() > MAX_KEPT_BYTES {
            return Err(format!(
                "more than {MAX_KEPT_BYTES} bytes of output and no answer to the warm-up request"
            ));
        }
        Ok(None)
    }

    fn into_chunks(self) -> Vec<LogOutput> {
        let mut out = self.other;
        if !self.stdout.is_empty() {
            out.insert(
                0,
                LogOutput::StdOut {
                    message: self.stdout.into(),
                },
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{Adapter, ClaudeCode};

    fn process(chunks: Vec<&'static [u8]>) -> AgentProcess {
        let output = chunks
            .into_iter()
            .map(|c| Ok(LogOutput::StdOut { message: c.into() }));
        AgentProcess {
            exec_id: "test".into(),
            output: Box::pin(futures::stream::iter(output.collect::<Vec<_>>())),
            input: Box::pin(tokio::io::sink()),
        }
    }

    async fn rest(p: &mut AgentProcess) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(Ok(c)) = p.output.next().await {
            out.extend_from_slice(&c.into_bytes());
        }
        out
    }

    const SECOND: std::time::Duration = std::time::Duration::from_secs(1);

    #[tokio::test]
    async fn the_answer_is_consumed_and_every_other_line_is_kept_in_order() {
        let w = ClaudeCode::default().warm_up().expect("claude warms up");
        let mut p = process(vec![
            b"{\"type\":\"system\",\"subtype\":\"hook\"}\n{\"type\":\"control_res",
            b"ponse\",\"response\":{\"subtype\":\"success\",\"request_id\":\"berth-warm-up\",\"response\":{}}}\n{\"after\"",
            b":1}\n",
        ]);
        warm_up(&mut p, w, SECOND).await.expect("ready");
        assert_eq!(
            String::from_utf8(rest(&mut p).await).expect("utf8"),
            "{\"type\":\"system\",\"subtype\":\"hook\"}\n{\"after\":1}\n"
        );
    }

    #[tokio::test]
    async fn a_refusal_an_exit_or_silence_is_an_error() {
        let claude = ClaudeCode::default();
        let mut refused = process(vec![
            b"{\"type\":\"control_response\",\"response\":{\"subtype\":\"error\",\"request_id\":\"berth-warm-up\",\"error\":\"no\"}}\n",
        ]);
        let err = warm_up(&mut refused, claude.warm_up().expect("w"), SECOND)
            .await
            .expect_err("refused");
        assert!(err.contains("refused the warm-up: no"), "{err}");

        let mut exited = process(vec![b"{\"type\":\"system\"}\n"]);
        let err = warm_up(&mut exited, claude.warm_up().expect("w"), SECOND)
            .await
            .expect_err("exited");
        assert!(err.contains("exited"), "{err}");
        assert_eq!(rest(&mut exited).await, b"{\"type\":\"system\"}\n");

        let mut silent = AgentProcess {
            exec_id: "test".into(),
            output: Box::pin(futures::stream::pending()),
            input: Box::pin(tokio::io::sink()),
        };
        let err = warm_up(
            &mut silent,
            claude.warm_up().expect("w"),
            std::time::Duration::from_millis(50),
        )
        .await
        .expect_err("silent");
        assert!(err.contains("no answer"), "{err}");
    }
}

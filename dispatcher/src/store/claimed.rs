//! What a claim hands its driver: the session as of its claim, and the
//! first user input its run has to take, read in the claiming statement.

use crate::session::Session;

/// A claimed session, as of its claim, with the first input after its
/// input cursor (read in the same statement).
#[derive(Debug)]
pub(crate) struct Claimed {
    pub session: Session,
    pub first_input: Option<FirstInput>,
}

/// The first user input a run has to take.
#[derive(Debug, Clone)]
pub(crate) struct FirstInput {
    pub seq: i64,
    /// The text, when that input is a message (another kind, an interrupt,
    /// cannot ride in a start).
    pub message: Option<String>,
    /// The trace it was sent in.
    pub traceparent: Option<String>,
}

impl FirstInput {
    /// A user event of type `kind` at `seq` (`text`: its message's text).
    pub(super) fn new(seq: i64, kind: &str, text: String, traceparent: Option<String>) -> Self {
        Self {
            seq,
            message: (kind == berth_common::events::USER_MESSAGE).then_some(text),
            traceparent,
        }
    }
}

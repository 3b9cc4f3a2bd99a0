//! The relay's part in tool approvals: the agent's permission requests
//! persisted with their rows, answers passed on to the agent, timeouts
//! answered with the policy's decision, and the requests a run leaves
//! closed. The pending requests themselves are a
//! [`PendingTools`](crate::driver::tools::PendingTools).

use berth_common::events::{self as ev, payload};
use berth_proto::node::v1 as pb;
use berth_proto::node::v1::dispatcher_frame;

use super::state::{Flow, Relay};
use crate::driver::ctx::durably;
use crate::driver::tools::{Waiting, approval_span, timeout_answer};
use crate::error::{Error, Result};
use crate::session::NewEvent;
use crate::store::{NewToolRequest, ToolEffect};

impl Relay<'_> {
    /// A re-attached run's agent still waits on the requests it asked; a
    /// fresh run's agent never asked the ones an ended run left (closed).
    pub(super) async fn load_tools(&mut self) -> Result<()> {
        let (ctx, id) = (self.ctx, self.session.id);
        if !self.link.attached {
            // Read with the claim: no round trip on the usual start.
            if self.session.pending_tools == 0 {
                return Ok(());
            }
            let close = ToolEffect::CloseAll {
                session: id,
                epoch: Some(self.session.epoch),
                reason: "the run that asked ended".into(),
            };
            ctx.log.tool(close).await?;
            return Ok(());
        }
        let input_seq = self.input_seq;
        let pending = durably(ctx, || ctx.store.unforwarded_tools(id, input_seq)).await?;
        let now_utc = chrono::Utc::now();
        let now = tokio::time::Instant::now();
        for p in pending {
            let left = (p.deadline - now_utc).to_std().unwrap_or_default();
            let span = approval_span("", &p.tool_use_id);
            self.tools.insert(
                p.tool_use_id,
                Waiting {
                    request_id: p.request_id,
                    deadline: now + left,
                    timed_out: false,
                    _span: span,
                },
            );
        }
        Ok(())
    }

    /// What a line that asks or withdraws a tool permission changes (such
    /// a line is one event; others are passed over at once).
    pub(super) fn tool_effect(&self, events: &[NewEvent]) -> Option<ToolEffect> {
        let [e] = events else { return None };
        let session = self.session.id;
        match e.kind.as_str() {
            ev::AGENT_TOOL_PERMISSION_CANCELLED => {
                let c: payload::ToolPermissionCancelled = payload::parse(&e.payload)?;
                Some(ToolEffect::Withdraw {
                    session,
                    request_id: c.request_id,
                })
            }
            kind if ev::asks(kind) => {
                let ask: payload::ToolPermission = payload::parse(&e.payload)?;
                if ask.request_id.is_empty() || ask.tool_use_id.is_empty() {
                    return None;
                }
                let policy = self.session.spec.tool_policy.clone().unwrap_or_default();
                Some(ToolEffect::Ask(NewToolRequest {
                    session,
                    ask,
                    epoch: self.session.epoch,
                    message_seq: self.turn_message_seq,
                    timeout: policy.confirmation_timeout(),
                    timeout_decision: policy.timeout_decision,
                }))
            }
            _ => None,
        }
    }

    /// Persists a line that asks or withdraws a tool permission together
    /// with the request's row, then says how the agent's activity changed.
    pub(super) async fn on_tool_line(
        &mut self,
        events: Vec<NewEvent>,
        node_seq: i64,
        effect: ToolEffect,
    ) -> Result<Flow> {
        let (id, epoch) = (self.session.id, self.session.epoch);
        self.ctx
            .log
            .append_line_with_tool(id, epoch, events, node_seq, &self.persisted, effect.clone())
            .await?;
        let changed = match effect {
            ToolEffect::Ask(request) => {
                let tool = berth_common::metrics::label_value(&request.ask.tool_name);
                metrics::counter!(crate::metrics::TOOL_REQUESTS, "tool" => tool).increment(1);
                tracing::info!(tool_use_id = %request.ask.tool_use_id, tool = %request.ask.tool_name,
                    "the agent asks to use a tool; waiting for an answer");
                let was_empty = self.tools.is_empty();
                let span = approval_span(&request.ask.tool_name, &request.ask.tool_use_id);
                self.tools.insert(
                    request.ask.tool_use_id,
                    Waiting {
                        request_id: request.ask.request_id,
                        deadline: tokio::time::Instant::now() + request.timeout,
                        timed_out: false,
                        _span: span,
                    },
                );
                was_empty
            }
            ToolEffect::Withdraw { request_id, .. } => {
                self.tools.withdraw(&request_id) && self.tools.is_empty()
            }
            _ => false,
        };
        if changed {
            self.activity().await?;
        }
        Ok(Flow::Continue)
    }

    /// The frame passing a logged answer to the agent; `None` when this
    /// run's agent does not wait on that request.
    pub(super) async fn tool_decision(
        &mut self,
        answer: &str,
    ) -> Result<Option<dispatcher_frame::Kind>> {
        let a: payload::ToolConfirmation = payload::parse(answer).unwrap_or_default();
        let Some(w) = self.tools.answer(&a.tool_use_id) else {
            return Ok(None);
        };
        if self.tools.is_empty() {
            self.activity().await?;
        }
        let json =
            |v: &Option<serde_json::Value>| v.as_ref().map(ToString::to_string).unwrap_or_default();
        Ok(Some(dispatcher_frame::Kind::ToolDecision(
            pb::ToolDecision {
                request_id: w.request_id,
                allow: a.decision == "allow",
                updated_input_json: json(&a.updated_input),
                updated_permissions_json: json(&a.updated_permissions),
                message: a.message,
                interrupt: a.interrupt,
                tool_use_id: a.tool_use_id,
            },
        )))
    }

    /// Logs `session.activity`: waiting for a person while any request
    /// waits, else working (a turn is in flight).
    pub(super) async fn activity(&self) -> Result<()> {
        let a = payload::Activity {
            activity: if self.tools.is_empty() {
                "working"
            } else {
                "waiting_input"
            }
            .into(),
            pending: self.tools.len() as i64,
        };
        self.ctx
            .log
            .append_queued(
                self.session.id,
                self.session.epoch,
                NewEvent::new(ev::SESSION_ACTIVITY, payload::to_json(&a)),
            )
            .await
    }

    /// Answers each request whose confirmation timeout passed with the
    /// policy's decision. A person's answer logged meanwhile wins; either
    /// way the answer reaches the agent through the feed.
    pub(super) async fn on_tool_timeout(&mut self) -> Result<Flow> {
        let policy = self.session.spec.tool_policy.clone().unwrap_or_default();
        let decision = policy.timeout_decision;
        for tool_use_id in self.tools.expired(tokio::time::Instant::now()) {
            tracing::info!(%tool_use_id, decision = decision.as_str(), "tool permission request timed out");
            let answer = timeout_answer(tool_use_id, decision, policy.confirmation_timeout());
            let effect = ToolEffect::Answer {
                session: self.session.id,
                answer,
                traceparent: berth_common::traces::current(),
            };
            match self.ctx.log.tool(effect).await {
                Ok(out) => {
                    for e in &out.events {
                        crate::metrics::record_tool_answer(&e.payload);
                    }
                }
                Err(Error::Precondition(why)) => {
                    tracing::debug!(%why, "answered before its timeout");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Flow::Continue)
    }

    /// Closes the requests the agent waited on when its run ended. After a
    /// pause, the turn that asked is delivered again on resume, so the
    /// agent asks again (README, "Tool approvals").
    pub(super) async fn close_tools(&mut self, reason: &str, pause: bool) -> Result<()> {
        if self.tools.is_empty() {
            return Ok(());
        }
        self.tools.clear();
        let (id, epoch) = (self.session.id, self.session.epoch);
        let out = self
            .ctx
            .log
            .tool(ToolEffect::CloseAll {
                session: id,
                epoch: Some(epoch),
                reason: reason.into(),
            })
            .await?;
        let first = out
            .closed_message_seqs
            .iter()
            .copied()
            .filter(|s| *s > 0)
            .min();
        if let (true, Some(seq)) = (pause, first) {
            tracing::info!(
                message_seq = seq,
                "paused while the agent waited for a tool answer: the turn is delivered again on resume"
            );
            let ctx = self.ctx;
            durably(ctx, || ctx.store.rewind_input_seq(id, seq - 1, epoch)).await?;
        }
        Ok(())
    }
}

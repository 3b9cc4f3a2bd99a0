//! The start handshake: place the session, send `Start`, and wait for the
//! node to accept or refuse. A transient refusal (full, draining, down)
//! places it elsewhere (late binding); when no node will take it, it goes
//! back to the queue with a growing, jittered backoff, never lost. A
//! permanent one (the node says the spec is invalid) fails it at once.

use berth_common::events::payload::StatusDetail;
use berth_proto::node::v1 as pb;
use berth_proto::node::v1::{dispatcher_frame, node_frame};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::ctx::{Ctx, durably};
use crate::error::{Error, Result};
use crate::nodes::Placed;
use crate::nodes::wire::{OpenedSecret, OpenedSecrets, node_spec};
use crate::session::{Session, StatusEvent};
use crate::store::FirstInput;

/// The frames a run sends its node. Boxed: the channel allocates its first
/// block of 32 slots when it is made, and a held session keeps it.
pub(super) type ToNode = mpsc::Sender<Box<pb::DispatcherFrame>>;

/// A started run: the node, the frames it sends, the frames we send.
pub(super) struct Link {
    pub placed: Placed,
    /// When the session was claimed (start of placement).
    pub claimed: std::time::Instant,
    /// How the node started the agent.
    pub start: pb::StartPath,
    /// The seq of the message the start carried (0: none): the agent has
    /// it already.
    pub first_message_seq: i64,
    /// The trace that message was sent in.
    pub first_traceparent: Option<String>,
    /// The run was already going: this link re-attached to it.
    pub attached: bool,
    pub frames: tonic::Streaming<pb::NodeFrame>,
    pub to_node: ToNode,
    /// The run's OAuth credentials as it started with them (the relay
    /// keeps them fresh).
    pub credentials: Vec<(uuid::Uuid, Result<crate::records::Access, String>)>,
}

/// Places the session and sends `start`, trying other nodes when one refuses.
/// `None` when the start failed or the session went back to the queue; the
/// log says which.
/// `first_input` is the first user input after the session's input cursor:
/// a message rides in the start, so the agent works on it while this
/// dispatcher records the start.
pub(super) async fn start(
    ctx: &Ctx,
    session: &Session,
    claimed: std::time::Instant,
    first_input: Option<FirstInput>,
) -> Result<Option<Link>> {
    let mut refused: Vec<String> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    let secrets = open_secrets(ctx, session).await?;
    let (first, first_traceparent) = match first_input {
        Some(FirstInput {
            seq,
            message: Some(text),
            traceparent,
        }) => (
            Some(pb::UserMessage {
                text,
                seq,
                traceparent: traceparent.clone().unwrap_or_default(),
            }),
            traceparent,
        ),
        _ => (None, None),
    };
    let spec = node_spec(session, &secrets);
    let agent_key = berth_common::warm::agent_key(&spec);
    loop {
        let Some(placed) = ctx
            .nodes
            .place(&session.spec.image, agent_key.as_deref(), &refused)
        else {
            requeue(ctx, session, &reasons).await?;
            return Ok(None);
        };
        let url = placed.link.key();
        let opened = open_run(&placed, session, spec.clone(), None, first.clone()).await;
        let (mut frames, to_node) = match opened {
            Ok(opened) => opened,
            // The spec itself is wrong (a path outside the node's volumes,
            // limits beyond the machine): no retry will change that, so the
            // session fails at once with the node's words.
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                tracing::info!(%url, reason = %status.message(), "node refused the spec; failing the session");
                let detail = StatusDetail {
                    node: Some(url.clone()),
                    ..StatusDetail::default()
                };
                let reason = format!("node {url} refused the session: {}", status.message());
                ctx.log
                    .transition_at(
                        session.id,
                        session.epoch,
                        StatusEvent::Failed,
                        &reason,
                        detail,
                    )
                    .await?;
                return Ok(None);
            }
            Err(status) => {
                reasons.push(format!("{url}: {}", status.message()));
                refused.push(url);
                continue;
            }
        };
        // A node that goes down before answering counts as a refusal.
        let kind = match first_answer(ctx, &placed, &mut frames).await {
            Ok(kind) => kind,
            Err(status) => {
                reasons.push(format!("{url}: {}", status.message()));
                refused.push(url);
                continue;
            }
        };
        match kind {
            Some(node_frame::Kind::Accepted(a)) => {
                let start = start_path(&a);
                tracing::debug!(%url, container_id = %a.container_id, start = start.as_str_name(), "node accepted the session");
                return Ok(Some(Link {
                    placed,
                    claimed,
                    start,
                    first_message_seq: first.as_ref().map_or(0, |m| m.seq),
                    first_traceparent,
                    attached: false,
                    frames,
                    to_node,
                    credentials: secrets.oauth.clone(),
                }));
            }
            Some(node_frame::Kind::Refused(r)) => {
                tracing::info!(%url, reason = %r.reason, "node refused the session; placing it elsewhere");
                reasons.push(format!("{url}: {}", r.reason));
                refused.push(url);
            }
            Some(node_frame::Kind::Exited(x)) => {
                let detail = StatusDetail {
                    exit_code: Some(x.exit_code),
                    stderr_tail: Some(x.stderr_tail),
                    node: Some(url),
                    ..StatusDetail::default()
                };
                ctx.log
                    .transition_at(
                        session.id,
                        session.epoch,
                        StatusEvent::Failed,
                        &x.reason,
                        detail,
                    )
                    .await?;
                return Ok(None);
            }
            // No answer, an empty frame, or an event before the answer.
            None
            | Some(
                node_frame::Kind::Line(_)
                | node_frame::Kind::Checkpoint(_)
                | node_frame::Kind::CredentialUse(_),
            ) => {
                return Err(Error::Internal(format!(
                    "node {url} broke the protocol: its first frame must accept or refuse the session"
                )));
            }
        }
    }
}

/// Takes over the run the session's lost owner left on `session.node`, at
/// this claim's epoch: the node sends again every frame after the one the
/// store has (`session.node_seq`). `None` when that node is down or has no
/// such run (it ended, or the node lost it): the session is placed anew.
pub(super) async fn attach(
    ctx: &Ctx,
    session: &Session,
    claimed: std::time::Instant,
) -> Result<Option<Link>> {
    let Some(node) = ctx
        .nodes
        .find(&session.node)
        .into_iter()
        .find(|l| l.report().is_some())
    else {
        tracing::info!(node = %session.node, "the node of the lost run is down; placing the session anew");
        return Ok(None);
    };
    let placed = ctx.nodes.hold(node);
    let url = placed.link.key();
    let after = u64::try_from(session.node_seq).unwrap_or(0);
    let secrets = open_secrets(ctx, session).await?;
    let spec = node_spec(session, &secrets);
    let (mut frames, to_node) = match open_run(&placed, session, spec, Some(after), None).await {
        Ok(opened) => opened,
        Err(status) => {
            tracing::info!(%url, error = %status.message(), "could not re-attach; placing the session anew");
            return Ok(None);
        }
    };
    match first_answer(ctx, &placed, &mut frames).await {
        Ok(Some(node_frame::Kind::Accepted(a))) if a.attached => {
            tracing::info!(%url, after = session.node_seq, "re-attached to the run the lost owner left");
            metrics::counter!(crate::metrics::REATTACHED).increment(1);
            Ok(Some(Link {
                placed,
                claimed,
                start: start_path(&a),
                first_message_seq: 0,
                first_traceparent: None,
                attached: true,
                frames,
                to_node,
                credentials: secrets.oauth.clone(),
            }))
        }
        Ok(Some(node_frame::Kind::Refused(r))) => {
            tracing::info!(%url, reason = %r.reason, "no run to re-attach to; placing the session anew");
            let (id, epoch) = (session.id, session.epoch);
            durably(ctx, || ctx.store.clear_node(id, epoch)).await?;
            Ok(None)
        }
        other => {
            tracing::info!(%url, answer = ?other.map(|k| k.is_some()), "could not re-attach; placing the session anew");
            Ok(None)
        }
    }
}

/// How the node says it started the agent (an older node says only warm or not).
fn start_path(a: &pb::Accepted) -> pb::StartPath {
    match pb::StartPath::try_from(a.start) {
        Ok(p) if p != pb::StartPath::Unspecified => p,
        _ if a.warm => pb::StartPath::WarmContainer,
        _ => pb::StartPath::Cold,
    }
}

/// Opens a run of `session` on the placed node: a fresh start (with the
/// first message, if any), or (with `attach`, the store's cursor) a
/// re-attach to the run already there.
async fn open_run(
    placed: &Placed,
    session: &Session,
    spec: pb::SessionSpec,
    attach: Option<u64>,
    first_message: Option<pb::UserMessage>,
) -> Result<(tonic::Streaming<pb::NodeFrame>, ToNode), tonic::Status> {
    let (to_node, rx) = mpsc::channel(64);
    let start = Box::new(pb::DispatcherFrame {
        epoch: session.epoch,
        kind: Some(dispatcher_frame::Kind::Start(Box::new(pb::Start {
            session_id: session.id.to_string(),
            epoch: session.epoch,
            spec: Some(spec),
            attach: attach.is_some(),
            after_node_seq: attach.unwrap_or(0),
            first_message,
            traceparent: berth_common::traces::current().unwrap_or_default(),
        }))),
    });
    // The channel is fresh: this send cannot fail.
    let _ = to_node.send(start).await;
    let mut request = tonic::Request::new(ReceiverStream::new(rx).map(|f| *f));
    berth_common::traces::inject_metadata(request.metadata_mut());
    let frames = placed
        .link
        .client()
        .run_session(request)
        .await?
        .into_inner();
    Ok((frames, to_node))
}

/// The session's env values and secrets (its vault ids and its git
/// resources' keys), opened for its node. A secret deleted since the
/// session was made is left out, with a warning: what it was for then
/// fails where it is used.
async fn open_secrets(ctx: &Ctx, session: &Session) -> Result<OpenedSecrets> {
    let mut opened = OpenedSecrets {
        env: ctx.store.session_env(session)?,
        ..OpenedSecrets::default()
    };
    let mut ids: Vec<uuid::Uuid> = session
        .spec
        .vault_ids
        .iter()
        .filter_map(|v| v.parse().ok())
        .collect();
    for r in &session.resources {
        if let crate::session::Resource::Git {
            ssh_key_secret,
            credential,
            ..
        } = r
        {
            let named = ssh_key_secret.iter().chain(credential.iter());
            ids.extend(named.filter_map(|id| id.parse::<uuid::Uuid>().ok()));
        }
    }
    ids.sort();
    ids.dedup();
    if ids.is_empty() {
        return Ok(opened);
    }
    let rows = durably(ctx, || ctx.store.sealed_secrets(&session.project, &ids)).await?;
    if rows.len() < ids.len() {
        tracing::warn!(
            wanted = ids.len(),
            found = rows.len(),
            "some of the session's secrets were deleted; it runs without them"
        );
    }
    let context = crate::store::secret_context(&session.project);
    for row in rows {
        let id = row.id;
        // An OAuth credential goes as its access token (refreshed now if it
        // is stale); its refresh token stays here.
        let (value, error) = if row.usage == crate::store::USAGE_OAUTH2_REFRESH {
            match ctx.oauth.access(id, None).await {
                Ok(a) => {
                    opened.oauth.push((id, Ok(a.clone())));
                    (a.value, None)
                }
                Err(why) => {
                    opened.oauth.push((id, Err(why.clone())));
                    (String::new(), Some(why))
                }
            }
        } else {
            let value = ctx
                .store
                .sealer()
                .open(&context, &row.sealed)
                .map_err(|e| Error::Internal(format!("secret secrets/{id}: {e}")))?;
            let value = String::from_utf8(value)
                .map_err(|_| Error::Internal(format!("secret secrets/{id} is not UTF-8")))?;
            (value, None)
        };
        opened.by_id.insert(
            id.to_string(),
            OpenedSecret {
                usage: row.usage,
                value,
                error,
                hosts: row.hosts,
                header_name: row.header_name,
                header_prefix: row.header_prefix,
            },
        );
    }
    Ok(opened)
}

/// The node's first frame (accept, refuse, exit); a node that goes down
/// before answering is an error.
/// A credential's use the gateway reported before the agent's start was
/// (it may call out as it starts) is recorded on the way.
async fn first_answer(
    ctx: &Ctx,
    placed: &Placed,
    frames: &mut tonic::Streaming<pb::NodeFrame>,
) -> Result<Option<node_frame::Kind>, tonic::Status> {
    loop {
        let first = tokio::select! {
            m = frames.message() => m,
            () = placed.link.down() => Err(tonic::Status::unavailable(format!("node down: {}", placed.link.last_error()))),
        };
        match first?.and_then(|f| f.kind) {
            Some(node_frame::Kind::CredentialUse(u)) => ctx.credential_used(&u).await,
            other => return Ok(other),
        }
    }
}

/// Every node is full, draining, down or refused: back to the queue. The
/// claim loop takes it again when a node reports free capacity.
async fn requeue(ctx: &Ctx, session: &Session, reasons: &[String]) -> Result<()> {
    let why = if reasons.is_empty() {
        "no node has free capacity".to_string()
    } else {
        reasons.join("; ")
    };
    let delay = durably(ctx, || ctx.store.back_off(session.id, session.epoch)).await?;
    tracing::info!(%why, ?delay, "no node could start the session; re-queued with a backoff");
    let reason = format!(
        "re-queued: no node could start it ({why}); next try in {:.1}s",
        delay.as_secs_f64()
    );
    ctx.log
        .transition_at(
            session.id,
            session.epoch,
            StatusEvent::NodeLost,
            &reason,
            StatusDetail::default(),
        )
        .await?;
    Ok(())
}

/// The `start` label of the latency metrics and of `session.running`.
pub(super) fn start_label(start: berth_proto::node::v1::StartPath) -> &'static str {
    use berth_proto::node::v1::StartPath;
    match start {
        StartPath::WarmProcess => "warm_process",
        StartPath::WarmContainer => "warm_container",
        StartPath::Cold | StartPath::Unspecified => "cold",
    }
}

//! Session operations behind the public API, with no wire types.

use std::sync::Arc;

use berth_common::events::payload::{self, StatusDetail};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::log::EventLog;
use crate::session::{Event, NewEvent, NewSession, Resource, Session, StatusEvent, session_prefix};
use crate::store::{SessionFilter, Store, ToolEffect};

/// The session operations clients call.
#[derive(Clone)]
pub(crate) struct Sessions {
    pub store: Store,
    pub log: Arc<EventLog>,
    pub objects: berth_common::objects::ObjectStore,
    /// The fleet, for what its nodes can give a session.
    pub nodes: Arc<crate::nodes::Nodes>,
    /// Hosts git resources may come from beyond public https.
    pub git_allow: Vec<String>,
    /// The deployment's queue timeout, for sessions that set none.
    pub queue_timeout: Option<std::time::Duration>,
}

/// A page of search results, and the (time, id) the next one starts before.
pub(crate) type SearchPage = (
    Vec<(Session, crate::store::SearchHit)>,
    Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
);

/// A person's answer to a tool permission request, checked.
#[derive(Debug, Clone)]
pub(crate) struct ToolAnswer {
    pub tool_use_id: String,
    pub decision: berth_common::tools::Decision,
    pub updated_input: Option<serde_json::Value>,
    pub always: bool,
    pub message: String,
    pub interrupt: bool,
}

/// A display name for a session created without one: the first words of
/// its first message (up to 60 characters), else its agent or image.
pub(crate) fn display_name_for(new: &NewSession) -> String {
    const MAX: usize = 60;
    if let Some(text) = new.initial_message.as_deref() {
        let mut name = String::new();
        for word in text.split_whitespace() {
            let extra = usize::from(!name.is_empty()) + word.chars().count();
            if name.chars().count() + extra > MAX {
                if name.is_empty() {
                    name = word.chars().take(MAX - 1).collect::<String>() + "…";
                } else {
                    name.push('…');
                }
                break;
            }
            if !name.is_empty() {
                name.push(' ');
            }
            name.push_str(word);
        }
        if !name.is_empty() {
            return name;
        }
    }
    match &new.agent {
        Some(agent) => format!("{agent} session"),
        None => format!("{} session", new.spec.image),
    }
}

/// How `ExportSession` renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExportFormat {
    Markdown,
    Json,
    Pdf,
}

impl Sessions {
    /// Resolves the agent (pinning its version), checks the resources, queues.
    pub(crate) async fn create(&self, project: &str, mut new: NewSession) -> Result<Session> {
        // As asked, before the agent is resolved and defaults are filled.
        let fingerprint = new.fingerprint();
        if let Some(agent) = &new.agent {
            let (id, version) =
                berth_common::names::agent_ref(agent).map_err(|e| Error::invalid("agent", e))?;
            let a = self.store.get_agent(project, id, version).await?;
            if a.archived {
                return Err(Error::Precondition(format!(
                    "agent `{}` is archived; new sessions cannot use it",
                    a.id
                )));
            }
            // The version's spec, with the request's env merged over its
            // env, and the request's secrets added to its own.
            let env = std::mem::take(&mut new.spec.env);
            let vaults = std::mem::take(&mut new.spec.vault_ids);
            let policy = new.spec.tool_policy.take();
            new.spec = a.spec;
            // A session's own tool policy replaces the version's whole.
            if policy.is_some() {
                new.spec.tool_policy = policy;
            }
            new.spec.env.extend(env);
            for v in vaults {
                if !new.spec.vault_ids.contains(&v) {
                    new.spec.vault_ids.push(v);
                }
            }
            new.pinned = Some((a.id, a.version));
        }
        for (k, v) in new.run_params.env(new.spec.runtime)? {
            new.spec.env.insert(k, v);
        }
        self.check_fleet_limits(&new)?;
        self.check_vault_ids(project, &new.spec.vault_ids).await?;
        for r in &new.resources {
            if let Resource::Git {
                url,
                ssh_key_secret,
                ..
            } = r
            {
                berth_common::spec::check_git_source(
                    "resources.git.url",
                    url,
                    &self.git_allow,
                    ssh_key_secret.is_some(),
                )?;
                if let Some(id) = ssh_key_secret {
                    self.check_ssh_key(project, id).await?;
                }
            }
        }
        for r in &new.resources {
            match r {
                Resource::Memory { .. } if new.pinned.is_none() => {
                    return Err(Error::invalid(
                        "resources.memory",
                        "memory stores belong to an agent: create the session with `agent`",
                    ));
                }
                Resource::File { file_id, .. } => {
                    if let Err(Error::NotFound(m)) = self.store.get_file(project, *file_id).await {
                        return Err(Error::invalid("resources.file", m));
                    }
                }
                _ => {}
            }
        }
        if new.queue_timeout.is_none() {
            new.queue_timeout = self.queue_timeout;
        }
        if new.display_name.trim().is_empty() {
            new.display_name = display_name_for(&new);
        }
        let (session, created, asked) = self
            .store
            .create_session(project, &new, &fingerprint)
            .await?;
        // AIP-155: a request_id names one request; another one under it is
        // refused rather than answered with the first one's session.
        if asked.is_some_and(|a| a != fingerprint) {
            return Err(Error::invalid(
                "request_id",
                format!(
                    "was used by another create request, which made {}; give a different request its own request_id",
                    berth_common::names::session_name(session.id)
                ),
            ));
        }
        if created {
            metrics::counter!(crate::metrics::SESSIONS_CREATED).increment(1);
            tracing::info!(session_id = %session.id, project, image = %session.spec.image, "session created");
        }
        Ok(session)
    }

    /// Checks that `agent` (`NAME` or `NAME@VERSION`) exists in `project`
    /// and is not archived, for what starts its sessions later (schedules,
    /// webhooks); errors name `field`.
    pub(crate) async fn check_agent(
        &self,
        project: &str,
        agent: &str,
        field: &'static str,
    ) -> Result<()> {
        if agent.is_empty() {
            return Err(Error::invalid(field, "required: `NAME` or `NAME@VERSION`"));
        }
        let (id, version) =
            berth_common::names::agent_ref(agent).map_err(|e| Error::invalid(field, e))?;
        match self.store.get_agent(project, id, version).await {
            Ok(a) if a.archived => Err(Error::invalid(field, format!("agent `{id}` is archived"))),
            Ok(_) => Ok(()),
            Err(Error::NotFound(m)) => Err(Error::invalid(field, m)),
            Err(e) => Err(e),
        }
    }

    /// Records `identity`'s rating of session `id` (turn 0: the whole
    /// session), replacing its earlier one for that turn.
    pub(crate) async fn submit_feedback(
        &self,
        project: &str,
        id: Uuid,
        turn: i64,
        identity: &str,
        rating: i32,
        comment: &str,
    ) -> Result<crate::store::FeedbackRow> {
        let s = self.get(project, id).await?;
        if turn < 0 || turn > s.usage.turns {
            return Err(Error::invalid(
                "turn",
                format!(
                    "0 (the whole session) or a turn it has had (1–{})",
                    s.usage.turns
                ),
            ));
        }
        self.store
            .upsert_feedback(id, turn, identity, rating, comment)
            .await
    }

    pub(crate) async fn list_feedback(
        &self,
        project: &str,
        id: Uuid,
    ) -> Result<Vec<crate::store::FeedbackRow>> {
        self.get(project, id).await?;
        self.store.list_feedback(id).await
    }

    /// The project's sessions whose messages match `query`, newest first
    /// before `before`, each with its first match, and where the next page
    /// starts (when this one is full). Sessions deleted between the two
    /// reads are left out.
    pub(crate) async fn search(
        &self,
        project: &str,
        query: &str,
        before: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
        limit: i64,
    ) -> Result<SearchPage> {
        let hits = self
            .store
            .search_sessions(project, query, before, limit)
            .await?;
        let next = hits
            .last()
            .filter(|_| hits.len() as i64 == limit)
            .map(|h| (h.create_time, h.session_id));
        let mut found = Vec::with_capacity(hits.len());
        for hit in hits {
            match self.get(project, hit.session_id).await {
                Ok(s) => found.push((s, hit)),
                Err(Error::SessionNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((found, next))
    }

    /// Refuses, at the API, a session no live node could run: limits above
    /// the largest node's, or a resource path outside the containers'
    /// writable volumes. (Before any node reports, the nodes check.)
    fn check_fleet_limits(&self, new: &NewSession) -> Result<()> {
        let Some(fleet) = self.nodes.limits() else {
            return Ok(());
        };
        let l = &new.spec.limits;
        if fleet.memory_bytes > 0 && u64::try_from(l.memory_bytes).unwrap_or(0) > fleet.memory_bytes
        {
            return Err(Error::invalid(
                "spec.limits.memory_bytes",
                format!(
                    "{} bytes is more than the largest node has ({} bytes)",
                    l.memory_bytes, fleet.memory_bytes
                ),
            ));
        }
        if fleet.cpus > 0 && l.cpus > f64::from(fleet.cpus) {
            return Err(Error::invalid(
                "spec.limits.cpus",
                format!(
                    "{} is more than the largest node has ({})",
                    l.cpus, fleet.cpus
                ),
            ));
        }
        if fleet.volumes.is_empty() {
            return Ok(());
        }
        for r in &new.resources {
            let (field, path, file) = match r {
                Resource::File { path, .. } => ("resources.file.path", path, true),
                Resource::Memory { path, .. } => ("resources.memory.path", path, false),
                Resource::Git { path, .. } => ("resources.git.path", path, false),
            };
            let path = path.trim_end_matches('/');
            // A file goes inside a volume; it cannot stand for one.
            if file
                && fleet
                    .volumes
                    .iter()
                    .any(|v| v.trim_end_matches('/') == path)
            {
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{path}` is a writable directory of the container itself; name a file inside it (e.g. `{path}/input.txt`)"
                    ),
                ));
            }
            let inside = fleet.volumes.iter().any(|v| {
                path.strip_prefix(v.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            });
            if !inside {
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{path}` is not in a writable directory of the container ({})",
                        fleet.volumes.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The session, if it is in `project`: another project's is NOT_FOUND,
    /// exactly as a session that does not exist.
    pub(crate) async fn get(&self, project: &str, id: Uuid) -> Result<Session> {
        let s = self.store.get_session(id).await?;
        if s.project != project {
            return Err(Error::SessionNotFound(id.to_string()));
        }
        Ok(s)
    }

    pub(crate) async fn list(&self, project: &str, filter: SessionFilter) -> Result<Vec<Session>> {
        self.store.list_sessions(project, &filter).await
    }

    /// A git resource's key must be a secret of `project` (else NOT_FOUND)
    /// made for ssh.
    async fn check_ssh_key(&self, project: &str, id: &str) -> Result<()> {
        let not_found = || {
            Error::NotFound(format!(
                "resources.git.ssh_key_secret: secret secrets/{id} not found"
            ))
        };
        let uuid: Uuid = id.parse().map_err(|_| not_found())?;
        let found = self.store.sealed_secrets(project, &[uuid]).await?;
        match found.first() {
            None => Err(not_found()),
            Some((_, usage, _)) if usage != crate::store::USAGE_GIT_SSH_KEY => Err(Error::invalid(
                "resources.git.ssh_key_secret",
                format!("secret secrets/{id} is not an SSH key (its usage is {usage})"),
            )),
            Some(_) => Ok(()),
        }
    }

    /// Every secret id must name a secret of `project` (else NOT_FOUND).
    async fn check_vault_ids(&self, project: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let not_found =
            |id: &str| Error::NotFound(format!("spec.vault_ids: secret secrets/{id} not found"));
        let ids = ids
            .iter()
            .map(|id| id.parse::<Uuid>().map_err(|_| not_found(id)))
            .collect::<Result<Vec<_>>>()?;
        let ids = ids.as_slice();
        let found = self.store.sealed_secrets(project, ids).await?;
        if let Some(missing) = ids.iter().find(|id| !found.iter().any(|f| f.0 == **id)) {
            return Err(Error::NotFound(format!(
                "spec.vault_ids: secret secrets/{missing} not found"
            )));
        }
        Ok(())
    }

    /// Persists a user message; the driver forwards it. Returns its seq.
    pub(crate) async fn send_message(&self, project: &str, id: Uuid, text: &str) -> Result<i64> {
        self.require_input(
            project,
            id,
            "messages can only be sent to pending, starting, running or idle sessions",
        )
        .await?;
        let e = self.log.append(id, NewEvent::user_message(text)).await?;
        Ok(e.seq)
    }

    /// Logs the answer to a pending tool permission request (the owner's
    /// relay passes it to the agent). Returns its seq, and whether the same
    /// answer was given before (nothing new is logged then).
    pub(crate) async fn confirm_tool(
        &self,
        project: &str,
        id: Uuid,
        identity: String,
        a: ToolAnswer,
    ) -> Result<(i64, bool)> {
        self.get(project, id).await?;
        let decision = a.decision.as_str();
        let answer = payload::ToolConfirmation {
            tool_use_id: a.tool_use_id,
            decision: decision.into(),
            updated_input: a.updated_input,
            always: a.always,
            message: a.message,
            interrupt: a.interrupt,
            by: "user".into(),
            identity,
            ..Default::default()
        };
        let out = self
            .log
            .tool(ToolEffect::Answer {
                session: id,
                answer,
            })
            .await?;
        if let Some(seq) = out.already {
            return Ok((seq, true));
        }
        let e = out
            .events
            .first()
            .ok_or_else(|| Error::Internal("an answer logged no event".into()))?;
        crate::metrics::record_tool_answer(&e.payload);
        tracing::info!(session_id = %id, seq = e.seq, decision, "tool permission answered");
        Ok((e.seq, false))
    }

    /// Pending tool permission requests of these sessions, oldest first.
    pub(crate) async fn pending_tools(
        &self,
        ids: &[Uuid],
    ) -> Result<Vec<crate::store::PendingTool>> {
        self.store.pending_tools(ids).await
    }

    pub(crate) async fn interrupt(&self, project: &str, id: Uuid) -> Result<i64> {
        self.require_input(project, id, "only a live session can be interrupted")
            .await?;
        let e = self.log.append(id, NewEvent::user_interrupt()).await?;
        Ok(e.seq)
    }

    async fn require_input(&self, project: &str, id: Uuid, what: &'static str) -> Result<()> {
        let s = self.get(project, id).await?;
        if !s.status.accepts_input() {
            return Err(Error::WrongStatus {
                id,
                status: s.status,
                what,
            });
        }
        Ok(())
    }

    /// Stops the session with reason `user` (a snapshot is kept, so it can be
    /// resumed). Stopping twice is not an error.
    pub(crate) async fn stop(&self, project: &str, id: Uuid) -> Result<Session> {
        self.get(project, id).await?;
        match self
            .log
            .transition(
                id,
                StatusEvent::StopRequested,
                "user",
                StatusDetail::default(),
            )
            .await
        {
            Ok(_) => {}
            Err(Error::Transition(t)) => {
                return Err(Error::WrongStatus {
                    id,
                    status: t.from,
                    what: "only a live session can be stopped",
                });
            }
            Err(e) => return Err(e),
        }
        self.store.get_session(id).await
    }

    /// Asks the driver to snapshot the session and free its container. The
    /// status machine decides which sessions may pause (running or idle).
    pub(crate) async fn pause(&self, project: &str, id: Uuid) -> Result<Session> {
        self.get(project, id).await?;
        self.log
            .transition(
                id,
                StatusEvent::PauseRequested,
                "pausing",
                StatusDetail::default(),
            )
            .await
            .map_err(|e| wrong_status(id, e, "only a running or idle session can be paused"))?;
        self.store.get_session(id).await
    }

    /// Queues a paused or stopped session again; it restores its snapshot.
    pub(crate) async fn resume(&self, project: &str, id: Uuid) -> Result<Session> {
        self.get(project, id).await?;
        self.log
            .transition(id, StatusEvent::Resumed, "resumed", StatusDetail::default())
            .await
            .map_err(|e| wrong_status(id, e, "only a paused or stopped session can be resumed"))?;
        self.store.notify_queue().await?;
        self.store.get_session(id).await
    }

    pub(crate) async fn archive(&self, project: &str, id: Uuid) -> Result<Session> {
        self.get(project, id).await?;
        self.log
            .transition(id, StatusEvent::Archived, "user", StatusDetail::default())
            .await
            .map_err(|e| {
                wrong_status(
                    id,
                    e,
                    "only a stopped, paused, completed, failed or timed-out session can be archived",
                )
            })?;
        self.store.get_session(id).await
    }

    /// Deletes a session that is not live: its objects, then its rows.
    /// Returns how many objects went.
    pub(crate) async fn delete(&self, project: &str, id: Uuid) -> Result<u64> {
        const WHAT: &str = "a live session cannot be deleted; stop it first";
        let s = self.get(project, id).await?;
        if s.status.is_live() {
            return Err(Error::WrongStatus {
                id,
                status: s.status,
                what: WHAT,
            });
        }
        let objects = self.objects.delete_prefix(&session_prefix(id)).await?;
        if !self.store.delete_session(id).await? {
            let s = self.store.get_session(id).await?;
            return Err(Error::WrongStatus {
                id,
                status: s.status,
                what: WHAT,
            });
        }
        tracing::info!(session_id = %id, objects, "session deleted");
        Ok(objects)
    }

    /// A new pending session with the same configuration and no history.
    pub(crate) async fn clone_session(
        &self,
        project: &str,
        id: Uuid,
        request_id: Option<String>,
    ) -> Result<Session> {
        let s = self.get(project, id).await?;
        let mut spec = s.spec.clone();
        spec.env = self.store.session_env(&s)?;
        let new = NewSession {
            request_id,
            display_name: s.display_name,
            spec,
            labels: s.labels,
            initial_message: None,
            timeout: s.timeout,
            agent: None,
            resources: s.resources,
            inactivity_timeout: s.inactivity_timeout,
            budget_usd: s.budget_usd,
            queue_timeout: s.queue_timeout,
            pinned: s.agent,
            // The spec carries them already, as env.
            run_params: Default::default(),
        };
        let (clone, _, _) = self
            .store
            .create_session(project, &new, &new.fingerprint())
            .await?;
        tracing::info!(session_id = %clone.id, from = %id, "session cloned");
        Ok(clone)
    }

    /// The whole session rendered as `format`.
    pub(crate) async fn export(
        &self,
        project: &str,
        id: Uuid,
        format: ExportFormat,
    ) -> Result<Vec<u8>> {
        let s = self.get(project, id).await?;
        let mut events = Vec::new();
        loop {
            let after = events.last().map_or(0, |e: &Event| e.seq);
            let page = self.store.list_events(id, after, 1000).await?;
            if page.is_empty() {
                break;
            }
            events.extend(page);
        }
        Ok(match format {
            ExportFormat::Markdown => crate::export::markdown(&s, &events).into_bytes(),
            ExportFormat::Json => crate::export::json(&s, &events).into_bytes(),
            ExportFormat::Pdf => crate::export_pdf::pdf(
                &crate::export::markdown(&s, &events),
                &format!("berth - sessions/{}", s.id),
            ),
        })
    }

    pub(crate) async fn list_events(
        &self,
        project: &str,
        id: Uuid,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<Event>> {
        // NOT_FOUND for an unknown session, not an empty page.
        self.get(project, id).await?;
        self.store.list_events(id, after_seq, limit).await
    }

    /// Replays after `after_seq`, then tails.
    pub(crate) async fn stream(
        &self,
        project: &str,
        id: Uuid,
        after_seq: i64,
    ) -> Result<mpsc::Receiver<Result<Arc<Event>>>> {
        if after_seq < 0 {
            return Err(Error::invalid("after_seq", "must not be negative"));
        }
        self.get(project, id).await?;
        Ok(self.log.follow(id, after_seq, 128))
    }
}

/// A refused transition as the client should see it.
fn wrong_status(id: Uuid, e: Error, what: &'static str) -> Error {
    match e {
        Error::Transition(t) => Error::WrongStatus {
            id,
            status: t.from,
            what,
        },
        e => e,
    }
}

#[cfg(test)]
mod display_name_tests {
    use super::*;

    fn new(message: Option<&str>, agent: Option<&str>) -> NewSession {
        NewSession {
            request_id: None,
            display_name: String::new(),
            spec: crate::session::AgentSpec {
                image: "img:1".into(),
                ..Default::default()
            },
            labels: Default::default(),
            initial_message: message.map(String::from),
            timeout: None,
            agent: agent.map(String::from),
            resources: Vec::new(),
            inactivity_timeout: None,
            budget_usd: None,
            queue_timeout: None,
            pinned: None,
            run_params: Default::default(),
        }
    }

    #[test]
    fn a_name_comes_from_the_first_message_or_the_agent() {
        assert_eq!(
            display_name_for(&new(Some("  fix the\nlogin bug  "), None)),
            "fix the login bug"
        );
        let long =
            "summarise every open issue in the tracker and group them by component please now";
        let name = display_name_for(&new(Some(long), None));
        assert!(name.chars().count() <= 61 && name.ends_with('…'), "{name}");
        assert!(long.starts_with(name.trim_end_matches('…')), "{name}");
        assert_eq!(display_name_for(&new(None, Some("coder"))), "coder session");
        assert_eq!(display_name_for(&new(Some("   "), None)), "img:1 session");
        let one_word = "x".repeat(100);
        assert_eq!(
            display_name_for(&new(Some(&one_word), None))
                .chars()
                .count(),
            60
        );
    }
}

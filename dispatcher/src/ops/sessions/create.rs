//! Creating sessions: the checks of a new session (agent, resources,
//! the fleet's limits) and its queueing; a clone is a create.

use uuid::Uuid;

use super::Sessions;
use crate::error::{Error, Result};
use crate::ops::audit::{Action, Detail, entry};
use crate::session::{NewSession, Resource, Session};
use crate::store::{AuditEntry, Created};

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

/// What asked for a new session, as its audit record says.
pub(crate) enum Origin {
    /// A client's `CreateSession`.
    Client,
    /// An inbound webhook's delivery.
    Webhook { delivery: String, agent: String },
    /// A schedule's fire at `fire_time` (RFC 3339).
    Schedule { fire_time: String, agent: String },
}

impl Origin {
    fn detail(self, new: &NewSession) -> Detail {
        match self {
            Origin::Client => Detail::Created {
                request_id: new.request_id.clone(),
                agent: new.agent.clone(),
                image: new.spec.image.clone(),
            },
            Origin::Webhook { delivery, agent } => Detail::Delivered { delivery, agent },
            Origin::Schedule { fire_time, agent } => Detail::Fired { fire_time, agent },
        }
    }
}

impl Sessions {
    /// Resolves the agent (pinning its version), checks the resources, queues.
    pub(crate) async fn create(
        &self,
        project: &str,
        mut new: NewSession,
        by: &str,
        origin: Origin,
    ) -> Result<Session> {
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
        self.check_secrets(project, &new.spec, &new.resources)
            .await?;
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
        let audit = entry(by, Action::SessionCreate, origin.detail(&new));
        let Created {
            session,
            created,
            asked,
            ..
        } = self.insert(project, &new, &fingerprint, &audit).await?;
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

    /// Stores a new session (or finds the one its request id made): claimed
    /// here in the same statement when this dispatcher has a slot for it
    /// and nothing waits, and then handed to this dispatcher's claim loop
    /// (or, if that has stopped, given back to the queue).
    async fn insert(
        &self,
        project: &str,
        new: &NewSession,
        fingerprint: &[u8],
        audit: &AuditEntry,
    ) -> Result<Created> {
        let here = self.handoff.reserve(self.nodes.free_slots());
        let mut stored = self
            .store
            .create_session(project, new, fingerprint, audit, here.as_ref().map(|h| h.0))
            .await?;
        if let (Some(claimed), Some((_, reservation))) = (stored.claimed.take(), here)
            && let Err(claimed) = self.handoff.send(claimed, reservation)
        {
            crate::handoff::give_back(&self.log, &claimed).await;
        }
        Ok(stored)
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

    /// A new pending session with the same configuration and no history.
    pub(crate) async fn clone_session(
        &self,
        project: &str,
        id: Uuid,
        request_id: Option<String>,
        by: &str,
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
        let from = berth_common::names::session_name(id);
        let audit = entry(by, Action::SessionClone, Detail::ClonedFrom { from });
        let Created { session: clone, .. } = self
            .insert(project, &new, &new.fingerprint(), &audit)
            .await?;
        tracing::info!(session_id = %clone.id, from = %id, "session cloned");
        Ok(clone)
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

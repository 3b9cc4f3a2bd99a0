//! `berth.v1.Agents` and `berth.v1.Files`.

use berth_common::names;
use berth_proto::v1::{
    self as pb, agents_server::Agents as AgentsApi, files_server::Files as FilesApi,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::agent_spec;
use crate::access::auth::caller;
use crate::error::Error;
use crate::ops::agents::Agents;
use crate::session::limits;

/// Serves `berth.v1.Agents` and `berth.v1.Files`.
#[derive(Clone)]
pub struct AgentsService {
    pub agents: Agents,
}

/// The id and optional pinned version in `agents/{id}[@{version}]`.
fn agent_name(name: &str) -> Result<(&str, Option<i64>), Error> {
    if name.is_empty() {
        return Err(Error::invalid(
            "name",
            "required: `agents/{id}` or the agent id",
        ));
    }
    names::agent_ref(name).map_err(|e| Error::invalid("name", e))
}

fn file_id(name: &str) -> Result<Uuid, Error> {
    if name.is_empty() {
        return Err(Error::invalid("name", "required: `files/{id}`"));
    }
    let id = names::file_id(name);
    Uuid::parse_str(id).map_err(|_| Error::NotFound(format!("file files/{id} not found")))
}

#[tonic::async_trait]
impl AgentsApi for AgentsService {
    async fn create_agent(
        &self,
        r: Request<pb::CreateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        if !names::is_agent_id(&r.agent_id) {
            return Err(Error::invalid(
                "agent_id",
                "1-63 lowercase letters, digits and `-`, starting with a letter",
            )
            .into());
        }
        let spec = agent_spec(r.spec)?;
        let a = self
            .agents
            .create(&who.project, &r.agent_id, &spec, &who.identity())
            .await?;
        Ok(Response::new(a.into()))
    }

    async fn get_agent(
        &self,
        r: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let (id, pinned) = agent_name(&r.name)?;
        let version = match (r.version, pinned) {
            (v, _) if v < 0 => return Err(Error::invalid("version", "must not be negative").into()),
            (0, p) => p,
            (v, None) => Some(v),
            (v, Some(p)) if v == p => Some(v),
            (_, Some(_)) => {
                return Err(Error::invalid("version", "differs from the version in `name`").into());
            }
        };
        Ok(Response::new(
            self.agents.get(&who.project, id, version).await?.into(),
        ))
    }

    async fn list_agents(
        &self,
        r: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let limit = match r.page_size {
            0 => 50,
            1..=1000 => i64::from(r.page_size),
            _ => return Err(Error::invalid("page_size", "must be between 1 and 1000").into()),
        };
        let listing = format!("ListAgents\n{}\n{}", who.project, r.show_archived);
        let after = super::pages::decode(&r.page_token, &listing)?.unwrap_or_default();
        let agents = self
            .agents
            .list(&who.project, &after, r.show_archived, limit)
            .await?;
        let next_page_token = match agents.last() {
            Some(last) if agents.len() as i64 == limit => super::pages::encode(&listing, &last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.into_iter().map(Into::into).collect(),
            next_page_token,
        }))
    }

    async fn update_agent(
        &self,
        r: Request<pb::UpdateAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let (id, pinned) = agent_name(&r.name)?;
        if pinned.is_some() {
            return Err(Error::invalid(
                "name",
                "name the agent, not a version: versions are immutable",
            )
            .into());
        }
        let spec = agent_spec(r.spec)?;
        let a = self
            .agents
            .update(&who.project, id, &spec, &who.identity())
            .await?;
        Ok(Response::new(a.into()))
    }

    async fn archive_agent(
        &self,
        r: Request<pb::ArchiveAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let who = caller(&r)?;
        let name = r.into_inner().name;
        let (id, _) = agent_name(&name)?;
        let a = self
            .agents
            .archive(&who.project, id, &who.identity())
            .await?;
        Ok(Response::new(a.into()))
    }
}

#[tonic::async_trait]
impl FilesApi for AgentsService {
    async fn upload_file(
        &self,
        r: Request<pb::UploadFileRequest>,
    ) -> Result<Response<pb::File>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        if r.content.len() > limits::FILE_BYTES {
            return Err(Error::invalid(
                "content",
                format!(
                    "{} bytes; the limit is {}",
                    r.content.len(),
                    limits::FILE_BYTES
                ),
            )
            .into());
        }
        if r.display_name.chars().count() > limits::DISPLAY_NAME_CHARS {
            return Err(Error::invalid("display_name", "longer than 256 characters").into());
        }
        let f = self
            .agents
            .upload_file(&who.project, r.display_name, bytes::Bytes::from(r.content))
            .await?;
        Ok(Response::new(f.into()))
    }

    async fn get_file(&self, r: Request<pb::GetFileRequest>) -> Result<Response<pb::File>, Status> {
        let who = caller(&r)?;
        let id = file_id(&r.into_inner().name)?;
        Ok(Response::new(
            self.agents.get_file(&who.project, id).await?.into(),
        ))
    }

    async fn delete_file(
        &self,
        r: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let who = caller(&r)?;
        let id = file_id(&r.into_inner().name)?;
        self.agents.delete_file(&who.project, id).await?;
        Ok(Response::new(pb::DeleteFileResponse {}))
    }
}

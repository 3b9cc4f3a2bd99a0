//! `berth.v1.ApiKeys` and `berth.v1.Secrets`.

use berth_common::grpc::rich_status;
use berth_common::names;
use berth_proto::v1::{
    self as pb, api_keys_server::ApiKeys as ApiKeysApi, secrets_server::Secrets as SecretsApi,
};
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::access::auth::{Caller, Role, caller};
use crate::error::Error;
use crate::ops::access::{Keys, Secrets};
use crate::store::{
    ApiKeyRow, SecretRow, SecretShape, USAGE_ANTHROPIC_API_KEY, USAGE_GIT_SSH_KEY,
    USAGE_HTTP_HEADER, USAGE_OAUTH2_REFRESH,
};
use berth_common::time::to_timestamp as timestamp;

/// Serves `berth.v1.ApiKeys`.
pub struct ApiKeysService {
    pub keys: Keys,
}

fn role_from_pb(r: i32) -> Result<Role, Error> {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Unspecified | pb::Role::Member) => Ok(Role::Member),
        Ok(pb::Role::FleetAdmin) => Ok(Role::FleetAdmin),
        Err(_) => Err(Error::invalid("role", format!("unknown role {r}"))),
    }
}

fn key_pb(k: ApiKeyRow) -> pb::ApiKey {
    let role = match Role::parse(&k.role) {
        Some(Role::FleetAdmin) => pb::Role::FleetAdmin,
        Some(Role::Member) => pb::Role::Member,
        None => pb::Role::Unspecified,
    };
    pb::ApiKey {
        name: format!("apiKeys/{}", k.id),
        key_id: k.id,
        project: k.project,
        role: role as i32,
        display_name: k.display_name,
        create_time: Some(timestamp(k.create_time)),
        revoke_time: k.revoke_time.map(timestamp),
    }
}

/// The project a request names: the caller's when empty; another only for
/// a fleet admin.
fn target_project(who: &Caller, requested: &str) -> Result<String, Status> {
    if requested.is_empty() || requested == who.project {
        return Ok(who.project.clone());
    }
    who.require_admin("another project's keys")?;
    if !names::is_agent_id(requested) {
        return Err(Error::invalid(
            "project",
            "1-63 lowercase letters, digits and `-`, starting with a letter",
        )
        .into());
    }
    Ok(requested.to_string())
}

#[tonic::async_trait]
impl ApiKeysApi for ApiKeysService {
    async fn create_api_key(
        &self,
        r: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let project = target_project(&who, &r.project)?;
        let role = role_from_pb(r.role)?;
        if role == Role::FleetAdmin {
            who.require_admin("a fleet-admin key")?;
        }
        let (key, token) = self
            .keys
            .create(&who, &project, role, &r.display_name)
            .await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(key_pb(key)),
            token,
        }))
    }

    async fn list_api_keys(
        &self,
        r: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let project = if r.project == "*" {
            who.require_admin("every project's keys")?;
            None
        } else {
            Some(target_project(&who, &r.project)?)
        };
        let keys = self
            .keys
            .store
            .list_api_keys(project.as_deref(), r.show_revoked)
            .await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.into_iter().map(key_pb).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        r: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let who = caller(&r)?;
        let name = r.into_inner().name;
        let id = name.strip_prefix("apiKeys/").unwrap_or(&name);
        if id.is_empty() {
            return Err(Error::invalid("name", "required: `apiKeys/{key_id}`").into());
        }
        // Another project's keys are NOT_FOUND to a member; its project's
        // are its to revoke only as `keys::may_revoke` says.
        let not_found = || Error::NotFound(format!("API key apiKeys/{id} not found"));
        let found = self.keys.store.api_key(id).await?.ok_or_else(not_found)?;
        match crate::access::keys::may_revoke(&who, &found) {
            Ok(()) => {}
            Err(crate::access::keys::Refusal::NotFound) => return Err(not_found().into()),
            Err(crate::access::keys::Refusal::Denied(why)) => {
                return Err(rich_status(
                    Code::PermissionDenied,
                    format!("cannot revoke apiKeys/{id}: {why}"),
                    "KEY_NOT_YOURS",
                    None,
                    None,
                ));
            }
        }
        let key = self.keys.revoke(&who, id, &found.project).await?;
        Ok(Response::new(key_pb(key)))
    }

    async fn who_am_i(
        &self,
        r: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let who = caller(&r)?;
        let Some(id) = &who.key_id else {
            let role = match who.role {
                Role::FleetAdmin => pb::Role::FleetAdmin,
                Role::Member => pb::Role::Member,
            };
            let display_name = match &who.certificate {
                Some(name) => format!("client certificate {name}"),
                None => "anonymous (--allow-anonymous)".into(),
            };
            return Ok(Response::new(pb::ApiKey {
                project: who.project.clone(),
                role: role as i32,
                display_name,
                ..pb::ApiKey::default()
            }));
        };
        let key = self
            .keys
            .store
            .api_key(id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("API key apiKeys/{id} not found")))?;
        Ok(Response::new(key_pb(key)))
    }
}

/// Serves `berth.v1.Secrets`.
pub struct SecretsService {
    pub secrets: Secrets,
}

fn usage_to_str(u: i32) -> Result<&'static str, Error> {
    match pb::SecretUsage::try_from(u) {
        Ok(pb::SecretUsage::AnthropicApiKey) => Ok(USAGE_ANTHROPIC_API_KEY),
        Ok(pb::SecretUsage::GitSshKey) => Ok(USAGE_GIT_SSH_KEY),
        Ok(pb::SecretUsage::HttpHeader) => Ok(USAGE_HTTP_HEADER),
        Ok(pb::SecretUsage::Oauth2Refresh) => Ok(USAGE_OAUTH2_REFRESH),
        Ok(pb::SecretUsage::Unspecified) => Err(Error::invalid(
            "usage",
            "required: how sessions use the secret (SECRET_USAGE_ANTHROPIC_API_KEY, SECRET_USAGE_GIT_SSH_KEY, SECRET_USAGE_HTTP_HEADER or SECRET_USAGE_OAUTH2_REFRESH)",
        )),
        Err(_) => Err(Error::invalid("usage", format!("unknown usage {u}"))),
    }
}

fn usage_from_str(u: &str) -> pb::SecretUsage {
    match u {
        USAGE_ANTHROPIC_API_KEY => pb::SecretUsage::AnthropicApiKey,
        USAGE_GIT_SSH_KEY => pb::SecretUsage::GitSshKey,
        USAGE_HTTP_HEADER => pb::SecretUsage::HttpHeader,
        USAGE_OAUTH2_REFRESH => pb::SecretUsage::Oauth2Refresh,
        _ => pb::SecretUsage::Unspecified,
    }
}

fn secret_pb(s: SecretRow) -> pb::Secret {
    pb::Secret {
        name: format!("secrets/{}", s.id),
        secret_id: s.id.to_string(),
        display_name: s.display_name,
        usage: usage_from_str(&s.usage) as i32,
        create_time: Some(timestamp(s.create_time)),
        header: (!s.hosts.is_empty()).then_some(pb::HttpHeader {
            name: s.header_name,
            prefix: s.header_prefix,
        }),
        hosts: s.hosts,
        last_use_time: s.last_use_time.map(timestamp),
        oauth: (s.usage == USAGE_OAUTH2_REFRESH).then_some(pb::OAuth2Client {
            token_url: s.oauth_token_url,
            client_id: s.oauth_client_id,
            client_secret: String::new(),
            scope: s.oauth_scope,
        }),
        last_refresh_time: s.last_refresh_time.map(timestamp),
        last_refresh_error: s.last_refresh_error,
        access_expire_time: s.access_expire_time.map(timestamp),
    }
}

fn secret_id(name: &str) -> Result<Uuid, Error> {
    let id = name.strip_prefix("secrets/").unwrap_or(name);
    if id.is_empty() {
        return Err(Error::invalid("name", "required: `secrets/{id}`"));
    }
    Uuid::parse_str(id).map_err(|_| Error::NotFound(format!("secret secrets/{id} not found")))
}

#[tonic::async_trait]
impl SecretsApi for SecretsService {
    async fn create_secret(
        &self,
        r: Request<pb::CreateSecretRequest>,
    ) -> Result<Response<pb::Secret>, Status> {
        let who = caller(&r)?;
        let r = r.into_inner();
        let header = r.header.unwrap_or_default();
        let oauth = r.oauth.clone().unwrap_or_default();
        let shape = SecretShape {
            display_name: r.display_name,
            usage: usage_to_str(r.usage)?,
            hosts: r.hosts,
            header_name: header.name,
            header_prefix: header.prefix,
            oauth_token_url: oauth.token_url,
            oauth_client_id: oauth.client_id,
            oauth_scope: oauth.scope,
        };
        let row = self
            .secrets
            .create(
                &who,
                shape,
                &r.value,
                r.oauth.is_some().then_some(&oauth.client_secret),
            )
            .await?;
        Ok(Response::new(secret_pb(row)))
    }

    async fn get_secret(
        &self,
        r: Request<pb::GetSecretRequest>,
    ) -> Result<Response<pb::Secret>, Status> {
        let who = caller(&r)?;
        let id = secret_id(&r.into_inner().name)?;
        Ok(Response::new(secret_pb(
            self.secrets.store.get_secret(&who.project, id).await?,
        )))
    }

    async fn list_secrets(
        &self,
        r: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let who = caller(&r)?;
        let secrets = self.secrets.store.list_secrets(&who.project).await?;
        Ok(Response::new(pb::ListSecretsResponse {
            secrets: secrets.into_iter().map(secret_pb).collect(),
        }))
    }

    async fn delete_secret(
        &self,
        r: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let who = caller(&r)?;
        let id = secret_id(&r.into_inner().name)?;
        self.secrets.delete(&who, id).await?;
        Ok(Response::new(pb::DeleteSecretResponse {}))
    }
}

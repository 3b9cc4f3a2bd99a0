//! API keys and secrets (sealed values), each row in one project.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Store;
use crate::error::{Error, Result};

mod sql {
    pub const INSERT_KEY: &str = "INSERT INTO api_keys (id, project, role, display_name, token_sha256, creator) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         RETURNING id, project, role, display_name, creator, create_time, revoke_time";

    pub const KEY_RECORD: &str = "SELECT project, role, token_sha256, revoke_time IS NOT NULL AS revoked FROM api_keys WHERE id = $1";

    /// `$1` NULL = every project.
    pub const LIST_KEYS: &str = "SELECT id, project, role, display_name, creator, create_time, revoke_time \
         FROM api_keys WHERE ($1::text IS NULL OR project = $1) AND ($2 OR revoke_time IS NULL) \
         ORDER BY project, create_time, id";

    /// `$2` NULL = any project.
    pub const REVOKE_KEY: &str = "UPDATE api_keys SET revoke_time = coalesce(revoke_time, now()) \
         WHERE id = $1 AND ($2::text IS NULL OR project = $2) \
         RETURNING id, project, role, display_name, creator, create_time, revoke_time";

    pub const KEY: &str = "SELECT id, project, role, display_name, creator, create_time, revoke_time \
         FROM api_keys WHERE id = $1";

    /// Keys revoked after `$1`, with when (served by `api_keys_revoked`).
    pub const REVOKED_SINCE: &str =
        "SELECT id, revoke_time FROM api_keys WHERE revoke_time > $1 ORDER BY revoke_time";

    /// One bootstrap at a time across dispatchers.
    pub const BOOTSTRAP_LOCK: &str =
        "SELECT pg_advisory_xact_lock(hashtext('berth.bootstrap_admin'))";

    pub const ACTIVE_ADMINS: &str =
        "SELECT count(*) FROM api_keys WHERE role = 'fleet_admin' AND revoke_time IS NULL";

    pub const INSERT_SECRET: &str = "INSERT INTO secrets \
         (id, project, display_name, usage, sealed, kek, hosts, header_name, header_prefix, \
          oauth_token_url, oauth_client_id, oauth_scope) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         RETURNING id, display_name, usage, create_time, hosts, header_name, header_prefix, last_use_time, \
         oauth_token_url, oauth_client_id, oauth_scope, last_refresh_time, last_refresh_error, \
         access_expire_time";

    pub const GET_SECRET: &str = "SELECT id, display_name, usage, create_time, hosts, header_name, header_prefix, last_use_time, \
         oauth_token_url, oauth_client_id, oauth_scope, last_refresh_time, last_refresh_error, \
         access_expire_time FROM secrets \
         WHERE project = $1 AND id = $2";

    pub const LIST_SECRETS: &str = "SELECT id, display_name, usage, create_time, hosts, header_name, header_prefix, last_use_time, \
         oauth_token_url, oauth_client_id, oauth_scope, last_refresh_time, last_refresh_error, \
         access_expire_time FROM secrets \
         WHERE project = $1 ORDER BY create_time, id";

    /// A node reported using credential `$1`; at most one write a minute.
    pub const CREDENTIAL_USED: &str = "UPDATE secrets SET last_use_time = now() \
         WHERE id = $1 AND (last_use_time IS NULL OR last_use_time < now() - interval '1 minute')";

    pub const DELETE_SECRET: &str = "DELETE FROM secrets WHERE project = $1 AND id = $2";

    pub const SEALED_SECRETS: &str = "SELECT id, usage, sealed, hosts, header_name, header_prefix \
         FROM secrets WHERE project = $1 AND id = ANY($2)";

    /// Sealed values under another KEK than `$1`, a batch at a time.
    pub const STALE_SECRETS: &str =
        "SELECT id::text, project, sealed FROM secrets WHERE kek <> $1 LIMIT 500";
    pub const STALE_SESSION_ENV: &str =
        "SELECT id::text, project, env_sealed FROM sessions WHERE env_kek <> $1 LIMIT 500";
    pub const STALE_AGENT_ENV: &str = "SELECT agent_id || '@' || version, project, env_sealed \
         FROM agent_versions WHERE env_kek <> $1 LIMIT 500";
    /// Compare-and-set on the old value: a concurrent rewrap of the same row wins once.
    pub const STALE_WEBHOOKS: &str =
        "SELECT id::text, project, sealed FROM webhooks WHERE kek <> $1 LIMIT 500";
    pub const REWRAP_WEBHOOK: &str =
        "UPDATE webhooks SET sealed = $3, kek = $4 WHERE id = $1::uuid AND sealed = $2";
    pub const STALE_SUBSCRIPTIONS: &str =
        "SELECT id::text, project, sealed FROM subscriptions WHERE kek <> $1 LIMIT 500";
    pub const REWRAP_SUBSCRIPTION: &str =
        "UPDATE subscriptions SET sealed = $3, kek = $4 WHERE id = $1::uuid AND sealed = $2";
    pub const REWRAP_SECRET: &str =
        "UPDATE secrets SET sealed = $3, kek = $4 WHERE id = $1::uuid AND sealed = $2";
    pub const REWRAP_SESSION_ENV: &str =
        "UPDATE sessions SET env_sealed = $3, env_kek = $4 WHERE id = $1::uuid AND env_sealed = $2";
    pub const REWRAP_AGENT_ENV: &str = "UPDATE agent_versions SET env_sealed = $3, env_kek = $4 \
         WHERE agent_id || '@' || version = $1 AND env_sealed = $2";
}

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Uses its own project.
    Member,
    /// Also manages nodes and every project's keys.
    FleetAdmin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::FleetAdmin => "fleet_admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Role::Member),
            "fleet_admin" => Some(Role::FleetAdmin),
            _ => None,
        }
    }
}

/// A key as the store has it.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub project: String,
    pub role: Role,
    pub sha256: Vec<u8>,
    pub revoked: bool,
}

/// How a secret is stored when sessions send it as their model API key.
pub(crate) const USAGE_ANTHROPIC_API_KEY: &str = "anthropic_api_key";
/// How a secret is stored when git resources clone over ssh with it.
pub(crate) const USAGE_GIT_SSH_KEY: &str = "git_ssh_key";
/// How a credential the gateway sends as an HTTP header is stored.
pub(crate) const USAGE_HTTP_HEADER: &str = "http_header";
/// How an OAuth 2.0 refresh credential is stored (the sealed value holds the
/// refresh token and the client secret).
pub(crate) const USAGE_OAUTH2_REFRESH: &str = "oauth2_refresh";

/// What sealed secrets are bound to: their project.
pub(crate) fn secret_context(project: &str) -> String {
    format!("secret/{project}")
}

/// An API key's public part.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ApiKeyRow {
    pub id: String,
    pub project: String,
    pub role: String,
    pub display_name: String,
    /// Who made it (`keys/{id}`, `certificates/{name}`, `anonymous`,
    /// `bootstrap`; '' for keys from before this was kept).
    pub creator: String,
    pub create_time: DateTime<Utc>,
    pub revoke_time: Option<DateTime<Utc>>,
}

/// A secret without its value.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct SecretRow {
    pub id: Uuid,
    pub display_name: String,
    pub usage: String,
    pub create_time: DateTime<Utc>,
    /// Credentials: where they may be sent, and how.
    pub hosts: Vec<String>,
    pub header_name: String,
    pub header_prefix: String,
    pub last_use_time: Option<DateTime<Utc>>,
    /// OAuth credentials: the client, and the last refresh.
    pub oauth_token_url: String,
    pub oauth_client_id: String,
    pub oauth_scope: String,
    pub last_refresh_time: Option<DateTime<Utc>>,
    pub last_refresh_error: String,
    pub access_expire_time: Option<DateTime<Utc>>,
}

/// A secret as a run opens it: still sealed, with what says where it goes.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct SealedSecret {
    pub id: Uuid,
    pub usage: String,
    pub sealed: Vec<u8>,
    pub hosts: Vec<String>,
    pub header_name: String,
    pub header_prefix: String,
}

/// What a new secret is besides its sealed value.
#[derive(Debug, Clone, Default)]
pub(crate) struct SecretShape {
    pub display_name: String,
    pub usage: &'static str,
    pub hosts: Vec<String>,
    pub header_name: String,
    pub header_prefix: String,
    /// OAuth credentials' client (its secret is sealed with the value).
    pub oauth_token_url: String,
    pub oauth_client_id: String,
    pub oauth_scope: String,
}

/// Which sealed column a rewrap batch reads.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SealedTable {
    Secrets,
    SessionEnv,
    AgentEnv,
    Webhooks,
    Subscriptions,
}

impl Store {
    pub(crate) async fn insert_api_key(
        &self,
        id: &str,
        project: &str,
        role: Role,
        display_name: &str,
        sha256: &[u8],
        creator: &str,
    ) -> Result<ApiKeyRow> {
        Ok(sqlx::query_as(sql::INSERT_KEY)
            .bind(id)
            .bind(project)
            .bind(role.as_str())
            .bind(display_name)
            .bind(sha256)
            .bind(creator)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Keys revoked after `since`, oldest first, with when.
    pub(crate) async fn revoked_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>> {
        Ok(sqlx::query_as(sql::REVOKED_SINCE)
            .bind(since)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The key's project, role, hash and whether it is revoked.
    pub(crate) async fn api_key_record(&self, id: &str) -> Result<Option<KeyRecord>> {
        let row: Option<(String, String, Vec<u8>, bool)> = sqlx::query_as(sql::KEY_RECORD)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|(project, role, sha256, revoked)| {
            Ok(KeyRecord {
                project,
                role: Role::parse(&role).ok_or_else(|| {
                    Error::Internal(format!("key {id} has unknown role `{role}`"))
                })?,
                sha256,
                revoked,
            })
        })
        .transpose()
    }

    pub(crate) async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRow>> {
        Ok(sqlx::query_as(sql::KEY)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Keys of `project` (`None` = all projects).
    pub(crate) async fn list_api_keys(
        &self,
        project: Option<&str>,
        show_revoked: bool,
    ) -> Result<Vec<ApiKeyRow>> {
        Ok(sqlx::query_as(sql::LIST_KEYS)
            .bind(project)
            .bind(show_revoked)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Revokes `id` if it is in `project` (`None` = any).
    pub(crate) async fn revoke_api_key(
        &self,
        id: &str,
        project: Option<&str>,
    ) -> Result<Option<ApiKeyRow>> {
        Ok(sqlx::query_as(sql::REVOKE_KEY)
            .bind(id)
            .bind(project)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Inserts the given fleet-admin key if no active one exists; true if
    /// it did. Serialized across dispatchers.
    pub(crate) async fn bootstrap_admin(
        &self,
        id: &str,
        project: &str,
        sha256: &[u8],
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(sql::BOOTSTRAP_LOCK).execute(&mut *tx).await?;
        let active: i64 = sqlx::query_scalar(sql::ACTIVE_ADMINS)
            .fetch_one(&mut *tx)
            .await?;
        if active > 0 {
            return Ok(false);
        }
        sqlx::query(sql::INSERT_KEY)
            .bind(id)
            .bind(project)
            .bind(Role::FleetAdmin.as_str())
            .bind("bootstrap")
            .bind(sha256)
            .bind("bootstrap")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn insert_secret(
        &self,
        id: Uuid,
        project: &str,
        shape: &SecretShape,
        sealed: &[u8],
        kek: &str,
    ) -> Result<SecretRow> {
        Ok(sqlx::query_as(sql::INSERT_SECRET)
            .bind(id)
            .bind(project)
            .bind(&shape.display_name)
            .bind(shape.usage)
            .bind(sealed)
            .bind(kek)
            .bind(&shape.hosts)
            .bind(&shape.header_name)
            .bind(&shape.header_prefix)
            .bind(&shape.oauth_token_url)
            .bind(&shape.oauth_client_id)
            .bind(&shape.oauth_scope)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Records that a node attached credential `id` (at most one write a
    /// minute per credential).
    pub(crate) async fn credential_used(&self, id: Uuid) -> Result<()> {
        sqlx::query(sql::CREDENTIAL_USED)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn get_secret(&self, project: &str, id: Uuid) -> Result<SecretRow> {
        sqlx::query_as(sql::GET_SECRET)
            .bind(project)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| Error::NotFound(format!("secret secrets/{id} not found")))
    }

    pub(crate) async fn list_secrets(&self, project: &str) -> Result<Vec<SecretRow>> {
        Ok(sqlx::query_as(sql::LIST_SECRETS)
            .bind(project)
            .fetch_all(&self.pool)
            .await?)
    }

    pub(crate) async fn delete_secret(&self, project: &str, id: Uuid) -> Result<bool> {
        let r = sqlx::query(sql::DELETE_SECRET)
            .bind(project)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Those of `ids` in `project`, sealed.
    pub(crate) async fn sealed_secrets(
        &self,
        project: &str,
        ids: &[Uuid],
    ) -> Result<Vec<SealedSecret>> {
        Ok(sqlx::query_as(sql::SEALED_SECRETS)
            .bind(project)
            .bind(ids)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Up to 500 `(row key, project, sealed)` of `table` not under `kek`.
    pub(crate) async fn stale_sealed(
        &self,
        table: SealedTable,
        kek: &str,
    ) -> Result<Vec<(String, String, Vec<u8>)>> {
        let q = match table {
            SealedTable::Secrets => sql::STALE_SECRETS,
            SealedTable::SessionEnv => sql::STALE_SESSION_ENV,
            SealedTable::AgentEnv => sql::STALE_AGENT_ENV,
            SealedTable::Webhooks => sql::STALE_WEBHOOKS,
            SealedTable::Subscriptions => sql::STALE_SUBSCRIPTIONS,
        };
        Ok(sqlx::query_as(q).bind(kek).fetch_all(&self.pool).await?)
    }

    /// Replaces `old` with `new` (sealed under `kek`) in one row.
    pub(crate) async fn rewrap_sealed(
        &self,
        table: SealedTable,
        key: &str,
        old: &[u8],
        new: &[u8],
        kek: &str,
    ) -> Result<()> {
        let q = match table {
            SealedTable::Secrets => sql::REWRAP_SECRET,
            SealedTable::SessionEnv => sql::REWRAP_SESSION_ENV,
            SealedTable::AgentEnv => sql::REWRAP_AGENT_ENV,
            SealedTable::Webhooks => sql::REWRAP_WEBHOOK,
            SealedTable::Subscriptions => sql::REWRAP_SUBSCRIPTION,
        };
        sqlx::query(q)
            .bind(key)
            .bind(old)
            .bind(new)
            .bind(kek)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

//! OAuth 2.0 refresh credentials: their client, the current access token
//! (sealed) and when it expires, and the lease under which one dispatcher
//! at a time refreshes one (a rotated refresh token must be spent once).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::Store;
use crate::error::Result;

mod sql {
    const COLS: &str = "id, project, oauth_token_url, oauth_client_id, oauth_scope, sealed, \
         access_sealed, access_expire_time, last_refresh_time";

    pub fn state() -> String {
        format!("SELECT {COLS} FROM secrets WHERE id = $1 AND usage = 'oauth2_refresh'")
    }

    /// Takes the lease when nobody holds it (or it lapsed).
    pub fn claim() -> String {
        format!(
            "UPDATE secrets SET refresh_lease_until = now() + $3 * interval '1 millisecond', \
             refresh_lease_owner = $2 \
             WHERE id = $1 AND usage = 'oauth2_refresh' \
             AND (refresh_lease_until IS NULL OR refresh_lease_until < now() OR refresh_lease_owner = $2) \
             RETURNING {COLS}"
        )
    }

    /// A refresh's result, by the lease's holder only; the lease ends.
    pub const REFRESHED: &str = "UPDATE secrets SET access_sealed = $3, access_kek = $4, \
         access_expire_time = $5, sealed = coalesce($6, sealed), kek = coalesce($7, kek), \
         last_refresh_time = now(), last_refresh_error = '', refresh_lease_until = NULL \
         WHERE id = $1 AND refresh_lease_owner = $2";

    pub const FAILED: &str = "UPDATE secrets SET last_refresh_time = now(), last_refresh_error = $3, \
         access_sealed = NULL, access_expire_time = NULL, refresh_lease_until = NULL \
         WHERE id = $1 AND refresh_lease_owner = $2";
}

/// An OAuth credential as the store has it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct OAuthRow {
    pub id: Uuid,
    pub project: String,
    pub oauth_token_url: String,
    pub oauth_client_id: String,
    pub oauth_scope: String,
    /// The refresh token and client secret (JSON), sealed.
    pub sealed: Vec<u8>,
    pub access_sealed: Option<Vec<u8>>,
    pub access_expire_time: Option<DateTime<Utc>>,
    pub last_refresh_time: Option<DateTime<Utc>>,
}

/// What a refresh produced, sealed.
#[derive(Debug)]
pub(crate) struct Refreshed<'a> {
    pub access_sealed: &'a [u8],
    pub expires: DateTime<Utc>,
    /// A rotated refresh token (with the client secret), when the endpoint
    /// sent one.
    pub sealed: Option<&'a [u8]>,
    pub kek: &'a str,
}

impl Store {
    pub(crate) async fn oauth_state(&self, id: Uuid) -> Result<Option<OAuthRow>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql::state()))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The row, with the refresh lease held by `owner` for `lease`; `None`
    /// while another holds it.
    pub(crate) async fn claim_oauth_refresh(
        &self,
        id: Uuid,
        owner: &str,
        lease: std::time::Duration,
    ) -> Result<Option<OAuthRow>> {
        Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql::claim()))
            .bind(id)
            .bind(owner)
            .bind(lease.as_millis() as f64)
            .fetch_optional(&self.pool)
            .await?)
    }

    pub(crate) async fn oauth_refreshed(
        &self,
        id: Uuid,
        owner: &str,
        r: &Refreshed<'_>,
    ) -> Result<()> {
        sqlx::query(sql::REFRESHED)
            .bind(id)
            .bind(owner)
            .bind(r.access_sealed)
            .bind(r.kek)
            .bind(r.expires)
            .bind(r.sealed)
            .bind(r.sealed.map(|_| r.kek))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn oauth_failed(&self, id: Uuid, owner: &str, error: &str) -> Result<()> {
        sqlx::query(sql::FAILED)
            .bind(id)
            .bind(owner)
            .bind(error)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

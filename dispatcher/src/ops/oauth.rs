//! OAuth 2.0 refresh credentials: the dispatchers trade a credential's
//! refresh token for short-lived access tokens at its token endpoint
//! (`grant_type=refresh_token`), one dispatcher at a time per credential
//! (a lease in its row), and store a rotated refresh token back, sealed.
//! The refresh token and client secret never leave the dispatchers; nodes
//! get access tokens only.
//!
//! A token is refreshed when a run needs it and it is stale: past a third
//! of its life before expiry (at least a second, at most a minute early),
//! or refused by a host (a 401 a gateway reported). Errors name the token
//! endpoint's answer, never a token.

use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use uuid::Uuid;

pub(crate) use crate::records::Access;
use crate::store::{OAuthRow, Refreshed, Store, secret_context};

use super::HttpsClient;

/// How long one dispatcher holds a credential's refresh.
const LEASE: Duration = Duration::from_secs(30);
/// Longest a token endpoint may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a run waits for another dispatcher's refresh.
const WAIT: Duration = Duration::from_secs(15);
/// `expires_in` when the endpoint gives none.
const DEFAULT_LIFETIME: i64 = 3600;

/// When a token that was issued at `issued` and expires at `expires` is
/// stale: a third of its life early, at least 1 s, at most 60 s.
pub(crate) fn refresh_at(issued: DateTime<Utc>, expires: DateTime<Utc>) -> DateTime<Utc> {
    let life = (expires - issued).num_milliseconds().max(0);
    let early = (life / 3).clamp(1_000, 60_000);
    expires - chrono::Duration::milliseconds(early)
}

/// The refresh token and client secret, as sealed together.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct RefreshSecret {
    pub refresh_token: String,
    #[serde(default)]
    pub client_secret: String,
}

/// The token endpoint's answer (RFC 6749 §5.1).
#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Clone)]
pub(crate) struct OAuth {
    store: Store,
    client: HttpsClient,
    /// Who holds leases: this dispatcher.
    owner: String,
}

impl OAuth {
    pub(crate) fn new(store: Store, owner: String) -> anyhow::Result<Self> {
        Ok(Self {
            store,
            client: super::https_client()?,
            owner,
        })
    }

    /// A usable access token for credential `id`: the stored one while it
    /// is fresh and is not `refused` (the value a host answered 401 to);
    /// else one refresh. `Err` says why there is none, for the session.
    pub(crate) async fn access(&self, id: Uuid, refused: Option<&str>) -> Result<Access, String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let row = self
                .store
                .oauth_state(id)
                .await
                .map_err(|e| e.to_string())?;
            let row = row.ok_or_else(|| format!("secrets/{id} was deleted"))?;
            if let Some(a) = self.stored(&row)
                && Utc::now() < a.refresh_at
                && refused != Some(a.value.as_str())
            {
                return Ok(a);
            }
            let claimed = self
                .store
                .claim_oauth_refresh(id, &self.owner, LEASE)
                .await
                .map_err(|e| e.to_string())?;
            match claimed {
                Some(row) => return self.refresh(row).await,
                // Another dispatcher refreshes it: its result is stored.
                None if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                None => {
                    return Err(format!(
                        "another dispatcher has been refreshing it for over {WAIT:?} without a result; it is tried again in 30 s"
                    ));
                }
            }
        }
    }

    /// The stored access token, if it opens and has not expired.
    fn stored(&self, row: &OAuthRow) -> Option<Access> {
        let (sealed, expires) = (row.access_sealed.as_ref()?, row.access_expire_time?);
        if expires <= Utc::now() {
            return None;
        }
        let value = self
            .store
            .sealer()
            .open(&secret_context(&row.project), sealed)
            .ok()?;
        Some(Access {
            value: String::from_utf8(value).ok()?,
            expires,
            refresh_at: refresh_at(row.last_refresh_time.unwrap_or(expires), expires),
        })
    }

    /// One refresh under the lease; its result (or error) is stored.
    async fn refresh(&self, row: OAuthRow) -> Result<Access, String> {
        let id = row.id;
        let result = self.exchange(&row).await;
        let stored = match &result {
            Ok((access, rotated)) => {
                let sealer = self.store.sealer();
                let context = secret_context(&row.project);
                let access_sealed = sealer.seal(&context, access.value.as_bytes());
                let rotated = rotated
                    .as_ref()
                    .map(|r| sealer.seal(&context, r.as_bytes()));
                let r = Refreshed {
                    access_sealed: &access_sealed,
                    expires: access.expires,
                    sealed: rotated.as_deref(),
                    kek: sealer.primary(),
                };
                self.store.oauth_refreshed(id, &self.owner, &r).await
            }
            Err(why) => self.store.oauth_failed(id, &self.owner, why).await,
        };
        if let Err(e) = stored {
            // A rotated refresh token that is not stored is lost: say so.
            tracing::error!(credential_id = %id, error = %e, "could not store an OAuth refresh's result");
            return Err(format!("storing the refreshed token failed: {e}"));
        }
        match &result {
            Ok((a, rotated)) => {
                tracing::info!(credential_id = %id, expires = %a.expires, rotated = rotated.is_some(), "OAuth access token refreshed");
            }
            Err(why) => {
                tracing::warn!(credential_id = %id, error = %why, "OAuth refresh failed");
            }
        }
        metrics::counter!(crate::metrics::OAUTH_REFRESHES, "outcome" => if result.is_ok() { "ok" } else { "error" })
            .increment(1);
        result.map(|(a, _)| a)
    }

    /// Calls the token endpoint: the access token, and the rotated refresh
    /// secret (sealed form's JSON) when it sent a new refresh token.
    async fn exchange(&self, row: &OAuthRow) -> Result<(Access, Option<String>), String> {
        let opened = self
            .store
            .sealer()
            .open(&secret_context(&row.project), &row.sealed)
            .map_err(|e| format!("opening the refresh token: {e}"))?;
        let secret: RefreshSecret = serde_json::from_slice(&opened)
            .map_err(|_| "the stored refresh token is unreadable".to_string())?;
        let body = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("refresh_token", &secret.refresh_token)
                .append_pair("client_id", &row.oauth_client_id);
            if !secret.client_secret.is_empty() {
                form.append_pair("client_secret", &secret.client_secret);
            }
            if !row.oauth_scope.is_empty() {
                form.append_pair("scope", &row.oauth_scope);
            }
            form.finish()
        };
        let req = http::Request::post(&row.oauth_token_url)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("token endpoint {}: {e}", row.oauth_token_url))?;
        let issued = Utc::now();
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(TIMEOUT, call)
            .await
            .map_err(|_| {
                format!(
                    "token endpoint {} did not answer within {TIMEOUT:?}",
                    row.oauth_token_url
                )
            })?
            .map_err(|e| format!("token endpoint {}: {e}", row.oauth_token_url))?;
        if !status.is_success() {
            // RFC 6749 §5.2: `error` and `error_description`, no secret.
            let err: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let code = err["error"].as_str().unwrap_or("no error code");
            let text = err["error_description"].as_str().unwrap_or_default();
            return Err(format!(
                "token endpoint {} answered {status}: {code} {text}",
                row.oauth_token_url
            )
            .trim_end()
            .to_string());
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
            format!(
                "token endpoint {} answered without an access_token",
                row.oauth_token_url
            )
        })?;
        let expires = issued
            + chrono::Duration::seconds(answer.expires_in.unwrap_or(DEFAULT_LIFETIME).max(1));
        let rotated = answer
            .refresh_token
            .filter(|t| *t != secret.refresh_token)
            .map(|refresh_token| {
                serde_json::to_string(&RefreshSecret {
                    refresh_token,
                    client_secret: secret.client_secret.clone(),
                })
                .unwrap_or_default()
            });
        Ok((
            Access {
                value: answer.access_token,
                expires,
                refresh_at: refresh_at(issued, expires),
            },
            rotated,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_refreshed_a_third_of_their_life_early_within_bounds() {
        let t0 = Utc::now();
        let at = |secs| refresh_at(t0, t0 + chrono::Duration::seconds(secs)) - t0;
        assert_eq!(at(3600), chrono::Duration::seconds(3540));
        assert_eq!(at(6), chrono::Duration::seconds(4));
        assert_eq!(at(2), chrono::Duration::seconds(1));
    }
}

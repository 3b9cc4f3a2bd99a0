//! API keys and secrets: the operations behind `berth.v1.ApiKeys` and
//! `berth.v1.Secrets`. Each checks its input, writes, and records itself in
//! the audit trail, once. Who may do what was decided before (the
//! handlers' caller checks, `access::keys::may_revoke`).

use std::sync::Arc;

use uuid::Uuid;

use crate::access::auth::{Authenticator, Caller, Role, new_token};
use crate::error::{Error, Result};
use crate::ops::audit::{Action, Audit, Detail};
use crate::store::{
    ApiKeyRow, SecretRow, SecretShape, Store, USAGE_HTTP_HEADER, USAGE_OAUTH2_REFRESH,
    secret_context,
};

/// Largest secret value.
pub const SECRET_BYTES: usize = 16 * 1024;

/// The API key operations.
#[derive(Clone)]
pub(crate) struct Keys {
    pub store: Store,
    pub audit: Audit,
    pub auth: Arc<Authenticator>,
}

impl Keys {
    /// Makes a key of `role` in `project` for `who`; returns it and its
    /// token (shown once).
    pub async fn create(
        &self,
        who: &Caller,
        project: &str,
        role: Role,
        display_name: &str,
    ) -> Result<(ApiKeyRow, String)> {
        check_display_name(display_name)?;
        let t = new_token();
        let key = self
            .store
            .insert_api_key(
                &t.key_id,
                project,
                role,
                display_name,
                &t.sha256,
                &who.identity(),
            )
            .await?;
        tracing::info!(key_id = %t.key_id, project, role = role.as_str(), by = ?who.key_id, "API key created");
        self.audit
            .record(
                project,
                &who.identity(),
                Action::KeyCreate,
                &format!("keys/{}", t.key_id),
                Detail::KeyRole {
                    role: role.as_str(),
                },
            )
            .await;
        Ok((key, t.token))
    }

    /// Revokes key `id` of `project` (the caller was allowed to); its
    /// streams end at once on this dispatcher, and on the others as they
    /// hear of it.
    pub async fn revoke(&self, who: &Caller, id: &str, project: &str) -> Result<ApiKeyRow> {
        let key = self
            .store
            .revoke_api_key(id, Some(project))
            .await?
            .ok_or_else(|| Error::NotFound(format!("API key apiKeys/{id} not found")))?;
        self.auth.forget(id);
        tracing::info!(key_id = %id, project = %key.project, by = ?who.key_id, "API key revoked");
        self.audit
            .record(
                &key.project,
                &who.identity(),
                Action::KeyRevoke,
                &format!("keys/{id}"),
                Detail::None {},
            )
            .await;
        Ok(key)
    }
}

/// The secret operations.
#[derive(Clone)]
pub(crate) struct Secrets {
    pub store: Store,
    pub audit: Audit,
    /// Hosts (`host` or `host:port`) an OAuth token endpoint may be reached
    /// at over plain `http://`.
    pub oauth_allow_http: Vec<String>,
}

impl Secrets {
    /// Seals `value` under the project's context and stores it; the value
    /// never appears in an error, a log or the audit trail.
    /// `client_secret`: an OAuth credential's (given or not), sealed with
    /// the refresh token (the value); `None` for any other secret.
    pub async fn create(
        &self,
        who: &Caller,
        shape: SecretShape,
        value: &str,
        client_secret: Option<&String>,
    ) -> Result<SecretRow> {
        let shape = credential_shape(shape, client_secret.is_some(), &self.oauth_allow_http)?;
        let (display_name, usage) = (shape.display_name.as_str(), shape.usage);
        if value.is_empty() {
            return Err(Error::invalid("value", "required"));
        }
        if value.len() > SECRET_BYTES {
            // The message never repeats the value.
            return Err(Error::invalid(
                "value",
                format!("{} bytes; the limit is {SECRET_BYTES}", value.len()),
            ));
        }
        check_display_name(display_name)?;
        let credential = usage == USAGE_HTTP_HEADER || usage == USAGE_OAUTH2_REFRESH;
        if value.contains(['\r', '\n', '\0']) && credential {
            return Err(Error::invalid(
                "value",
                "a credential or refresh token holds no line break or NUL",
            ));
        }
        let plain = match client_secret {
            Some(client_secret) => serde_json::to_string(&crate::ops::oauth::RefreshSecret {
                refresh_token: value.to_string(),
                client_secret: client_secret.clone(),
            })
            .map_err(|e| Error::Internal(e.to_string()))?,
            None => value.to_string(),
        };
        let sealer = self.store.sealer();
        let sealed = sealer.seal(&secret_context(&who.project), plain.as_bytes());
        let id = Uuid::now_v7();
        let row = self
            .store
            .insert_secret(id, &who.project, &shape, &sealed, sealer.primary())
            .await?;
        tracing::info!(secret_id = %id, project = %who.project, usage, "secret created");
        self.audit
            .record(
                &who.project,
                &who.identity(),
                Action::SecretCreate,
                &format!("secrets/{id}"),
                Detail::SecretUsage {
                    usage: usage.to_string(),
                },
            )
            .await;
        Ok(row)
    }

    /// Deletes secret `id` of the caller's project.
    pub async fn delete(&self, who: &Caller, id: Uuid) -> Result<()> {
        if !self.store.delete_secret(&who.project, id).await? {
            return Err(Error::NotFound(format!("secret secrets/{id} not found")));
        }
        tracing::info!(secret_id = %id, project = %who.project, "secret deleted");
        self.audit
            .record(
                &who.project,
                &who.identity(),
                Action::SecretDelete,
                &format!("secrets/{id}"),
                Detail::None {},
            )
            .await;
        Ok(())
    }
}

/// A credential (`http_header`, `oauth2_refresh`) names 1 to 16 hosts and
/// a valid header, stored with its defaults filled in; an OAuth one also
/// its client (`oauth`); any other secret names none of these.
fn credential_shape(
    mut shape: SecretShape,
    has_oauth: bool,
    oauth_allow_http: &[String],
) -> Result<SecretShape> {
    let oauth = shape.usage == USAGE_OAUTH2_REFRESH;
    if has_oauth != oauth {
        return Err(Error::invalid(
            "oauth",
            if oauth {
                "required for SECRET_USAGE_OAUTH2_REFRESH: the token endpoint and client"
            } else {
                "only SECRET_USAGE_OAUTH2_REFRESH credentials have an OAuth client"
            },
        ));
    }
    if oauth {
        check_token_url(&shape.oauth_token_url, oauth_allow_http)?;
        if shape.oauth_client_id.trim().is_empty() {
            return Err(Error::invalid("oauth.client_id", "required"));
        }
        for (field, v) in [
            ("oauth.client_id", &shape.oauth_client_id),
            ("oauth.scope", &shape.oauth_scope),
        ] {
            if v.len() > 1024 || v.contains('\0') {
                return Err(Error::invalid(field, "up to 1024 characters, without NUL"));
            }
        }
    }
    if shape.usage != USAGE_HTTP_HEADER && !oauth {
        if !shape.hosts.is_empty() {
            return Err(Error::invalid(
                "hosts",
                "only credentials (SECRET_USAGE_HTTP_HEADER) name hosts",
            ));
        }
        if !(shape.header_name.is_empty() && shape.header_prefix.is_empty()) {
            return Err(Error::invalid(
                "header",
                "only credentials (SECRET_USAGE_HTTP_HEADER) have a header",
            ));
        }
        return Ok(shape);
    }
    berth_common::credentials::validate_hosts("hosts", &shape.hosts)?;
    for h in &mut shape.hosts {
        *h = h.to_ascii_lowercase();
    }
    let header = berth_common::credentials::HttpHeader::with_defaults(
        &shape.header_name,
        &shape.header_prefix,
    );
    header.validate("header")?;
    shape.header_name = header.name;
    shape.header_prefix = header.prefix;
    Ok(shape)
}

/// A token endpoint is `https://`, or `http://` to an allowed host.
fn check_token_url(url: &str, allow_http: &[String]) -> Result<()> {
    let field = "oauth.token_url";
    let Some((host, port)) = berth_common::credentials::target_of(url) else {
        return Err(Error::invalid(
            field,
            format!("`{url}` is not an https:// URL with a host"),
        ));
    };
    if url.len() > 2048 {
        return Err(Error::invalid(field, "longer than 2048 characters"));
    }
    let https = url
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    let allowed = allow_http.iter().any(|h| {
        h.eq_ignore_ascii_case(&host) || h.eq_ignore_ascii_case(&format!("{host}:{port}"))
    });
    if !https && !allowed {
        return Err(Error::invalid(
            field,
            format!(
                "`{url}` must be https:// (plain http:// only to hosts in --oauth-allow-http-hosts)"
            ),
        ));
    }
    Ok(())
}

fn check_display_name(name: &str) -> Result<()> {
    if name.chars().count() > crate::session::limits::DISPLAY_NAME_CHARS {
        return Err(Error::invalid("display_name", "longer than 256 characters"));
    }
    if name.contains('\0') {
        return Err(Error::invalid(
            "display_name",
            "holds a NUL character (U+0000)",
        ));
    }
    Ok(())
}

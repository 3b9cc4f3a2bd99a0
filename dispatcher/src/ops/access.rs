//! API keys and secrets: the operations behind `berth.v1.ApiKeys` and
//! `berth.v1.Secrets`. Each checks its input, writes, and records itself in
//! the audit trail, once. Who may do what was decided before (the
//! handlers' caller checks, `access::keys::may_revoke`).

use std::sync::Arc;

use uuid::Uuid;

use crate::access::auth::{Authenticator, Caller, Role, new_token};
use crate::error::{Error, Result};
use crate::ops::audit::{Action, Audit, Detail};
use crate::store::{ApiKeyRow, SecretRow, SecretShape, Store, USAGE_HTTP_HEADER, secret_context};

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
}

impl Secrets {
    /// Seals `value` under the project's context and stores it; the value
    /// never appears in an error, a log or the audit trail.
    pub async fn create(&self, who: &Caller, shape: SecretShape, value: &str) -> Result<SecretRow> {
        let shape = credential_shape(shape)?;
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
        if value.contains(['\r', '\n', '\0']) && usage == USAGE_HTTP_HEADER {
            return Err(Error::invalid(
                "value",
                "a credential sent as a header holds no line break or NUL",
            ));
        }
        let sealer = self.store.sealer();
        let sealed = sealer.seal(&secret_context(&who.project), value.as_bytes());
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

/// A credential (`http_header`) names 1 to 16 hosts and a valid header,
/// stored with its defaults filled in; any other secret names neither.
fn credential_shape(mut shape: SecretShape) -> Result<SecretShape> {
    if shape.usage != USAGE_HTTP_HEADER {
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

//! The secrets a new session names: each is the project's (else
//! NOT_FOUND), and each is of the kind its use needs — an SSH key for an
//! `ssh://` clone, a credential whose hosts cover the URL for an MCP server
//! or an `https://` clone.

use uuid::Uuid;

use super::Sessions;
use crate::error::{Error, Result};
use crate::session::Resource;
use crate::store::{SealedSecret, USAGE_GIT_SSH_KEY, USAGE_HTTP_HEADER, USAGE_OAUTH2_REFRESH};
use berth_common::spec::AgentSpec;

/// One use of a secret by a session: the field that names it, the secret,
/// and what it must be.
struct Use<'a> {
    field: &'static str,
    id: &'a str,
    need: Need<'a>,
}

enum Need<'a> {
    /// Any secret (`spec.vault_ids`).
    Any,
    SshKey,
    /// A credential that may be sent to this URL's host.
    CredentialFor(&'a str),
}

/// Every use of a secret in `spec` and `resources`.
fn uses<'a>(spec: &'a AgentSpec, resources: &'a [Resource]) -> Vec<Use<'a>> {
    let mut out: Vec<Use<'a>> = spec
        .vault_ids
        .iter()
        .map(|id| Use {
            field: "spec.vault_ids",
            id,
            need: Need::Any,
        })
        .collect();
    for m in &spec.mcp_servers {
        if let berth_common::spec::McpTransport::Remote {
            url,
            credential: Some(id),
            ..
        } = &m.transport
        {
            out.push(Use {
                field: "spec.mcp_servers.remote.credential",
                id,
                need: Need::CredentialFor(url),
            });
        }
    }
    for r in resources {
        if let Resource::Git {
            url,
            ssh_key_secret,
            credential,
            ..
        } = r
        {
            if let Some(id) = ssh_key_secret {
                out.push(Use {
                    field: "resources.git.ssh_key_secret",
                    id,
                    need: Need::SshKey,
                });
            }
            if let Some(id) = credential {
                out.push(Use {
                    field: "resources.git.credential",
                    id,
                    need: Need::CredentialFor(url),
                });
            }
        }
    }
    out
}

/// Whether `secret` serves `need`; the reason when it does not.
fn fits(secret: &SealedSecret, need: &Need<'_>) -> std::result::Result<(), String> {
    let id = secret.id;
    match need {
        Need::Any => Ok(()),
        Need::SshKey if secret.usage == USAGE_GIT_SSH_KEY => Ok(()),
        Need::SshKey => Err(format!(
            "secret secrets/{id} is not an SSH key (its usage is {})",
            secret.usage
        )),
        Need::CredentialFor(_)
            if secret.usage != USAGE_HTTP_HEADER && secret.usage != USAGE_OAUTH2_REFRESH =>
        {
            Err(format!(
                "secret secrets/{id} is not a credential (SECRET_USAGE_HTTP_HEADER or SECRET_USAGE_OAUTH2_REFRESH; its usage is {})",
                secret.usage
            ))
        }
        Need::CredentialFor(url) => {
            let Some((host, port)) = berth_common::credentials::target_of(url) else {
                return Err(format!("`{url}` names no host"));
            };
            if berth_common::credentials::covers(&secret.hosts, &host, port) {
                Ok(())
            } else {
                Err(format!(
                    "secret secrets/{id} may not be sent to {host}:{port} (its hosts: {})",
                    secret.hosts.join(", ")
                ))
            }
        }
    }
}

impl Sessions {
    /// Checks every secret `spec` and `resources` name (see the module).
    pub(super) async fn check_secrets(
        &self,
        project: &str,
        spec: &AgentSpec,
        resources: &[Resource],
    ) -> Result<()> {
        let uses = uses(spec, resources);
        if uses.is_empty() {
            return Ok(());
        }
        let mut ids = Vec::with_capacity(uses.len());
        for u in &uses {
            let id: Uuid = u.id.parse().map_err(|_| {
                Error::NotFound(format!("{}: secret secrets/{} not found", u.field, u.id))
            })?;
            ids.push(id);
        }
        ids.sort();
        ids.dedup();
        let found = self.store.sealed_secrets(project, &ids).await?;
        for u in &uses {
            let Some(secret) = found.iter().find(|f| f.id.to_string() == u.id) else {
                return Err(Error::NotFound(format!(
                    "{}: secret secrets/{} not found",
                    u.field, u.id
                )));
            };
            fits(secret, &u.need).map_err(|why| Error::invalid(u.field, why))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(usage: &str, hosts: &[&str]) -> SealedSecret {
        SealedSecret {
            id: Uuid::nil(),
            usage: usage.into(),
            sealed: vec![],
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            header_name: "Authorization".into(),
            header_prefix: "Bearer ".into(),
        }
    }

    #[test]
    fn a_credential_serves_only_the_hosts_it_names() {
        let c = secret(USAGE_HTTP_HEADER, &["mcp.example.com", "127.0.0.1:9000"]);
        assert!(fits(&c, &Need::CredentialFor("https://mcp.example.com/mcp")).is_ok());
        assert!(fits(&c, &Need::CredentialFor("http://127.0.0.1:9000/mcp")).is_ok());
        let e = fits(&c, &Need::CredentialFor("https://evil.example.com/")).expect_err("host");
        assert!(e.contains("evil.example.com:443"), "{e}");
        assert!(fits(&c, &Need::SshKey).is_err());
        let key = secret(USAGE_GIT_SSH_KEY, &[]);
        assert!(fits(&key, &Need::SshKey).is_ok());
        assert!(fits(&key, &Need::CredentialFor("https://x/")).is_err());
        assert!(fits(&key, &Need::Any).is_ok());
    }
}

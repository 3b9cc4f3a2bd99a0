//! The node's view of what a session runs, converted from the wire once and
//! checked with the same validator the dispatcher applies.

use berth_common::spec::{AgentSpec, validate_git};
use berth_proto::node::v1 as pb;

use crate::error::Error;
use crate::layout::Layout;

pub use berth_common::spec::Runtime;

/// A validated session spec: the agent's part, and this run's.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// Image, runtime, prompt, env, limits and skills.
    pub agent: AgentSpec,
    /// The runtime's own id to resume its conversation under.
    pub resume_id: String,
    pub restore_snapshot_key: String,
    /// Where to save a snapshot if a drain evicts the run.
    pub evict_snapshot_key: String,
    /// Where checkpoints go (see the proto); empty: none.
    pub checkpoint_key_prefix: String,
    pub files: Vec<FileCopy>,
    pub memory: Vec<MemoryCopy>,
    pub git: Vec<GitClone>,
    /// Values the gateway attaches to the session's traffic.
    pub secrets: GatewaySecrets,
    /// Set when the agent exports its own telemetry through the gateway:
    /// the resource attributes put on it.
    pub telemetry: Option<std::collections::BTreeMap<String, String>>,
    /// Its agent pool: key and what a pre-started process for it is
    /// started from (no secret, no run data). `None`: no process can be
    /// pre-started for it (a resume, resources, env).
    pub warm: Option<(String, pb::SessionSpec)>,
}

/// Secret values for the egress gateway only: never in the container, its
/// env, a snapshot or a log (`Debug` shows only which are set).
#[derive(Clone, Default)]
pub struct GatewaySecrets {
    pub anthropic_api_key: Option<String>,
    /// Credentials the gateway sends as a header to their hosts (the
    /// run's dispatcher updates refreshed ones).
    pub credentials: CredentialBook,
}

/// A run's credentials, shared by its gateway routes and the stream that
/// brings refreshed values.
#[derive(Clone, Default)]
pub struct CredentialBook(std::sync::Arc<std::sync::RwLock<Vec<Credential>>>);

impl CredentialBook {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Credential>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Credential `id` as it is now.
    pub fn get(&self, id: &str) -> Option<Credential> {
        self.read().iter().find(|c| c.id == id).cloned()
    }

    /// A refreshed credential's new value, or why it has none. `false`
    /// when the run has no such refreshed credential.
    pub fn update(&self, id: &str, value: String, error: String) -> bool {
        let mut all = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(c) = all.iter_mut().find(|c| c.id == id && c.refreshed) else {
            return false;
        };
        if error.is_empty() && !value.contains(['\r', '\n', '\0']) {
            c.value = value;
            c.error = None;
        } else {
            c.error = Some(if error.is_empty() {
                "the refreshed value cannot be sent as a header".into()
            } else {
                error
            });
        }
        true
    }

    fn push(&self, c: Credential) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(c);
    }

    fn len(&self) -> usize {
        self.read().len()
    }
}

impl std::fmt::Debug for CredentialBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.read().iter()).finish()
    }
}

/// A credential: sent as `header` to `hosts` only.
#[derive(Clone)]
pub struct Credential {
    pub id: String,
    pub hosts: Vec<String>,
    pub header: berth_common::credentials::HttpHeader,
    pub value: String,
    /// An OAuth access token the dispatcher refreshes.
    pub refreshed: bool,
    /// It could not be refreshed: why (its requests are refused).
    pub error: Option<String>,
}

impl Credential {
    /// Puts the credential's header on `headers` (as a sensitive value,
    /// never logged by hyper), replacing whatever the agent sent in its
    /// place. `false` when it cannot be a header.
    pub fn attach(&self, headers: &mut http::HeaderMap) -> bool {
        let (Ok(name), Ok(mut value)) = (
            http::HeaderName::from_bytes(self.header.name.as_bytes()),
            http::HeaderValue::from_str(&self.header.value(&self.value)),
        ) else {
            return false;
        };
        value.set_sensitive(true);
        headers.insert(name, value);
        true
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("id", &self.id)
            .field("hosts", &self.hosts)
            .field("header", &self.header.name)
            .field("value", &"<redacted>")
            .field("refreshed", &self.refreshed)
            .field("error", &self.error)
            .finish()
    }
}

impl std::fmt::Debug for GatewaySecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySecrets")
            .field(
                "anthropic_api_key",
                &self.anthropic_api_key.as_ref().map(|_| "<redacted>"),
            )
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl GatewaySecrets {
    /// The credential `id` as it is now, if the session has it.
    pub fn credential(&self, id: &str) -> Option<Credential> {
        self.credentials.get(id)
    }

    fn from_pb(secrets: Vec<pb::GatewaySecret>) -> Result<Self, Error> {
        let mut out = Self::default();
        for s in secrets {
            match pb::SecretUsage::try_from(s.usage) {
                Ok(pb::SecretUsage::AnthropicApiKey) => out.anthropic_api_key = Some(s.value),
                Ok(pb::SecretUsage::HttpHeader) => {
                    berth_common::credentials::validate_hosts("spec.secrets.hosts", &s.hosts)?;
                    let header = berth_common::credentials::HttpHeader {
                        name: s.header_name,
                        prefix: s.header_prefix,
                    };
                    header.validate("spec.secrets.header_name")?;
                    if s.id.is_empty() || s.value.contains(['\r', '\n', '\0']) {
                        return Err(Error::invalid(
                            "spec.secrets",
                            "a credential needs an id and a one-line value",
                        ));
                    }
                    if out.credentials.len() >= berth_common::spec::limits::VAULT_IDS * 2 {
                        return Err(Error::invalid("spec.secrets", "too many credentials"));
                    }
                    out.credentials.push(Credential {
                        id: s.id,
                        hosts: s.hosts,
                        header,
                        value: s.value,
                        refreshed: s.refreshed,
                        error: Some(s.error).filter(|e| !e.is_empty()),
                    });
                }
                _ => {
                    return Err(Error::invalid(
                        "spec.secrets.usage",
                        format!("unknown usage {}", s.usage),
                    ));
                }
            }
        }
        Ok(out)
    }
}

#[derive(Debug, Clone)]
pub struct FileCopy {
    pub key: String,
    pub path: String,
}

#[derive(Debug, Clone)]
pub struct MemoryCopy {
    pub key: String,
    pub path: String,
    pub write_back: bool,
}

#[derive(Clone)]
pub struct GitClone {
    pub url: String,
    pub git_ref: String,
    pub path: String,
    /// For ssh:// URLs: the private key to clone with (node only).
    pub ssh_key: Option<String>,
    /// For https:// URLs: the credential (one of the session's) to clone
    /// and fetch with, through the gateway.
    pub credential_id: Option<String>,
}

impl std::fmt::Debug for GitClone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitClone")
            .field("url", &self.url)
            .field("git_ref", &self.git_ref)
            .field("path", &self.path)
            .field("ssh_key", &self.ssh_key.as_ref().map(|_| "<redacted>"))
            .field("credential_id", &self.credential_id)
            .finish()
    }
}

impl TryFrom<pb::SessionSpec> for SessionSpec {
    type Error = Error;

    fn try_from(s: pb::SessionSpec) -> Result<Self, Error> {
        let agent = berth_common::spec::from_node_pb(&s)?;
        let warm = berth_common::warm::template(&s).map(|t| (berth_common::warm::key_of(&t), t));
        for g in &s.git {
            validate_git("spec.git.url", "spec.git.ref", &g.url, &g.r#ref)?;
        }
        Ok(Self {
            agent,
            warm,
            telemetry: s.telemetry.map(|t| t.resource.into_iter().collect()),
            secrets: GatewaySecrets::from_pb(s.secrets)?,
            resume_id: s.resume_id,
            restore_snapshot_key: s.restore_snapshot_key,
            evict_snapshot_key: s.evict_snapshot_key,
            checkpoint_key_prefix: s.checkpoint_key_prefix,
            files: s
                .files
                .into_iter()
                .map(|f| FileCopy {
                    key: f.key,
                    path: f.path,
                })
                .collect(),
            memory: s
                .memory
                .into_iter()
                .map(|m| MemoryCopy {
                    key: m.key,
                    path: m.path,
                    write_back: m.write_back,
                })
                .collect(),
            git: s
                .git
                .into_iter()
                .map(|g| GitClone {
                    ssh_key: Some(g.ssh_key).filter(|k| !k.is_empty()),
                    credential_id: Some(g.credential_id).filter(|c| !c.is_empty()),
                    url: g.url,
                    git_ref: g.r#ref,
                    path: g.path,
                })
                .collect(),
        })
    }
}

impl SessionSpec {
    /// Every path the spec names lies in a writable volume of the container.
    pub fn check_paths(&self, layout: &Layout) -> Result<(), Error> {
        let paths = self
            .files
            .iter()
            .map(|f| ("spec.files.path", &f.path))
            .chain(self.memory.iter().map(|m| ("spec.memory.path", &m.path)))
            .chain(self.git.iter().map(|g| ("spec.git.path", &g.path)));
        for (field, path) in paths {
            layout.check(path).map_err(|e| Error::invalid(field, e))?;
        }
        for f in &self.files {
            if let Ok((volume, rest)) = layout.volume_of(&f.path)
                && rest.is_empty()
            {
                return Err(Error::invalid(
                    "spec.files.path",
                    format!("`{volume}` is a writable volume itself; name a file inside it"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_from_the_wire_are_kept_but_never_shown() {
        let s = GatewaySecrets::from_pb(vec![pb::GatewaySecret {
            usage: pb::SecretUsage::AnthropicApiKey as i32,
            value: "sk-ant-very-secret".into(),
            ..Default::default()
        }])
        .expect("a known usage");
        assert_eq!(s.anthropic_api_key.as_deref(), Some("sk-ant-very-secret"));
        assert!(!format!("{s:?}").contains("sk-ant"));
        let unknown = GatewaySecrets::from_pb(vec![pb::GatewaySecret {
            usage: 99,
            value: "x".into(),
            ..Default::default()
        }]);
        assert!(unknown.is_err());
    }
}

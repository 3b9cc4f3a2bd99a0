//! A session's egress policy: where it may connect beyond the model API,
//! as the node's gateway enforces it.

use serde::{Deserialize, Serialize};

use super::{FieldError, limits};

/// Where a session may connect beyond the model API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EgressMode {
    /// The model API only.
    #[default]
    None,
    /// The model API and the hosts in `allow`.
    Allowlist,
    /// Any public host.
    Open,
}

/// A session's egress policy, enforced by the node's gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Egress {
    #[serde(default)]
    pub mode: EgressMode,
    /// `host`, `host:port` or `*.domain[:port]`; no port means 443.
    #[serde(default)]
    pub allow: Vec<String>,
}

impl Egress {
    pub(super) fn validate(&self) -> Result<(), FieldError> {
        if self.allow.len() > limits::EGRESS_HOSTS {
            return Err(FieldError::new(
                "spec.egress.allow",
                format!("at most {} entries", limits::EGRESS_HOSTS),
            ));
        }
        match self.mode {
            EgressMode::Allowlist if self.allow.is_empty() => {
                return Err(FieldError::new(
                    "spec.egress.allow",
                    "EGRESS_MODE_ALLOWLIST needs at least one host",
                ));
            }
            EgressMode::None | EgressMode::Open if !self.allow.is_empty() => {
                return Err(FieldError::new(
                    "spec.egress.allow",
                    "hosts are only for EGRESS_MODE_ALLOWLIST",
                ));
            }
            _ => {}
        }
        for a in &self.allow {
            check_host_pattern("spec.egress.allow", a)?;
        }
        Ok(())
    }

    /// Whether the policy lets the session reach `host:port`. (Internal
    /// addresses are refused by the gateway whatever this says.)
    pub fn allows(&self, host: &str, port: u16) -> bool {
        match self.mode {
            EgressMode::None => false,
            EgressMode::Open => true,
            EgressMode::Allowlist => self.allow.iter().any(|a| host_matches(a, host, port)),
        }
    }
}

/// Checks one host pattern: `host`, `host:port` or `*.domain[:port]`.
pub fn check_host_pattern(field: &'static str, a: &str) -> Result<(), FieldError> {
    let (host, port) = split_host_port(a);
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok_name = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok_name || port.is_none() {
        return Err(FieldError::new(
            field,
            format!("`{a}`: expected `host`, `host:port` or `*.domain[:port]`"),
        ));
    }
    Ok(())
}

/// Whether `host:port` matches a pattern (`host` means port 443;
/// `*.domain` matches subdomains only).
pub fn host_matches(pattern: &str, host: &str, port: u16) -> bool {
    let (pattern, p) = split_host_port(pattern);
    if p != Some(port) {
        return false;
    }
    let host = host.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(domain) => host.ends_with(&format!(".{domain}")),
        None => host == pattern,
    }
}

/// `host[:port]`, the port 443 when absent; `None` for a bad port.
fn split_host_port(s: &str) -> (&str, Option<u16>) {
    match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok().filter(|p| *p > 0)),
        None => (s, Some(443)),
    }
}

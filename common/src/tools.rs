//! Tool approvals: which tool calls an agent makes without asking, which
//! are refused, and what happens to a request nobody answers. Set per agent
//! version and replaceable per session; stored as JSON in the spec.

use std::time::Duration;

use berth_proto::{node::v1 as node_pb, v1 as pb};
use serde::{Deserialize, Serialize};

use crate::field::FieldError;

/// Rules in one allow or deny list.
pub const MAX_RULES: usize = 64;
/// Bytes in one rule.
pub const MAX_RULE_BYTES: usize = 256;
/// How long a request waits when the policy says nothing.
pub const DEFAULT_CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(600);
const MIN_CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Bytes in a deny message.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Bytes in an edited tool input.
pub const MAX_INPUT_BYTES: usize = 1024 * 1024;

/// Claude Code's `--permission-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PermissionMode {
    #[default]
    #[serde(rename = "default")]
    Default,
    #[serde(rename = "acceptEdits")]
    AcceptEdits,
    #[serde(rename = "plan")]
    Plan,
    #[serde(rename = "bypassPermissions")]
    BypassPermissions,
}

impl PermissionMode {
    /// The CLI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::AcceptEdits => "acceptEdits",
            Self::Plan => "plan",
            Self::BypassPermissions => "bypassPermissions",
        }
    }

    /// From the CLI's name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Default,
            Self::AcceptEdits,
            Self::Plan,
            Self::BypassPermissions,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    #[default]
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "allow" => Some(Self::Allow),
            "deny" => Some(Self::Deny),
            _ => None,
        }
    }

    /// From the wire; `field` names it in the error.
    pub fn from_pb(value: i32, field: &'static str) -> Result<Self, FieldError> {
        match pb::ToolDecision::try_from(value) {
            Ok(pb::ToolDecision::Allow) => Ok(Self::Allow),
            Ok(pb::ToolDecision::Deny) => Ok(Self::Deny),
            Ok(pb::ToolDecision::Unspecified) => Err(FieldError::new(
                field,
                "required: TOOL_DECISION_ALLOW or TOOL_DECISION_DENY",
            )),
            Err(_) => Err(FieldError::new(field, format!("unknown decision {value}"))),
        }
    }

    pub fn to_pb(self) -> i32 {
        match self {
            Self::Allow => pb::ToolDecision::Allow as i32,
            Self::Deny => pb::ToolDecision::Deny as i32,
        }
    }
}

/// A session's tool policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ToolPolicy {
    #[serde(default)]
    pub permission_mode: PermissionMode,
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    #[serde(default)]
    pub disallowed_tools: Vec<String>,
    /// Milliseconds a request waits; `None`: [`DEFAULT_CONFIRMATION_TIMEOUT`].
    #[serde(default)]
    pub confirmation_timeout_ms: Option<u64>,
    /// What a request that times out gets.
    #[serde(default)]
    pub timeout_decision: Decision,
}

impl ToolPolicy {
    /// How long a request waits for a person.
    pub fn confirmation_timeout(&self) -> Duration {
        self.confirmation_timeout_ms
            .map_or(DEFAULT_CONFIRMATION_TIMEOUT, Duration::from_millis)
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        for (field, rules) in [
            ("spec.tool_policy.allowed_tools", &self.allowed_tools),
            ("spec.tool_policy.disallowed_tools", &self.disallowed_tools),
        ] {
            if rules.len() > MAX_RULES {
                return Err(FieldError::new(field, format!("at most {MAX_RULES} rules")));
            }
            for r in rules {
                if r.trim().is_empty()
                    || r.len() > MAX_RULE_BYTES
                    || r.chars().any(char::is_control)
                {
                    return Err(FieldError::new(
                        field,
                        format!(
                            "`{}`: a rule is 1 to {MAX_RULE_BYTES} bytes of printable text, like `Bash(git *)` or `Edit`",
                            r.escape_debug()
                        ),
                    ));
                }
            }
        }
        let t = self.confirmation_timeout();
        if !(MIN_CONFIRMATION_TIMEOUT..=MAX_CONFIRMATION_TIMEOUT).contains(&t) {
            return Err(FieldError::new(
                "spec.tool_policy.confirmation_timeout",
                "must be from 1 second to 24 hours",
            ));
        }
        Ok(())
    }

    /// From the public wire, checked.
    pub fn from_pb(p: pb::ToolPolicy) -> Result<Self, FieldError> {
        let permission_mode = match pb::PermissionMode::try_from(p.permission_mode) {
            Ok(pb::PermissionMode::Unspecified | pb::PermissionMode::Default) => {
                PermissionMode::Default
            }
            Ok(pb::PermissionMode::AcceptEdits) => PermissionMode::AcceptEdits,
            Ok(pb::PermissionMode::Plan) => PermissionMode::Plan,
            Ok(pb::PermissionMode::BypassPermissions) => PermissionMode::BypassPermissions,
            Err(_) => {
                return Err(FieldError::new(
                    "spec.tool_policy.permission_mode",
                    format!("unknown mode {}", p.permission_mode),
                ));
            }
        };
        let confirmation_timeout_ms = match &p.confirmation_timeout {
            None => None,
            Some(d) => Some(
                crate::time::from_duration(d)
                    .ok_or_else(|| {
                        FieldError::new(
                            "spec.tool_policy.confirmation_timeout",
                            "must not be negative",
                        )
                    })?
                    .as_millis()
                    .try_into()
                    .unwrap_or(u64::MAX),
            ),
        };
        let timeout_decision = match pb::ToolDecision::try_from(p.timeout_decision) {
            Ok(pb::ToolDecision::Unspecified | pb::ToolDecision::Deny) => Decision::Deny,
            Ok(pb::ToolDecision::Allow) => Decision::Allow,
            Err(_) => {
                return Err(FieldError::new(
                    "spec.tool_policy.timeout_decision",
                    format!("unknown decision {}", p.timeout_decision),
                ));
            }
        };
        let policy = Self {
            permission_mode,
            allowed_tools: p.allowed_tools,
            disallowed_tools: p.disallowed_tools,
            confirmation_timeout_ms,
            timeout_decision,
        };
        policy.validate()?;
        Ok(policy)
    }

    pub fn to_pb(&self) -> pb::ToolPolicy {
        let t = self.confirmation_timeout();
        pb::ToolPolicy {
            permission_mode: match self.permission_mode {
                PermissionMode::Default => pb::PermissionMode::Default,
                PermissionMode::AcceptEdits => pb::PermissionMode::AcceptEdits,
                PermissionMode::Plan => pb::PermissionMode::Plan,
                PermissionMode::BypassPermissions => pb::PermissionMode::BypassPermissions,
            } as i32,
            allowed_tools: self.allowed_tools.clone(),
            disallowed_tools: self.disallowed_tools.clone(),
            confirmation_timeout: Some(crate::time::to_duration(t)),
            timeout_decision: self.timeout_decision.to_pb(),
        }
    }

    /// What the node needs: the agent's flags (the timeout is the dispatcher's).
    pub fn to_node_pb(&self) -> node_pb::ToolPolicy {
        node_pb::ToolPolicy {
            permission_mode: self.permission_mode.as_str().into(),
            allowed_tools: self.allowed_tools.clone(),
            disallowed_tools: self.disallowed_tools.clone(),
        }
    }

    /// From the node wire, checked.
    pub fn from_node_pb(p: &node_pb::ToolPolicy) -> Result<Self, FieldError> {
        let permission_mode = match p.permission_mode.as_str() {
            "" => PermissionMode::Default,
            m => PermissionMode::parse(m).ok_or_else(|| {
                FieldError::new(
                    "spec.tool_policy.permission_mode",
                    format!("unknown mode `{}`", m.escape_debug()),
                )
            })?,
        };
        let policy = Self {
            permission_mode,
            allowed_tools: p.allowed_tools.clone(),
            disallowed_tools: p.disallowed_tools.clone(),
            ..Self::default()
        };
        policy.validate()?;
        Ok(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_and_bad_ones_name_their_field() {
        let p = ToolPolicy {
            permission_mode: PermissionMode::AcceptEdits,
            allowed_tools: vec!["Bash(git *)".into()],
            disallowed_tools: vec!["WebFetch".into()],
            confirmation_timeout_ms: Some(30_000),
            timeout_decision: Decision::Allow,
        };
        assert_eq!(ToolPolicy::from_pb(p.to_pb()), Ok(p.clone()));
        let node = ToolPolicy::from_node_pb(&p.to_node_pb()).expect("node policy");
        assert_eq!(node.permission_mode, PermissionMode::AcceptEdits);
        assert_eq!(node.allowed_tools, p.allowed_tools);

        let e = ToolPolicy::from_pb(pb::ToolPolicy {
            allowed_tools: vec!["Bash\n".into()],
            ..Default::default()
        })
        .expect_err("a control character");
        assert_eq!(e.field, "spec.tool_policy.allowed_tools");
        let e = ToolPolicy::from_pb(pb::ToolPolicy {
            confirmation_timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 5,
            }),
            ..Default::default()
        })
        .expect_err("too short");
        assert_eq!(e.field, "spec.tool_policy.confirmation_timeout");
        let e = ToolPolicy::from_pb(pb::ToolPolicy {
            permission_mode: 42,
            ..Default::default()
        })
        .expect_err("unknown mode");
        assert_eq!(e.field, "spec.tool_policy.permission_mode");
        // Unset is the default policy: 10 minutes, then deny.
        let d = ToolPolicy::from_pb(pb::ToolPolicy::default()).expect("default");
        assert_eq!(d.confirmation_timeout(), DEFAULT_CONFIRMATION_TIMEOUT);
        assert_eq!(d.timeout_decision, Decision::Deny);
    }
}

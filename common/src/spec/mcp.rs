//! An agent's MCP servers: remote ones (streamable HTTP), reached
//! only through the node's gateway with their credential added there, and
//! stdio ones, started by the agent in its container.

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::FieldError;
use crate::names;

/// Most MCP servers one spec may declare.
pub const MAX_SERVERS: usize = 16;
/// Longest URL, command or argument.
const MAX_CHARS: usize = 2048;
/// Most arguments of a stdio server.
const MAX_ARGS: usize = 64;

/// One MCP server of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct McpServer {
    pub name: String,
    pub transport: McpTransport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McpTransport {
    /// Over streamable HTTP, through the gateway. `credential`: a secret id.
    Remote {
        url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credential: Option<String>,
    },
    /// A program in the image, on stdio.
    Stdio {
        command: String,
        #[serde(default)]
        args: Vec<String>,
    },
}

/// The gateway's route for remote server `name`, as the agent reaches it
/// on its loopback forwarder.
pub fn route(name: &str) -> String {
    format!("/berth/mcp/{name}")
}

impl McpServer {
    pub fn is_remote(&self) -> bool {
        matches!(self.transport, McpTransport::Remote { .. })
    }

    /// The credential a remote server names.
    pub fn credential(&self) -> Option<&str> {
        match &self.transport {
            McpTransport::Remote { credential, .. } => credential.as_deref(),
            McpTransport::Stdio { .. } => None,
        }
    }
}

/// Checks the servers of one spec: unique simple names, `http(s)://` URLs
/// with a host and no user info, commands without NUL.
pub fn validate(servers: &[McpServer]) -> Result<(), FieldError> {
    if servers.len() > MAX_SERVERS {
        return Err(FieldError::new(
            "spec.mcp_servers",
            format!("at most {MAX_SERVERS} servers"),
        ));
    }
    for (i, s) in servers.iter().enumerate() {
        if !names::is_simple_name(&s.name) {
            return Err(FieldError::new(
                "spec.mcp_servers.name",
                format!("`{}`: 1-64 of [A-Za-z0-9_-]", s.name),
            ));
        }
        if servers[..i].iter().any(|o| o.name == s.name) {
            return Err(FieldError::new(
                "spec.mcp_servers.name",
                format!("`{}` is declared twice", s.name),
            ));
        }
        match &s.transport {
            McpTransport::Remote { url, .. } => {
                if url.len() > MAX_CHARS || super::target_of(url).is_none() {
                    return Err(FieldError::new(
                        "spec.mcp_servers.remote.url",
                        format!(
                            "server `{}`: `{url}` is not an http:// or https:// URL with a host (and no user info)",
                            s.name
                        ),
                    ));
                }
            }
            McpTransport::Stdio { command, args } => {
                if command.trim().is_empty() {
                    return Err(FieldError::new(
                        "spec.mcp_servers.stdio.command",
                        format!("server `{}`: required", s.name),
                    ));
                }
                let bad = |v: &String| v.len() > MAX_CHARS || v.contains('\0');
                if bad(command) || args.len() > MAX_ARGS || args.iter().any(bad) {
                    return Err(FieldError::new(
                        "spec.mcp_servers.stdio",
                        format!(
                            "server `{}`: at most {MAX_ARGS} arguments of {MAX_CHARS} characters, without NUL",
                            s.name
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Claude Code's `--mcp-config` for `servers`: remote ones point at the
/// gateway's route on the container's forwarder (`gateway`, e.g.
/// `http://127.0.0.1:18080`), never at the server itself.
pub fn claude_config(servers: &[McpServer], gateway: Option<&str>) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for s in servers {
        let entry = match &s.transport {
            McpTransport::Remote { .. } => {
                // Without a gateway nothing leaves the container: the
                // server is declared where it cannot connect, and the
                // agent reports it failed.
                let base = gateway.unwrap_or("http://127.0.0.1:9");
                json!({
                    "type": "http",
                    "url": format!("{base}{}", route(&s.name)),
                })
            }
            McpTransport::Stdio { command, args } => {
                json!({"type": "stdio", "command": command, "args": args})
            }
        };
        out.insert(s.name.clone(), entry);
    }
    json!({ "mcpServers": out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(name: &str, url: &str) -> McpServer {
        McpServer {
            name: name.into(),
            transport: McpTransport::Remote {
                url: url.into(),
                credential: None,
            },
        }
    }

    #[test]
    fn bad_servers_are_named_by_field() {
        let ok = vec![remote("docs", "https://mcp.example.com/mcp")];
        assert_eq!(validate(&ok), Ok(()));
        for (servers, field) in [
            (vec![remote("a b", "https://x/")], "spec.mcp_servers.name"),
            (
                vec![remote("a", "https://x/"), remote("a", "https://y/")],
                "spec.mcp_servers.name",
            ),
            (
                vec![remote("a", "file:///etc")],
                "spec.mcp_servers.remote.url",
            ),
            (
                vec![remote("a", "https://u:p@x/")],
                "spec.mcp_servers.remote.url",
            ),
            (
                vec![McpServer {
                    name: "s".into(),
                    transport: McpTransport::Stdio {
                        command: " ".into(),
                        args: vec![],
                    },
                }],
                "spec.mcp_servers.stdio.command",
            ),
        ] {
            assert_eq!(validate(&servers).map_err(|e| e.field), Err(field));
        }
    }

    #[test]
    fn remote_servers_point_at_the_gateway_never_at_the_server() {
        let servers = vec![
            remote("docs", "https://mcp.example.com/mcp"),
            McpServer {
                name: "local".into(),
                transport: McpTransport::Stdio {
                    command: "srv".into(),
                    args: vec!["--stdio".into()],
                },
            },
        ];
        let c = claude_config(&servers, Some("http://127.0.0.1:18080"));
        assert_eq!(
            c["mcpServers"]["docs"],
            json!({"type": "http", "url": "http://127.0.0.1:18080/berth/mcp/docs"})
        );
        assert_eq!(c["mcpServers"]["local"]["command"], "srv");
        assert!(!c.to_string().contains("example.com"));
    }
}

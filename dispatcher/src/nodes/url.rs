//! Where the nodes are: `AGENT_SERVERS` entries and how to reach them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use berth_common::tls::LiveTls;

/// One configured `AGENT_SERVERS` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUrl {
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl NodeUrl {
    /// Parses `https://host:port` (or `http://` for plaintext development).
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            anyhow::bail!(
                "AGENT_SERVERS: `{url}` must start with https:// (or http:// with --insecure-plaintext)"
            );
        };
        let authority = rest.trim_end_matches('/');
        anyhow::ensure!(
            !authority.contains('/'),
            "AGENT_SERVERS: `{url}` must be a bare https://host:port"
        );
        let uri: tonic::codegen::http::uri::Authority = authority
            .parse()
            .map_err(|e| anyhow::anyhow!("AGENT_SERVERS: `{url}` is not a valid URL: {e}"))?;
        let port = match uri.port() {
            Some(p) => p.as_str().parse::<u16>().map_err(|_| {
                anyhow::anyhow!(
                    "AGENT_SERVERS: `{url}` has an invalid port `{}`",
                    p.as_str()
                )
            })?,
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
        };
        let host = uri.host().trim_matches(['[', ']']).to_string();
        anyhow::ensure!(!host.is_empty(), "AGENT_SERVERS: `{url}` has no host");
        Ok(Self {
            url: url.to_string(),
            tls,
            host,
            port,
        })
    }

    pub(super) fn host_port(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// How this dispatcher reaches its nodes.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub urls: Vec<NodeUrl>,
    /// Client certificate and CA; `None` only for plaintext development.
    pub tls: Option<std::sync::Arc<LiveTls>>,
    /// `host:port` → address, consulted before DNS (like curl's `--resolve`).
    pub resolve: HashMap<String, SocketAddr>,
    pub resolve_interval: Duration,
    pub lease: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_urls_parse_with_their_dial_name_and_port() {
        let u = NodeUrl::parse("https://node-a.berth.svc:7443").expect("parse");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port),
            (true, "node-a.berth.svc", 7443)
        );
        let u = NodeUrl::parse("https://node-b/").expect("parse");
        assert_eq!((u.host.as_str(), u.port), ("node-b", 443));
        let u = NodeUrl::parse("http://[::1]:7443").expect("parse");
        assert_eq!((u.tls, u.host.as_str()), (false, "::1"));
        for bad in [
            "node-a:7443",
            "ftp://node-a",
            "https://node-a:7443/path",
            "https://:x",
        ] {
            let e = NodeUrl::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("AGENT_SERVERS"), "{bad}: {e}");
        }
    }
}

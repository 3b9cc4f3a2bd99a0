//! The gateway's declared routes: `/berth/mcp/{name}` to a remote MCP
//! server of the session's agent, and `/berth/git/{n}` to a git resource's
//! repository. The agent reaches them as origin-form requests on its
//! loopback forwarder; the gateway sends each on to the real URL with the
//! route's credential attached, so the sandbox never holds it. A route
//! exists only for what the session declared, and reaches only that URL:
//! the credential goes only to its own hosts, internal addresses only when
//! the operator allows them, and git pushes only where the session's egress
//! policy allows the host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_common::credentials::{covers, target_of};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{Body, Gateway, SessionGate, bad_path, retarget, text};
use crate::spec::{Credential, SessionSpec};

/// Where declared routes live on the forwarder.
pub const PREFIX: &str = "/berth/";

/// One declared route.
#[derive(Debug, Clone)]
pub struct Route {
    /// `mcp/{name}` or `git/{n}`: its path under [`PREFIX`].
    pub path: String,
    /// Where it goes.
    pub url: String,
    /// Its credential's id (one of the gate's).
    pub credential: Option<String>,
    /// A git repository: pushes need the egress policy's leave.
    pub git: bool,
}

/// The path of git resource `n`'s route.
pub fn git_route(n: usize) -> String {
    format!("{PREFIX}git/{n}")
}

/// The routes `spec` declares: each remote MCP server, and each git
/// resource cloned with a credential. A credential the session lacks (it
/// was deleted) leaves the route without one; the server then answers as
/// it does to anyone.
pub fn routes_of(spec: &SessionSpec) -> Vec<Route> {
    let credential = |id: Option<&str>| {
        id.filter(|id| spec.secrets.credential(id).is_some())
            .map(String::from)
    };
    let mut out = Vec::new();
    for m in &spec.agent.mcp_servers {
        if let berth_common::spec::McpTransport::Remote { url, credential: c } = &m.transport {
            out.push(Route {
                path: format!("mcp/{}", m.name),
                url: url.clone(),
                credential: credential(c.as_deref()),
                git: false,
            });
        }
    }
    for (n, g) in spec.git.iter().enumerate() {
        if g.credential_id.is_some() {
            out.push(Route {
                path: format!("git/{n}"),
                url: g.url.clone(),
                credential: credential(g.credential_id.as_deref()),
                git: true,
            });
        }
    }
    out
}

/// One report that a credential was attached: sent to the dispatcher for
/// `Secret.last_use_time`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialUse {
    pub credential_id: String,
    pub host: String,
    /// Requests since the last report.
    pub requests: u64,
    /// The host answered 401 with it (a refreshed credential).
    pub rejected: bool,
}

/// Where a gate's use reports go (the run's frames).
pub type UseSink = Arc<dyn Fn(CredentialUse) + Send + Sync>;

/// How often one credential's use is reported per run.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// A gate's use reports, at most one per credential per [`REPORT_EVERY`]:
/// the first use at once, later ones counted into the next report.
#[derive(Clone)]
pub struct UseLog {
    sink: UseSink,
    seen: Arc<Mutex<HashMap<String, Reported>>>,
}

/// One credential's reports: when the last went, and the uses since.
type Reported = (Option<Instant>, u64);

impl std::fmt::Debug for UseLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UseLog").finish_non_exhaustive()
    }
}

impl UseLog {
    pub fn new(sink: UseSink) -> Self {
        Self {
            sink,
            seen: Arc::default(),
        }
    }

    fn used(&self, credential_id: &str, host: &str, rejected: bool) {
        if rejected {
            (self.sink)(CredentialUse {
                credential_id: credential_id.to_string(),
                host: host.to_string(),
                requests: 0,
                rejected: true,
            });
        }
        let due = {
            let mut seen = self
                .seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let (last, pending) = seen.entry(credential_id.to_string()).or_default();
            *pending += 1;
            let due = last.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
            if due {
                *last = Some(Instant::now());
                Some(std::mem::take(pending))
            } else {
                None
            }
        };
        if let Some(requests) = due {
            (self.sink)(CredentialUse {
                credential_id: credential_id.to_string(),
                host: host.to_string(),
                requests,
                rejected: false,
            });
        }
    }
}

/// Whether a git request is a push (smart HTTP's receive-pack).
fn is_push(rest: &str, query: &str) -> bool {
    rest.ends_with("/git-receive-pack") || query.split('&').any(|p| p == "service=git-receive-pack")
}

impl Gateway {
    /// Answers a request under [`PREFIX`]: a declared route, or 404.
    pub(super) async fn route(&self, gate: &SessionGate, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let under = path.strip_prefix(PREFIX).unwrap_or_default();
        let found = gate.routes.iter().find_map(|r| {
            let rest = under.strip_prefix(r.path.as_str())?;
            (rest.is_empty() || rest.starts_with('/')).then(|| (r, rest.to_string()))
        });
        let Some((route, rest)) = found else {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "berth gateway: {path} is not a route of this session (its agent declares its MCP servers and git credentials)\n"
                ),
            );
        };
        self.forward(gate, route, &rest, req).await
    }

    async fn forward(
        &self,
        gate: &SessionGate,
        route: &Route,
        rest: &str,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let Some((host, port)) = target_of(&route.url) else {
            return text(
                StatusCode::BAD_GATEWAY,
                "berth gateway: the route's URL has no host\n",
            );
        };
        // The credential as it is now (a refreshed one changes).
        let credential: Option<Credential> = route
            .credential
            .as_deref()
            .and_then(|id| gate.credentials.get(id));
        let label = route.credential.clone().unwrap_or_else(|| "none".into());
        let refuse = |status: StatusCode, why: String| {
            count(&label, &host, "refused");
            tracing::info!(session_id = %gate.session_id, route = %route.path, host, port, reason = %why, "route refused");
            text(status, format!("berth gateway: {why}\n"))
        };
        let query = req.uri().query().unwrap_or_default().to_string();
        if route.git && is_push(rest, &query) && !gate.egress.allows(&host, port) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!("pushes to {host}:{port} are not in this session's egress policy"),
            );
        }
        if let Some(why) = credential.as_ref().and_then(|c| c.error.as_ref()) {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("credential secrets/{label} could not be refreshed: {why}"),
            );
        }
        if let Some(c) = &credential
            && !covers(&c.hosts, &host, port)
        {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "credential secrets/{} may not be sent to {host}:{port}",
                    c.id
                ),
            );
        }
        if let Err(why) = self.public_or_allowed(&host, port).await {
            return refuse(StatusCode::FORBIDDEN, why);
        }
        let base = route.url.trim_end_matches('/');
        let target = if query.is_empty() {
            format!("{base}{rest}")
        } else {
            format!("{base}{rest}?{query}")
        };
        let (mut parts, body) = req.into_parts();
        if !retarget(&mut parts, &target) {
            return bad_path();
        }
        if let Some(c) = &credential
            && !c.attach(&mut parts.headers)
        {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("credential secrets/{} cannot be sent as a header", c.id),
            );
        }
        let method = parts.method.clone();
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(resp) => {
                let outcome = format!("{}xx", resp.status().as_u16() / 100);
                count(&label, &host, &outcome);
                if let (Some(c), Some(uses)) = (&credential, &gate.uses) {
                    // A refreshed token the host refused: the dispatcher
                    // refreshes it at once.
                    let rejected = c.refreshed && resp.status() == StatusCode::UNAUTHORIZED;
                    uses.used(&c.id, &host, rejected);
                }
                tracing::info!(
                    session_id = %gate.session_id,
                    route = %route.path,
                    credential_id = %label,
                    host,
                    %method,
                    status = resp.status().as_u16(),
                    "route request"
                );
                resp.map(|b| b.boxed())
            }
            Err(e) => {
                count(&label, &host, "unreachable");
                tracing::warn!(session_id = %gate.session_id, route = %route.path, host, error = %e, "route unreachable");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("berth gateway: {host}:{port} is unreachable: {e}\n"),
                )
            }
        }
    }

    /// `Ok` when `host` resolves to public addresses only, or the operator
    /// allows it although internal (`--egress-allow-internal`).
    async fn public_or_allowed(&self, host: &str, port: u16) -> Result<(), String> {
        if self.internal_allowed(host, port) {
            return Ok(());
        }
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("{host}: {e}"))?
            .collect();
        if addrs.is_empty()
            || addrs
                .iter()
                .any(|a| berth_common::spec::is_internal_ip(a.ip()))
        {
            return Err(format!("{host} is an internal address"));
        }
        Ok(())
    }
}

fn count(credential: &str, host: &str, outcome: &str) {
    metrics::counter!(
        crate::metrics::GATEWAY_CREDENTIAL_REQUESTS,
        "credential" => credential.to_string(),
        "host" => host.to_string(),
        "outcome" => outcome.to_string()
    )
    .increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_are_told_apart_from_fetches() {
        assert!(is_push("/info/refs", "service=git-receive-pack"));
        assert!(is_push("/git-receive-pack", ""));
        assert!(!is_push("/info/refs", "service=git-upload-pack"));
        assert!(!is_push("/git-upload-pack", ""));
    }

    #[test]
    fn uses_are_reported_once_a_minute_per_credential() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let log = UseLog::new(Arc::new(move |u| sink.lock().expect("lock").push(u)));
        log.used("c1", "h", false);
        log.used("c1", "h", false);
        log.used("c2", "h", false);
        let got = got.lock().expect("lock");
        let ids: Vec<_> = got.iter().map(|u| u.credential_id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2"]);
        assert_eq!(got[0].requests, 1);
    }
}

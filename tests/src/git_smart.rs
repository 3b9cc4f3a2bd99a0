//! A git server on loopback that speaks git's smart HTTP protocol through
//! `git http-backend` (CGI), and serves only requests with one
//! `Authorization` header: the stand-in for a private repository host in
//! the tests of credentials. Every request is recorded (path, query, and
//! whether it carried the header), pushes included (`http.receivepack`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use tokio::io::AsyncWriteExt;

use crate::loopback::Loopback;

/// One request the server got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub authorized: bool,
}

struct Shared {
    root: PathBuf,
    authorization: String,
    seen: Mutex<Vec<GitRequest>>,
}

pub struct SmartGitServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Loopback,
}

impl SmartGitServer {
    /// Serves the bare repositories under `root` to requests whose
    /// `Authorization` header is exactly `authorization`.
    pub async fn start(root: PathBuf, authorization: &str) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared {
            root,
            authorization: authorization.to_string(),
            seen: Mutex::default(),
        });
        let app = axum::Router::new()
            .fallback(backend)
            .with_state(shared.clone());
        let server = Loopback::serve(app).await?;
        Ok(Self {
            addr: server.addr,
            shared,
            server,
        })
    }

    /// Stops serving, and waits until it has.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// The URL of repository `name` (a bare repository under the root).
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<GitRequest> {
        self.shared
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

async fn backend(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| header_of(&headers, name);
    let authorized = header("authorization") == shared.authorization;
    shared
        .seen
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(GitRequest {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: uri.query().unwrap_or_default().to_string(),
            authorized,
        });
    if !authorized {
        return (StatusCode::UNAUTHORIZED, "a token is required\n").into_response();
    }
    match cgi(&shared, &method, &uri, &headers, body).await {
        Ok(r) => r,
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// A request header's value, or empty.
fn header_of(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Runs `git http-backend` for one request and turns its CGI answer into a
/// response.
async fn cgi(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> anyhow::Result<Response> {
    let header = |name: &str| header_of(headers, name);
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        // Pushes are served to an authenticated user.
        .env("REMOTE_USER", "tester")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", uri.path())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let feed = async move {
        let _ = stdin.write_all(&body).await;
    };
    let (out, ()) = tokio::join!(child.wait_with_output(), feed);
    let out = out?;
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| {
            out.stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, 2))
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "git http-backend answered no headers: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let (head, rest) = out.stdout.split_at(split.0);
    let mut resp = Response::new(axum::body::Body::from(rest[split.1..].to_vec()));
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split(' ')
                .next()
                .unwrap_or("500")
                .parse()
                .unwrap_or(500);
            *resp.status_mut() = StatusCode::from_u16(code)?;
        } else if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::from_bytes(name.as_bytes()),
            axum::http::HeaderValue::from_str(value),
        ) {
            resp.headers_mut().append(n, v);
        }
    }
    Ok(resp)
}

//! A git server on loopback for git resources in tests: bare repositories
//! served over git's "dumb" HTTP protocol (static files). Clusters that use
//! it allowlist its address explicitly (`--git-allow-hosts`).

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;

use crate::loopback::Loopback;

pub struct GitServer {
    pub addr: SocketAddr,
    server: Loopback,
}

impl GitServer {
    /// Serves the files under `root` (bare repositories made ready with
    /// `git update-server-info`).
    pub async fn start(root: PathBuf) -> anyhow::Result<Self> {
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::get(file))
            .with_state(root);
        let server = Loopback::serve(app).await?;
        Ok(Self {
            addr: server.addr,
            server,
        })
    }

    /// Stops serving, and waits until it has.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// The URL of repository `name` (a directory under the root).
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// What a cluster allowlists to reach it: `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

async fn file(State(root): State<PathBuf>, Path(path): Path<String>) -> impl IntoResponse {
    if path.split('/').any(|p| p == ".." || p.is_empty()) {
        return (StatusCode::BAD_REQUEST, Vec::new());
    }
    match tokio::fs::read(root.join(&path)).await {
        Ok(bytes) => (StatusCode::OK, bytes),
        Err(_) => (StatusCode::NOT_FOUND, Vec::new()),
    }
}

/// Runs `git ARGS` in `dir` as a test author (`t <t@t>`, branch `main`),
/// failing with git's words.
pub fn git(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@t"])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

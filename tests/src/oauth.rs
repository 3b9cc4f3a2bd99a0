//! An OAuth 2.0 token endpoint on loopback for the tests of refreshed
//! credentials: `POST /token` with `grant_type=refresh_token` issues an
//! access token that expires after `lifetime` and rotates the refresh
//! token (the old one is refused from then on, as strict providers do). It
//! writes the valid access tokens, with their expiry, to a file an MCP
//! stand-in checks (`fake-anthropic --mcp-token-file`), and can revoke the
//! refresh token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::loopback::Loopback;

struct Shared {
    client_id: String,
    client_secret: String,
    lifetime: Duration,
    tokens_file: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    refresh: String,
    revoked: bool,
    issued: u64,
    /// `(token, expires in ms since the epoch)`.
    access: Vec<(String, u128)>,
    /// Refresh tokens presented that were not the current one.
    stale: Vec<String>,
}

pub struct TokenEndpoint {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<Loopback>,
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl TokenEndpoint {
    /// Serves client `client_id`/`client_secret`, whose first refresh
    /// token is `refresh`.
    pub async fn start(
        client_id: &str,
        client_secret: &str,
        refresh: &str,
        lifetime: Duration,
    ) -> anyhow::Result<Self> {
        let tokens_file =
            std::env::temp_dir().join(format!("berth-oauth-{}.txt", uuid::Uuid::new_v4().simple()));
        std::fs::write(&tokens_file, "")?;
        let shared = Arc::new(Shared {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            lifetime,
            tokens_file,
            inner: Mutex::new(Inner {
                refresh: refresh.into(),
                ..Inner::default()
            }),
        });
        let app = axum::Router::new()
            .route("/token", axum::routing::post(token))
            .with_state(shared.clone());
        let server = Loopback::serve(app).await?;
        Ok(Self {
            addr: server.addr,
            shared,
            server: Some(server),
        })
    }

    /// Stops serving, and waits until it has.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Where the valid access tokens are (`TOKEN EXPIRES_MS` lines).
    pub fn tokens_file(&self) -> PathBuf {
        self.shared.tokens_file.clone()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.shared
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Access tokens issued so far.
    pub fn issued(&self) -> u64 {
        self.inner().issued
    }

    /// Every access token issued, and every refresh token, current or not.
    pub fn all_tokens(&self) -> Vec<String> {
        let i = self.inner();
        let mut all: Vec<String> = i.access.iter().map(|(t, _)| t.clone()).collect();
        all.push(i.refresh.clone());
        all.extend(i.stale.iter().cloned());
        all
    }

    /// Refresh tokens presented after they were rotated away.
    pub fn stale_presented(&self) -> Vec<String> {
        self.inner().stale.clone()
    }

    /// Forgets every access token issued (a provider revoking sessions):
    /// hosts refuse them from now on, until the next refresh.
    pub fn forget_access_tokens(&self) {
        let _ = std::fs::write(&self.shared.tokens_file, "");
    }

    /// From now on every refresh is refused (`invalid_grant`).
    pub fn revoke(&self) {
        self.inner().revoked = true;
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.shared.tokens_file);
    }
}

fn oauth_error(code: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [("content-type", "application/json")],
        serde_json::json!({"error": code, "error_description": description}).to_string(),
    )
        .into_response()
}

async fn token(State(s): State<Arc<Shared>>, body: axum::body::Bytes) -> Response {
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(&body).into_owned().collect();
    let get = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    if get("client_id") != s.client_id || get("client_secret") != s.client_secret {
        return oauth_error("invalid_client", "unknown client");
    }
    if get("grant_type") != "refresh_token" {
        return oauth_error("unsupported_grant_type", "refresh_token only");
    }
    let mut i = s
        .inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if i.revoked {
        return oauth_error("invalid_grant", "the refresh token was revoked");
    }
    if get("refresh_token") != i.refresh {
        i.stale.push(get("refresh_token").to_string());
        return oauth_error("invalid_grant", "the refresh token was already used");
    }
    i.issued += 1;
    let n = i.issued;
    let access = format!("at-{n}-{}", uuid::Uuid::new_v4().simple());
    i.refresh = format!("rt-{n}-{}", uuid::Uuid::new_v4().simple());
    let expires = now_ms() + s.lifetime.as_millis();
    i.access.push((access.clone(), expires));
    let lines: String = i.access.iter().map(|(t, e)| format!("{t} {e}\n")).collect();
    let _ = std::fs::write(&s.tokens_file, lines);
    (
        [("content-type", "application/json")],
        serde_json::json!({
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": s.lifetime.as_secs(),
            "refresh_token": i.refresh,
        })
        .to_string(),
    )
        .into_response()
}

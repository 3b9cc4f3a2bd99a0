//! Who is calling: API keys (`authorization: Bearer berth_{id}_{secret}`),
//! checked by a tower layer in front of every public service. The caller
//! (project and role) rides in the request's extensions to the handlers.
//!
//! Keys are high-entropy, shown once, and stored as their SHA-256 (a fast
//! hash is right for 256 random bits: there is nothing to brute-force). A
//! checked key is cached for [`CACHE_TTL`]; a revoke clears this
//! dispatcher's cache at once, the others' within that time.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine;
use berth_common::grpc::rich_status;
use ring::rand::{SecureRandom, SystemRandom};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};

use berth_common::sync::lock;

use crate::store::Store;

/// How long a checked key is trusted without asking Postgres again.
pub const CACHE_TTL: Duration = Duration::from_secs(10);
pub use crate::session::DEFAULT_PROJECT;
pub use crate::store::{KeyRecord, Role};
const TOKEN_PREFIX: &str = "berth_";

/// The authenticated caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub project: String,
    pub role: Role,
    /// The key used; `None` for a client certificate or an anonymous caller.
    pub key_id: Option<String>,
    /// The client certificate's name, when that is how the caller proved
    /// who it is (`--client-identity`).
    pub certificate: Option<String>,
}

impl Caller {
    /// Who acted, as recorded with what they did: `keys/{id}`,
    /// `certificates/{name}` or `anonymous`.
    pub fn identity(&self) -> String {
        match (&self.key_id, &self.certificate) {
            (Some(k), _) => format!("keys/{k}"),
            (None, Some(c)) => format!("certificates/{c}"),
            (None, None) => "anonymous".into(),
        }
    }

    /// Refuses callers who are not fleet admins (PERMISSION_DENIED: the
    /// resource is not secret, the right to change it is).
    pub fn require_admin(&self, what: &str) -> Result<(), Status> {
        match self.role {
            Role::FleetAdmin => Ok(()),
            Role::Member => Err(rich_status(
                Code::PermissionDenied,
                format!(
                    "{what} needs a fleet-admin key; this key is a member of project `{}`",
                    self.project
                ),
                "FLEET_ADMIN_REQUIRED",
                None,
                None,
            )),
        }
    }
}

/// The caller the auth layer put on `r`.
pub fn caller<T>(r: &tonic::Request<T>) -> Result<Caller, Status> {
    r.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("request reached a handler without passing authentication"))
}

/// A new token and its parts.
pub struct NewToken {
    pub key_id: String,
    pub token: String,
    pub sha256: Vec<u8>,
}

/// Makes a token: `berth_` + 16 hex digits of key id + `_` + 43 characters
/// (256 bits) of secret.
pub fn new_token() -> NewToken {
    let rng = SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill(&mut id).expect("system randomness");
    rng.fill(&mut secret).expect("system randomness");
    let key_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let token = format!(
        "{TOKEN_PREFIX}{key_id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    );
    let sha256 = token_hash(&token);
    NewToken {
        key_id,
        token,
        sha256,
    }
}

pub fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// The key id in a token, if it has the shape of one.
fn key_id_of(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && secret.len() == 43)
        .then_some(id)
}

/// Checks tokens against the store, with a short cache.
pub struct Authenticator {
    store: Store,
    allow_anonymous: bool,
    /// Client-certificate names that stand for a project and role.
    identities: HashMap<String, (String, Role)>,
    cache: Mutex<HashMap<String, (KeyRecord, Instant)>>,
    /// Keys revoked since this dispatcher started (this one's revokes at
    /// once, the others' from the revocation watch): their open streams end.
    revoked: tokio::sync::watch::Sender<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(
        store: Store,
        allow_anonymous: bool,
        identities: HashMap<String, (String, Role)>,
    ) -> Self {
        Self {
            store,
            allow_anonymous,
            identities,
            cache: Mutex::new(HashMap::new()),
            revoked: tokio::sync::watch::channel(std::collections::HashSet::new()).0,
        }
    }

    /// Forgets a revoked key: its next call is refused, and its open
    /// streams end.
    pub fn forget(&self, key_id: &str) {
        lock(&self.cache).remove(key_id);
        self.revoked
            .send_if_modified(|set| set.insert(key_id.to_string()));
    }

    /// Resolves once `key_id` is known revoked.
    pub async fn revoked(&self, key_id: &str) {
        let mut rx = self.revoked.subscribe();
        let _ = rx.wait_for(|set| set.contains(key_id)).await;
    }

    async fn record(&self, key_id: &str) -> Result<Option<KeyRecord>, Status> {
        if let Some((r, at)) = lock(&self.cache).get(key_id)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(Some(r.clone()));
        }
        let r = self.store.api_key_record(key_id).await.map_err(|e| {
            rich_status(
                Code::Unavailable,
                format!("cannot check the API key now: {e}"),
                "DATABASE_UNAVAILABLE",
                None,
                Some(std::time::Duration::from_secs(2)),
            )
        })?;
        if let Some(r) = &r {
            lock(&self.cache).insert(key_id.to_string(), (r.clone(), Instant::now()));
        }
        Ok(r)
    }

    /// The caller `headers` prove, or UNAUTHENTICATED saying what is wrong
    /// (never echoing the token).
    pub async fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer_certs: Option<&[tonic::transport::CertificateDer<'static>]>,
    ) -> Result<Caller, Status> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            // A CA-verified client certificate the operator maps to a
            // project (parsed only here: calls with a key never pay for it).
            let peer_names = match peer_certs.and_then(<[_]>::first) {
                Some(cert) if !self.identities.is_empty() => berth_common::tls::cert_names(cert),
                _ => Vec::new(),
            };
            if let Some((name, (project, role))) = peer_names
                .iter()
                .find_map(|n| self.identities.get(n).map(|i| (n, i)))
            {
                return Ok(Caller {
                    project: project.clone(),
                    role: *role,
                    key_id: None,
                    certificate: Some(name.clone()),
                });
            }
            if self.allow_anonymous {
                return Ok(Caller {
                    project: DEFAULT_PROJECT.into(),
                    role: Role::FleetAdmin,
                    key_id: None,
                    certificate: None,
                });
            }
            return Err(rich_status(
                Code::Unauthenticated,
                "missing `authorization: Bearer <API key>` metadata",
                "API_KEY_MISSING",
                Some("authorization"),
                None,
            ));
        };
        let token = value.to_str().ok().and_then(bearer_token).ok_or_else(|| {
            rich_status(
                Code::Unauthenticated,
                "`authorization` metadata must be `Bearer <API key>`",
                "API_KEY_MALFORMED",
                Some("authorization"),
                None,
            )
        })?;
        let invalid = || {
            rich_status(
                Code::Unauthenticated,
                "invalid API key: not one this deployment issued (a fleet admin makes keys with `berth keys create`)",
                "API_KEY_INVALID",
                Some("authorization"),
                None,
            )
        };
        let key_id = key_id_of(token).ok_or_else(invalid)?;
        let record = self.record(key_id).await?.ok_or_else(invalid)?;
        let given = token_hash(token);
        // Constant-time: the hash comparison must not leak how much matched.
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_slice(),
            record.sha256.as_slice(),
        )) {
            tracing::warn!(key_id, "API key with a wrong secret");
            return Err(invalid());
        }
        if record.revoked {
            return Err(rich_status(
                Code::Unauthenticated,
                format!("API key {key_id} is revoked"),
                "API_KEY_REVOKED",
                Some("authorization"),
                None,
            ));
        }
        Ok(Caller {
            project: record.project,
            role: record.role,
            key_id: Some(key_id.to_string()),
            certificate: None,
        })
    }
}

/// Parses `NAME=PROJECT:ROLE` (`--client-identity`).
pub fn parse_identity(s: &str) -> Result<(String, (String, Role)), String> {
    let bad = || format!("`{s}`: expected NAME=PROJECT:ROLE (ROLE: member or fleet-admin)");
    let (name, rest) = s.split_once('=').ok_or_else(bad)?;
    let (project, role) = rest.split_once(':').ok_or_else(bad)?;
    let role = match role {
        "member" => Role::Member,
        "fleet-admin" | "fleet_admin" => Role::FleetAdmin,
        _ => return Err(bad()),
    };
    if name.is_empty() || !berth_common::names::is_agent_id(project) {
        return Err(bad());
    }
    Ok((name.to_string(), (project.to_string(), role)))
}

/// Services every caller may reach without a key: load balancers' probes.
fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
}

/// Tower layer: authenticates each call and hands the [`Caller`] on.
#[derive(Clone)]
pub struct AuthLayer(pub Arc<Authenticator>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B, R> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        // The ready service is the one to call; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        // The verified client certificate, on an mTLS connection.
        let peer_certs = req
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(TlsConnectInfo::peer_certs);
        Box::pin(async move {
            if !exempt(req.uri().path()) {
                match auth
                    .authenticate(req.headers(), peer_certs.as_deref().map(Vec::as_slice))
                    .await
                {
                    Ok(caller) => {
                        req.extensions_mut().insert(caller);
                    }
                    Err(status) => return Ok(status.into_http()),
                }
            }
            inner.call(req).await
        })
    }
}

/// The credential of an `authorization` value: the scheme is
/// case-insensitive (RFC 9110 §11.1), so `bearer x` is `Bearer x`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for ok in ["Bearer berth_a_b", "bearer berth_a_b", "BEARER  berth_a_b "] {
            assert_eq!(bearer_token(ok), Some("berth_a_b"), "{ok}");
        }
        for bad in ["", "Bearer", "Bearer ", "Basic berth_a_b", "berth_a_b"] {
            assert_eq!(bearer_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_are_prefixed_high_entropy_and_carry_their_key_id() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a.token, b.token);
        assert!(a.token.starts_with("berth_"));
        assert_eq!(key_id_of(&a.token), Some(a.key_id.as_str()));
        assert_eq!(a.sha256, token_hash(&a.token));
        assert_eq!(a.sha256.len(), 32);
        for bad in ["", "berth_", "berth_abc_def", "Bearer x", &a.token[1..]] {
            assert_eq!(key_id_of(bad), None, "{bad}");
        }
    }
}

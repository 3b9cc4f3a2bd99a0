//! Calling the API with a key: every request carries
//! `authorization: Bearer <token>`.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Adds the API key to each request (nothing when there is none).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.write_str(if self.0.is_some() {
            "Bearer(<token>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Bearer {
    /// `None` or an empty token sends no `authorization` metadata.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Self(None)),
            Some(t) => {
                let mut v: MetadataValue<Ascii> = format!("Bearer {t}").parse().map_err(|_| {
                    "the API token has characters a header cannot carry".to_string()
                })?;
                v.set_sensitive(true);
                Ok(Self(Some(v)))
            }
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel whose calls carry an API key: what every client is built on.
pub type Api = InterceptedService<Channel, Bearer>;

/// `channel` with `bearer` on every call.
pub fn api(channel: Channel, bearer: Bearer) -> Api {
    InterceptedService::new(channel, bearer)
}

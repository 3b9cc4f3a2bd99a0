//! The HTTPS client the services use to reach the world (the model API and
//! declared routes from the gateway; webhooks, OAuth token endpoints and
//! Slack from the dispatchers): HTTP/1.1, plain http or TLS with the
//! system's CA roots.

use hyper_util::client::legacy::Client as Legacy;
use hyper_util::client::legacy::connect::HttpConnector;

/// An HTTPS client sending bodies of type `B`.
pub type Client<B> = Legacy<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// A new [`Client`]; fails when the system's CA roots cannot be read.
pub fn client<B>() -> anyhow::Result<Client<B>>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .map_err(|e| anyhow::anyhow!("loading the system's CA roots: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Legacy::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

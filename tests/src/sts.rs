//! A stand-in for AWS STS on loopback: it answers
//! `AssumeRoleWithWebIdentity` as STS does (the form request, the XML
//! answer) with the S3 test server's key and a session token of its own,
//! and records each token and role it was sent. Reached through the SDK's
//! own endpoint override (`AWS_ENDPOINT_URL_STS`), so the web identity
//! provider (IRSA on EKS) runs unchanged against it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::s3;

/// What one call carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assumed {
    pub role_arn: String,
    pub web_identity_token: String,
}

/// A running stand-in; it stops when dropped.
pub struct Sts {
    pub addr: SocketAddr,
    /// The session token every answer carries.
    pub session_token: String,
    calls: Arc<Mutex<Vec<Assumed>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Sts {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let session_token = format!("berth-sts-{}", uuid::Uuid::new_v4().simple());
        let calls: Arc<Mutex<Vec<Assumed>>> = Arc::default();
        let (seen, token) = (calls.clone(), session_token.clone());
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(move |body: bytes::Bytes| {
                let (seen, token) = (seen.clone(), token.clone());
                async move { answer(&body, &seen, &token) }
            }),
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            session_token,
            calls,
            server,
        })
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<Assumed> {
        self.calls.lock().expect("calls").clone()
    }
}

impl Drop for Sts {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn answer(
    body: &[u8],
    seen: &Mutex<Vec<Assumed>>,
    token: &str,
) -> (
    axum::http::StatusCode,
    [(&'static str, &'static str); 1],
    String,
) {
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(body).into_owned().collect();
    let field = |k: &str| form.get(k).cloned().unwrap_or_default();
    if field("Action") != "AssumeRoleWithWebIdentity" || field("WebIdentityToken").is_empty() {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            [("content-type", "text/xml")],
            "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidAction</Code>\
             <Message>only AssumeRoleWithWebIdentity, with a token</Message></Error></ErrorResponse>"
                .into(),
        );
    }
    seen.lock().expect("calls").push(Assumed {
        role_arn: field("RoleArn"),
        web_identity_token: field("WebIdentityToken"),
    });
    let xml = format!(
        r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>{}</AccessKeyId>
      <SecretAccessKey>{}</SecretAccessKey>
      <SessionToken>{token}</SessionToken>
      <Expiration>2099-01-01T00:00:00Z</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/berth-node/test</Arn>
      <AssumedRoleId>AROATEST:test</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>berth-test</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#,
        s3::ACCESS_KEY,
        s3::SECRET_KEY
    );
    (
        axum::http::StatusCode::OK,
        [("content-type", "text/xml")],
        xml,
    )
}

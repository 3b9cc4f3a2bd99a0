//! The S3 client: credentials, addressing and server-side encryption.
//!
//! - **Credentials**: `--s3-access-key-id` and `--s3-secret-access-key`
//!   when both are given (an override); otherwise the AWS default chain:
//!   the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//!   `AWS_SESSION_TOKEN`), the shared profile, web identity (IRSA:
//!   `AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`), then the container
//!   and instance metadata endpoints. Each endpoint can be overridden the
//!   SDK's way (`AWS_ENDPOINT_URL_STS`, say). Checked once at start, so a
//!   node or dispatcher without credentials says so then, not at its first
//!   snapshot.
//! - **Addressing**: path-style (`endpoint/bucket/key`) or virtual-hosted
//!   (`bucket.endpoint/key`); `auto` is path-style with a custom endpoint
//!   (S3-compatible servers) and virtual-hosted on AWS.
//! - **Server-side encryption**: SSE-S3 or SSE-KMS (with an optional key
//!   id) on every object written.

use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, ProvideCredentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::operation::create_multipart_upload::builders::CreateMultipartUploadFluentBuilder;
use aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder;
use aws_sdk_s3::types::ServerSideEncryption;

use super::{ObjectError, ObjectStoreArgs, Result};

/// How a bucket is addressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Addressing {
    /// Path-style with `--s3-endpoint`, virtual-hosted without.
    #[default]
    Auto,
    /// `https://endpoint/bucket/key`.
    Path,
    /// `https://bucket.endpoint/key`.
    Virtual,
}

impl Addressing {
    /// Whether requests put the bucket in the path.
    pub fn path_style(self, custom_endpoint: bool) -> bool {
        match self {
            Self::Auto => custom_endpoint,
            Self::Path => true,
            Self::Virtual => false,
        }
    }
}

/// Server-side encryption asked of the store for every object written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SseMode {
    /// None asked (the bucket's default applies).
    #[default]
    None,
    /// SSE-S3: `AES256`, keys the store manages.
    Aes256,
    /// SSE-KMS: `aws:kms`, with `--s3-sse-kms-key-id` or the account's key.
    AwsKms,
}

/// The encryption headers of each write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sse {
    pub mode: SseMode,
    pub kms_key_id: Option<String>,
}

impl Sse {
    /// From the flags; a KMS key id needs `aws-kms`.
    pub fn from_args(args: &ObjectStoreArgs) -> Result<Self> {
        let kms_key_id = args.s3_sse_kms_key_id.clone().filter(|k| !k.is_empty());
        if kms_key_id.is_some() && args.s3_sse != SseMode::AwsKms {
            return Err(ObjectError::Config(
                "--s3-sse-kms-key-id needs --s3-sse aws-kms".into(),
            ));
        }
        Ok(Self {
            mode: args.s3_sse,
            kms_key_id,
        })
    }

    fn algorithm(&self) -> Option<ServerSideEncryption> {
        match self.mode {
            SseMode::None => None,
            SseMode::Aes256 => Some(ServerSideEncryption::Aes256),
            SseMode::AwsKms => Some(ServerSideEncryption::AwsKms),
        }
    }

    /// A single PUT with these headers.
    pub(super) fn put(&self, req: PutObjectFluentBuilder) -> PutObjectFluentBuilder {
        req.set_server_side_encryption(self.algorithm())
            .set_ssekms_key_id(self.kms_key_id.clone())
    }

    /// A multipart upload with these headers (its parts inherit them).
    pub(super) fn multipart(
        &self,
        req: CreateMultipartUploadFluentBuilder,
    ) -> CreateMultipartUploadFluentBuilder {
        req.set_server_side_encryption(self.algorithm())
            .set_ssekms_key_id(self.kms_key_id.clone())
    }
}

/// How long the start waits for the credential chain.
const CREDENTIALS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The client `args` describe, with credentials checked.
pub(super) async fn client(args: &ObjectStoreArgs) -> Result<aws_sdk_s3::Client> {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(args.s3_region.clone()));
    match (&args.s3_access_key_id, &args.s3_secret_access_key) {
        (Some(id), Some(secret)) => {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "berth-flags",
            ));
        }
        (None, None) => {}
        _ => {
            return Err(ObjectError::Config(
                "--s3-access-key-id and --s3-secret-access-key go together (or set neither, \
                 for the AWS default credential chain)"
                    .into(),
            ));
        }
    }
    let sdk = loader.load().await;
    let provider = sdk
        .credentials_provider()
        .ok_or_else(|| ObjectError::Config("--s3-bucket: no S3 credential provider".into()))?;
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(ObjectError::Config(format!(
                "--s3-bucket needs credentials: none from the flags, the environment, the \
                 shared profile, web identity, or the container and instance metadata: {}",
                crate::causes::with_causes(e.to_string(), std::error::Error::source(&e))
            )));
        }
        Err(_) => {
            return Err(ObjectError::Config(format!(
                "--s3-bucket: the AWS credential chain gave no answer within {CREDENTIALS_TIMEOUT:?}"
            )));
        }
    }
    let endpoint = args.s3_endpoint.as_ref().filter(|e| !e.is_empty());
    let mut cfg = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(args.s3_addressing.path_style(endpoint.is_some()))
        // S3-compatible servers: checksums only where the API requires them.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if let Some(endpoint) = endpoint {
        cfg = cfg.endpoint_url(endpoint.clone());
    }
    Ok(aws_sdk_s3::Client::from_conf(cfg.build()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_addressing_is_path_style_only_with_a_custom_endpoint() {
        assert!(Addressing::Auto.path_style(true));
        assert!(!Addressing::Auto.path_style(false));
        assert!(Addressing::Path.path_style(false));
        assert!(!Addressing::Virtual.path_style(true));
    }

    #[test]
    fn a_kms_key_needs_kms_encryption() {
        let mut args = ObjectStoreArgs {
            s3_sse_kms_key_id: Some("alias/berth".into()),
            ..Default::default()
        };
        let err = Sse::from_args(&args).expect_err("refused");
        assert!(err.to_string().contains("--s3-sse aws-kms"), "{err}");
        args.s3_sse = SseMode::AwsKms;
        let sse = Sse::from_args(&args).expect("accepted");
        assert_eq!(sse.algorithm(), Some(ServerSideEncryption::AwsKms));
        assert_eq!(sse.kms_key_id.as_deref(), Some("alias/berth"));
    }

    #[tokio::test]
    async fn half_a_static_key_is_refused() {
        let args = ObjectStoreArgs {
            s3_bucket: Some("b".into()),
            s3_access_key_id: Some("id".into()),
            ..Default::default()
        };
        let err = client(&args).await.expect_err("refused");
        assert!(err.to_string().contains("go together"), "{err}");
    }
}

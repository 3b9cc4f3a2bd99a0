//! The object-store seam: snapshots, memory stores and uploaded files.
//!
//! Two backends behind one type:
//! - S3 through aws-sdk-s3 ([`s3`]: the AWS credential chain, path-style
//!   or virtual-hosted addressing, server-side encryption, checksums only
//!   "when required"), so S3-compatible servers (MinIO, Ceph, s3s) work as
//!   well as AWS;
//! - a local directory, the default when no bucket is configured. A dispatcher
//!   and the nodes it drives must see the same store: a shared directory works
//!   only when they share a filesystem (one machine); a fleet needs S3.
//!
//! Keys (ARCHITECTURE.md §7): `sessions/{id}/snapshots/{n}.tar.zst`,
//! `agents/{id}/memory/{store}.tar.zst`, `files/{id}`.

mod s3;
mod stream;

use std::path::{Path, PathBuf};

use bytes::Bytes;

pub use s3::{Addressing, Sse, SseMode};
pub use stream::{ObjectReader, PART_BYTES};

/// Why an object operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("bad object key `{0}`: keys are relative, `/`-separated, without `.` or `..` segments")]
    BadKey(String),
    #[error("object store: {0}")]
    Backend(String),
    #[error("object store configuration: {0}")]
    Config(String),
}

type Result<T> = std::result::Result<T, ObjectError>;

/// Where objects live. `--s3-bucket` selects S3; otherwise `--objects-dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct ObjectStoreArgs {
    /// Directory of the local object store, used when no S3 bucket is set.
    #[arg(long, env = "BERTH_OBJECTS_DIR", default_value = ".berth/objects")]
    pub objects_dir: PathBuf,
    /// S3 bucket for snapshots, memory stores and files. Setting it selects S3.
    #[arg(long, env = "BERTH_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3 endpoint URL, for S3-compatible servers (e.g. `http://minio:9000`).
    /// Unset: AWS's endpoint for the region.
    #[arg(long, env = "BERTH_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "BERTH_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Prefix prepended to every key, to share a bucket (e.g. `berth/`).
    #[arg(long, env = "BERTH_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// How the bucket is addressed: `path` (`endpoint/bucket/key`),
    /// `virtual` (`bucket.endpoint/key`), or `auto`: path-style with
    /// `--s3-endpoint`, virtual-hosted on AWS.
    #[arg(long, env = "BERTH_S3_ADDRESSING", value_enum, default_value_t = Addressing::Auto)]
    pub s3_addressing: Addressing,
    /// Server-side encryption asked for every object written: `none` (the
    /// bucket's default), `aes256` (SSE-S3) or `aws-kms` (SSE-KMS).
    #[arg(long, env = "BERTH_S3_SSE", value_enum, default_value_t = SseMode::None)]
    pub s3_sse: SseMode,
    /// The KMS key (id, ARN or alias) for `--s3-sse aws-kms`; unset: the
    /// account's default key for S3.
    #[arg(long, env = "BERTH_S3_SSE_KMS_KEY_ID")]
    pub s3_sse_kms_key_id: Option<String>,
    /// A static S3 access key id, with `--s3-secret-access-key`: overrides
    /// the AWS default credential chain (environment `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, the shared profile,
    /// web identity as IRSA gives it, container and instance metadata).
    #[arg(long, env = "BERTH_S3_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// The static key's secret (see `--s3-access-key-id`).
    #[arg(long, env = "BERTH_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
}

impl Default for ObjectStoreArgs {
    fn default() -> Self {
        Self {
            objects_dir: PathBuf::from(".berth/objects"),
            s3_bucket: None,
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
            s3_prefix: String::new(),
            s3_addressing: Addressing::Auto,
            s3_sse: SseMode::None,
            s3_sse_kms_key_id: None,
            s3_access_key_id: None,
            s3_secret_access_key: None,
        }
    }
}

/// An object store: S3 or a local directory.
#[derive(Clone)]
pub enum ObjectStore {
    Local(PathBuf),
    S3 {
        client: aws_sdk_s3::Client,
        bucket: String,
        prefix: String,
        sse: Sse,
    },
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(dir) => write!(f, "local directory {}", dir.display()),
            Self::S3 { bucket, prefix, .. } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl ObjectStore {
    /// Opens the store `args` describe (for S3, once its credentials are
    /// found).
    pub async fn open(args: &ObjectStoreArgs) -> Result<Self> {
        let Some(bucket) = args.s3_bucket.clone().filter(|b| !b.is_empty()) else {
            std::fs::create_dir_all(&args.objects_dir).map_err(|e| {
                ObjectError::Config(format!(
                    "cannot create --objects-dir {}: {e}",
                    args.objects_dir.display()
                ))
            })?;
            let dir = args
                .objects_dir
                .canonicalize()
                .unwrap_or_else(|_| args.objects_dir.clone());
            return Ok(Self::Local(dir));
        };
        let sse = Sse::from_args(args)?;
        Ok(Self::S3 {
            client: s3::client(args).await?,
            bucket,
            prefix: args.s3_prefix.clone(),
            sse,
        })
    }

    /// Stores `body` at `key`, replacing what was there.
    pub async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        match self {
            // In one request, without a copy, when it fits in one part.
            Self::S3 {
                client,
                bucket,
                prefix,
                sse,
            } if body.len() < PART_BYTES => {
                check_key(key)?;
                stream::put_one(client, bucket, sse, &format!("{prefix}{key}"), key, body).await
            }
            _ => self.put_stream(key, &body[..]).await.map(|_| ()),
        }
    }

    /// The object at `key`, or `None` when there is none.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let Some(mut reader) = self.get_stream(key).await? else {
            return Ok(None);
        };
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut body)
            .await
            .map_err(|e| backend("read", key, e))?;
        Ok(Some(Bytes::from(body)))
    }

    /// Keys under `prefix`, sorted.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        match self {
            Self::Local(dir) => {
                let root = dir.clone();
                let prefix = prefix.to_string();
                tokio::task::spawn_blocking(move || list_local(&root, &prefix))
                    .await
                    .map_err(|e| ObjectError::Backend(e.to_string()))?
            }
            Self::S3 {
                client,
                bucket,
                prefix: base,
                ..
            } => {
                let mut keys = Vec::new();
                let mut token = None;
                loop {
                    let out = client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(format!("{base}{prefix}"))
                        .set_continuation_token(token)
                        .send()
                        .await
                        .map_err(|e| {
                            backend("list", prefix, aws_sdk_s3::error::DisplayErrorContext(e))
                        })?;
                    keys.extend(
                        out.contents()
                            .iter()
                            .filter_map(|o| o.key())
                            .filter_map(|k| k.strip_prefix(base.as_str()))
                            .map(String::from),
                    );
                    match out.next_continuation_token() {
                        Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                        _ => break,
                    }
                }
                keys.sort();
                Ok(keys)
            }
        }
    }

    /// Removes `key`; removing a missing object is not an error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        match self {
            Self::Local(dir) => match tokio::fs::remove_file(dir.join(key)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(backend("delete", key, e)),
            },
            Self::S3 {
                client,
                bucket,
                prefix,
                ..
            } => client
                .delete_object()
                .bucket(bucket)
                .key(format!("{prefix}{key}"))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| backend("delete", key, aws_sdk_s3::error::DisplayErrorContext(e))),
        }
    }

    /// Removes every object under `prefix`; returns how many there were.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<u64> {
        let keys = self.list(prefix).await?;
        for key in &keys {
            self.delete(key).await?;
        }
        Ok(keys.len() as u64)
    }
}

/// Keys are relative paths with no empty, `.` or `..` segments, so a local
/// store can never be led outside its directory.
fn check_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && !key.contains('\0')
        && key
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if ok {
        Ok(())
    } else {
        Err(ObjectError::BadKey(key.to_string()))
    }
}

fn backend(op: &str, key: &str, e: impl std::fmt::Display) -> ObjectError {
    ObjectError::Backend(format!("{op} `{key}`: {e}"))
}

fn list_local(root: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(backend("list", prefix, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| backend("list", prefix, e))?;
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                let key = rel.to_string_lossy().replace('\\', "/");
                // In-flight writes are not objects yet.
                if key.starts_with(prefix) && !key.contains(".tmp-") {
                    keys.push(key);
                }
            }
        }
    }
    keys.sort();
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_store() {
        for bad in ["", "/etc/passwd", "a/../../b", "a//b", "./a", "a/.", "a\0b"] {
            assert!(check_key(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["files/1", "sessions/x/snapshots/1.tar.zst", "a.b/c..d"] {
            assert!(check_key(good).is_ok(), "{good:?} refused");
        }
    }

    #[tokio::test]
    async fn the_local_store_puts_gets_lists_and_deletes() {
        let dir = std::env::temp_dir().join(format!("berth-objects-{}", std::process::id()));
        let store = ObjectStore::open(&ObjectStoreArgs {
            objects_dir: dir.clone(),
            ..Default::default()
        })
        .await
        .expect("open");
        store
            .put("a/1", Bytes::from_static(b"one"))
            .await
            .expect("put");
        store
            .put("a/2", Bytes::from_static(b"two"))
            .await
            .expect("put");
        store
            .put("b/1", Bytes::from_static(b"x"))
            .await
            .expect("put");
        assert_eq!(
            store.get("a/1").await.expect("get").as_deref(),
            Some(&b"one"[..])
        );
        assert_eq!(store.get("a/3").await.expect("get"), None);
        assert_eq!(store.list("a/").await.expect("list"), ["a/1", "a/2"]);
        assert_eq!(store.delete_prefix("a/").await.expect("delete"), 2);
        assert!(store.list("a/").await.expect("list").is_empty());
        store
            .delete("a/1")
            .await
            .expect("deleting a missing object is fine");
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! Objects as streams, in bounded memory whatever their size: uploads in
//! parts (S3 multipart, or a temporary file renamed into place) and
//! downloads read as they arrive.
//!
//! Invariant: an object appears at its key only when its whole body was
//! stored. A body that fails, or a store that fails mid-way, leaves what
//! was at the key before (the multipart upload is aborted; the temporary
//! file removed).

use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{ObjectError, ObjectStore, Result, backend, check_key};

/// Size of one uploaded part (S3's minimum is 5 MiB; at 8 MiB its 10,000
/// parts hold 78 GiB). The one buffer an upload holds.
pub const PART_BYTES: usize = 8 << 20;

/// A reader of an object's body.
pub type ObjectReader = Box<dyn AsyncRead + Send + Unpin>;

/// Local writes of this process so far: two writers of one key never share
/// a temporary file.
static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl ObjectStore {
    /// Stores what `body` yields at `key`, replacing what was there once it
    /// has all been stored; returns its size. An error from `body` or the
    /// store leaves the previous object in place.
    pub async fn put_stream(
        &self,
        key: &str,
        mut body: impl AsyncRead + Unpin + Send,
    ) -> Result<u64> {
        check_key(key)?;
        match self {
            Self::Local(dir) => {
                let path = dir.join(key);
                let tmp = path.with_extension(format!(
                    "tmp-{}-{}",
                    std::process::id(),
                    WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let write = async {
                    if let Some(parent) = path.parent() {
                        tokio::fs::create_dir_all(parent).await?;
                    }
                    let mut file = tokio::fs::File::create(&tmp).await?;
                    let n = tokio::io::copy(&mut body, &mut file).await?;
                    file.sync_all().await?;
                    // Readers see the old object or the new one, never half.
                    tokio::fs::rename(&tmp, &path).await?;
                    Ok::<_, std::io::Error>(n)
                };
                let written = write.await;
                if written.is_err() {
                    let _ = tokio::fs::remove_file(&tmp).await;
                }
                written.map_err(|e| backend("put", key, e))
            }
            Self::S3 {
                client,
                bucket,
                prefix,
                sse,
            } => {
                let full = format!("{prefix}{key}");
                let first = read_part(&mut body)
                    .await
                    .map_err(|e| backend("read the body of", key, e))?;
                if first.len() < PART_BYTES {
                    // All of it fits in one part: one PUT.
                    let n = first.len() as u64;
                    put_one(client, bucket, sse, &full, key, first.freeze()).await?;
                    return Ok(n);
                }
                let upload = sse
                    .multipart(client.create_multipart_upload().bucket(bucket).key(&full))
                    .send()
                    .await
                    .map_err(|e| backend("start the upload of", key, DisplayErrorContext(e)))?;
                let id = upload.upload_id().unwrap_or_default().to_string();
                let uploaded = upload_parts(client, bucket, &full, &id, first, &mut body)
                    .await
                    .map_err(|e| ObjectError::Backend(format!("put `{key}`: {e}")));
                if uploaded.is_err() {
                    // Nothing replaces the old object; the parts are dropped.
                    let aborted = client
                        .abort_multipart_upload()
                        .bucket(bucket)
                        .key(&full)
                        .upload_id(&id)
                        .send()
                        .await;
                    if let Err(e) = aborted {
                        tracing::warn!(%key, error = %DisplayErrorContext(e),
                            "could not abort a failed multipart upload (a bucket lifecycle rule removes its parts)");
                    }
                }
                uploaded
            }
        }
    }

    /// A reader of the object at `key`, or `None` when there is none. The
    /// body is read as it arrives.
    pub async fn get_stream(&self, key: &str) -> Result<Option<ObjectReader>> {
        check_key(key)?;
        match self {
            Self::Local(dir) => match tokio::fs::File::open(dir.join(key)).await {
                Ok(f) => Ok(Some(Box::new(f))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(backend("get", key, e)),
            },
            Self::S3 {
                client,
                bucket,
                prefix,
                ..
            } => match client
                .get_object()
                .bucket(bucket)
                .key(format!("{prefix}{key}"))
                .send()
                .await
            {
                Ok(out) => Ok(Some(Box::new(out.body.into_async_read()))),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                Err(e) => Err(backend("get", key, DisplayErrorContext(e))),
            },
        }
    }
}

/// Stores `body` at `full` (the prefixed `key`) in one S3 PUT.
pub(super) async fn put_one(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    sse: &super::Sse,
    full: &str,
    key: &str,
    body: bytes::Bytes,
) -> Result<()> {
    sse.put(client.put_object().bucket(bucket).key(full))
        .body(ByteStream::from(body))
        .send()
        .await
        .map(|_| ())
        .map_err(|e| backend("put", key, DisplayErrorContext(e)))
}

/// Uploads `first` and the rest of `body` as the parts of upload `id`, then
/// completes it. Returns the object's size.
async fn upload_parts(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    id: &str,
    first: BytesMut,
    body: &mut (impl AsyncRead + Unpin + Send),
) -> std::result::Result<u64, String> {
    let mut parts = Vec::new();
    let mut total = 0u64;
    let mut part = first;
    loop {
        let number = parts.len() as i32 + 1;
        total += part.len() as u64;
        let last = part.len() < PART_BYTES;
        let done = client
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(id)
            .part_number(number)
            .body(ByteStream::from(part.freeze()))
            .send()
            .await
            .map_err(|e| format!("part {number}: {}", DisplayErrorContext(e)))?;
        parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(done.e_tag().map(String::from))
                .build(),
        );
        if last {
            break;
        }
        part = read_part(body)
            .await
            .map_err(|e| format!("reading part {}: {e}", number + 1))?;
        if part.is_empty() {
            break;
        }
    }
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .map_err(|e| format!("completing the upload: {}", DisplayErrorContext(e)))?;
    Ok(total)
}

/// Reads up to [`PART_BYTES`] from `body`: fewer only at its end. The
/// buffer grows as the body comes: a small object never costs a part.
async fn read_part(body: &mut (impl AsyncRead + Unpin)) -> std::io::Result<BytesMut> {
    const STEP: usize = 64 << 10;
    let mut buf = BytesMut::new();
    while buf.len() < PART_BYTES {
        buf.reserve(STEP.min(PART_BYTES - buf.len()));
        let room = PART_BYTES - buf.len();
        if (&mut *body).take(room as u64).read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::objects::ObjectStoreArgs;

    /// A body that yields `left` bytes, then fails.
    struct CutShort {
        left: usize,
    }

    impl AsyncRead for CutShort {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.left == 0 {
                return Poll::Ready(Err(std::io::Error::other("the writer died")));
            }
            let n = self.left.min(buf.remaining()).min(4096);
            buf.put_slice(&vec![7u8; n]);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_body_that_fails_leaves_the_previous_object() {
        let dir = std::env::temp_dir().join(format!("berth-stream-{}", std::process::id()));
        let store = ObjectStore::open(&ObjectStoreArgs {
            objects_dir: dir.clone(),
            ..Default::default()
        })
        .await
        .expect("open");
        store
            .put("s/1", bytes::Bytes::from_static(b"good"))
            .await
            .expect("put");
        let err = store
            .put_stream("s/1", CutShort { left: 100_000 })
            .await
            .expect_err("a failed body is an error");
        assert!(err.to_string().contains("the writer died"), "{err}");
        assert_eq!(
            store.get("s/1").await.expect("get").as_deref(),
            Some(&b"good"[..])
        );
        assert_eq!(
            store.list("s/").await.expect("list"),
            ["s/1"],
            "no temporary file is left"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! A real S3-protocol server on loopback (s3s-fs over a temporary directory),
//! so object-store code is tested against the protocol, not a mock.

use std::net::SocketAddr;
use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio_util::sync::CancellationToken;

/// Credentials the test server accepts.
pub const ACCESS_KEY: &str = "berth-test";
pub const SECRET_KEY: &str = "berth-test-secret";
/// The bucket every test cluster uses.
pub const BUCKET: &str = "berth";

/// An S3 server on `127.0.0.1:PORT`, serving a temporary directory.
pub struct S3Server {
    pub addr: SocketAddr,
    /// The directory behind the server; the bucket is a folder in it.
    pub root: PathBuf,
    stop: CancellationToken,
}

impl S3Server {
    /// Starts a server with one empty bucket, [`BUCKET`].
    pub async fn start() -> anyhow::Result<Self> {
        let root = std::env::temp_dir().join(format!("berth-s3-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(root.join(BUCKET))?;
        let fs = s3s_fs::FileSystem::new(&root).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
        let mut b = S3ServiceBuilder::new(fs);
        b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            loop {
                let socket = tokio::select! {
                    () = token.cancelled() => return,
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        Err(_) => continue,
                    },
                };
                let conn = http
                    .serve_connection(TokioIo::new(socket), service.clone())
                    .into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(Self { addr, root, stop })
    }

    /// Object-store settings pointing at this server.
    pub fn args(&self) -> berth_common::objects::ObjectStoreArgs {
        berth_common::objects::ObjectStoreArgs {
            s3_bucket: Some(BUCKET.into()),
            s3_endpoint: Some(format!("http://{}", self.addr)),
            s3_access_key_id: Some(ACCESS_KEY.into()),
            s3_secret_access_key: Some(SECRET_KEY.into()),
            ..Default::default()
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop.cancel();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

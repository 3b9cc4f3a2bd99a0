//! A real S3-protocol server on loopback (s3s-fs over a temporary directory),
//! so object-store code is tested against the protocol, not a mock. It can
//! be killed (its listener and every connection dropped at once) and
//! started again on the same address and directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio_util::sync::CancellationToken;

/// Credentials the test server accepts.
pub const ACCESS_KEY: &str = "berth-test";
pub const SECRET_KEY: &str = "berth-test-secret";
/// The bucket every test cluster uses.
pub const BUCKET: &str = "berth";

/// What the server saw of one request: enough to check what a client
/// asked for (encryption, temporary credentials).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// `x-amz-server-side-encryption`.
    pub sse: Option<String>,
    /// `x-amz-server-side-encryption-aws-kms-key-id`.
    pub kms_key_id: Option<String>,
    /// `x-amz-security-token` (temporary credentials).
    pub security_token: Option<String>,
}

/// An S3 server on `127.0.0.1:PORT`, serving a temporary directory.
pub struct S3Server {
    pub addr: SocketAddr,
    /// The directory behind the server; the bucket is a folder in it.
    pub root: PathBuf,
    service: S3Service,
    /// Multipart parts received (`UploadPart` requests) so far.
    parts: Arc<AtomicU64>,
    /// Every request, in order.
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    /// The running incarnation: cancelled by [`Self::kill`].
    life: std::sync::Mutex<CancellationToken>,
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
        let server = Self {
            addr,
            root,
            service,
            parts: Arc::new(AtomicU64::new(0)),
            seen: Arc::default(),
            life: std::sync::Mutex::new(CancellationToken::new()),
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let token = self.life.lock().expect("life").clone();
        let service = self.service.clone();
        let parts = self.parts.clone();
        let seen = self.seen.clone();
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
                let (service, parts, seen) = (service.clone(), parts.clone(), seen.clone());
                let counting = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        if req.uri().query().is_some_and(|q| q.contains("partNumber=")) {
                            parts.fetch_add(1, Ordering::SeqCst);
                        }
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .map(String::from)
                        };
                        let request = Seen {
                            method: req.method().to_string(),
                            uri: req.uri().to_string(),
                            sse: header("x-amz-server-side-encryption"),
                            kms_key_id: header("x-amz-server-side-encryption-aws-kms-key-id"),
                            security_token: header("x-amz-security-token"),
                        };
                        seen.lock().expect("seen").push(request);
                        Service::call(&service, req)
                    },
                );
                let conn = http
                    .serve_connection(TokioIo::new(socket), counting)
                    .into_owned();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = token.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
    }

    /// Every request the server has been sent so far.
    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Multipart parts the server has been sent so far.
    pub fn parts_received(&self) -> u64 {
        self.parts.load(Ordering::SeqCst)
    }

    /// Kills the server: the listener and every open connection go at once,
    /// as when its process dies. Stored objects stay on disk.
    pub fn kill(&self) {
        self.life.lock().expect("life").cancel();
    }

    /// Starts the server again on its address, over the same directory.
    pub async fn restart(&self) -> anyhow::Result<()> {
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    tracing::debug!(error = %e, "S3 address still taken; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        *self.life.lock().expect("life") = CancellationToken::new();
        self.serve(listener);
        Ok(())
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
        self.kill();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

//! Dispatchers under test as processes of their own (the real
//! `berth-dispatcher` binary), so their memory can be read and one can be
//! killed: started against simulated nodes, on a fresh database or on one
//! they share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};

use crate::driver::Conns;
use crate::simnode::SimNode;

/// A running dispatcher process.
pub struct Child {
    pub proc: tokio::process::Child,
    pub pid: u32,
    pub url: String,
    /// Its dispatcher id (the `owner` of the sessions it drives).
    pub id: String,
    /// Where it serves `/metrics`, when asked to.
    pub metrics: Option<SocketAddr>,
    /// The database it made for itself ([`spawn_dispatcher`]), to drop.
    pub database: String,
    _dir: Option<TempDir>,
}

/// Files the dispatchers of one fleet share: the CA, their certificate and
/// key, the secrets key. Removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A directory with a dispatcher certificate from `ca` and a fresh
    /// secrets key.
    pub fn fleet(ca: &DevCa, tag: &str) -> anyhow::Result<Self> {
        let dir = Self(std::env::temp_dir().join(format!("berth-loadtest-{tag}")));
        std::fs::create_dir_all(&dir.0)?;
        let issued = ca.issue(CertKind::Dispatcher, &[DISPATCHER_NAME.to_string()])?;
        std::fs::write(dir.0.join("ca.pem"), &ca.cert_pem)?;
        std::fs::write(dir.0.join("dispatcher.pem"), &issued.cert_pem)?;
        std::fs::write(dir.0.join("dispatcher-key.pem"), &issued.key_pem)?;
        write_secrets_key(&dir.0.join("secrets.key"))?;
        Ok(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How one dispatcher of a fleet runs.
pub struct Launch<'a> {
    pub bin: &'a Path,
    pub sims: &'a [SimNode],
    pub database_url: &'a str,
    pub dir: &'a TempDir,
    pub id: String,
    /// Serve `/metrics` on a loopback port.
    pub metrics: bool,
    /// Extra environment (`BERTH_DISPATCHER_LEASE`, …).
    pub env: Vec<(&'static str, String)>,
}

/// One dispatcher on a fresh database of its own, with its own files.
pub async fn spawn_dispatcher(
    bin: &PathBuf,
    ca: &DevCa,
    sims: &[SimNode],
) -> anyhow::Result<Child> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let (database, database_url) = berth_tests::create_database(&tag).await?;
    let dir = TempDir::fleet(ca, &tag)?;
    let mut child = launch(&Launch {
        bin,
        sims,
        database_url: &database_url,
        dir: &dir,
        id: format!("loadtest-{tag}"),
        metrics: false,
        // The driver is one caller standing in for thousands, and opens
        // its streams all at once: the per-caller rate limit and the
        // in-flight bound (1 024 calls opening at once) would shed it, not
        // measure berth.
        env: vec![
            ("BERTH_API_RATE_LIMIT", "0".to_string()),
            ("BERTH_API_MAX_IN_FLIGHT", "65536".to_string()),
        ],
    })?;
    child.database = database;
    child._dir = Some(dir);
    Ok(child)
}

/// Starts a dispatcher as `l` says.
pub fn launch(l: &Launch<'_>) -> anyhow::Result<Child> {
    let dir = &l.dir.0;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let metrics = if l.metrics {
        Some(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
    } else {
        None
    };
    let servers: Vec<String> = l.sims.iter().map(|s| s.url.clone()).collect();
    let resolve: Vec<String> = l
        .sims
        .iter()
        .map(|s| format!("{}={}", s.url.trim_start_matches("https://"), s.addr))
        .collect();
    let mut cmd = tokio::process::Command::new(l.bin);
    cmd.env("BERTH_LISTEN", addr.to_string())
        .env("DATABASE_URL", l.database_url)
        .env("AGENT_SERVERS", servers.join(","))
        .env("BERTH_NODE_RESOLVE", resolve.join(","))
        .env("BERTH_TLS_CA", dir.join("ca.pem"))
        .env("BERTH_TLS_CERT", dir.join("dispatcher.pem"))
        .env("BERTH_TLS_KEY", dir.join("dispatcher-key.pem"))
        .env(
            "BERTH_METRICS_LISTEN",
            metrics.map_or_else(|| "off".to_string(), |m| m.to_string()),
        )
        .env("BERTH_WEBHOOK_LISTEN", "off")
        .env("BERTH_OBJECTS_DIR", dir.join("objects"))
        .env("BERTH_DISPATCHER_ID", &l.id)
        // A benchmark dispatcher of its own: anonymous calls, a fresh key.
        .env("BERTH_ALLOW_ANONYMOUS", "true")
        .env("BERTH_SECRETS_KEY_FILE", dir.join("secrets.key"))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (k, v) in &l.env {
        cmd.env(k, v);
    }
    let proc = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", l.bin.display()))?;
    let pid = proc
        .id()
        .ok_or_else(|| anyhow::anyhow!("the dispatcher exited at once"))?;
    Ok(Child {
        proc,
        pid,
        url: format!("http://{addr}"),
        id: l.id.clone(),
        metrics,
        database: String::new(),
        _dir: None,
    })
}

impl Child {
    /// Connections to its API once it answers (up to 60 s).
    pub async fn connect(&mut self, connections: usize) -> anyhow::Result<Conns> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.proc.try_wait() {
                anyhow::bail!("the dispatcher {} exited with {status}", self.id);
            }
            if let Ok(c) = Conns::open(&self.url, None, None, connections).await {
                let ok = c
                    .get()
                    .list_sessions(berth_proto::v1::ListSessionsRequest {
                        page_size: 1,
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                if ok {
                    return Ok(c);
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the dispatcher {} did not answer within 60 s",
                self.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The dispatcher binary: `given`, or `berth-dispatcher` beside this one.
pub fn binary(given: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let bin = match given {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("berth-dispatcher"),
    };
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build it beside berth-loadtest (`cargo build --release -p berth-server -p berth-loadtest`) or pass --dispatcher-bin",
        bin.display()
    );
    Ok(bin)
}

/// Resident memory of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    berth_tests::proc_status_bytes(pid, "VmRSS")
}

/// A fresh secrets key file at `path`.
fn write_secrets_key(path: &Path) -> anyhow::Result<()> {
    use base64::Engine;
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let line = format!(
        "k1:{}\n",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    std::fs::write(path, line)?;
    Ok(())
}

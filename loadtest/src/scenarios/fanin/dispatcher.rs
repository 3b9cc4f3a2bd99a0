//! The dispatcher under test, as a process of its own (so its memory can be
//! read): started against the simulated nodes, with its own database.

use std::path::PathBuf;

use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};

use crate::simnode::SimNode;

/// A running dispatcher process.
pub(super) struct Child {
    pub(super) proc: tokio::process::Child,
    pub(super) pid: u32,
    pub(super) url: String,
    pub(super) database: String,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) async fn spawn_dispatcher(
    bin: &PathBuf,
    ca: &DevCa,
    sims: &[SimNode],
) -> anyhow::Result<Child> {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let (database, database_url) = berth_tests::create_database(&tag).await?;
    let dir = TempDir(std::env::temp_dir().join(format!("berth-loadtest-{tag}")));
    std::fs::create_dir_all(&dir.0)?;
    let issued = ca.issue(CertKind::Dispatcher, &[DISPATCHER_NAME.to_string()])?;
    std::fs::write(dir.0.join("ca.pem"), &ca.cert_pem)?;
    std::fs::write(dir.0.join("dispatcher.pem"), &issued.cert_pem)?;
    std::fs::write(dir.0.join("dispatcher-key.pem"), &issued.key_pem)?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let servers: Vec<String> = sims.iter().map(|s| s.url.clone()).collect();
    let resolve: Vec<String> = sims
        .iter()
        .map(|s| format!("{}={}", s.url.trim_start_matches("https://"), s.addr))
        .collect();
    let proc = tokio::process::Command::new(bin)
        .env("BERTH_LISTEN", addr.to_string())
        .env("DATABASE_URL", &database_url)
        .env("AGENT_SERVERS", servers.join(","))
        .env("BERTH_NODE_RESOLVE", resolve.join(","))
        .env("BERTH_TLS_CA", dir.0.join("ca.pem"))
        .env("BERTH_TLS_CERT", dir.0.join("dispatcher.pem"))
        .env("BERTH_TLS_KEY", dir.0.join("dispatcher-key.pem"))
        .env("BERTH_METRICS_LISTEN", "off")
        .env("BERTH_OBJECTS_DIR", dir.0.join("objects"))
        .env("BERTH_DISPATCHER_ID", format!("loadtest-{tag}"))
        // A benchmark dispatcher of its own: anonymous calls, a fresh key.
        .env("BERTH_ALLOW_ANONYMOUS", "true")
        .env("BERTH_SECRETS_KEY_FILE", secrets_key_file(&dir.0)?)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", bin.display()))?;
    let pid = proc
        .id()
        .ok_or_else(|| anyhow::anyhow!("the dispatcher exited at once"))?;
    Ok(Child {
        proc,
        pid,
        url: format!("http://{addr}"),
        database,
        _dir: dir,
    })
}

/// Resident memory of a process, in bytes.
pub(super) fn rss(pid: u32) -> anyhow::Result<u64> {
    berth_tests::proc_status_bytes(pid, "VmRSS")
}

/// A fresh secrets key file in `dir`.
fn secrets_key_file(dir: &std::path::Path) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join("secrets.key");
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let line = format!("k1:{}\n", base64_encode(&key));
    std::fs::write(&path, line)?;
    Ok(path)
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

//! berth's test harness: start a real cluster (dispatcher + nodes) in process,
//! against the real Docker daemon and a fresh Postgres database.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let cluster = berth_tests::TestCluster::builder().nodes(1).start().await?;
//! let mut client = cluster.client();
//! # Ok(()) }
//! ```

pub mod config_reference;
pub mod doc_commands;
pub mod engine;
pub mod git_http;
pub mod git_smart;
pub mod git_ssh;
pub mod loopback;
pub mod netns;
pub mod oauth;
pub mod otlp;
pub mod pg;
pub mod process_dispatcher;
pub mod s3;
pub mod sts;

mod builder;
mod cluster;
mod db;
mod docker;
mod logs;
mod process_node;
mod proxy;
mod sessions;

pub use builder::{Builder, NodeHook};
pub use cluster::{KillableDispatcher, TestCluster, TestNode, answering, berth_bin, berth_command};
pub use db::{create_database, drop_database, http_get};
pub use docker::*;
pub use logs::captured_logs;
use logs::init_logging;
pub use process_node::{ProcessNode, node_binary};
pub use proxy::Proxy;
pub use sessions::*;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use berth_common::metrics::Listen;
use berth_common::tls::{CertKind, DISPATCHER_NAME, DevCa};
use berth_proto::v1::{self as pb, nodes_client::NodesClient, sessions_client::SessionsClient};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use berth_cli::auth::{Api, Bearer};

/// The image `deploy/test-image/build.sh` builds.
pub const TEST_IMAGE: &str = "berth-test-agent:latest";
/// The recorded transcript, as the test image holds it.
pub const FIXTURE_IN_IMAGE: &str = "/fixtures/claude-code/explore_count_files.jsonl";

/// Where the public Claude Code captures are read in place: `BERTH_SHARED_FIXTURES`,
/// else `../shared/fixtures/claude-code` beside this checkout. The project
/// keeps no copy of them (see `SOURCES.md` there).
pub fn shared_fixtures() -> std::path::PathBuf {
    match std::env::var_os("BERTH_SHARED_FIXTURES") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/claude-code"),
    }
}

/// A public capture by its path under [`shared_fixtures`].
pub fn fixture(name: &str) -> anyhow::Result<String> {
    let path = shared_fixtures().join(name);
    std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot read the Claude Code capture {}: the public captures live in ../shared/fixtures/claude-code (or set BERTH_SHARED_FIXTURES)",
            path.display()
        )
    })
}

/// A free loopback port for a service that binds it itself.
///
/// Taken below the kernel's ephemeral range (32768 and up), from a counter
/// this process owns: a port the kernel hands to some other `bind(0)` (a
/// test's listener, a client socket) can never be the one given here
/// between this check and the service's own bind. The counter starts at an
/// offset from the pid, so two test processes rarely try the same ports.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() % u32::from(SPAN)) as u16 + 1,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
    anyhow::bail!("no free loopback port in {FIRST}..{}", FIRST + SPAN)
}

/// The binary `name` that `scripts/setup.sh` builds beside the tests.
pub fn built_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| format!("target/debug/{name}").into())
}

/// The `berth-forward` binary `scripts/setup.sh` builds beside the tests.
pub fn forwarder() -> std::path::PathBuf {
    built_binary("berth-forward")
}

/// A `/proc/PID/status` figure in kB (`VmRSS`, `VmHWM`…), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// A test node's egress gateway: the built forwarder, a directory of its
/// own, and a model API on a loopback port nothing listens on (a test that
/// wants one sets its own), so no test traffic can leave the machine.
pub fn gateway_for_tests(cfg: &mut berth_agent_server::Config) {
    cfg.gateway_forwarder = Some(forwarder());
    cfg.gateway_dir = std::env::temp_dir()
        .join("berth-test-gateway")
        .display()
        .to_string();
    cfg.model_api_url = "http://127.0.0.1:9".into();
}

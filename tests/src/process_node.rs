//! A node as a process of its own (the binary `scripts/setup.sh` builds),
//! for tests that kill a node or measure its memory: a node inside the test
//! process shares its heap with everything else.

use super::*;

/// The node binary `scripts/setup.sh` builds beside the tests.
pub fn node_binary() -> std::path::PathBuf {
    built_binary("berth-agent-server")
}

/// A node process serving mTLS with a certificate of the cluster's CA, and
/// keeping its objects in the cluster's S3 server. Killed, and its
/// containers removed, when dropped.
pub struct ProcessNode {
    pub id: String,
    /// How a dispatcher dials it (`https://NAME:PORT`).
    pub url: String,
    /// Where that name resolves (`NAME:PORT` → the node's address).
    pub resolve: (String, SocketAddr),
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl ProcessNode {
    /// Starts a node of `cluster`'s CA and S3 server with `args` added
    /// (e.g. `--capacity 1`), and waits until it listens.
    pub async fn start(cluster: &TestCluster, args: &[&str]) -> anyhow::Result<Self> {
        Self::start_in(cluster, args, None).await
    }

    /// As [`Self::start`], inside the network namespace `netns` when one is
    /// given: dispatchers then reach it through a relay (see
    /// [`crate::netns`]), and it reaches nothing over the network (not the
    /// S3 server: keep it from snapshots).
    pub async fn start_in(
        cluster: &TestCluster,
        args: &[&str],
        netns: Option<&crate::netns::NetNs>,
    ) -> anyhow::Result<Self> {
        Self::start_with(cluster, args, netns, None, None).await
    }

    /// As [`Self::start`], finding its S3 credentials through `env` (web
    /// identity, say) instead of the static key in the environment.
    pub async fn start_with_credentials(
        cluster: &TestCluster,
        args: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        Self::start_with(cluster, args, None, None, Some(env)).await
    }

    /// As [`Self::start`], on `engine` instead of the host's Docker: the
    /// node is given its socket (`DOCKER_HOST`) and the gateway directory
    /// it shares, which the engine sees elsewhere (`--gateway-engine-dir`).
    pub async fn start_on(
        cluster: &TestCluster,
        args: &[&str],
        engine: &crate::engine::Engine,
    ) -> anyhow::Result<Self> {
        Self::start_with(cluster, args, None, Some(engine), None).await
    }

    async fn start_with(
        cluster: &TestCluster,
        args: &[&str],
        netns: Option<&crate::netns::NetNs>,
        engine: Option<&crate::engine::Engine>,
        credentials: Option<&[(&str, String)]>,
    ) -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let id = format!("pnode-{tag}");
        let dir = std::env::temp_dir().join(format!("berth-{id}"));
        std::fs::create_dir_all(&dir)?;
        let issued = cluster
            .ca
            .issue(CertKind::Node, std::slice::from_ref(&id))?;
        std::fs::write(dir.join("ca.pem"), &cluster.ca.cert_pem)?;
        std::fs::write(dir.join("node.pem"), &issued.cert_pem)?;
        std::fs::write(dir.join("node.key"), &issued.key_pem)?;
        let addr = free_addr()?;
        let log = std::fs::File::create(dir.join("node.log"))?;
        let mut cmd = match netns {
            Some(ns) => ns.command(node_binary()),
            None => std::process::Command::new(node_binary()),
        };
        match engine {
            Some(e) => cmd
                .env("DOCKER_HOST", e.docker_host())
                .arg("--gateway-dir")
                .arg(e.gateway_dir())
                .args(["--gateway-engine-dir", crate::engine::ENGINE_GATEWAY_DIR]),
            None => cmd
                .env_remove("DOCKER_HOST")
                .arg("--gateway-dir")
                .arg(std::env::temp_dir().join("berth-test-gateway")),
        };
        // S3 credentials through the AWS default chain: the environment's
        // static key, unless the test gives other variables. Never the
        // instance metadata endpoint (a packet off this machine).
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("AWS_EC2_METADATA_DISABLED", "true");
        match credentials {
            Some(env) => {
                for (k, v) in env {
                    cmd.env(k, v);
                }
            }
            None => {
                cmd.env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
                    .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY);
            }
        }
        // Nothing answers on port 9, unless the test names a model API.
        if !args.contains(&"--model-api-url") {
            cmd.args(["--model-api-url", "http://127.0.0.1:9"]);
        }
        let child = cmd
            .args(["--listen", &addr.to_string(), "--metrics-listen", "off"])
            .args(["--node-id", &id, "--load-heartbeat", "0.2"])
            .arg("--tls-ca")
            .arg(dir.join("ca.pem"))
            .arg("--tls-cert")
            .arg(dir.join("node.pem"))
            .arg("--tls-key")
            .arg(dir.join("node.key"))
            .arg("--gateway-forwarder")
            .arg(forwarder())
            .args(["--s3-bucket", s3::BUCKET])
            .args(["--s3-endpoint", &format!("http://{}", cluster.s3.addr)])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", node_binary().display()))?;
        let dialled = match netns {
            Some(ns) => ns.relay(addr).await?,
            None => addr,
        };
        let mut node = Self {
            url: format!("https://{id}:{}", addr.port()),
            resolve: (format!("{id}:{}", addr.port()), dialled),
            id,
            child,
            dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let listening = || async {
            match netns {
                Some(ns) => ns.connect(addr).await.is_ok(),
                None => tokio::net::TcpStream::connect(addr).await.is_ok(),
            }
        };
        while !listening().await {
            if let Some(status) = node.child.try_wait()? {
                anyhow::bail!("the node exited ({status}): {}", node.log());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the node did not listen within 30 s: {}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(node)
    }

    /// Replaces the node's certificate and key files with `issued`, each
    /// by a rename, as a Kubernetes Secret mount swaps them.
    pub fn write_tls(&self, issued: &berth_common::tls::Issued) -> anyhow::Result<()> {
        for (file, pem) in [
            ("node.pem", &issued.cert_pem),
            ("node.key", &issued.key_pem),
        ] {
            let tmp = self.dir.join(format!("{file}.new"));
            std::fs::write(&tmp, pem)?;
            std::fs::rename(&tmp, self.dir.join(file))?;
        }
        Ok(())
    }

    /// Waits up to `within` for the process to exit; its status, or `None`
    /// if it is still running.
    pub async fn exit_within(
        &mut self,
        within: Duration,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The most memory the process has held so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        proc_status_bytes(self.child.id(), "VmHWM")
    }

    /// What the node has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }
}

impl Drop for ProcessNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_node_containers(&self.id);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

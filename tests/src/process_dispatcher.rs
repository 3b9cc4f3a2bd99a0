//! `berth-dispatcher` as a process of its own (the binary `scripts/setup.sh`
//! builds), with its in-process node: for tests of what only a whole
//! process shows (its traces, its environment, its log).

use std::time::Duration;

/// A `berth-dispatcher` process with its in-process node, stopped with
/// SIGTERM when dropped (its node then removes its containers).
pub struct ProcessDispatcher {
    child: std::process::Child,
    dir: std::path::PathBuf,
    listen: std::net::SocketAddr,
}

impl ProcessDispatcher {
    /// Starts one on `database_url`, serving on `listen`, as the README's
    /// local set-up runs it (anonymous calls: the dev flag), with `env` added
    /// (it wins over the defaults here). Its log is JSON.
    pub fn start(
        database_url: &str,
        listen: std::net::SocketAddr,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "berth-dispatcher-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("secrets.key"),
            "k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        )?;
        let log = std::fs::File::create(dir.join("dispatcher.log"))?;
        let child = std::process::Command::new(crate::built_binary("berth-dispatcher"))
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("BERTH_LOG_FORMAT", "json")
            .env("DATABASE_URL", database_url)
            .env("BERTH_LISTEN", listen.to_string())
            .env("BERTH_METRICS_LISTEN", "off")
            .env("BERTH_WEBHOOK_LISTEN", "off")
            .env("BERTH_ALLOW_ANONYMOUS", "true")
            .env("BERTH_SECRETS_KEY_FILE", dir.join("secrets.key"))
            .env("BERTH_LOCAL_CAPACITY", "2")
            .env(
                "BERTH_NODE_ID",
                format!("traces-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            )
            .env("BERTH_GATEWAY_FORWARDER", crate::forwarder())
            .env(
                "BERTH_GATEWAY_DIR",
                std::env::temp_dir().join("berth-test-gateway"),
            )
            .env("BERTH_MODEL_API_URL", "http://127.0.0.1:9")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Self { child, dir, listen })
    }

    /// A client of its API (anonymous), once it answers (within 30 s).
    pub async fn client(
        &self,
    ) -> anyhow::Result<berth_proto::v1::sessions_client::SessionsClient<crate::Api>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.listen))?
            .connect_lazy();
        let mut client = berth_proto::v1::sessions_client::SessionsClient::new(crate::Api::new(
            channel,
            crate::Bearer::default(),
        ));
        for _ in 0..300 {
            let list = berth_proto::v1::ListSessionsRequest {
                page_size: 1,
                ..Default::default()
            };
            if client.list_sessions(list).await.is_ok() {
                return Ok(client);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!(
            "berth-dispatcher did not answer within 30 s: {}",
            self.log()
        )
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dispatcher.log")).unwrap_or_default()
    }

    /// Asks it to stop (SIGTERM: it flushes its last spans) and waits.
    pub fn stop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ProcessDispatcher {
    fn drop(&mut self) {
        // SIGTERM first: its node stops its sessions and removes their
        // containers (a SIGKILL would leave them).
        if matches!(self.child.try_wait(), Ok(None)) {
            self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! A container engine that is not the host's: Debian's `dockerd`,
//! `containerd` and `runc` in a container of their own (the image
//! `deploy/test-image/build-engine.sh` builds), as the chart's
//! `nodes.engine=dind` sidecar runs them.
//!
//! - Its data root is its own (an anonymous volume, removed with it), so
//!   the host's `docker ps` never lists what it runs.
//! - It has no network but its own loopback.
//! - It is reached only through the Unix socket it serves in a directory it
//!   shares with the test ([`Engine::docker_host`]).
//! - The gateway directory is shared too, but the engine sees it at
//!   [`ENGINE_GATEWAY_DIR`], not at the node's path: the node says so with
//!   `--gateway-engine-dir`.
//!
//! This machine's Docker cannot grant every capability
//! (`--privileged` fails), so it runs with every capability it can add,
//! seccomp and AppArmor off, and the host's cgroup tree mounted writable:
//! what `--privileged` gives a sidecar on a cluster node.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::Context;

/// The engine image `scripts/setup.sh` builds.
pub const ENGINE_IMAGE: &str = "berth-test-engine:latest";
/// Where the engine sees the shared gateway directory.
pub const ENGINE_GATEWAY_DIR: &str = "/var/berth/gateway";

/// A running engine; removed, with its data root, when dropped.
pub struct Engine {
    name: String,
    dir: PathBuf,
}

impl Engine {
    /// Starts an engine and waits until it answers on its socket.
    pub async fn start() -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
        let dir = std::env::temp_dir().join(format!("berth-engine-{tag}"));
        std::fs::create_dir_all(dir.join("run"))?;
        std::fs::create_dir_all(dir.join("gateway"))?;
        let engine = Self {
            name: format!("berth-engine-{tag}"),
            dir,
        };
        let run_dir = format!("{}:/run/engine", engine.dir.join("run").display());
        let gateway = format!("{}:{ENGINE_GATEWAY_DIR}", engine.gateway_dir().display());
        let cgroup_parent = format!("/berth-engine-{tag}");
        let out = Command::new("docker")
            .args(["run", "-d", "--name", &engine.name])
            .args([
                "--label",
                "berth.managed=true",
                "--label",
                "berth.test=engine",
            ])
            .args(["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE"])
            .args(["--security-opt", "seccomp=unconfined"])
            .args(["--security-opt", "apparmor=unconfined"])
            .args(["--security-opt", "systempaths=unconfined"])
            .args(["--network", "none"])
            .args(["-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"])
            .args(["-v", &run_dir, "-v", &gateway, "-v", "/var/lib/docker"])
            .arg(ENGINE_IMAGE)
            .args(["--host", "unix:///run/engine/docker.sock"])
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"])
            .args(["--storage-driver", "vfs", "--cgroup-parent", &cgroup_parent])
            .output()
            .context("docker run (the engine)")?;
        anyhow::ensure!(
            out.status.success(),
            "starting the engine from {ENGINE_IMAGE} (scripts/setup.sh builds it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !engine.docker().arg("version").output()?.status.success() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the engine did not answer within 30 s: {}",
                engine.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(engine)
    }

    /// `DOCKER_HOST` for the engine's socket.
    pub fn docker_host(&self) -> String {
        format!("unix://{}", self.dir.join("run/docker.sock").display())
    }

    /// The gateway directory, as the node sees it.
    pub fn gateway_dir(&self) -> PathBuf {
        self.dir.join("gateway")
    }

    /// The docker CLI against this engine.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.args(["-H", &self.docker_host()]);
        c
    }

    /// Copies `image` from the host's Docker into the engine (a registry
    /// would, on a cluster).
    pub fn load(&self, image: &str) -> anyhow::Result<()> {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = save.stdout.take().context("docker save's output")?;
        let load = self.docker().arg("load").stdin(stdout).output()?;
        anyhow::ensure!(save.wait()?.success(), "docker save {image} failed");
        anyhow::ensure!(
            load.status.success(),
            "loading {image} into the engine: {}",
            String::from_utf8_lossy(&load.stderr)
        );
        Ok(())
    }

    /// The ids of the engine's containers (running or not) with `label`.
    pub fn containers(&self, label: &str) -> anyhow::Result<Vec<String>> {
        let out = self
            .docker()
            .args([
                "ps",
                "-aq",
                "--no-trunc",
                "--filter",
                &format!("label={label}"),
            ])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(String::from)
            .collect())
    }

    /// The engine's containers of session `session_id`: a cold start's
    /// label, or a warm container's name once the session took it.
    pub fn containers_of(&self, session_id: &str) -> anyhow::Result<Vec<String>> {
        let mut ids = self.containers(&format!("berth.session={session_id}"))?;
        let out = self
            .docker()
            .args(["ps", "-aq", "--no-trunc", "--filter"])
            .arg(format!("name=-s-{session_id}"))
            .output()?;
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if !ids.iter().any(|i| i == id) {
                ids.push(id.to_string());
            }
        }
        Ok(ids)
    }

    /// Runs `script` with `sh -c` in `container`; its stdout, trimmed.
    pub fn sh(&self, container: &str, script: &str) -> anyhow::Result<String> {
        let out = self
            .docker()
            .args(["exec", container, "sh", "-c", script])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "exec in {container}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// What the engine's daemon logged.
    pub fn log(&self) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "40", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Its containers and volumes live in its data root, which goes with it.
        let _ = Command::new("docker")
            .args(["rm", "-fv", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        // The cgroups its daemon made, now empty, deepest first.
        let parent = self.name.clone();
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let _ = Command::new("find")
                    .arg(h.path().join(&parent))
                    .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                    .stderr(Stdio::null())
                    .output();
            }
        }
    }
}

//! The container runtime: Docker through bollard.
//!
//! A session's container runs only a keep-alive process; the agent is started
//! with `exec` so the session's env (credentials included) enters the container
//! only at that moment. Everything created here carries `berth.*` labels so a
//! restarted node can find and reap its leftovers.

use std::collections::HashMap;
use std::pin::Pin;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, MountVolumeOptions};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    RenameContainerOptionsBuilder, UploadToContainerOptionsBuilder,
};
use futures::Stream;
use tokio::io::AsyncWrite;

use berth_common::sync::lock;

use crate::config::ContainerConfig;
use crate::error::Error;

mod cleanup;
mod deadman;
mod gateway_dir;
mod inspect;
mod launcher;

pub use deadman::{heartbeat, touch as touch_alive};
pub use gateway_dir::MAX_GATEWAY_DIR_BYTES;
use gateway_dir::prepare_gateway_dir;

use launcher::{LAUNCHER, launch_line};

/// The start of a session's container name; the session id and a random
/// suffix follow.
fn session_name_prefix(node_id: &str) -> String {
    format!("berth-{}-s", sanitize(node_id))
}

/// Label every berth container carries.
pub const LABEL_MANAGED: &str = "berth.managed";
/// Label naming the node that owns a container.
pub const LABEL_NODE: &str = "berth.node";
/// Label naming the session a container runs (cold starts only: a warm
/// container is created before its session is known).
pub const LABEL_SESSION: &str = "berth.session";
/// Label naming the warm pool (image) a container was created for.
pub const LABEL_POOL: &str = "berth.pool";

/// What a container is created for.
#[derive(Debug, Clone, Copy)]
pub enum Purpose<'a> {
    /// A cold start for this session.
    Session(&'a str),
    /// A warm pool's spare: no session, no session data, no credentials.
    Warm,
}

/// A started agent process: its output and its stdin.
pub struct AgentProcess {
    pub exec_id: String,
    pub output: Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>,
    pub input: Pin<Box<dyn AsyncWrite + Send>>,
}

/// Creates, execs into and removes containers on the local Docker daemon.
#[derive(Clone)]
pub struct ContainerRuntime {
    docker: Docker,
    cfg: ContainerConfig,
    /// Each container's gateway directory, by container id.
    gateway_dirs: std::sync::Arc<std::sync::Mutex<HashMap<String, std::path::PathBuf>>>,
}

impl ContainerRuntime {
    /// Connects to the daemon (`DOCKER_HOST` or the local socket) and
    /// negotiates the API version with it.
    pub async fn connect(cfg: ContainerConfig) -> Result<Self, Error> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| Error::Docker(format!("cannot connect to Docker: {e}")))?
            .negotiate_version()
            .await
            .map_err(|e| Error::Docker(format!("cannot reach the Docker daemon: {e}")))?;
        Ok(Self {
            docker,
            cfg,
            gateway_dirs: Default::default(),
        })
    }

    /// Creates and starts a hardened container for `image`, running only the
    /// keep-alive process. Returns its id. Nothing session-specific goes in
    /// but the `berth.session` label of a cold start: env enters at exec.
    pub async fn start_container(
        &self,
        image: &str,
        purpose: Purpose<'_>,
    ) -> Result<String, Error> {
        let label = match purpose {
            Purpose::Session(_) => "session",
            Purpose::Warm => "warm",
        };
        let histogram = metrics::histogram!(crate::metrics::CONTAINER_START, "purpose" => label);
        crate::metrics::timed(histogram, self.create_and_start(image, purpose)).await
    }

    async fn create_and_start(&self, image: &str, purpose: Purpose<'_>) -> Result<String, Error> {
        let cfg = &self.cfg;
        let mut labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_NODE.to_string(), cfg.node_id.clone()),
        ]);
        match purpose {
            Purpose::Session(id) => labels.insert(LABEL_SESSION.to_string(), id.to_string()),
            Purpose::Warm => labels.insert(LABEL_POOL.to_string(), image.to_string()),
        };
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let name = match purpose {
            Purpose::Session(id) => {
                format!("{}-{id}-{suffix}", session_name_prefix(&cfg.node_id))
            }
            Purpose::Warm => format!("berth-{}-{suffix}", sanitize(&cfg.node_id)),
        };
        // The volumes carry the container's labels: whatever leaks can be
        // told by node and session, and the reaper finds it.
        let mut mounts: Vec<Mount> = [&cfg.workspace, &cfg.home]
            .into_iter()
            .map(|target| Mount {
                target: Some(target.clone()),
                typ: Some(MountType::VOLUME),
                volume_options: Some(MountVolumeOptions {
                    labels: Some(labels.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect();
        // The egress gateway's directory: the forwarder, and (while a
        // session runs) the gateway's socket. Read-only in the container.
        let mut watch = None;
        let gateway_dir = match &cfg.gateway {
            Some(g) => {
                // Short: a Unix socket's path has at most 107 bytes.
                let root = self.gateway_root().expect("gateway on");
                let dir = root.join(&suffix);
                prepare_gateway_dir(&dir, &g.forwarder).map_err(|e| {
                    Error::Docker(format!(
                        "gateway directory {}: {e} (--gateway-dir, --gateway-forwarder)",
                        dir.display()
                    ))
                })?;
                watch = g
                    .dead_man
                    .filter(|_| deadman::link_into(&root, &dir))
                    .map(|t| deadman::watch_cmd(crate::gateway::MOUNT, t, &cfg.keepalive_cmd));
                mounts.push(Mount {
                    target: Some(crate::gateway::MOUNT.to_string()),
                    source: Some(self.engine_gateway_dir(&suffix).display().to_string()),
                    typ: Some(MountType::BIND),
                    read_only: Some(true),
                    ..Default::default()
                });
                Some(dir)
            }
            None => None,
        };
        let host_config = host_config(cfg, mounts, watch.is_some());
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(watch.unwrap_or_else(|| cfg.keepalive_cmd.clone())),
            user: Some(cfg.agent_user.clone()),
            working_dir: Some(cfg.workspace.clone()),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let opts = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = self
            .docker
            .create_container(Some(opts), body)
            .await
            .inspect_err(|_| {
                if let Some(d) = &gateway_dir {
                    let _ = std::fs::remove_dir_all(d);
                }
            })
            .map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => Error::ImageNotFound(image.to_string()),
                e => Error::Docker(format!("create container from `{image}`: {e}")),
            })?;
        if let Some(d) = gateway_dir {
            lock(&self.gateway_dirs).insert(created.id.clone(), d);
        }
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            self.remove(&created.id).await;
            return Err(Error::Docker(format!(
                "start container from `{image}`: {e}"
            )));
        }
        if let Some(g) = &cfg.gateway
            && let Err(e) = self.start_forwarder(&created.id, g.port).await
        {
            self.remove(&created.id).await;
            return Err(e);
        }
        Ok(created.id)
    }

    /// Starts the agent in the container with `env`, stdin and stdout attached.
    pub async fn exec_agent(
        &self,
        container_id: &str,
        cmd: Vec<String>,
        env: Vec<String>,
    ) -> Result<AgentProcess, Error> {
        let histogram = metrics::histogram!(crate::metrics::CONTAINER_EXEC);
        crate::metrics::timed(histogram, self.exec(container_id, cmd, env)).await
    }

    async fn exec(
        &self,
        container_id: &str,
        cmd: Vec<String>,
        env: Vec<String>,
    ) -> Result<AgentProcess, Error> {
        let exec = self
            .docker
            .create_exec(
                container_id,
                CreateExecOptions {
                    attach_stdin: Some(true),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    tty: Some(false),
                    cmd: Some(cmd),
                    env: Some(env),
                    user: Some(self.cfg.agent_user.clone()),
                    working_dir: Some(self.cfg.workspace.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::Docker(format!("create exec: {e}")))?;
        let opts = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: Some(64 * 1024),
        };
        match self.docker.start_exec(&exec.id, Some(opts)).await {
            Ok(StartExecResults::Attached { output, input }) => Ok(AgentProcess {
                exec_id: exec.id,
                output,
                input,
            }),
            Ok(StartExecResults::Detached) => Err(Error::Docker("exec started detached".into())),
            Err(e) => Err(Error::Docker(format!("start exec: {e}"))),
        }
    }

    /// Starts a launcher in a warm container: a shell, as the agent user in
    /// the workspace, that waits for one line on stdin and runs it. The
    /// session's start then costs a write instead of a Docker exec (which
    /// takes ~50 ms of namespace and cgroup setup on a typical host).
    /// Needs `sh` in the image.
    pub async fn start_launcher(&self, container_id: &str) -> Result<AgentProcess, Error> {
        let cmd = ["sh", "-c", LAUNCHER].map(String::from).to_vec();
        self.exec(container_id, cmd, Vec::new()).await
    }

    /// Runs `cmd` with `env` through a launcher from [`Self::start_launcher`]:
    /// the shell exports the env and `exec`s the agent, which keeps the
    /// launcher's exec id, stdin and output. Fails, with the launcher
    /// unused, when the launcher is gone or the command cannot go on one
    /// shell line (a newline in a value, an env name the shell cannot export):
    /// the caller then execs normally.
    pub async fn launch(
        &self,
        mut launcher: AgentProcess,
        cmd: &[String],
        env: &[String],
    ) -> Result<AgentProcess, Error> {
        let line = launch_line(cmd, env)
            .ok_or_else(|| Error::Docker("the command does not fit a launcher line".into()))?;
        let histogram = metrics::histogram!(crate::metrics::CONTAINER_EXEC);
        crate::metrics::timed(histogram, async {
            if !self.exec_running(&launcher.exec_id).await {
                return Err(Error::Docker(
                    "the warm container's launcher is gone".into(),
                ));
            }
            use tokio::io::AsyncWriteExt;
            launcher
                .input
                .write_all(line.as_bytes())
                .await
                .map_err(|e| Error::Docker(format!("write to launcher: {e}")))?;
            launcher
                .input
                .flush()
                .await
                .map_err(|e| Error::Docker(format!("write to launcher: {e}")))?;
            Ok(launcher)
        })
        .await
    }

    /// Unpacks `tar` into `dir` (a volume: the root filesystem is read-only).
    pub async fn upload_tar(
        &self,
        container_id: &str,
        dir: &str,
        tar: bytes::Bytes,
    ) -> Result<(), Error> {
        let opts = UploadToContainerOptionsBuilder::new().path(dir).build();
        self.docker
            .upload_to_container(container_id, Some(opts), bollard::body_full(tar))
            .await
            .map_err(|e| Error::Docker(format!("copy into {dir}: {e}")))
    }

    /// Extracts the tar `body` yields into `dir` as it arrives. An error
    /// from `body` aborts the copy (what was extracted stays).
    pub async fn upload_tar_stream(
        &self,
        container_id: &str,
        dir: &str,
        body: impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    ) -> Result<(), Error> {
        let opts = UploadToContainerOptionsBuilder::new().path(dir).build();
        self.docker
            .upload_to_container(container_id, Some(opts), bollard::body_try_stream(body))
            .await
            .map_err(|e| Error::Docker(format!("copy into {dir}: {e}")))
    }

    /// A tar of `path` in the container (entries rooted at its basename), as
    /// it arrives; more than `max_bytes` ends it with an error.
    pub fn download_tar(
        &self,
        container_id: &str,
        path: &str,
        max_bytes: u64,
    ) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
        use futures::StreamExt;
        let opts = DownloadFromContainerOptionsBuilder::new()
            .path(path)
            .build();
        let path = path.to_string();
        let mut seen = 0u64;
        self.docker
            .download_from_container(container_id, Some(opts))
            .map(move |chunk| {
                let chunk =
                    chunk.map_err(|e| std::io::Error::other(format!("copy out of {path}: {e}")))?;
                seen += chunk.len() as u64;
                if seen > max_bytes {
                    return Err(std::io::Error::other(format!(
                        "{path} holds more than {max_bytes} bytes (--snapshot-max-bytes)"
                    )));
                }
                Ok(chunk)
            })
    }

    /// Applies a session's own limits to a (warm) container before its agent
    /// starts. Memory+swap follows memory, as at creation.
    pub async fn update_limits(
        &self,
        container_id: &str,
        limits: &berth_common::spec::Limits,
    ) -> Result<(), Error> {
        let body = bollard::models::ContainerUpdateBody {
            memory: limits.memory_bytes(),
            memory_swap: limits.memory_bytes(),
            nano_cpus: limits.cpus().map(|c| (c * 1e9) as i64),
            pids_limit: limits.pids(),
            ..Default::default()
        };
        self.docker
            .update_container(container_id, body)
            .await
            .map_err(|e| Error::Docker(format!("apply limits: {e}")))
    }

    /// Runs `cmd` in the container as the agent user, to completion;
    /// returns its stdout and the exec's id (for [`Self::exit_code`]).
    /// `what` names it in errors.
    pub(super) async fn run_to_end(
        &self,
        container_id: &str,
        cmd: Vec<String>,
        what: &str,
    ) -> Result<(Vec<u8>, String), Error> {
        let exec = self
            .docker
            .create_exec(
                container_id,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd),
                    user: Some(self.cfg.agent_user.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::Docker(format!("create {what} exec: {e}")))?;
        let mut stdout = Vec::new();
        if let StartExecResults::Attached { mut output, .. } = self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| Error::Docker(format!("start {what}: {e}")))?
        {
            use futures::StreamExt;
            while let Some(chunk) = output.next().await {
                if let Ok(LogOutput::StdOut { message }) = chunk {
                    stdout.extend_from_slice(&message);
                }
            }
        }
        Ok((stdout, exec.id))
    }

    /// Runs `cmd` in the container to completion and checks it exits 0: the
    /// warm pool's health check before a container is offered.
    pub async fn check(&self, container_id: &str, cmd: &[String]) -> Result<(), Error> {
        let (_, exec_id) = self
            .run_to_end(container_id, cmd.to_vec(), "health check")
            .await?;
        match self.exit_code(&exec_id).await {
            Some(0) => Ok(()),
            code => Err(Error::Docker(format!(
                "health check `{}` exited with {code:?}",
                cmd.join(" ")
            ))),
        }
    }

    /// Names a claimed warm container for its session
    /// (`berth-{node}-{session}`): labels cannot change on a running
    /// container, its name can, so `docker ps` and operators find a
    /// session's container by name whichever way it started.
    pub async fn name_for_session(&self, container_id: &str, session_id: &str) {
        // The warm name's suffix stays: a session's next run may claim a
        // container while this one is still being removed.
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let name = format!(
            "{}-{session_id}-{suffix}",
            session_name_prefix(&self.cfg.node_id)
        );
        let opts = RenameContainerOptionsBuilder::new().name(&name).build();
        if let Err(e) = self.docker.rename_container(container_id, opts).await {
            tracing::debug!(container_id, error = %e, "could not name the container for its session");
        }
    }
}

/// Container names allow `[a-zA-Z0-9_.-]`.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// A session container's confinement: no capabilities or new privileges, a
/// read-only root, the node's limits, the network mode, a private `/tmp`,
/// and `mounts`; removed by Docker when it exits if `auto_remove`.
fn host_config(cfg: &ContainerConfig, mounts: Vec<Mount>, auto_remove: bool) -> HostConfig {
    let memory = cfg.memory_mib * 1024 * 1024;
    HostConfig {
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        pids_limit: Some(cfg.pids_limit),
        memory: Some(memory),
        // Equal to memory: no swap beyond the limit.
        memory_swap: Some(memory),
        nano_cpus: Some((cfg.cpus * 1e9) as i64),
        readonly_rootfs: Some(true),
        network_mode: cfg.network.clone(),
        // Reaps the exec'd agent's children; forwards signals.
        init: Some(true),
        tmpfs: Some(HashMap::from([(
            "/tmp".to_string(),
            "rw,nosuid,nodev,size=256m".to_string(),
        )])),
        // Anonymous volumes: writable, removed with the container
        // (`v=true`); and the gateway's directory.
        mounts: Some(mounts),
        // With the dead man's switch, a container whose watcher gave
        // up on its dead node is removed, volumes and all, by Docker.
        auto_remove: Some(auto_remove),
        ..Default::default()
    }
}

//! Each container's gateway directory: where it lives on the host, the
//! forwarder in it, and the dead man's switch's heartbeat.

use berth_common::sync::lock;
use bollard::exec::{CreateExecOptions, StartExecOptions};

use super::{ContainerRuntime, Error, sanitize};

/// How long a new container's forwarder may take to listen.
const FORWARDER_READY_SECS: u64 = 10;

impl ContainerRuntime {
    /// This node's part of the gateway directory.
    pub(super) fn gateway_root(&self) -> Option<std::path::PathBuf> {
        self.cfg
            .gateway
            .as_ref()
            .map(|g| g.root.join(gateway_node_dir(&self.cfg.node_id)))
    }

    /// The container directory `suffix` under this node's part of the
    /// gateway directory, as the container engine sees it (the bind
    /// mount's source).
    pub(super) fn engine_gateway_dir(&self, suffix: &str) -> std::path::PathBuf {
        let g = self.cfg.gateway.as_ref().expect("gateway on");
        g.engine_root
            .join(gateway_node_dir(&self.cfg.node_id))
            .join(suffix)
    }

    /// This node's heartbeat directory and the switch's timeout, when the
    /// dead man's switch is on.
    pub fn dead_man(&self) -> Option<(std::path::PathBuf, std::time::Duration)> {
        let timeout = self.cfg.gateway.as_ref()?.dead_man?;
        Some((self.gateway_root()?, timeout))
    }

    /// Removes this node's gateway directory if no container's is left in it.
    pub fn remove_gateway_root(&self) {
        if let Some(root) = self.gateway_root() {
            let _ = std::fs::remove_dir(root);
        }
    }

    /// The container's gateway directory (on the host), if it has one.
    pub fn gateway_dir(&self, container_id: &str) -> Option<std::path::PathBuf> {
        lock(&self.gateway_dirs).get(container_id).cloned()
    }

    /// Starts the forwarder on the container's loopback, detached, as the
    /// agent's user, and waits until it listens.
    pub(super) async fn start_forwarder(&self, container_id: &str, port: u16) -> Result<(), Error> {
        let dir = crate::gateway::MOUNT;
        let exec = self
            .docker
            .create_exec(
                container_id,
                CreateExecOptions {
                    cmd: Some(vec![
                        format!("{dir}/{}", crate::gateway::FORWARDER),
                        format!("127.0.0.1:{port}"),
                        format!("{dir}/{}", crate::gateway::SOCKET),
                    ]),
                    user: Some(self.cfg.agent_user.clone()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| Error::Docker(format!("create gateway forwarder exec: {e}")))?;
        self.docker
            .start_exec(
                &exec.id,
                Some(StartExecOptions {
                    detach: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| Error::Docker(format!("start gateway forwarder: {e}")))?;
        // Listening before anything else runs: an agent connects to it as
        // it starts (MCP servers), and must not find the port closed.
        let ready = vec![
            format!("{dir}/{}", crate::gateway::FORWARDER),
            "--ready".to_string(),
            format!("127.0.0.1:{port}"),
            FORWARDER_READY_SECS.to_string(),
        ];
        let (_, exec_id) = self
            .run_to_end(container_id, ready, "gateway forwarder readiness check")
            .await?;
        match self.exit_code(&exec_id).await {
            Some(0) => Ok(()),
            code => Err(Error::Docker(format!(
                "the gateway forwarder did not listen on 127.0.0.1:{port} within {FORWARDER_READY_SECS} s (exit {code:?})"
            ))),
        }
    }
}

/// This node's directory name under `--gateway-dir`: its id, or, when
/// longer than 24 characters, its first 15 and a hash of the whole id, so
/// that two nodes on one host never share a directory (each one's start
/// removes what is in its own).
fn gateway_node_dir(node_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let id = sanitize(node_id);
    if id.len() <= 24 {
        return id;
    }
    let hash = Sha256::digest(node_id.as_bytes());
    let head: String = id.chars().take(15).collect();
    let tail: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("{head}-{tail}")
}

/// Longest `--gateway-dir` whose sockets' paths still fit a Unix socket
/// address (107 bytes): room for `/{node, 24}/{container, 12}/egress.sock`.
pub const MAX_GATEWAY_DIR_BYTES: usize = 107 - (1 + 24 + 1 + 12 + 1 + crate::gateway::SOCKET.len());

/// Makes a container's gateway directory with the forwarder in it (a hard
/// link when the file system allows, else a copy).
pub(super) fn prepare_gateway_dir(
    dir: &std::path::Path,
    forwarder: &std::path::Path,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !forwarder.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "no forwarder at {} (build `berth-forward`)",
                forwarder.display()
            ),
        ));
    }
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let target = dir.join(crate::gateway::FORWARDER);
    if std::fs::hard_link(forwarder, &target).is_err() {
        std::fs::copy(forwarder, &target)?;
    }
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_with_long_ids_that_share_a_prefix_get_their_own_directories() {
        let a = gateway_node_dir("local-local_0123456789abcdef0123456789abcdef-a");
        let b = gateway_node_dir("local-local_0123456789abcdef0123456789abcdef-b");
        assert_ne!(a, b);
        assert!(a.len() <= 24 && b.len() <= 24, "{a} {b}");
        assert_eq!(gateway_node_dir("node-1"), "node-1");
    }
}

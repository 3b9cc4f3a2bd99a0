//! The dead man's switch: containers that outlive their node stop.
//!
//! The node keeps one file, `.alive`, in its gateway directory, and touches
//! it every sixth of the timeout. Each container's gateway directory holds
//! a hard link to it (`alive`: the same inode, so one touch reaches every
//! container), and the container's main process is the forwarder watching
//! that file's modification time (`berth-forward --watch`), with the
//! configured keep-alive command as its child. When the node
//! dies, the touches stop; each container's watcher exits once the file is
//! older than the timeout, the container stops with it, and Docker removes
//! it and its volumes (auto-remove). Nothing needs the node to restart.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

/// The node's heartbeat file in its gateway directory.
const ALIVE: &str = ".alive";
/// Its link's name in each container's gateway directory.
pub const LINK: &str = "alive";

/// Touches the node's heartbeat file, creating it if needed.
pub fn touch(node_dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(node_dir)?;
    let file = std::fs::File::options()
        .create(true)
        .write(true)
        .truncate(false)
        .open(node_dir.join(ALIVE))?;
    file.set_modified(SystemTime::now())
}

/// Links the heartbeat file into a container's gateway directory. `false`
/// when it cannot (another file system): that container runs without the
/// switch.
pub fn link_into(node_dir: &Path, container_dir: &Path) -> bool {
    let alive = node_dir.join(ALIVE);
    if !alive.exists() && touch(node_dir).is_err() {
        return false;
    }
    match std::fs::hard_link(&alive, container_dir.join(LINK)) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, dir = %container_dir.display(), "cannot link the dead man's switch; this container runs without it");
            false
        }
    }
}

/// The container's main process with the switch on: the forwarder watching
/// the heartbeat (through the directory's mount in the container), with
/// the keep-alive command as its child.
pub fn watch_cmd(mount: &str, timeout: Duration, keepalive: &[String]) -> Vec<String> {
    let mut cmd = vec![
        format!("{mount}/{}", crate::gateway::FORWARDER),
        "--watch".into(),
        format!("{mount}/{LINK}"),
        timeout.as_secs().to_string(),
        "--".into(),
    ];
    cmd.extend_from_slice(keepalive);
    cmd
}

/// Touches the heartbeat every sixth of `timeout` until `stop`.
pub async fn heartbeat(node_dir: PathBuf, timeout: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(timeout / 6);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = touch(&node_dir) {
            tracing::warn!(error = %e, dir = %node_dir.display(), "cannot touch the dead man's switch; containers stop if this lasts");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_touch_reaches_every_container_link() {
        let root = std::env::temp_dir().join(format!("berth-deadman-{}", uuid::Uuid::new_v4()));
        let (node, c1, c2) = (root.join("n"), root.join("n/c1"), root.join("n/c2"));
        std::fs::create_dir_all(&c1).expect("test");
        std::fs::create_dir_all(&c2).expect("test");
        assert!(link_into(&node, &c1) && link_into(&node, &c2));
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(node.join(ALIVE))
            .expect("test")
            .set_modified(old)
            .expect("test");
        let mtime = |p: &Path| {
            std::fs::metadata(p)
                .expect("test")
                .modified()
                .expect("test")
        };
        assert_eq!(mtime(&c1.join(LINK)), old);
        touch(&node).expect("test");
        assert!(mtime(&c1.join(LINK)) > old && mtime(&c2.join(LINK)) > old);
        std::fs::remove_dir_all(root).expect("test");
    }
}

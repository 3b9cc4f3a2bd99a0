//! Removing containers and what they leave: one, or every one of this
//! node's (the reaper at start), with their volumes.

use std::collections::HashMap;

use berth_common::sync::lock;
use bollard::query_parameters::{
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};

use super::{ContainerRuntime, Error, LABEL_MANAGED, LABEL_NODE, LABEL_POOL};

/// Longest a container's removal may take before the node gives up on it
/// (its next start reaps it).
const REMOVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl ContainerRuntime {
    /// Force-removes a container and its anonymous volumes. Errors are logged:
    /// a container that is already gone is what we wanted.
    pub async fn remove(&self, container_id: &str) {
        let dir = lock(&self.gateway_dirs).remove(container_id);
        if let Some(d) = dir {
            let _ = std::fs::remove_dir_all(d);
        }
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        // A frozen container (see `freezer.rs`) is killed while still
        // frozen: Docker sends SIGKILL, then thaws it, so its processes die
        // as they thaw without running another instruction (a superseded
        // run never runs beside its replacement). An engine that refuses
        // to kill a paused container gets it thawed first (removing one
        // still frozen never finishes under the cgroup v1 freezer).
        let kill = KillContainerOptionsBuilder::new().signal("SIGKILL").build();
        if let Err(e) = self.docker.kill_container(container_id, Some(kill)).await {
            tracing::trace!(container_id, error = %e, "kill before removal");
            if let Err(e) = self.docker.unpause_container(container_id).await {
                tracing::trace!(container_id, error = %e, "unpause before removal");
            }
        }
        let histogram = metrics::histogram!(crate::metrics::CONTAINER_REMOVE);
        let removed = crate::metrics::timed(
            histogram,
            tokio::time::timeout(
                REMOVE_TIMEOUT,
                self.docker.remove_container(container_id, Some(opts)),
            ),
        )
        .await;
        let Ok(removed) = removed else {
            tracing::warn!(container_id, timeout = ?REMOVE_TIMEOUT, "removing the container did not finish; the next start of this node reaps it");
            return;
        };
        match removed {
            Ok(()) => {}
            // Gone already, or being removed by Docker itself (auto-remove
            // once the dead man's switch's watcher exits).
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404 | 409,
                ..
            }) => {}
            Err(e) => tracing::warn!(container_id, error = %e, "failed to remove container"),
        }
    }

    /// Ids of every container this node owns (running or not).
    pub async fn list_owned(&self) -> Result<Vec<String>, Error> {
        self.list(&[format!("{LABEL_MANAGED}=true")], false).await
    }

    /// Ids of this node's containers carrying every label in `labels`
    /// (`key` or `key=value`); only running ones if `running_only`.
    pub(super) async fn list(
        &self,
        labels: &[String],
        running_only: bool,
    ) -> Result<Vec<String>, Error> {
        let mut label_filter = vec![format!("{LABEL_NODE}={}", self.cfg.node_id)];
        label_filter.extend_from_slice(labels);
        let mut filters = HashMap::from([("label".to_string(), label_filter)]);
        if running_only {
            filters.insert("status".to_string(), vec!["running".to_string()]);
        }
        let opts = ListContainersOptionsBuilder::new()
            .all(!running_only)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| Error::Docker(format!("list containers: {e}")))?;
        Ok(list.into_iter().filter_map(|c| c.id).collect())
    }

    /// Removes every container a previous run of this node left behind.
    pub async fn reap(&self) -> Result<usize, Error> {
        let ids = self.list_owned().await?;
        for id in &ids {
            self.remove(id).await;
        }
        // Volumes of containers that are gone (an earlier run's, a removal
        // that failed): every one carries this node's label.
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_NODE}={}", self.cfg.node_id)],
        )]);
        let opts = bollard::query_parameters::ListVolumesOptions {
            filters: Some(filters),
        };
        match self.docker.list_volumes(Some(opts)).await {
            Ok(list) => {
                for v in list.volumes.unwrap_or_default() {
                    let opts = bollard::query_parameters::RemoveVolumeOptions { force: true };
                    if let Err(e) = self.docker.remove_volume(&v.name, Some(opts)).await {
                        tracing::warn!(volume = %v.name, error = %e, "cannot remove a leftover volume");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list this node's volumes"),
        }
        // Gateway directories of containers an earlier run of this node left.
        if let Some(root) = self.gateway_root() {
            let _ = std::fs::remove_dir_all(&root);
        }
        Ok(ids.len())
    }

    /// Ids of this node's running warm (pool) containers.
    pub async fn running_warm(&self) -> Result<std::collections::HashSet<String>, Error> {
        let ids = self.list(&[LABEL_POOL.to_string()], true).await?;
        Ok(ids.into_iter().collect())
    }
}

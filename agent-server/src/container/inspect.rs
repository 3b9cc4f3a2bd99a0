//! What the node asks of a running container besides running the agent:
//! freezing it, and reading its exit, CPU and memory counters.

use super::ContainerRuntime;

impl ContainerRuntime {
    /// Freezes every process of the container (the cgroup freezer).
    /// Whether it is paused now.
    pub async fn pause(&self, container_id: &str) -> bool {
        match self.docker.pause_container(container_id).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(container_id, error = %e, "cannot pause the container");
                false
            }
        }
    }

    /// Thaws a paused container; a container that is not paused (or gone)
    /// is left as it is.
    pub async fn unpause(&self, container_id: &str) {
        if let Err(e) = self.docker.unpause_container(container_id).await {
            tracing::debug!(container_id, error = %e, "unpause");
        }
    }

    /// How many processes the kernel killed in the container for want of
    /// memory (its memory cgroup's `oom_kill`, v2 or v1); `None` when it
    /// cannot be read.
    pub async fn oom_kills(&self, container_id: &str) -> Option<u64> {
        let cmd = [
            "cat",
            "/sys/fs/cgroup/memory.events",
            "/sys/fs/cgroup/memory/memory.oom_control",
        ]
        .map(String::from)
        .to_vec();
        let (text, _) = self
            .run_to_end(container_id, cmd, "memory check")
            .await
            .ok()?;
        String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| l.strip_prefix("oom_kill "))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .max()
    }

    /// CPU time the container has used so far, in nanoseconds (its cgroup's
    /// count, one sample, no wait for a second).
    pub async fn cpu_used_ns(&self, container_id: &str) -> Option<u64> {
        use futures::StreamExt;
        let opts = bollard::query_parameters::StatsOptionsBuilder::new()
            .stream(false)
            .one_shot(true)
            .build();
        let mut stats = std::pin::pin!(self.docker.stats(container_id, Some(opts)));
        let s = stats.next().await?.ok()?;
        s.cpu_stats?.cpu_usage?.total_usage
    }

    /// Whether an exec's process is still running.
    pub async fn exec_running(&self, exec_id: &str) -> bool {
        matches!(self.docker.inspect_exec(exec_id).await, Ok(i) if i.running == Some(true))
    }

    /// The exit code of a finished exec, if Docker knows it.
    pub async fn exit_code(&self, exec_id: &str) -> Option<i64> {
        // The output stream can end a moment before Docker records the exit.
        for _ in 0..50 {
            match self.docker.inspect_exec(exec_id).await {
                Ok(info) if info.running == Some(false) => return info.exit_code,
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                Err(_) => return None,
            }
        }
        None
    }
}

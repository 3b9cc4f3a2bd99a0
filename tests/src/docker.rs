//! Docker as the tests see it: containers by label or session, commands
//! in them, and cleanup through the CLI for `Drop`.

use super::*;

/// Removes every container of node `node_id` through the docker CLI: for
/// `Drop`, which cannot await, when a test fails before its shutdown.
pub fn remove_node_containers(node_id: &str) {
    let filter = format!("label=berth.node={node_id}");
    let Ok(out) = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(String::from)
        .collect();
    if !ids.is_empty() {
        // Frozen ones first thawed: a frozen container cannot be killed.
        let _ = std::process::Command::new("docker")
            .arg("unpause")
            .args(&ids)
            .output();
        let _ = std::process::Command::new("docker")
            .args(["rm", "-fv"])
            .args(&ids)
            .output();
    }
}

/// The local Docker daemon, API version negotiated.
pub async fn docker() -> anyhow::Result<bollard::Docker> {
    Ok(bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?)
}

/// Containers (running or not) carrying every label in `labels` (`key` or `key=value`).
pub async fn containers_labelled(labels: &[String]) -> anyhow::Result<Vec<String>> {
    let filters = std::collections::HashMap::from([("label".to_string(), labels.to_vec())]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    Ok(docker()
        .await?
        .list_containers(Some(opts))
        .await?
        .into_iter()
        .filter_map(|c| c.id)
        .collect())
}

/// Running containers carrying every one of `labels`.
pub async fn running_labelled(labels: &[String]) -> anyhow::Result<Vec<String>> {
    let filters = std::collections::HashMap::from([
        ("label".to_string(), labels.to_vec()),
        ("status".to_string(), vec!["running".to_string()]),
    ]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .filters(&filters)
        .build();
    Ok(docker()
        .await?
        .list_containers(Some(opts))
        .await?
        .into_iter()
        .filter_map(|c| c.id)
        .collect())
}

/// Runs `cmd` in a container, as its image's user (the agent's: what a
/// prompt-injected agent could run), to its end; its stdout, lossily.
pub async fn exec_output(container: &str, cmd: &[&str]) -> anyhow::Result<String> {
    use bollard::exec::{CreateExecOptions, StartExecResults};
    let docker = docker().await?;
    let exec = docker
        .create_exec(
            container,
            CreateExecOptions {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(cmd.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            },
        )
        .await?;
    let mut out = Vec::new();
    if let StartExecResults::Attached { mut output, .. } = docker.start_exec(&exec.id, None).await?
    {
        while let Some(chunk) = output.next().await {
            if let Ok(bollard::container::LogOutput::StdOut { message }) = chunk {
                out.extend_from_slice(&message);
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Containers Docker still has for a session (running or not). A cold
/// start's container carries the session's label; a warm one takes its
/// name (`berth-{node}-s-{session}`) when claimed.
pub async fn containers_of(session_id: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = containers_labelled(&[format!("berth.session={session_id}")]).await?;
    let filters =
        std::collections::HashMap::from([("name".to_string(), vec![format!("-s-{session_id}")])]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    for c in docker().await?.list_containers(Some(opts)).await? {
        if let Some(id) = c.id
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// The session's containers, waiting (briefly) for at least one: a
/// pre-started container takes the session's name after the agent's first
/// line, a moment after the session is under way.
pub async fn containers_of_started(session_id: &str) -> anyhow::Result<Vec<String>> {
    for _ in 0..50 {
        let ids = containers_of(session_id).await?;
        if !ids.is_empty() {
            return Ok(ids);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    containers_of(session_id).await
}

/// Waits (briefly) until no container of the session exists: removal
/// follows the status change by a moment.
pub async fn no_containers_left(id: &str) -> anyhow::Result<()> {
    for _ in 0..50 {
        if containers_of(id).await?.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("session {id} still has containers after 10 s")
}

/// Running, unpaused containers of a session: its live agents.
pub async fn live_agents(session_id: &str) -> anyhow::Result<usize> {
    let docker = docker().await?;
    let mut live = 0;
    for id in containers_of(session_id).await? {
        let Ok(c) = docker.inspect_container(&id, None).await else {
            continue;
        };
        let state = c.state.unwrap_or_default();
        if state.running == Some(true) && state.paused != Some(true) {
            live += 1;
        }
    }
    Ok(live)
}

/// A watcher that samples a session's live agents every 100 ms (on every
/// node: Docker is shared) until [`AgentWatch::most`] stops it.
pub struct AgentWatch {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<usize>>,
}

impl AgentWatch {
    pub fn start(session_id: &str) -> Self {
        let stop = CancellationToken::new();
        let (id, token) = (session_id.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            let mut most = 0;
            let started = std::time::Instant::now();
            while !token.is_cancelled() {
                let live = live_agents(&id).await?;
                if live > 1 {
                    eprintln!("{live} live agents at {:?}", started.elapsed());
                }
                most = most.max(live);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(most)
        });
        Self { stop, task }
    }

    /// Stops watching: the most live agents seen at once.
    pub async fn most(self) -> anyhow::Result<usize> {
        self.stop.cancel();
        self.task.await?
    }
}

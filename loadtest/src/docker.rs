//! Baselines on the Docker daemon itself, through bollard: what a user would
//! do without berth. Every container made here carries the label
//! `berth.loadtest=1` and is removed before the scenario returns.

use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::time::Instant;

pub const LABEL: &str = "berth.loadtest";

/// Connects to the local daemon, negotiating the API version.
pub async fn connect() -> anyhow::Result<Docker> {
    Docker::connect_with_local_defaults()
        .map_err(|e| anyhow::anyhow!("cannot connect to Docker: {e}"))?
        .negotiate_version()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the Docker daemon: {e}"))
}

/// The agent's command line for one turn on `prompt`, as berth runs it, fed
/// the same stream-json user message on stdin.
pub fn agent_cmd(prompt: &str) -> Vec<String> {
    let msg = serde_json::json!({"type": "user", "message": {"role": "user",
        "content": [{"type": "text", "text": prompt}]}});
    let script = format!(
        "printf '%s\\n' '{}' | claude -p --input-format stream-json --output-format stream-json --verbose",
        msg.to_string().replace('\'', "'\\''")
    );
    vec!["sh".into(), "-c".into(), script]
}

/// Creates (does not start) a container of `image` running `cmd`.
pub async fn create(docker: &Docker, image: &str, cmd: Vec<String>) -> anyhow::Result<String> {
    create_in(docker, image, cmd, None).await
}

/// [`create`] on a network (`none`: loopback only).
pub async fn create_in(
    docker: &Docker,
    image: &str,
    cmd: Vec<String>,
    network: Option<&str>,
) -> anyhow::Result<String> {
    let body = ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(cmd),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        labels: Some([(LABEL.to_string(), "1".to_string())].into()),
        host_config: network.map(|n| bollard::models::HostConfig {
            network_mode: Some(n.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let name = format!(
        "berth-loadtest-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let opts = CreateContainerOptionsBuilder::new().name(&name).build();
    Ok(docker.create_container(Some(opts), body).await?.id)
}

/// Attaches to `id`'s stdout, starts it, and returns when its first output
/// arrives; then reads the rest (up to `bytes` total, or to its end) and
/// returns the time to first output and the bytes read.
pub async fn start_and_read(
    docker: &Docker,
    id: &str,
    t0: Instant,
    want_bytes: Option<u64>,
) -> anyhow::Result<(Duration, Duration, u64)> {
    let opts = AttachContainerOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .stream(true)
        .build();
    let mut att = docker.attach_container(id, Some(opts)).await?;
    docker.start_container(id, None).await?;
    let mut first = None;
    let mut bytes = 0u64;
    while let Some(chunk) = att.output.next().await {
        let n = match chunk? {
            LogOutput::StdOut { message } => message.len(),
            LogOutput::StdErr { message } => {
                anyhow::bail!(
                    "container wrote to stderr: {}",
                    String::from_utf8_lossy(&message).trim()
                )
            }
            _ => 0,
        };
        bytes += n as u64;
        if n > 0 {
            first.get_or_insert_with(|| t0.elapsed());
            if want_bytes.is_none_or(|w| bytes >= w) {
                break;
            }
        }
    }
    let first = first.ok_or_else(|| anyhow::anyhow!("container {id} wrote nothing"))?;
    Ok((first, t0.elapsed(), bytes))
}

/// Force-removes a container.
pub async fn remove(docker: &Docker, id: &str) {
    let opts = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    if let Err(e) = docker.remove_container(id, Some(opts)).await {
        tracing::warn!(container = id, error = %e, "removing a baseline container failed");
    }
}

/// Removes every container this driver made (left by an interrupted run too).
pub async fn cleanup(docker: &Docker) -> anyhow::Result<()> {
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&std::collections::HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL}=1")],
        )]))
        .build();
    for c in docker.list_containers(Some(opts)).await? {
        if let Some(id) = c.id {
            remove(docker, &id).await;
        }
    }
    Ok(())
}

/// The resident memory (bytes) of each process whose command line holds
/// `needle`, in every running container labelled `label`: what one idle
/// pre-started agent costs.
pub async fn rss_of(d: &Docker, label: &str, needle: &str) -> anyhow::Result<Vec<u64>> {
    let filters = std::collections::HashMap::from([("label".to_string(), vec![label.to_string()])]);
    let opts = bollard::query_parameters::ListContainersOptionsBuilder::new()
        .filters(&filters)
        .build();
    let mut out = Vec::new();
    for c in d.list_containers(Some(opts)).await? {
        let Some(id) = c.id else { continue };
        let top = d
            .top_processes(
                &id,
                Some(
                    bollard::query_parameters::TopOptionsBuilder::new()
                        .ps_args("-o pid,rss,args")
                        .build(),
                ),
            )
            .await?;
        let titles = top.titles.unwrap_or_default();
        let col = |name: &str| titles.iter().position(|t| t.eq_ignore_ascii_case(name));
        let (Some(rss), Some(args)) = (col("RSS"), col("COMMAND").or_else(|| col("ARGS"))) else {
            anyhow::bail!("docker top of {id}: no RSS or COMMAND column in {titles:?}");
        };
        for p in top.processes.unwrap_or_default() {
            if p.get(args).is_some_and(|a| a.contains(needle))
                && let Some(kib) = p.get(rss).and_then(|r| r.trim().parse::<u64>().ok())
            {
                out.push(kib * 1024);
            }
        }
    }
    Ok(out)
}

//! Copying a session's resources into its container before the agent starts.

use std::path::PathBuf;

use bytes::Bytes;

use super::archive::{Rebase, Route, blocking, dir_tar, dirs_tar, files_tar, single_file_tar};
use super::restore::restore;
use super::snapshot::layout_volumes;
use crate::config::WorkspaceConfig;
use crate::container::ContainerRuntime;
use crate::spec::{Credential, GitClone, SessionSpec};

/// Copies everything the session needs into its container, in order:
/// snapshot, then (first start only) files and git clones, then memory
/// stores and skills. The error names the resource that failed.
pub async fn prepare(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &WorkspaceConfig,
    container: &str,
    spec: &SessionSpec,
) -> Result<(), String> {
    let layout = &cfg.layout;
    let restoring = !spec.restore_snapshot_key.is_empty();
    if restoring {
        let key = &spec.restore_snapshot_key;
        let routes = layout_volumes(layout)
            .into_iter()
            .map(|v| Route {
                rebase: Rebase::new(&v, ""),
                volume: v,
                dirs: None,
            })
            .collect();
        let found = restore(runtime, objects, container, key, routes)
            .await
            .map_err(|e| format!("restoring snapshot {key}: {e}"))?;
        if !found {
            return Err(format!("snapshot {key} is missing from the object store"));
        }
    } else {
        for f in &spec.files {
            let body = objects
                .get(&f.key)
                .await
                .map_err(|e| format!("file {}: {e}", f.key))?
                .ok_or_else(|| format!("file {} does not exist", f.key))?;
            let (volume, rel) = layout.volume_of(&f.path)?;
            let (uid, gid) = (layout.uid, layout.gid);
            let tar = blocking(move || single_file_tar(&rel, &body, uid, gid))
                .await
                .map_err(|e| format!("file {}: {e}", f.key))?;
            runtime
                .upload_tar(container, volume, tar)
                .await
                .map_err(|e| format!("copying file {} to {}: {e}", f.key, f.path))?;
        }
        for (n, g) in spec.git.iter().enumerate() {
            let credential = g
                .credential_id
                .as_deref()
                .map(|id| {
                    spec.secrets.credential(id).ok_or_else(|| {
                        format!(
                            "git repository {}: its credential secrets/{id} was deleted",
                            g.url
                        )
                    })
                })
                .transpose()?;
            let tar = clone_repo(cfg, g, credential.as_ref().map(|c| (n, c))).await?;
            let (volume, _) = layout.volume_of(&g.path)?;
            runtime
                .upload_tar(container, volume, tar)
                .await
                .map_err(|e| format!("copying git repository {} to {}: {e}", g.url, g.path))?;
        }
    }
    for m in &spec.memory {
        let (volume, rel) = layout.volume_of(&m.path)?;
        let (uid, gid) = (layout.uid, layout.gid);
        let route = Route {
            volume: volume.to_string(),
            rebase: Rebase::new("", &rel),
            dirs: Some((uid, gid)),
        };
        let found = restore(runtime, objects, container, &m.key, vec![route])
            .await
            .map_err(|e| format!("memory store {}: {e}", m.key))?;
        if !found {
            // A new store: its directory, empty.
            let tar = blocking(move || dirs_tar(&rel, uid, gid))
                .await
                .map_err(|e| format!("memory store {}: {e}", m.key))?;
            runtime
                .upload_tar(container, volume, tar)
                .await
                .map_err(|e| format!("copying memory store {} to {}: {e}", m.key, m.path))?;
        }
    }
    if !spec.agent.skills.is_empty() {
        let skills: Vec<(String, Vec<u8>)> = spec
            .agent
            .skills
            .iter()
            .map(|k| {
                (
                    format!(".claude/skills/{}/SKILL.md", k.name),
                    k.content.clone().into_bytes(),
                )
            })
            .collect();
        let (uid, gid) = (layout.uid, layout.gid);
        let tar = blocking(move || files_tar(&skills, uid, gid))
            .await
            .map_err(|e| format!("skills: {e}"))?;
        runtime
            .upload_tar(container, &layout.home, tar)
            .await
            .map_err(|e| format!("copying skills: {e}"))?;
    }
    Ok(())
}

/// The node's own check of a git source: the shared rules, and a host name
/// that resolves to an internal address is refused too (unless allowlisted).
async fn check_source(cfg: &WorkspaceConfig, url: &str, with_key: bool) -> Result<(), String> {
    berth_common::spec::check_git_source("git.url", url, &cfg.git_allow, with_key)
        .map_err(|e| format!("git repository {url}: {}", e.message))?;
    let Some(target) = berth_common::spec::GitHost::of(url) else {
        return Err(format!("git repository {url}: not a URL"));
    };
    if target.allowed_by(&cfg.git_allow) {
        return Ok(());
    }
    let host = target.host;
    let addrs = tokio::net::lookup_host((host, 443))
        .await
        .map_err(|e| format!("git repository {url}: cannot resolve {host}: {e}"))?;
    for a in addrs {
        if berth_common::spec::is_internal_ip(a.ip()) {
            return Err(format!(
                "git repository {url}: {host} resolves to the internal address {}; not cloned",
                a.ip()
            ));
        }
    }
    Ok(())
}

/// Clones `g` on the node (the container has no network or git) and returns
/// a tar of the checkout placed at its path relative to its volume. With a
/// credential (`(n, credential)`: the resource's index too), git sends it as
/// an extra header given in its environment only (never a file or git's
/// config), and the checkout's `origin` is the gateway's route for it.
async fn clone_repo(
    cfg: &WorkspaceConfig,
    g: &GitClone,
    credential: Option<(usize, &Credential)>,
) -> Result<Bytes, String> {
    check_source(cfg, &g.url, g.ssh_key.is_some()).await?;
    let layout = &cfg.layout;
    let (_, rel) = layout.volume_of(&g.path)?;
    let dir = std::env::temp_dir().join(format!("berth-git-{}", uuid::Uuid::new_v4().simple()));
    // An ssh key lives in a file of the node's (0600) for the clone only.
    let key_file = match &g.ssh_key {
        Some(key) => Some(
            write_key(&dir.with_extension("key"), key)
                .map_err(|e| format!("git repository {}: writing its ssh key: {e}", g.url))?,
        ),
        None => None,
    };
    let ssh = key_file.as_ref().map(|k| {
        format!(
            "ssh -i '{}' -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            k.display()
        )
    });
    let header =
        credential.map(|(_, c)| format!("{}: {}", c.header.name, c.header.value(&c.value)));
    let result = async {
        git_with(
            cfg,
            None,
            GitAuth {
                ssh: ssh.as_deref(),
                header: header.as_deref(),
            },
            &[
                "clone",
                "--quiet",
                "--no-checkout",
                &g.url,
                &dir.to_string_lossy(),
            ],
        )
        .await
        .map_err(|e| format!("git repository {}: clone failed: {e}", g.url))?;
        let target = if g.git_ref.is_empty() {
            "HEAD"
        } else {
            &g.git_ref
        };
        git(cfg, Some(&dir), &["checkout", "--quiet", target, "--"])
            .await
            .map_err(|e| format!("git repository {}: no ref `{}`: {e}", g.url, target))?;
        if let (Some((n, _)), Some(port)) = (credential, cfg.gateway_port) {
            let origin = format!("http://127.0.0.1:{port}{}", crate::gateway::git_route(n));
            git(cfg, Some(&dir), &["remote", "set-url", "origin", &origin])
                .await
                .map_err(|e| {
                    format!(
                        "git repository {}: pointing origin at the gateway: {e}",
                        g.url
                    )
                })?;
        }
        let (uid, gid) = (layout.uid, layout.gid);
        let src = dir.clone();
        blocking(move || dir_tar(&src, &rel, uid, gid))
            .await
            .map_err(|e| format!("git repository {}: packing the checkout: {e}", g.url))
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    if let Some(k) = key_file {
        let _ = tokio::fs::remove_file(k).await;
    }
    result
}

/// Writes an ssh private key readable by the node's user only.
fn write_key(path: &std::path::Path, key: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key.as_bytes())?;
    if !key.ends_with('\n') {
        f.write_all(b"\n")?;
    }
    Ok(path.to_path_buf())
}

async fn git(cfg: &WorkspaceConfig, cwd: Option<&PathBuf>, args: &[&str]) -> Result<(), String> {
    git_with(cfg, cwd, GitAuth::default(), args).await
}

/// How one git command authenticates.
#[derive(Default, Clone, Copy)]
struct GitAuth<'a> {
    /// `GIT_SSH_COMMAND`.
    ssh: Option<&'a str>,
    /// An `http.extraHeader` (`Name: value`), given in git's environment
    /// (`GIT_CONFIG_*`), so it is in no file and no config.
    header: Option<&'a str>,
}

/// `git` with `auth` in its environment.
async fn git_with(
    cfg: &WorkspaceConfig,
    cwd: Option<&PathBuf>,
    auth: GitAuth<'_>,
    args: &[&str],
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(&cfg.git_bin);
    if let Some(ssh) = auth.ssh {
        cmd.env("GIT_SSH_COMMAND", ssh);
    }
    if let Some(header) = auth.header {
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env("GIT_CONFIG_VALUE_0", header);
    }
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let out = tokio::time::timeout(cfg.git_timeout, cmd.output())
        .await
        .map_err(|_| format!("timed out after {:?}", cfg.git_timeout))?
        .map_err(|e| format!("cannot run `{}`: {e}", cfg.git_bin))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(err.trim().lines().last().unwrap_or("failed").to_string())
    }
}

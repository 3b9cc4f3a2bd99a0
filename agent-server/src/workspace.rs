//! What goes into a session's container before the agent starts, and what
//! comes out when it stops: snapshots, memory stores, files, git clones and
//! skills, all moved as tar streams through the Docker API.
//!
//! Layout: the container's root filesystem is read-only; the workspace and the
//! agent's home are its two writable volumes, so every path a session names
//! must lie under one of them. A snapshot is one tar of both volumes, entries
//! rooted at `/` (`workspace/…`, `home/agent/…`), compressed with zstd.
//!
//! Invariants: preparation either completes or fails the start with a reason
//! naming the resource (the caller then removes the container: nothing
//! half-prepared ever runs); objects are read fully before anything is copied
//! in.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;

use crate::config::Config;
use crate::container::ContainerRuntime;
use crate::spec::{GitClone, SessionSpec};

/// zstd level for snapshots and memory stores: fast, and most of the gain.
const ZSTD_LEVEL: i32 = 3;

/// Where the writable volumes are and who owns what is copied in.
#[derive(Debug, Clone)]
pub struct Layout {
    pub workspace: String,
    pub home: String,
    pub uid: u64,
    pub gid: u64,
}

impl Layout {
    pub fn new(cfg: &Config) -> Self {
        let mut ids = cfg.agent_user.split(':').map(|s| s.parse::<u64>().ok());
        let uid = ids.next().flatten().unwrap_or(1000);
        let gid = ids.next().flatten().unwrap_or(uid);
        Self {
            workspace: cfg.workspace.trim_end_matches('/').to_string(),
            home: cfg.home.trim_end_matches('/').to_string(),
            uid,
            gid,
        }
    }

    fn volumes(&self) -> [&str; 2] {
        [&self.workspace, &self.home]
    }

    /// The volume holding `path` and the path relative to it ("" for the
    /// volume itself), or `None` when `path` is outside both.
    pub fn locate<'a>(&'a self, path: &str) -> Option<(&'a str, String)> {
        let clean = clean_absolute(path)?;
        self.volumes().into_iter().find_map(|v| {
            let rest = clean.strip_prefix(v)?;
            if rest.is_empty() {
                Some((v, String::new()))
            } else {
                rest.strip_prefix('/').map(|r| (v, r.to_string()))
            }
        })
    }

    /// A path a session may name: absolute, normal, inside a volume.
    pub fn check(&self, path: &str) -> Result<(), String> {
        self.volume_of(path).map(|_| ())
    }

    /// [`Layout::locate`], with an error saying where paths may go.
    pub fn volume_of<'a>(&'a self, path: &str) -> Result<(&'a str, String), String> {
        self.locate(path).ok_or_else(|| {
            format!(
                "`{path}` must be an absolute path under {} or {} (the container's writable volumes), without `..`",
                self.workspace, self.home
            )
        })
    }
}

/// `path` without a trailing `/`, if it is absolute with only normal parts.
fn clean_absolute(path: &str) -> Option<String> {
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return None;
    }
    let mut out = String::new();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(s) => {
                out.push('/');
                out.push_str(s.to_str()?);
            }
            _ => return None,
        }
    }
    Some(if out.is_empty() { "/".into() } else { out })
}

/// Copies everything the session needs into its container, in order:
/// snapshot, then (first start only) files and git clones, then memory
/// stores and skills. The error names the resource that failed.
pub async fn prepare(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &Config,
    container: &str,
    spec: &SessionSpec,
) -> Result<(), String> {
    let layout = Layout::new(cfg);
    let restoring = !spec.restore_snapshot_key.is_empty();
    if restoring {
        let key = &spec.restore_snapshot_key;
        let packed = objects
            .get(key)
            .await
            .map_err(|e| format!("snapshot {key}: {e}"))?
            .ok_or_else(|| format!("snapshot {key} is missing from the object store"))?;
        let volumes = layout_volumes(&layout);
        let parts = blocking(move || split_snapshot(&packed, &volumes))
            .await
            .map_err(|e| format!("snapshot {key} is unreadable: {e}"))?;
        for (volume, tar) in parts {
            runtime
                .upload_tar(container, &volume, tar)
                .await
                .map_err(|e| format!("restoring snapshot {key} into {volume}: {e}"))?;
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
        for g in &spec.git {
            let tar = clone_repo(cfg, &layout, g).await?;
            let (volume, _) = layout.volume_of(&g.path)?;
            runtime
                .upload_tar(container, volume, tar)
                .await
                .map_err(|e| format!("copying git repository {} to {}: {e}", g.url, g.path))?;
        }
    }
    for m in &spec.memory {
        let packed = objects
            .get(&m.key)
            .await
            .map_err(|e| format!("memory store {}: {e}", m.key))?;
        let (volume, rel) = layout.volume_of(&m.path)?;
        let (uid, gid) = (layout.uid, layout.gid);
        let tar = blocking(move || memory_tar(packed.as_deref(), &rel, uid, gid))
            .await
            .map_err(|e| format!("memory store {} is unreadable: {e}", m.key))?;
        runtime
            .upload_tar(container, volume, tar)
            .await
            .map_err(|e| format!("copying memory store {} to {}: {e}", m.key, m.path))?;
    }
    if !spec.skills.is_empty() {
        let skills: Vec<(String, Vec<u8>)> = spec
            .skills
            .iter()
            .map(|(name, content)| {
                (
                    format!(".claude/skills/{name}/SKILL.md"),
                    content.clone().into_bytes(),
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

fn layout_volumes(layout: &Layout) -> Vec<String> {
    layout.volumes().iter().map(|v| v.to_string()).collect()
}

/// Saves the workspace and home volumes to `key`. Returns the compressed size.
pub async fn snapshot(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &Config,
    container: &str,
    key: &str,
) -> Result<u64, String> {
    let layout = Layout::new(cfg);
    let mut parts = Vec::new();
    for volume in layout.volumes() {
        let tar = runtime
            .download_tar(container, volume, cfg.snapshot_max_bytes)
            .await
            .map_err(|e| format!("reading {volume}: {e}"))?;
        parts.push((volume.to_string(), tar));
    }
    let packed = blocking(move || join_snapshot(&parts))
        .await
        .map_err(|e| format!("packing the snapshot: {e}"))?;
    let size = packed.len() as u64;
    objects
        .put(key, packed)
        .await
        .map_err(|e| format!("storing the snapshot: {e}"))?;
    Ok(size)
}

/// Copies every `read_write` memory store back to its object. Returns one
/// message per store that failed.
pub async fn write_back_memory(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &Config,
    container: &str,
    spec: &SessionSpec,
) -> Vec<String> {
    let mut errors = Vec::new();
    for m in spec.memory.iter().filter(|m| m.write_back) {
        let result = async {
            let tar = runtime
                .download_tar(container, &m.path, cfg.snapshot_max_bytes)
                .await
                .map_err(|e| format!("reading {}: {e}", m.path))?;
            let base = Path::new(&m.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let packed = blocking(move || {
                let rebased = rebase(&tar, &base, "")?;
                compress(&rebased)
            })
            .await
            .map_err(|e| format!("packing {}: {e}", m.path))?;
            objects
                .put(&m.key, packed)
                .await
                .map_err(|e| format!("storing: {e}"))
        }
        .await;
        if let Err(e) = result {
            errors.push(format!("memory store {}: {e}", m.key));
        }
    }
    errors
}

/// Clones `g` on the node (the container has no network or git) and returns
/// a tar of the checkout placed at its path relative to its volume.
async fn clone_repo(cfg: &Config, layout: &Layout, g: &GitClone) -> Result<Bytes, String> {
    let (_, rel) = layout.volume_of(&g.path)?;
    let dir = std::env::temp_dir().join(format!("berth-git-{}", uuid::Uuid::new_v4().simple()));
    let result = async {
        git(
            cfg,
            None,
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
        let (uid, gid) = (layout.uid, layout.gid);
        let src = dir.clone();
        blocking(move || dir_tar(&src, &rel, uid, gid))
            .await
            .map_err(|e| format!("git repository {}: packing the checkout: {e}", g.url))
    }
    .await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    result
}

async fn git(cfg: &Config, cwd: Option<&PathBuf>, args: &[&str]) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(&cfg.git_bin);
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

fn compress(tar: &[u8]) -> std::io::Result<Bytes> {
    Ok(Bytes::from(zstd::encode_all(tar, ZSTD_LEVEL)?))
}

/// Re-roots entries: those under `from` (a path prefix, "" = all) are moved
/// under `to`. Entries outside `from`, and `from` itself, are dropped.
fn rebase(tar: &[u8], from: &str, to: &str) -> std::io::Result<Vec<u8>> {
    let mut out = tar::Builder::new(Vec::new());
    let mut archive = tar::Archive::new(tar);
    let join = |rest: &str| {
        if to.is_empty() {
            rest.to_string()
        } else {
            format!("{to}/{rest}")
        }
    };
    let strip = |p: &str| -> Option<String> {
        let p = p.trim_end_matches('/');
        let rest = if from.is_empty() {
            p
        } else {
            p.strip_prefix(from)?.strip_prefix('/')?
        };
        (!rest.is_empty()).then(|| rest.to_string())
    };
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some(rest) = strip(&path) else { continue };
        let mut header = entry.header().clone();
        let kind = header.entry_type();
        if kind.is_symlink() {
            let target = entry
                .link_name()?
                .map(|t| t.into_owned())
                .unwrap_or_default();
            out.append_link(&mut header, join(&rest), target)?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()?
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default();
            let target = strip(&target).map(|t| join(&t)).unwrap_or(target);
            out.append_link(&mut header, join(&rest), target)?;
        } else {
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            out.append_data(&mut header, join(&rest), data.as_slice())?;
        }
    }
    out.into_inner()
}

/// One tar of both volumes (entries rooted at `/`), compressed.
fn join_snapshot(parts: &[(String, Bytes)]) -> std::io::Result<Bytes> {
    let mut all = Vec::new();
    for (volume, tar) in parts {
        let path = Path::new(volume);
        let base = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let rooted = volume.trim_start_matches('/');
        let mut rebased = rebase(tar, &base, rooted)?;
        // Drop the two zero blocks that end each archive before joining.
        trim_end_blocks(&mut rebased);
        all.extend_from_slice(&rebased);
    }
    all.extend_from_slice(&[0u8; 1024]);
    compress(&all)
}

/// A tar ends in zero blocks; remove them so archives concatenate.
fn trim_end_blocks(tar: &mut Vec<u8>) {
    while tar.len() >= 512 && tar[tar.len() - 512..].iter().all(|b| *b == 0) {
        tar.truncate(tar.len() - 512);
    }
}

/// Splits a snapshot into one tar per volume, entries relative to it.
fn split_snapshot(packed: &[u8], volumes: &[String]) -> std::io::Result<Vec<(String, Bytes)>> {
    let tar = zstd::decode_all(packed)?;
    volumes
        .iter()
        .map(|v| {
            let rebased = rebase(&tar, v.trim_start_matches('/'), "")?;
            Ok((v.clone(), Bytes::from(rebased)))
        })
        .collect()
}

/// A memory store's tar, placed at `rel` (with the directory itself, so an
/// empty or absent store still gives the agent its directory).
fn memory_tar(packed: Option<&[u8]>, rel: &str, uid: u64, gid: u64) -> std::io::Result<Bytes> {
    let mut out = tar::Builder::new(Vec::new());
    append_dirs(&mut out, rel, uid, gid)?;
    let mut tar = out.into_inner()?;
    trim_end_blocks(&mut tar);
    if let Some(packed) = packed {
        let inner = zstd::decode_all(packed)?;
        let mut rebased = rebase(&inner, "", rel)?;
        trim_end_blocks(&mut rebased);
        tar.extend_from_slice(&rebased);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    Ok(Bytes::from(tar))
}

/// Directory entries for `rel` and each of its parents, owned by uid:gid.
fn append_dirs(
    out: &mut tar::Builder<Vec<u8>>,
    rel: &str,
    uid: u64,
    gid: u64,
) -> std::io::Result<()> {
    let mut path = String::new();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        if !path.is_empty() {
            path.push('/');
        }
        path.push_str(part);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(0);
        h.set_mtime(now());
        out.append_data(&mut h, format!("{path}/"), std::io::empty())?;
    }
    Ok(())
}

fn single_file_tar(rel: &str, body: &[u8], uid: u64, gid: u64) -> std::io::Result<Bytes> {
    files_tar(&[(rel.to_string(), body.to_vec())], uid, gid)
}

/// Regular files (with their parent directories) owned by uid:gid.
fn files_tar(files: &[(String, Vec<u8>)], uid: u64, gid: u64) -> std::io::Result<Bytes> {
    let mut out = tar::Builder::new(Vec::new());
    for (rel, body) in files {
        if let Some((parent, _)) = rel.rsplit_once('/') {
            append_dirs(&mut out, parent, uid, gid)?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(body.len() as u64);
        h.set_mtime(now());
        out.append_data(&mut h, rel, body.as_slice())?;
    }
    Ok(Bytes::from(out.into_inner()?))
}

/// A directory tree from the node's filesystem, placed at `rel`, owned by uid:gid.
fn dir_tar(src: &Path, rel: &str, uid: u64, gid: u64) -> std::io::Result<Bytes> {
    let mut out = tar::Builder::new(Vec::new());
    out.follow_symlinks(false);
    append_dirs(&mut out, rel, uid, gid)?;
    let mut stack = vec![(src.to_path_buf(), rel.to_string())];
    while let Some((dir, at)) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let to = if at.is_empty() {
                name
            } else {
                format!("{at}/{name}")
            };
            let meta = std::fs::symlink_metadata(&path)?;
            let mut h = tar::Header::new_gnu();
            h.set_metadata(&meta);
            h.set_uid(uid);
            h.set_gid(gid);
            if meta.is_dir() {
                h.set_size(0);
                out.append_data(&mut h, format!("{to}/"), std::io::empty())?;
                stack.push((path, to));
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path)?;
                out.append_link(&mut h, &to, target)?;
            } else {
                let file = std::fs::File::open(&path)?;
                out.append_data(&mut h, &to, file)?;
            }
        }
    }
    Ok(Bytes::from(out.into_inner()?))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            workspace: "/workspace".into(),
            home: "/home/agent".into(),
            uid: 1000,
            gid: 1000,
        }
    }

    fn entries(tar: &[u8]) -> Vec<(String, String)> {
        let mut a = tar::Archive::new(tar);
        let mut out = Vec::new();
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            let path = e.path().expect("path").to_string_lossy().into_owned();
            let mut body = String::new();
            e.read_to_string(&mut body).expect("read");
            out.push((path, body));
        }
        out
    }

    #[test]
    fn paths_must_lie_in_a_volume() {
        let l = layout();
        assert_eq!(
            l.locate("/workspace/a/b.txt"),
            Some(("/workspace", "a/b.txt".into()))
        );
        assert_eq!(
            l.locate("/home/agent/.mem/"),
            Some(("/home/agent", ".mem".into()))
        );
        assert_eq!(l.locate("/workspace"), Some(("/workspace", String::new())));
        for bad in [
            "/etc/passwd",
            "workspace/a",
            "/workspace/../etc",
            "/workspacex/a",
            "/home",
        ] {
            assert!(l.check(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_snapshot_round_trips_both_volumes() {
        let ws = files_tar(&[("a.txt".into(), b"alpha".to_vec())], 1000, 1000).expect("tar");
        // Docker's archive of /workspace roots entries at the basename.
        let ws = rebase(&ws, "", "workspace").expect("rebase");
        let home =
            files_tar(&[(".claude/x.jsonl".into(), b"{}".to_vec())], 1000, 1000).expect("tar");
        let home = rebase(&home, "", "agent").expect("rebase");
        let packed = join_snapshot(&[
            ("/workspace".into(), Bytes::from(ws)),
            ("/home/agent".into(), Bytes::from(home)),
        ])
        .expect("join");
        let parts = split_snapshot(&packed, &layout_volumes(&layout())).expect("split");
        assert_eq!(parts[0].0, "/workspace");
        assert_eq!(
            entries(&parts[0].1),
            [("a.txt".to_string(), "alpha".to_string())]
        );
        assert_eq!(parts[1].0, "/home/agent");
        let home: Vec<_> = entries(&parts[1].1).into_iter().map(|e| e.0).collect();
        assert!(home.contains(&".claude/x.jsonl".to_string()), "{home:?}");
    }

    #[test]
    fn a_memory_store_is_placed_under_its_path_even_when_empty() {
        let empty = memory_tar(None, "mem/notes", 1000, 1000).expect("tar");
        let names: Vec<_> = entries(&empty).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["mem/", "mem/notes/"]);
        let store = files_tar(&[("facts.md".into(), b"sky is blue".to_vec())], 1, 1).expect("tar");
        let packed = compress(&store).expect("zstd");
        let full = memory_tar(Some(&packed), "mem", 1000, 1000).expect("tar");
        assert!(entries(&full).contains(&("mem/facts.md".into(), "sky is blue".into())));
    }
}

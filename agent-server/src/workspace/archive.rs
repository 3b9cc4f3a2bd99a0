//! Tar and zstd: packing volumes into snapshots and memory stores, and
//! building the archives copied into containers. Pure functions over bytes,
//! run on the blocking pool.

use std::io::Read;
use std::path::Path;

use bytes::Bytes;

/// zstd level for snapshots and memory stores: fast, and most of the gain.
const ZSTD_LEVEL: i32 = 3;

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

pub(super) fn compress(tar: &[u8]) -> std::io::Result<Bytes> {
    Ok(Bytes::from(zstd::encode_all(tar, ZSTD_LEVEL)?))
}

/// Re-roots entries: those under `from` (a path prefix, "" = all) are moved
/// under `to`. Entries outside `from`, and `from` itself, are dropped.
pub(super) fn rebase(tar: &[u8], from: &str, to: &str) -> std::io::Result<Vec<u8>> {
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
pub(super) fn join_snapshot(parts: &[(String, Bytes)]) -> std::io::Result<Bytes> {
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
pub(super) fn split_snapshot(
    packed: &[u8],
    volumes: &[String],
) -> std::io::Result<Vec<(String, Bytes)>> {
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
pub(super) fn memory_tar(
    packed: Option<&[u8]>,
    rel: &str,
    uid: u64,
    gid: u64,
) -> std::io::Result<Bytes> {
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

pub(super) fn single_file_tar(
    rel: &str,
    body: &[u8],
    uid: u64,
    gid: u64,
) -> std::io::Result<Bytes> {
    files_tar(&[(rel.to_string(), body.to_vec())], uid, gid)
}

/// Regular files (with their parent directories) owned by uid:gid.
pub(super) fn files_tar(files: &[(String, Vec<u8>)], uid: u64, gid: u64) -> std::io::Result<Bytes> {
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
pub(super) fn dir_tar(src: &Path, rel: &str, uid: u64, gid: u64) -> std::io::Result<Bytes> {
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
    use std::io::Read;

    use super::*;
    use crate::layout::Layout;

    fn volumes() -> Vec<String> {
        let l = Layout::new("1000:1000", "/workspace", "/home/agent");
        l.volumes().iter().map(|v| v.to_string()).collect()
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
        let parts = split_snapshot(&packed, &volumes()).expect("split");
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

//! Tar: re-rooting and splitting the archives of snapshots and memory
//! stores as they stream through, and building the small archives copied
//! into containers. Synchronous functions over readers and writers, run on
//! the blocking pool.

use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;

/// zstd level for snapshots and memory stores: fast, and most of the gain.
pub(super) const ZSTD_LEVEL: i32 = 3;

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)?
}

/// A path re-rooting: entries under `from` (a path prefix, "" = all) move
/// under `to`; entries outside `from`, and `from` itself, are dropped.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Rebase {
    pub from: String,
    pub to: String,
}

impl Rebase {
    pub(super) fn new(from: &str, to: &str) -> Self {
        Self {
            from: from.trim_matches('/').to_string(),
            to: to.trim_matches('/').to_string(),
        }
    }

    /// `p` relative to `from`, or `None` when it is not under it.
    fn strip(&self, p: &str) -> Option<String> {
        let p = p.trim_end_matches('/');
        let rest = if self.from.is_empty() {
            p
        } else {
            p.strip_prefix(self.from.as_str())?.strip_prefix('/')?
        };
        (!rest.is_empty()).then(|| rest.to_string())
    }

    fn join(&self, rest: &str) -> String {
        if self.to.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.to)
        }
    }
}

/// Copies the entries of the tar `src` that `rebase` keeps into `out`,
/// re-rooted. Entry data is streamed, never held whole.
pub(super) fn rebase_into<R: Read, W: Write>(
    src: R,
    out: &mut tar::Builder<W>,
    rebase: &Rebase,
) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(src);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        if let Some(rest) = rebase.strip(&path) {
            copy_entry(out, &mut entry, rebase, &rest)?;
        }
    }
    Ok(())
}

/// Appends `entry` to `out` at `rebase.join(rest)`; a hard link's target is
/// re-rooted the same way.
fn copy_entry<R: Read, W: Write>(
    out: &mut tar::Builder<W>,
    entry: &mut tar::Entry<'_, R>,
    rebase: &Rebase,
    rest: &str,
) -> std::io::Result<()> {
    let mut header = entry.header().clone();
    let kind = header.entry_type();
    if kind.is_symlink() {
        let target = entry
            .link_name()?
            .map(|t| t.into_owned())
            .unwrap_or_default();
        out.append_link(&mut header, rebase.join(rest), target)
    } else if kind.is_hard_link() {
        let target = entry
            .link_name()?
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = rebase
            .strip(&target)
            .map(|t| rebase.join(&t))
            .unwrap_or(target);
        out.append_link(&mut header, rebase.join(rest), target)
    } else {
        out.append_data(&mut header, rebase.join(rest), entry)
    }
}

/// Where restored entries go: those `rebase` keeps land in `volume`.
#[derive(Debug, Clone)]
pub(super) struct Route {
    pub volume: String,
    pub rebase: Rebase,
    /// Owner of directory entries for `rebase.to` and its parents, written
    /// first (so an empty or absent store still gives the agent its
    /// directory); `None`: none.
    pub dirs: Option<(u64, u64)>,
}

/// Splits the tar `src` by `routes` (the first that keeps an entry takes
/// it). Each run of entries for one route becomes a tar of its own, written
/// to the writer `open` gives and ended by `close`. A route with `dirs` that
/// no entry took still gets its directories.
pub(super) fn split_into<R: Read, W: Write>(
    src: R,
    routes: &[Route],
    mut open: impl FnMut(&Route) -> std::io::Result<W>,
    mut close: impl FnMut(W) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut start = |i: usize| -> std::io::Result<tar::Builder<W>> {
        let route = &routes[i];
        let mut out = tar::Builder::new(open(route)?);
        if let Some((uid, gid)) = route.dirs {
            append_dirs(&mut out, &route.rebase.to, uid, gid)?;
        }
        Ok(out)
    };
    let mut seen = vec![false; routes.len()];
    let mut current: Option<(usize, tar::Builder<W>)> = None;
    let mut archive = tar::Archive::new(src);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let Some((i, rest)) = routes
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.rebase.strip(&path).map(|rest| (i, rest)))
        else {
            continue;
        };
        if current.as_ref().is_none_or(|(at, _)| *at != i) {
            if let Some((_, out)) = current.take() {
                close(out.into_inner()?)?;
            }
            current = Some((i, start(i)?));
            seen[i] = true;
        }
        if let Some((_, out)) = current.as_mut() {
            copy_entry(out, &mut entry, &routes[i].rebase, &rest)?;
        }
    }
    if let Some((_, out)) = current.take() {
        close(out.into_inner()?)?;
    }
    for (i, route) in routes.iter().enumerate() {
        if !seen[i] && route.dirs.is_some() {
            close(start(i)?.into_inner()?)?;
        }
    }
    Ok(())
}

/// The directory `rel` (with its parents), owned by uid:gid, as a tar.
pub(super) fn dirs_tar(rel: &str, uid: u64, gid: u64) -> std::io::Result<Bytes> {
    let mut out = tar::Builder::new(Vec::new());
    append_dirs(&mut out, rel, uid, gid)?;
    Ok(Bytes::from(out.into_inner()?))
}

/// Directory entries for `rel` and each of its parents, owned by uid:gid.
fn append_dirs<W: Write>(
    out: &mut tar::Builder<W>,
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

    fn rebased(tar: &[u8], rebase: Rebase) -> Vec<u8> {
        let mut out = tar::Builder::new(Vec::new());
        rebase_into(tar, &mut out, &rebase).expect("rebase");
        out.into_inner().expect("tar")
    }

    /// `src` split by `routes`: each tar written, with its volume.
    fn split(src: &[u8], routes: &[Route]) -> Vec<(String, Vec<u8>)> {
        let done = std::cell::RefCell::new(Vec::new());
        let names = std::cell::RefCell::new(Vec::new());
        split_into(
            src,
            routes,
            |r| {
                names.borrow_mut().push(r.volume.clone());
                Ok(Vec::new())
            },
            |tar| {
                done.borrow_mut().push(tar);
                Ok(())
            },
        )
        .expect("split");
        names
            .into_inner()
            .into_iter()
            .zip(done.into_inner())
            .collect()
    }

    fn snapshot_routes() -> Vec<Route> {
        volumes()
            .into_iter()
            .map(|v| Route {
                rebase: Rebase::new(&v, ""),
                volume: v,
                dirs: None,
            })
            .collect()
    }

    #[test]
    fn a_snapshot_round_trips_both_volumes() {
        let ws = files_tar(&[("a.txt".into(), b"alpha".to_vec())], 1000, 1000).expect("tar");
        // Docker's archive of /workspace roots entries at the basename.
        let ws = rebased(&ws, Rebase::new("", "workspace"));
        let home =
            files_tar(&[(".claude/x.jsonl".into(), b"{}".to_vec())], 1000, 1000).expect("tar");
        let home = rebased(&home, Rebase::new("", "agent"));
        let mut packed = tar::Builder::new(Vec::new());
        rebase_into(&ws[..], &mut packed, &Rebase::new("workspace", "workspace")).expect("ws");
        rebase_into(&home[..], &mut packed, &Rebase::new("agent", "home/agent")).expect("home");
        let packed = packed.into_inner().expect("tar");
        let parts = split(&packed, &snapshot_routes());
        assert_eq!(parts.len(), 2, "one tar per volume");
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
    fn long_names_and_links_survive_the_rebase() {
        let long = format!("{}/deep.txt", "d".repeat(150));
        let mut src = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(4);
        h.set_mode(0o644);
        src.append_data(&mut h, format!("workspace/{long}"), &b"deep"[..])
            .expect("file");
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        src.append_link(&mut l, "workspace/link", "/etc/hostname")
            .expect("link");
        let src = src.into_inner().expect("tar");
        let parts = split(&src, &snapshot_routes());
        let got = entries(&parts[0].1);
        assert_eq!(got[0], (long, "deep".to_string()));
        let mut a = tar::Archive::new(&parts[0].1[..]);
        let link = a
            .entries()
            .expect("entries")
            .map(|e| e.expect("entry"))
            .find(|e| e.header().entry_type().is_symlink())
            .expect("the symlink");
        assert_eq!(
            link.link_name()
                .expect("target")
                .expect("a target")
                .to_string_lossy(),
            "/etc/hostname"
        );
    }

    #[test]
    fn a_memory_store_is_placed_under_its_path_even_when_empty() {
        let route = Route {
            volume: "/home/agent".into(),
            rebase: Rebase::new("", "mem/notes"),
            dirs: Some((1000, 1000)),
        };
        let empty = tar::Builder::new(Vec::new()).into_inner().expect("tar");
        let parts = split(&empty, std::slice::from_ref(&route));
        let names: Vec<_> = entries(&parts[0].1).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["mem/", "mem/notes/"]);
        let store = files_tar(&[("facts.md".into(), b"sky is blue".to_vec())], 1, 1).expect("tar");
        let parts = split(&store, &[route]);
        assert_eq!(parts.len(), 1);
        assert!(
            entries(&parts[0].1).contains(&("mem/notes/facts.md".into(), "sky is blue".into()))
        );
    }
}

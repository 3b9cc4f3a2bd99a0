//! Saving what a session leaves: a snapshot of both volumes, and its
//! read-write memory stores. Each streams from Docker through tar and zstd
//! to the object store in bounded memory, whatever the workspace's size.

use std::path::Path;

use tokio_util::io::{StreamReader, SyncIoBridge};

use super::archive::{Rebase, ZSTD_LEVEL, blocking, rebase_into};
use super::pipe::{ChunkWriter, pipe};
use crate::config::WorkspaceConfig;
use crate::container::ContainerRuntime;
use crate::layout::Layout;
use crate::spec::SessionSpec;

/// The writable volumes of `layout`, in snapshot order.
pub(super) fn layout_volumes(layout: &Layout) -> Vec<String> {
    layout.volumes().iter().map(|v| v.to_string()).collect()
}

/// Saves the workspace and home volumes to `key`. Returns the compressed
/// size. On failure the object at `key` is what it was before.
pub async fn snapshot(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &WorkspaceConfig,
    container: &str,
    key: &str,
) -> Result<u64, String> {
    // Docker roots each volume's archive at its basename; the snapshot
    // roots it at its path.
    let sources = layout_volumes(&cfg.layout)
        .into_iter()
        .map(|v| {
            let rebase = Rebase::new(&basename(&v), &v);
            (v, rebase)
        })
        .collect();
    save(runtime, objects, cfg, container, key, sources).await
}

/// Copies every `read_write` memory store back to its object. Returns one
/// message per store that failed.
pub async fn write_back_memory(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &WorkspaceConfig,
    container: &str,
    spec: &SessionSpec,
) -> Vec<String> {
    let mut errors = Vec::new();
    for m in spec.memory.iter().filter(|m| m.write_back) {
        let sources = vec![(m.path.clone(), Rebase::new(&basename(&m.path), ""))];
        if let Err(e) = save(runtime, objects, cfg, container, &m.key, sources).await {
            errors.push(format!("memory store {}: {e}", m.key));
        }
    }
    errors
}

fn basename(path: &str) -> String {
    Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Streams the container's `sources` (a path, and how its entries are
/// re-rooted) as one zstd tar to `key`; returns the stored size.
async fn save(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &WorkspaceConfig,
    container: &str,
    key: &str,
    sources: Vec<(String, Rebase)>,
) -> Result<u64, String> {
    let (writer, body) = pipe();
    let pack = async {
        let mut out = tar::Builder::new(zstd::Encoder::new(writer, ZSTD_LEVEL)?);
        for (path, rebase) in sources {
            let tar = runtime.download_tar(container, &path, cfg.snapshot_max_bytes);
            let src = SyncIoBridge::new(StreamReader::new(tar));
            out = blocking(move || {
                rebase_into(src, &mut out, &rebase)?;
                Ok(out)
            })
            .await?;
        }
        blocking(move || {
            let encoder: zstd::Encoder<'static, ChunkWriter> = out.into_inner()?;
            encoder.finish()?.finish()
        })
        .await
    };
    let store = objects.put_stream(key, StreamReader::new(body));
    let (packed, stored) = tokio::join!(pack, store);
    match (packed, stored) {
        (Ok(()), Ok(size)) => Ok(size),
        // The store stopped reading: its error is the cause.
        (Err(p), Err(s)) if p.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(format!("storing: {s}"))
        }
        (Err(p), _) => Err(format!("packing: {p}")),
        (Ok(()), Err(s)) => Err(format!("storing: {s}")),
    }
}

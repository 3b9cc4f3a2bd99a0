//! Saving what a session leaves: a snapshot of both volumes, and its
//! read-write memory stores.

use std::path::Path;

use super::archive::{blocking, compress, join_snapshot, rebase};
use crate::config::WorkspaceConfig;
use crate::container::ContainerRuntime;
use crate::layout::Layout;
use crate::spec::SessionSpec;

pub(super) fn layout_volumes(layout: &Layout) -> Vec<String> {
    layout.volumes().iter().map(|v| v.to_string()).collect()
}

/// Saves the workspace and home volumes to `key`. Returns the compressed size.
pub async fn snapshot(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    cfg: &WorkspaceConfig,
    container: &str,
    key: &str,
) -> Result<u64, String> {
    let layout = &cfg.layout;
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
    cfg: &WorkspaceConfig,
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

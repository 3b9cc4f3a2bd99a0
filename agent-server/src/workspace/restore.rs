//! Restoring an object (a snapshot, a memory store) into a container: read
//! from the object store as it arrives, decompressed and split by volume on
//! the blocking pool, and extracted by Docker as it streams, in bounded
//! memory whatever its size.

use tokio_util::io::SyncIoBridge;

use super::archive::{Route, blocking, split_into};
use super::pipe::{ChunkStream, pipe};
use crate::container::ContainerRuntime;

/// Extracts the zstd tar at `key` into the container, each entry where the
/// first of `routes` that keeps it says. `Ok(false)`: there is no object at
/// `key`. The error says what failed: reading, or copying into a volume.
pub(super) async fn restore(
    runtime: &ContainerRuntime,
    objects: &berth_common::objects::ObjectStore,
    container: &str,
    key: &str,
    routes: Vec<Route>,
) -> Result<bool, String> {
    let Some(reader) = objects.get_stream(key).await.map_err(|e| e.to_string())? else {
        return Ok(false);
    };
    let src = SyncIoBridge::new(reader);
    let (volumes_tx, mut volumes_rx) =
        tokio::sync::mpsc::unbounded_channel::<(String, ChunkStream)>();
    let split = blocking(move || {
        let decoder = zstd::Decoder::new(src)?;
        split_into(
            decoder,
            &routes,
            |route| {
                let (writer, body) = pipe();
                volumes_tx
                    .send((route.volume.clone(), body))
                    .map_err(|_| std::io::Error::other("the copy into the container stopped"))?;
                Ok(writer)
            },
            |writer| writer.finish(),
        )
    });
    let copy = async {
        // One volume at a time, in the order the archive holds them.
        while let Some((volume, body)) = volumes_rx.recv().await {
            runtime
                .upload_tar_stream(container, &volume, body)
                .await
                .map_err(|e| format!("copying into {volume}: {e}"))?;
        }
        Ok::<(), String>(())
    };
    let (split, copied) = tokio::join!(split, copy);
    match (split, copied) {
        (Ok(()), Ok(())) => Ok(true),
        // The copy stopped reading: its error is the cause.
        (Err(e), Err(c)) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(c),
        (Err(e), _) => Err(format!("unreadable: {e}")),
        (Ok(()), Err(e)) => Err(e),
    }
}

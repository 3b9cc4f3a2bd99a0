//! Key rotation: re-wraps every sealed value's data key under the key
//! file's first (sealing) key, at start and then every few minutes, so an
//! old key can leave the file once the log says none remain under it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::seal::Sealer;
use crate::store::{SealedTable, Store};

const INTERVAL: Duration = Duration::from_secs(300);

pub(crate) async fn run(store: Store, shutdown: CancellationToken) {
    loop {
        match rewrap_all(&store).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                values = n,
                key = store.sealer().primary(),
                "re-wrapped sealed values under the sealing key; none remain under older keys"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "re-wrapping sealed values failed; retrying later")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

/// Re-wraps what is not under the sealing key; returns how many.
async fn rewrap_all(store: &Store) -> crate::error::Result<usize> {
    let sealer = store.sealer();
    let kek = sealer.primary();
    let mut done = 0;
    for table in [
        SealedTable::Secrets,
        SealedTable::SessionEnv,
        SealedTable::AgentEnv,
        SealedTable::Webhooks,
        SealedTable::Subscriptions,
    ] {
        loop {
            let batch = store.stale_sealed(table, kek).await?;
            if batch.is_empty() {
                break;
            }
            let mut progressed = false;
            for (key, _project, old) in batch {
                match sealer.rewrap(&old) {
                    Ok(Some(new)) => {
                        store.rewrap_sealed(table, &key, &old, &new, kek).await?;
                        done += 1;
                        progressed = true;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(
                        ?table,
                        row = %key,
                        key = Sealer::key_of(&old).unwrap_or("?"),
                        error = %e,
                        "cannot re-wrap a sealed value: keep its key in the key file"
                    ),
                }
            }
            if !progressed {
                break;
            }
        }
    }
    Ok(done)
}

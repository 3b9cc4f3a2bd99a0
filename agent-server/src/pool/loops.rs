//! The refill loops of a pool kind: their stop token (cancelled by a drain
//! or shutdown, replaced by an undrain) and their handles, so a shutdown
//! can wait for every loop, an undrain's included, to remove its spares.

use std::sync::Mutex;

use berth_common::sync::lock;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) struct Loops {
    stop: Mutex<CancellationToken>,
    shutdown: CancellationToken,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Loops {
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self {
            stop: Mutex::new(shutdown.child_token()),
            shutdown,
            handles: Mutex::new(Vec::new()),
        }
    }

    /// The token the loops started now stop on.
    pub(crate) fn token(&self) -> CancellationToken {
        lock(&self.stop).clone()
    }

    /// Whether the loops are stopped (drained or shutting down).
    pub(crate) fn stopped_now(&self) -> bool {
        lock(&self.stop).is_cancelled()
    }

    /// Keeps a started loop's handle for [`Self::join`].
    pub(crate) fn track(&self, handle: JoinHandle<()>) {
        lock(&self.handles).push(handle);
    }

    /// Stops the loops (a drain).
    pub(crate) fn stop(&self) {
        lock(&self.stop).cancel();
    }

    /// After a drain: a fresh token, and `true` when the loops must be
    /// started again (false unless stopped, or when shutting down).
    pub(crate) fn rearm(&self) -> bool {
        if self.shutdown.is_cancelled() {
            return false;
        }
        let mut stop = lock(&self.stop);
        if !stop.is_cancelled() {
            return false;
        }
        *stop = self.shutdown.child_token();
        true
    }

    /// Waits until every loop has ended (after a shutdown).
    pub(crate) async fn join(&self) {
        let handles = std::mem::take(&mut *lock(&self.handles));
        for h in handles {
            let _ = h.await;
        }
    }
}

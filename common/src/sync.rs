//! Small concurrency helpers shared by the services.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the value even if another thread panicked while holding
/// it. Callers use this only where every mutation leaves the value whole (a
/// single insert, remove, push or replace), so a poisoned value is consistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sleeps until `at`, or forever when there is no deadline (a disarmed
/// branch of a `select!`).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

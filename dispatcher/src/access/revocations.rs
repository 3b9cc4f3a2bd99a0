//! A revoked key loses its open streams, not only its next call. Each
//! dispatcher watches Postgres for keys revoked anywhere (every half of the
//! key cache's lifetime) and tells its authenticator, which ends the
//! streams those keys hold with UNAUTHENTICATED: `StreamEvents` and
//! `Connect` end within the key cache's lifetime of a revoke on any
//! dispatcher, at once on the one that revoked.

use std::pin::Pin;
use std::sync::Arc;

use berth_common::grpc::rich_status;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::access::auth::{Authenticator, CACHE_TTL, Caller};
use crate::store::Store;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Reads the keys revoked since the last look, every half of the key
/// cache's lifetime, until shutdown.
pub(crate) async fn watch(store: Store, auth: Arc<Authenticator>, shutdown: CancellationToken) {
    // Streams exist only from this start on; a margin covers clock skew.
    let mut since = chrono::Utc::now() - chrono::Duration::minutes(5);
    let mut tick = tokio::time::interval(CACHE_TTL / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.revoked_since(since).await {
            Ok(revoked) => {
                for (key_id, at) in revoked {
                    auth.forget(&key_id);
                    since = since.max(at);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read revoked keys now; trying again"),
        }
    }
}

/// Resolves once the key `caller` used is revoked; never for a caller
/// without a key.
pub(crate) fn key_revoked(
    auth: Arc<Authenticator>,
    caller: &Caller,
) -> impl Future<Output = ()> + Send + 'static {
    let key_id = caller.key_id.clone();
    async move {
        match key_id {
            Some(key_id) => auth.revoked(&key_id).await,
            None => std::future::pending().await,
        }
    }
}

/// `stream`, ended with UNAUTHENTICATED once the key `caller` used is
/// revoked. A caller without a key (a client certificate, anonymous) keeps
/// its stream.
pub(crate) fn end_when_revoked<T: Send + 'static>(
    auth: Arc<Authenticator>,
    caller: &Caller,
    stream: BoxStream<T>,
) -> BoxStream<T> {
    let Some(key_id) = caller.key_id.clone() else {
        return stream;
    };
    let revoked: Pin<Box<dyn Future<Output = ()> + Send>> =
        Box::pin(async move { auth.revoked(&key_id).await });
    Box::pin(futures::stream::unfold(
        Some((stream, revoked)),
        |state| async move {
            let (mut stream, mut revoked) = state?;
            tokio::select! {
                item = stream.next() => item.map(|i| (i, Some((stream, revoked)))),
                () = &mut revoked => Some((Err(rich_status(
                    Code::Unauthenticated,
                    "this stream's API key was revoked; use another key",
                    "API_KEY_REVOKED",
                    Some("authorization"),
                    None,
                )), None)),
            }
        },
    ))
}

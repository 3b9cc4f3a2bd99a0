//! Following a session's events through dispatcher restarts: on UNAVAILABLE
//! (a dispatcher shutting down for a rolling update, or gone) the stream
//! is opened again on the same URL (any dispatcher behind it), from the
//! last seq seen, with a growing, jittered backoff. Each interruption is
//! one line on stderr.

use std::time::{Duration, Instant};

use crate::auth::Api;
use berth_proto::v1::{self as pb, sessions_client::SessionsClient};
use futures::StreamExt;

/// How long a stream may stay interrupted before following gives up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(300);

/// Whether a stream error is worth reconnecting after.
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Streams `name`'s events after `after_seq` into `on_event` until it
/// returns false, or the stream ends (the session left its run). Returns
/// the last error that could not be retried.
pub async fn follow(
    client: &mut SessionsClient<Api>,
    name: &str,
    mut after_seq: i64,
    mut on_event: impl FnMut(&pb::Event) -> bool,
) -> Result<(), tonic::Status> {
    let mut interrupted: Option<Instant> = None;
    let mut backoff =
        berth_common::retry::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let opened = client
            .stream_events(pb::StreamEventsRequest {
                name: name.into(),
                after_seq,
            })
            .await;
        let failure = match opened {
            Ok(r) => {
                let mut stream = r.into_inner();
                loop {
                    match stream.next().await {
                        Some(Ok(e)) => {
                            interrupted = None;
                            backoff.reset();
                            after_seq = after_seq.max(e.seq);
                            if !on_event(&e) {
                                return Ok(());
                            }
                        }
                        Some(Err(s)) => break s,
                        None => return Ok(()),
                    }
                }
            }
            Err(s) => s,
        };
        if !retryable(&failure) {
            return Err(failure);
        }
        let since = *interrupted.get_or_insert_with(|| {
            eprintln!(
                "berth: event stream interrupted ({}); reconnecting from seq {after_seq}",
                failure.message()
            );
            Instant::now()
        });
        if since.elapsed() > GIVE_UP_AFTER {
            return Err(failure);
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

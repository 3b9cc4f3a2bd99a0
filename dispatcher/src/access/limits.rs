//! Admission on the public API, after authentication: a per-caller rate
//! limit (RESOURCE_EXHAUSTED with RetryInfo) and a cap on calls in
//! progress across the dispatcher, past which calls are shed at once
//! (UNAVAILABLE with RetryInfo) instead of queueing. A streaming call
//! counts until its stream is open, not for its whole life: thousands of
//! tails do not starve unary calls.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use berth_common::grpc::rich_status;
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::Semaphore;
use tonic::Code;

use crate::access::auth::Caller;
use crate::metrics;

/// How long a shed caller is told to wait.
const SHED_RETRY: Duration = Duration::from_secs(1);

type Limiter = RateLimiter<String, HashMapStateStore<String>, DefaultClock>;

/// The API's admission settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Calls per second each caller (API key, certificate) may make; 0: no limit.
    pub per_key_rate: u32,
    /// Calls a caller may make at once above the rate.
    pub per_key_burst: u32,
    /// Calls in progress across the dispatcher before new ones are shed.
    pub max_in_flight: usize,
}

/// Tower layer applying [`Limits`].
#[derive(Clone)]
pub struct LimitsLayer {
    limiter: Option<Arc<Limiter>>,
    in_flight: Arc<Semaphore>,
    rate: u32,
}

impl LimitsLayer {
    pub fn new(limits: Limits) -> Self {
        let limiter = NonZeroU32::new(limits.per_key_rate).map(|rate| {
            let burst =
                NonZeroU32::new(limits.per_key_burst.max(limits.per_key_rate)).unwrap_or(rate);
            Arc::new(RateLimiter::hashmap_with_clock(
                Quota::per_second(rate).allow_burst(burst),
                DefaultClock::default(),
            ))
        });
        Self {
            limiter,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            rate: limits.per_key_rate,
        }
    }

    /// Whether `caller` may make a call now; else how long to wait.
    fn admit(&self, caller: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter
            .check_key(&caller.to_string())
            .map_err(|not_until| not_until.wait_time_from(limiter.clock().now()))
    }
}

impl<S> tower::Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        LimitsService {
            inner,
            limits: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LimitsService<S> {
    inner: S,
    limits: LimitsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for LimitsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // Health probes carry no caller and are never limited.
        let caller = req.extensions().get::<Caller>().map(Caller::identity);
        if let Some(caller) = &caller
            && let Err(wait) = self.limits.admit(caller)
        {
            ::metrics::counter!(metrics::API_REJECTED, "reason" => "rate_limited").increment(1);
            let status = rich_status(
                Code::ResourceExhausted,
                format!(
                    "rate limit: {caller} may make {} calls per second; retry after {} ms",
                    self.limits.rate,
                    wait.as_millis().max(1)
                ),
                "RATE_LIMITED",
                None,
                Some(wait.max(Duration::from_millis(1))),
            );
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let permit = match (
            caller.is_some(),
            self.limits.in_flight.clone().try_acquire_owned(),
        ) {
            (false, _) => None,
            (true, Ok(p)) => Some(p),
            (true, Err(_)) => {
                ::metrics::counter!(metrics::API_REJECTED, "reason" => "overloaded").increment(1);
                let status = rich_status(
                    Code::Unavailable,
                    "the dispatcher is at its limit of calls in progress; retry shortly or on another dispatcher",
                    "OVERLOADED",
                    None,
                    Some(SHED_RETRY),
                );
                return Box::pin(async move { Ok(status.into_http()) });
            }
        };
        Box::pin(async move {
            let response = inner.call(req).await;
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_caller_past_its_burst_waits_and_others_do_not() {
        let l = LimitsLayer::new(Limits {
            per_key_rate: 1,
            per_key_burst: 3,
            max_in_flight: 8,
        });
        for _ in 0..3 {
            assert_eq!(l.admit("keys/a"), Ok(()));
        }
        let wait = l.admit("keys/a").expect_err("past the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(l.admit("keys/b"), Ok(()), "another key has its own budget");
    }

    #[test]
    fn zero_turns_the_rate_limit_off() {
        let l = LimitsLayer::new(Limits {
            per_key_rate: 0,
            per_key_burst: 0,
            max_in_flight: 1,
        });
        for _ in 0..1000 {
            assert_eq!(l.admit("keys/a"), Ok(()));
        }
    }
}

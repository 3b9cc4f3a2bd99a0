//! The dispatcher's background loops, each started by
//! [`crate::services::spawn_loops`] on one tracker and awaited at shutdown:
//! the queue's claims, the janitor, the reconcile pass, secret re-wrapping
//! and the metrics sampler. (The scheduler, the webhook server and the
//! outbound deliverer live with their operations in [`crate::ops`].)

pub(crate) mod janitor;
pub(crate) mod queue;
pub(crate) mod reconcile;
pub(crate) mod rewrap;
pub(crate) mod sampler;

//! Who may call: API keys and client certificates ([`auth`]), the rules of
//! managing keys, rate and concurrency limits ([`limits`]), and ending a revoked key's
//! streams. (Sealing secrets is [`crate::seal`], below the store.)

pub mod auth;
pub(crate) mod keys;
pub mod limits;
pub(crate) mod revocations;

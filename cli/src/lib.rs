//! What the `berth` CLI shares with programs that call the API the same
//! way: following a session's events through dispatcher restarts.

pub mod auth;
pub mod errors;
pub mod follow;
pub mod questions;
pub mod tools;

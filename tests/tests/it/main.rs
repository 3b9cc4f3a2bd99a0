//! berth's end-to-end tests: one binary, real Docker, real Postgres.
//! Run `scripts/setup.sh` first (it starts Postgres and builds the test image).

mod access;
mod agent_telemetry;
mod approvals;

mod claude;
mod clients;
mod console;
mod credentials;
mod docs;
mod durable;
mod engine;
mod failover;
mod faults;
mod fleet;
mod http;
mod local;
mod managed;
mod notify;
mod oauth;
mod ops;
mod partition;
mod questions;
mod reliability;
mod retries;
mod rotation;
mod seed;
mod shutdown;
mod slack;
mod snapshots;
mod spine;
mod traces;
mod turns;
mod warm;

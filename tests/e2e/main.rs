//! End-to-end tests: a real PostgreSQL from the test kit, the real `breakwater` binary, and real
//! clients (tokio-postgres, psql, pgbench). Each test owns its ports, dirs and processes.

// The tests run on runtimes of their own, never on a shard (crates/clippy.toml).
#![allow(clippy::disallowed_methods)]

mod admin;
mod admission;
mod auth;
mod auth_query;
mod common;
mod config;
mod deploy;
mod dns;
mod failover;
mod faults;
mod fleet;
mod hostile_upstream;
mod lifecycle;
mod limits;
mod listen;
mod park;
mod pooling;
mod prepared;
mod protocol;
mod rds_iam;
mod session_state;
mod startup;
mod storm;
mod tls;

//! Breakwater's test kit (dev-only): throwaway PostgreSQL clusters (and streaming standbys),
//! loopback ports that parallel test processes cannot collide on, a running Breakwater process, a
//! fault-injecting TCP proxy to put between Breakwater and PostgreSQL, a hostile fake server for
//! the login path, a tiny DNS responder, a network namespace whose link can be cut silently, and waiting for conditions instead of sleeping.
//!
//! End-to-end tests run in parallel, one process each (cargo nextest), so everything shared —
//! ports above all — is coordinated across processes, not just threads. Everything a test starts
//! is stopped when its handle drops, when the test panics, and (through a watchdog process) when
//! the test process is killed. The kit never touches the system's PostgreSQL clusters, sockets or
//! data directories, and is never a dependency of the shipped binary.

// Test support runs on the tests' runtimes, never on a shard (crates/clippy.toml).
#![allow(clippy::disallowed_methods)]

mod conn;
mod dns;
mod fault;
mod netns;
mod pg;
mod pooler;
mod port;
mod process;
mod upstream;
mod wait;

pub use dns::{DnsAnswer, DnsServer};
pub use fault::{ByteFault, ConnectFault, FaultProxy};
pub use netns::NetNs;
pub use pg::{pg_bin, PgCluster, PgOptions, ROLES, SUPERUSER};
pub use pooler::Pooler;
pub use port::{accepts_connections, free_port};
pub use upstream::{FakeUpstream, Hostility, Outcome};
pub use wait::{wait_until, wait_until_blocking};

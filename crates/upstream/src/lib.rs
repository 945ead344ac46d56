//! Server connections for Breakwater: connect and log in with every phase bounded, keep pools of
//! warm connections per (database, user), and notice connections that died while idle.
//! This crate never reads from clients and never decides when a transaction ends.

#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
// Tests run on runtimes of their own, with a time driver (crates/clippy.toml).
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod alarm;
pub mod auth_query;
pub mod changes;
pub mod conn;
pub mod connect;
pub mod dns;
pub mod error;
pub mod failover;
pub mod fleet;
pub mod home;
pub mod host;
pub mod names;
pub mod pool;
pub mod pool_set;
pub mod prepared;
pub mod rds_iam;
pub mod registry;
pub mod require_auth;
pub mod reserve;
pub mod role;
pub mod settings;
mod slots;
pub mod stream;
pub mod timer;
pub mod tls;

pub use alarm::Alarm;
pub use auth_query::{LookupError, LookupPool};
pub use changes::Changes;
pub use conn::{CancelTarget, ServerAddr, ServerConn};
pub use dns::{DnsCache, DnsEntrySnapshot, DnsError, DnsSettings};
pub use error::{ConnectError, QueryError};
pub use failover::HostList;
pub use fleet::{FleetSettings, FleetStatus};
pub use host::{BreakerOpen, DrillMode, Host, Hosts, Origin, Refusal, StormSettings};
pub use names::UnknownName;
pub use pool::{
    discard, Checkout, CheckoutError, ConnectFlag, Limits, PoolSizes, PooledServer, ServerPool,
    Source,
};
pub use pool_set::{Paused, PoolKey, PoolSet, PoolSpec, PoolStatus, Reconfigure};
pub use prepared::PreparedCache;
pub use rds_iam::{RdsIam, ServerAuth, ServerAuthKind};
pub use registry::ServerInfo;
pub use require_auth::{AuthMethod, RequireAuth};
pub use reserve::ReserveSettings;
pub use role::{LoadBalanceHosts, Role, TargetSessionAttrs};
pub use settings::{ServerSettings, ServerTarget};
pub use stats::CloseReason;
pub use stream::{Stream, TcpLiveness};
pub use tls::{ServerTls, ServerTlsFiles, SslMode, TlsConfigError};

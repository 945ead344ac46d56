//! Server connections for Breakwater: connect and log in with every phase bounded, keep pools of
//! warm connections per (database, user), and notice connections that died while idle.
//! This crate never reads from clients and never decides when a transaction ends.

pub mod alarm;
pub mod conn;
pub mod dns;
pub mod failover;
pub mod host;
pub mod pool;
pub mod prepared;
pub mod registry;
pub mod stream;
pub mod tls;

pub use alarm::Alarm;
pub use conn::{
    CancelTarget, ConnectError, QueryError, ServerAddr, ServerConn, ServerSettings, ServerTarget,
};
pub use dns::{DnsCache, DnsEntrySnapshot, DnsError, DnsSettings};
pub use failover::{HostList, LoadBalanceHosts, Origin, Role, TargetSessionAttrs};
pub use host::{BreakerOpen, DrillMode, Host, Hosts, Refusal, StormSettings};
pub use pool::{discard, took_connect_poll, CheckoutError, Limits, PooledServer, ServerPool};
pub use prepared::PreparedCache;
pub use registry::ServerInfo;
pub use stream::Stream;
pub use tls::{ServerTls, ServerTlsFiles, SslMode, TlsConfigError};

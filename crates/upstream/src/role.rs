//! What a server says about itself (its [`Role`]) and what a pool asks of its servers
//! (`target_session_attrs`, `load_balance_hosts`), with libpq's meanings. Plain values; the
//! search for a matching host is `failover`'s job.

use std::fmt;

/// `target_session_attrs`: which servers a pool accepts, as in libpq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    #[default]
    Any,
    /// Not in hot standby and `default_transaction_read_only = off`.
    ReadWrite,
    /// In hot standby, or `default_transaction_read_only = on`.
    ReadOnly,
    /// Not in hot standby.
    Primary,
    /// In hot standby.
    Standby,
    /// A standby if one is up, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Does a server with this role serve the pool outright? (`prefer-standby` also takes a
    /// non-standby when no standby is up; see [`HostList::connect`].)
    pub fn accepts(self, role: Role) -> bool {
        match self {
            TargetSessionAttrs::Any => true,
            TargetSessionAttrs::ReadWrite => !role.hot_standby && !role.read_only,
            TargetSessionAttrs::ReadOnly => role.hot_standby || role.read_only,
            TargetSessionAttrs::Primary => !role.hot_standby,
            TargetSessionAttrs::Standby | TargetSessionAttrs::PreferStandby => role.hot_standby,
        }
    }

    /// Pools that must write: a 25006 (read-only transaction) from their server means the host
    /// may have been demoted.
    pub fn wants_writer(self) -> bool {
        matches!(
            self,
            TargetSessionAttrs::ReadWrite | TargetSessionAttrs::Primary
        )
    }
}

impl fmt::Display for TargetSessionAttrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `load_balance_hosts`: the order in which a new connection tries the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalanceHosts {
    /// Always in the configured order.
    #[default]
    Disable,
    /// Each new connection starts one host further along.
    RoundRobin,
}

/// What a server says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Role {
    /// `in_hot_standby` (or `pg_is_in_recovery()` before PostgreSQL 14).
    pub hot_standby: bool,
    /// `default_transaction_read_only`.
    pub read_only: bool,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match (self.hot_standby, self.read_only) {
            (true, _) => "standby",
            (false, true) => "read-only primary",
            (false, false) => "primary",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIMARY: Role = Role {
        hot_standby: false,
        read_only: false,
    };
    const RO_PRIMARY: Role = Role {
        hot_standby: false,
        read_only: true,
    };
    const STANDBY: Role = Role {
        hot_standby: true,
        read_only: false,
    };

    #[test]
    fn target_session_attrs_accept_what_libpq_accepts() {
        use TargetSessionAttrs::*;
        let cases = [
            (Any, [true, true, true]),
            (ReadWrite, [true, false, false]),
            (ReadOnly, [false, true, true]),
            (Primary, [true, true, false]),
            (Standby, [false, false, true]),
            (PreferStandby, [false, false, true]),
        ];
        for (attrs, want) in cases {
            let got = [PRIMARY, RO_PRIMARY, STANDBY].map(|r| attrs.accepts(r));
            assert_eq!(got, want, "{attrs}");
        }
    }
}

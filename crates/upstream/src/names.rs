//! How the values of upstream's settings are spelled in config files, SHOW CONFIG and SET:
//! `FromStr` and `Display` for each setting enum, from one list of names per enum, so the
//! binary's config never keeps a mirror of these types. Nothing here reads a file.

use std::fmt;
use std::str::FromStr;

use crate::{LoadBalanceHosts, SslMode, TargetSessionAttrs};

/// A setting value that is none of the names the setting accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{given}\" is not {}", one_of(.accepted))]
pub struct UnknownName {
    pub given: String,
    pub accepted: Vec<&'static str>,
}

fn one_of(names: &[&str]) -> String {
    match names {
        [] => "accepted".into(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

impl UnknownName {
    /// The variant of `all` whose name is `given` (surrounding blanks ignored).
    pub fn find<T: Copy>(
        given: &str,
        all: &[T],
        name: impl Fn(T) -> &'static str,
    ) -> Result<T, UnknownName> {
        let wanted = given.trim();
        all.iter()
            .copied()
            .find(|v| name(*v) == wanted)
            .ok_or_else(|| UnknownName {
                given: given.to_owned(),
                accepted: all.iter().map(|v| name(*v)).collect(),
            })
    }
}

impl SslMode {
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];
}

impl FromStr for SslMode {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        UnknownName::find(s, &SslMode::ALL, SslMode::as_str)
    }
}

impl TargetSessionAttrs {
    pub const ALL: [TargetSessionAttrs; 6] = [
        TargetSessionAttrs::Any,
        TargetSessionAttrs::ReadWrite,
        TargetSessionAttrs::ReadOnly,
        TargetSessionAttrs::Primary,
        TargetSessionAttrs::Standby,
        TargetSessionAttrs::PreferStandby,
    ];
}

impl FromStr for TargetSessionAttrs {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        UnknownName::find(s, &TargetSessionAttrs::ALL, TargetSessionAttrs::as_str)
    }
}

impl LoadBalanceHosts {
    pub const ALL: [LoadBalanceHosts; 2] =
        [LoadBalanceHosts::Disable, LoadBalanceHosts::RoundRobin];

    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalanceHosts::Disable => "disable",
            LoadBalanceHosts::RoundRobin => "round-robin",
        }
    }
}

impl FromStr for LoadBalanceHosts {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, UnknownName> {
        UnknownName::find(s, &LoadBalanceHosts::ALL, LoadBalanceHosts::as_str)
    }
}

impl fmt::Display for LoadBalanceHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_variant() {
        for m in SslMode::ALL {
            assert_eq!(m.to_string().parse(), Ok(m));
        }
        for t in TargetSessionAttrs::ALL {
            assert_eq!(t.to_string().parse(), Ok(t));
        }
        for l in LoadBalanceHosts::ALL {
            assert_eq!(l.to_string().parse(), Ok(l));
        }
    }

    #[test]
    fn an_unknown_name_lists_the_accepted_ones() {
        let err = "verify_full".parse::<SslMode>().unwrap_err().to_string();
        assert_eq!(
            err,
            "\"verify_full\" is not disable, allow, prefer, require, verify-ca or verify-full"
        );
        let err = "writer"
            .parse::<TargetSessionAttrs>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("read-write"), "{err}");
    }
}

//! How the values of upstream's settings are spelled in config files, SHOW CONFIG and SET:
//! `FromStr` and `Display` for each setting enum, from one list of names per enum, so the
//! binary's config never keeps a mirror of these types. Nothing here reads a file.

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

/// `FromStr` through [`UnknownName`] (and, unless the type has one, `Display`) for a setting
/// enum with an `ALL` list and an `as_str` name, so each name is written once, in `as_str`.
#[macro_export]
macro_rules! setting_names {
    (from_str: $($t:ty),*) => {$(
        impl ::std::str::FromStr for $t {
            type Err = $crate::UnknownName;
            fn from_str(s: &str) -> ::std::result::Result<Self, $crate::UnknownName> {
                $crate::UnknownName::find(s, &<$t>::ALL, <$t>::as_str)
            }
        }
    )*};
    ($($t:ty),*) => {$(
        $crate::setting_names!(from_str: $t);
        impl ::std::fmt::Display for $t {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}

// SslMode and TargetSessionAttrs have their Display beside them.
setting_names!(from_str: SslMode, TargetSessionAttrs);
setting_names!(LoadBalanceHosts, crate::rds_iam::ServerAuthKind);

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

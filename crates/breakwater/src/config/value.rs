//! How one setting's value is read from the TOML file, from text (SET, the environment, flags)
//! and shown (SHOW CONFIG). PgBouncer habits (integer seconds, `0`/`1` booleans) are refused
//! with the fix spelled out rather than accepted with a guess.

use std::path::PathBuf;
use std::time::Duration;

use toml_edit::Value;

/// A duration setting; `"0"` means disabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub Option<Duration>);

impl Timeout {
    pub const fn secs(n: u64) -> Timeout {
        Timeout(Some(Duration::from_secs(n)))
    }

    pub const fn millis(n: u64) -> Timeout {
        Timeout(Some(Duration::from_millis(n)))
    }
}

pub fn parse_timeout(s: &str) -> Result<Timeout, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Timeout(None));
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bare_seconds(s));
    }
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Ok(Timeout(None)),
        Ok(d) => Ok(Timeout(Some(d))),
        Err(e) => Err(format!(
            "invalid duration \"{s}\" ({e}); use a unit, e.g. \"250ms\", \"5s\", \"10m\", or \"0\" to disable"
        )),
    }
}

/// PgBouncer counts most timeouts in seconds without a unit; Breakwater wants the unit.
fn bare_seconds(n: &str) -> String {
    format!(
        "a duration needs a unit: write \"{n}s\" if you mean seconds (PgBouncer's integer seconds), \"{n}ms\" for milliseconds, or \"0\" to disable"
    )
}

/// One setting's value type.
pub trait SettingValue: Sized {
    /// As SHOW CONFIG prints it; `parse` reads it back.
    fn show(&self) -> String;
    /// From text: SET, `BREAKWATER_*` variables, command-line flags.
    fn parse(s: &str) -> Result<Self, String>;
    /// From the TOML file. Strings go through `parse`; other types say what was expected.
    fn from_toml(v: &Value) -> Result<Self, String> {
        match v.as_str() {
            Some(s) => Self::parse(s),
            None => Err(format!("expected a string, found {}", describe(v))),
        }
    }
    /// As a TOML file writes it (`import-pgbouncer`); `None` for an unset optional value.
    fn to_toml(&self) -> Option<Value> {
        Some(Value::from(self.show()))
    }
}

/// `an integer 120` and the like, for messages.
pub fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string \"{}\"", s.value()),
        Value::Integer(i) => format!("the integer {}", i.value()),
        Value::Float(f) => format!("the number {}", f.value()),
        Value::Boolean(b) => format!("the boolean {}", b.value()),
        Value::Datetime(_) => "a date".into(),
        Value::Array(_) => "a list".into(),
        Value::InlineTable(_) => "a table".into(),
    }
}

impl SettingValue for String {
    fn show(&self) -> String {
        self.clone()
    }
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.to_owned())
    }
}

impl SettingValue for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
    fn parse(s: &str) -> Result<Self, String> {
        Ok(PathBuf::from(s))
    }
}

macro_rules! number_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn show(&self) -> String {
                self.to_string()
            }
            fn parse(s: &str) -> Result<Self, String> {
                s.trim().parse().map_err(|_| {
                    format!("\"{s}\" is not a whole number from {} to {}", <$t>::MIN, <$t>::MAX)
                })
            }
            fn from_toml(v: &Value) -> Result<Self, String> {
                match v {
                    Value::Integer(i) => <$t>::try_from(*i.value()).map_err(|_| {
                        format!("{} is not a whole number from {} to {}", i.value(), <$t>::MIN, <$t>::MAX)
                    }),
                    Value::String(s) => Self::parse(s.value()),
                    other => Err(format!("expected a whole number, found {}", describe(other))),
                }
            }
            fn to_toml(&self) -> Option<Value> {
                i64::try_from(*self).ok().map(Value::from)
            }
        }
    )*};
}
number_setting!(u16, u32, usize);

impl SettingValue for bool {
    fn show(&self) -> String {
        self.to_string()
    }
    fn parse(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "on" | "1" | "yes" => Ok(true),
            "false" | "off" | "0" | "no" => Ok(false),
            _ => Err(format!("\"{s}\" is not a boolean (true or false)")),
        }
    }
    fn from_toml(v: &Value) -> Result<Self, String> {
        match v {
            Value::Boolean(b) => Ok(*b.value()),
            Value::Integer(i) if matches!(i.value(), 0 | 1) => Err(format!(
                "write {} instead of {} (TOML booleans are true and false, not PgBouncer's 1 and 0)",
                *i.value() == 1,
                i.value()
            )),
            Value::String(s) => Self::parse(s.value()),
            other => Err(format!("expected true or false, found {}", describe(other))),
        }
    }
    fn to_toml(&self) -> Option<Value> {
        Some(Value::from(*self))
    }
}

impl SettingValue for Timeout {
    fn show(&self) -> String {
        match self.0 {
            None => "0".into(),
            Some(d) => humantime::format_duration(d).to_string(),
        }
    }
    fn parse(s: &str) -> Result<Self, String> {
        parse_timeout(s)
    }
    fn from_toml(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) => parse_timeout(s.value()),
            Value::Integer(i) if *i.value() == 0 => {
                Err("write \"0\" (a string) to disable; durations are strings with a unit".into())
            }
            Value::Integer(i) => Err(bare_seconds(&i.value().to_string())),
            Value::Float(f) => Err(format!(
                "a duration needs a unit: write \"{}s\" if you mean seconds",
                f.value()
            )),
            other => Err(format!(
                "expected a duration such as \"5s\", found {}",
                describe(other)
            )),
        }
    }
}

impl SettingValue for Vec<String> {
    fn show(&self) -> String {
        self.join(",")
    }
    /// PgBouncer's comma-separated lists.
    fn parse(s: &str) -> Result<Self, String> {
        Ok(s.split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect())
    }
    fn from_toml(v: &Value) -> Result<Self, String> {
        match v {
            Value::Array(items) => items
                .iter()
                .map(|item| {
                    item.as_str().map(str::to_owned).ok_or_else(|| {
                        format!("expected a list of strings, found {}", describe(item))
                    })
                })
                .collect(),
            // `"admin, ops"`, as PgBouncer writes lists, means the same as ["admin", "ops"].
            Value::String(s) => Self::parse(s.value()),
            other => Err(format!(
                "expected a list of strings such as [\"a\", \"b\"], found {}",
                describe(other)
            )),
        }
    }
    fn to_toml(&self) -> Option<Value> {
        Some(Value::Array(self.iter().map(String::as_str).collect()))
    }
}

/// Unset is shown as an empty string, and an empty string unsets.
impl<T: SettingValue> SettingValue for Option<T> {
    fn show(&self) -> String {
        self.as_ref().map(T::show).unwrap_or_default()
    }
    fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(None);
        }
        T::parse(s).map(Some)
    }
    fn from_toml(v: &Value) -> Result<Self, String> {
        T::from_toml(v).map(Some)
    }
    fn to_toml(&self) -> Option<Value> {
        self.as_ref().and_then(T::to_toml)
    }
}

/// Enums spelled by their own `FromStr`/`Display`, which live with the type in its crate.
macro_rules! named_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn show(&self) -> String {
                self.to_string()
            }
            fn parse(s: &str) -> Result<Self, String> {
                s.parse().map_err(|e: upstream::UnknownName| e.to_string())
            }
        }
    )*};
}
named_setting!(
    proxy::PoolMode,
    proxy::AuthType,
    upstream::SslMode,
    upstream::TargetSessionAttrs,
    upstream::LoadBalanceHosts,
    upstream::ServerAuthKind,
    super::LogFormat
);

#[cfg(test)]
mod tests {
    use super::*;

    fn toml_value(text: &str) -> Value {
        text.parse().unwrap()
    }

    #[test]
    fn durations_need_units_and_zero_disables() {
        assert_eq!(parse_timeout("250ms"), Ok(Timeout::millis(250)));
        assert_eq!(parse_timeout("0"), Ok(Timeout(None)));
        assert_eq!(parse_timeout("2h 30m"), Ok(Timeout::secs(9000)));
        assert!(parse_timeout("soon").unwrap_err().contains("soon"));
    }

    #[test]
    fn pgbouncer_habits_are_refused_with_the_fix() {
        type Read = fn(&Value) -> Result<(), String>;
        let cases: &[(&str, Read, &str)] = &[
            ("120", |v| Timeout::from_toml(v).map(drop), "write \"120s\""),
            (
                "\"120\"",
                |v| Timeout::from_toml(v).map(drop),
                "write \"120s\"",
            ),
            ("0", |v| Timeout::from_toml(v).map(drop), "write \"0\""),
            (
                "1",
                |v| bool::from_toml(v).map(drop),
                "write true instead of 1",
            ),
            (
                "0",
                |v| bool::from_toml(v).map(drop),
                "write false instead of 0",
            ),
            (
                "-1",
                |v| usize::from_toml(v).map(drop),
                "-1 is not a whole number",
            ),
            ("70000", |v| u16::from_toml(v).map(drop), "from 0 to 65535"),
            (
                "[1]",
                |v| Vec::<String>::from_toml(v).map(drop),
                "list of strings",
            ),
            (
                "5",
                |v| String::from_toml(v).map(drop),
                "found the integer 5",
            ),
        ];
        for (text, read, want) in cases {
            let err = read(&toml_value(text)).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn lists_may_be_pgbouncer_comma_strings() {
        assert_eq!(
            Vec::<String>::from_toml(&toml_value("\"admin, ops\"")),
            Ok(vec!["admin".to_string(), "ops".to_string()])
        );
        assert_eq!(
            Vec::<String>::from_toml(&toml_value("[\"admin\"]")),
            Ok(vec!["admin".to_string()])
        );
    }

    #[test]
    fn enums_read_and_show_their_library_names() {
        let m = proxy::PoolMode::from_toml(&toml_value("\"statement\"")).unwrap();
        assert_eq!(m.show(), "statement");
        let err = proxy::PoolMode::from_toml(&toml_value("\"Transaction\"")).unwrap_err();
        assert!(err.contains("session, transaction or statement"), "{err}");
        assert_eq!(
            <upstream::SslMode as SettingValue>::parse("verify-full"),
            Ok(upstream::SslMode::VerifyFull)
        );
    }
}

//! `server_require_auth`: which authentication methods a server may ask Breakwater for, with
//! libpq's `require_auth` spelling: a comma list of `password`, `md5`, `scram-sha-256`, `gss`,
//! `sspi` and `none` (the server asks for nothing), either all plain (the server must use one of
//! them) or all negated with `!` (it must use none of them).
//!
//! Unset (the empty string), Breakwater allows every method except `password` — the cleartext
//! password — over a connection whose certificate was not verified: without `verify-ca` or
//! `verify-full`, whoever answers at the server's address (or sits in the middle of a
//! connection in the clear or under unverified TLS) could ask for the password and be handed
//! it. md5 stays allowed by default: it never reveals the password itself, and many databases
//! still use it; `!password,!md5` (or `scram-sha-256`) refuses it too. Listing `password`
//! allows cleartext anywhere. Nothing here does I/O.

use std::fmt;

/// An authentication method a server can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// AuthenticationCleartextPassword.
    Password,
    Md5,
    ScramSha256,
    Gss,
    Sspi,
    /// No request at all: AuthenticationOk straight away (trust).
    None,
}

impl AuthMethod {
    const ALL: [AuthMethod; 6] = [
        AuthMethod::Password,
        AuthMethod::Md5,
        AuthMethod::ScramSha256,
        AuthMethod::Gss,
        AuthMethod::Sspi,
        AuthMethod::None,
    ];

    /// libpq's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
            AuthMethod::None => "none",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A parsed `server_require_auth`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequireAuth {
    rule: Rule,
    /// As written, for messages.
    text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Rule {
    /// Unset: everything but cleartext over an unverified connection.
    #[default]
    Default,
    /// Only these methods (a bit set of [`AuthMethod::bit`]).
    Only(u8),
    /// Anything but these.
    Not(u8),
}

impl RequireAuth {
    /// Parses libpq's syntax; the empty string is Breakwater's default.
    pub fn parse(text: &str) -> Result<RequireAuth, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(RequireAuth::default());
        }
        let (mut set, mut negated) = (0u8, None);
        for item in text.split(',').map(str::trim) {
            let (neg, name) = match item.strip_prefix('!') {
                Some(name) => (true, name),
                None => (false, item),
            };
            if *negated.get_or_insert(neg) != neg {
                return Err(format!(
                    "\"{text}\" mixes negated (!method) and plain methods; use one or the other"
                ));
            }
            let Some(method) = AuthMethod::ALL.iter().find(|m| m.as_str() == name) else {
                return Err(format!(
                    "unknown authentication method \"{name}\"; use password, md5, scram-sha-256, gss, sspi or none, each optionally with !"
                ));
            };
            if set & method.bit() != 0 {
                return Err(format!("\"{name}\" is listed twice"));
            }
            set |= method.bit();
        }
        let rule = match negated {
            Some(true) => Rule::Not(set),
            _ => Rule::Only(set),
        };
        if rule == Rule::Not(AuthMethod::ALL.iter().fold(0, |s, m| s | m.bit())) {
            return Err(format!("\"{text}\" refuses every method"));
        }
        Ok(RequireAuth {
            rule,
            text: text.to_owned(),
        })
    }

    /// May a server ask for `method` on a connection whose certificate was (or was not)
    /// verified? `Err` says why not.
    pub fn check(&self, method: AuthMethod, verified: bool) -> Result<(), &'static str> {
        match self.rule {
            Rule::Default if method == AuthMethod::Password && !verified => Err(
                "by default a cleartext password is sent only over a connection whose certificate was verified (server_tls_sslmode = verify-ca or verify-full) or a Unix socket",
            ),
            Rule::Default => Ok(()),
            Rule::Only(set) if set & method.bit() == 0 => Err("it is not listed"),
            Rule::Not(set) if set & method.bit() != 0 => Err("it is excluded"),
            Rule::Only(_) | Rule::Not(_) => Ok(()),
        }
    }
}

impl fmt::Display for RequireAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AuthMethod::*;

    #[test]
    fn policies_allow_and_refuse_as_libpq_require_auth_does() {
        // (setting, method, certificate verified, allowed)
        let cases = [
            ("", Password, false, false),
            ("", Password, true, true),
            ("", Md5, false, true),
            ("", ScramSha256, false, true),
            ("", None, false, true),
            ("password", Password, false, true),
            ("scram-sha-256", Md5, true, false),
            ("scram-sha-256", None, true, false),
            ("scram-sha-256, none", None, false, true),
            ("md5,scram-sha-256", Password, true, false),
            ("!password", Password, true, false),
            ("!password", Md5, false, true),
            ("!password,!md5", Md5, true, false),
            ("!none", None, true, false),
            ("!none", ScramSha256, false, true),
        ];
        for (text, method, verified, allowed) in cases {
            let policy = RequireAuth::parse(text).unwrap();
            assert_eq!(
                policy.check(method, verified).is_ok(),
                allowed,
                "server_require_auth = {text:?}, {method}, verified {verified}"
            );
        }
    }

    #[test]
    fn malformed_lists_are_refused_with_the_reason() {
        let cases = [
            ("md5,!password", "mixes"),
            ("kerberos", "unknown authentication method \"kerberos\""),
            ("md5,md5", "listed twice"),
            ("md5,,scram-sha-256", "unknown authentication method \"\""),
            (
                "!password,!md5,!scram-sha-256,!gss,!sspi,!none",
                "refuses every method",
            ),
        ];
        for (text, want) in cases {
            let err = RequireAuth::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
        assert_eq!(RequireAuth::parse(" md5 ").unwrap().to_string(), "md5");
    }
}

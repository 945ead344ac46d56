//! Cheap detection of session state a transaction-mode client leaves on a server connection.
//!
//! Command tags tell most of it (SET, PREPARE, LISTEN, DECLARE CURSOR …). Temporary tables and
//! session-level advisory locks leave no trace in tags, so for those — and only those — the query
//! text is scanned for `temp` and `advisory`, case-insensitively. False positives cost one reset
//! round trip; false negatives would leak state to another client, so the scan errs wide.

/// Does a CommandComplete tag mean the server now carries session state?
pub fn tag_leaves_state(tag: &[u8]) -> bool {
    const TAGS: &[&[u8]] = &[
        b"SET",
        b"RESET",
        b"PREPARE",
        b"LISTEN",
        b"DECLARE CURSOR",
        b"DISCARD",
        b"DISCARD ALL",
        b"LOAD",
        b"CREATE TABLE",
        b"SELECT INTO",
        b"CREATE TABLE AS",
    ];
    // Tags like "SELECT 5" carry a count; only exact words are compared here.
    TAGS.contains(&tag)
}

/// Does this SQL text possibly create a temp object or take a session advisory lock?
///
/// Finds the rarest letter of each word with SIMD `memchr2` (`m` of temp, `v` of advisory, in
/// either case) and compares around it, so typical queries cost tens of nanoseconds.
pub fn text_may_leave_state(sql: &[u8]) -> bool {
    around(sql, b'm', 2, b"temp") || around(sql, b'v', 2, b"advisory")
}

/// Does this SQL text name an advisory lock function? Asked only of text
/// [`text_may_leave_state`] already flagged: a yes means the server is asked, at the end of the
/// transaction, whether it holds a session advisory lock for this client (see
/// `Session::pinned_by_advisory_locks`).
pub fn text_mentions_advisory(sql: &[u8]) -> bool {
    around(sql, b'v', 2, b"advisory")
}

/// Is `word` (lower case) at some occurrence of `letter` (either case), which sits at
/// `offset` within the word?
fn around(hay: &[u8], letter: u8, offset: usize, word: &[u8]) -> bool {
    memchr::memchr2_iter(letter, letter.to_ascii_uppercase(), hay).any(|at| {
        at.checked_sub(offset)
            .and_then(|start| hay.get(start..start + word.len()))
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    })
}

/// What a statement puts back to its session default: one parameter (lower case, as
/// PostgreSQL folds an unquoted name) or all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reset {
    One(String),
    All,
}

impl Reset {
    /// Does this reset take parameter `name` back to its default?
    pub fn covers(&self, name: &str) -> bool {
        match self {
            Reset::All => true,
            Reset::One(n) => n.eq_ignore_ascii_case(name),
        }
    }
}

/// Is this SQL text exactly one statement that puts parameters back to their session defaults
/// (`RESET name`, `RESET ALL`, `SET [SESSION] name {TO | =} DEFAULT`, `DISCARD ALL`)? On a
/// pooled server the default is the server's, where PostgreSQL would give back what the client's
/// startup packet said; the session uses this to put that back. Anything more (two statements,
/// a comment) is not recognised and keeps the server's default. Costs a look at the first
/// letter for every other query.
pub fn reset_target(sql: &[u8]) -> Option<Reset> {
    let start = sql.iter().position(|b| !b.is_ascii_whitespace())?;
    let head = sql.get(start..)?;
    let starts = |word: &[u8]| {
        head.get(..word.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(word))
            && head.get(word.len()).is_some_and(u8::is_ascii_whitespace)
    };
    if !(starts(b"reset") || starts(b"set") || starts(b"discard")) {
        return None;
    }
    // A Query's text ends in its NUL terminator; a Parse's is followed by its parameter types.
    let sql = head.split(|b| *b == 0).next().unwrap_or_default();
    let text = std::str::from_utf8(sql).ok()?;
    let text = text.trim_end_matches(|c: char| c.is_whitespace() || c == ';');
    if text.contains(';') || text.contains("--") || text.contains("/*") {
        return None;
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let lower = |w: &str| w.to_ascii_lowercase();
    let name = |w: &str| -> Option<String> {
        let n = match w.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
            Some(quoted) => quoted.to_owned(),
            None => w.to_ascii_lowercase(),
        };
        let ok = !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        ok.then_some(n)
    };
    match words.as_slice() {
        [r, all] if lower(r) == "reset" && lower(all) == "all" => Some(Reset::All),
        [d, all] if lower(d) == "discard" && lower(all) == "all" => Some(Reset::All),
        [r, n] if lower(r) == "reset" => name(n).map(Reset::One),
        [s, n, to, default] | [s, _, n, to, default]
            if lower(s) == "set"
                && (words.len() == 4 || lower(words.get(1)?) == "session")
                && (lower(to) == "to" || *to == "=")
                && lower(default) == "default" =>
        {
            name(n).map(Reset::One)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_that_leave_state() {
        let cases: &[(&[u8], bool)] = &[
            (b"SET", true),
            (b"PREPARE", true),
            (b"LISTEN", true),
            (b"DECLARE CURSOR", true),
            (b"SELECT 1", false),
            (b"INSERT 0 1", false),
            (b"COMMIT", false),
            (b"BEGIN", false),
        ];
        for (tag, want) in cases {
            assert_eq!(
                tag_leaves_state(tag),
                *want,
                "{}",
                String::from_utf8_lossy(tag)
            );
        }
    }

    #[test]
    fn text_scan_finds_temp_and_advisory_in_any_case() {
        let cases: &[(&[u8], bool)] = &[
            (b"CREATE TEMP TABLE t (x int)", true),
            (b"create temporary table t (x int)", true),
            (b"SELECT PG_ADVISORY_LOCK(1)", true),
            (
                b"SELECT abalance FROM pgbench_accounts WHERE aid = $1",
                false,
            ),
            (b"", false),
            (b"te", false),
            (b"SELECT * FROM attempts", true),
            (b"select pg_advisor(1)", false),
            (b"ADVISORY", true),
        ];
        assert!(text_mentions_advisory(b"SELECT pg_Advisory_unlock_all()"));
        assert!(!text_mentions_advisory(b"CREATE TEMP TABLE t (x int)"));
        for (sql, want) in cases {
            assert_eq!(
                text_may_leave_state(sql),
                *want,
                "{}",
                String::from_utf8_lossy(sql)
            );
        }
    }

    #[test]
    fn statements_that_put_parameters_back_to_their_defaults() {
        let one = |n: &str| Some(Reset::One(n.into()));
        let cases: &[(&str, Option<Reset>)] = &[
            ("RESET DateStyle", one("datestyle")),
            ("  reset \"DateStyle\" ; ", one("DateStyle")),
            ("RESET ALL;", Some(Reset::All)),
            ("RESET ALL\0", Some(Reset::All)),
            ("RESET DateStyle\0\0\0", one("datestyle")),
            ("discard all", Some(Reset::All)),
            ("SET TimeZone TO DEFAULT", one("timezone")),
            (
                "set session statement_timeout = default",
                one("statement_timeout"),
            ),
            ("SET search_path = DEFAULT;", one("search_path")),
            ("SET TimeZone TO 'UTC'", None),
            ("SET LOCAL TimeZone TO DEFAULT", None),
            ("RESET ROLE; SELECT 1", None),
            ("RESET DateStyle -- why", None),
            ("DISCARD PLANS", None),
            ("SELECT 1", None),
            ("reset x\"; drop", None),
            ("", None),
        ];
        for (sql, want) in cases {
            assert_eq!(&reset_target(sql.as_bytes()), want, "{sql}");
        }
    }
}

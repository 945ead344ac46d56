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
/// Looks for the rarest letter of each word (`m` of temp, `v` of advisory, in either case) and
/// compares around it. One pass, eight bytes at a time: a statement is usually short (pgbench's
/// is 55 bytes), where two `memchr2` passes spent more on setting up their SIMD loops than on
/// searching (about 260 instructions per transaction against about 180 for this).
pub fn text_may_leave_state(sql: &[u8]) -> bool {
    const LOWS: u64 = u64::from_le_bytes([0x7f; 8]);
    const CASE: u64 = u64::from_le_bytes([0x20; 8]);
    const M: u64 = u64::from_le_bytes([b'm'; 8]);
    const V: u64 = u64::from_le_bytes([b'v'; 8]);
    // 0x80 in exactly the bytes of `x` that are zero (no borrow between bytes).
    let zeros = |x: u64| !(((x & LOWS).wrapping_add(LOWS)) | x | LOWS);
    // Setting 0x20 lower-cases a letter, and only `M` and `m` become `m`, `V` and `v` `v`.
    let hit_at = |at: usize| match sql.get(at).map(|b| b | 0x20) {
        Some(b'm') => word_at(sql, at, 2, b"temp"),
        Some(b'v') => word_at(sql, at, 2, b"advisory"),
        _ => false,
    };
    let mut chunks = sql.chunks_exact(8);
    let mut base = 0;
    for chunk in chunks.by_ref() {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        // Little-endian on every machine, so byte i of the chunk is bits 8i..8i+8.
        let x = u64::from_le_bytes(word) | CASE;
        let mut found = zeros(x ^ M) | zeros(x ^ V);
        while found != 0 {
            if hit_at(base + (found.trailing_zeros() / 8) as usize) {
                return true;
            }
            found &= found - 1;
        }
        base += 8;
    }
    (base..sql.len()).any(hit_at)
}

/// Is `word` (lower case) in `hay` where its byte at `offset` is at `at`?
fn word_at(hay: &[u8], at: usize, offset: usize, word: &[u8]) -> bool {
    at.checked_sub(offset)
        .and_then(|start| hay.get(start..start + word.len()))
        .is_some_and(|w| w.eq_ignore_ascii_case(word))
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
    memchr::memchr2_iter(letter, letter.to_ascii_uppercase(), hay)
        .any(|at| word_at(hay, at, offset, word))
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

    proptest::proptest! {
        /// The one-pass scan agrees with the plain search for each word, on text made of the
        /// words, pieces of them and the letters that matter, in both cases, at every length
        /// and alignment.
        #[test]
        fn the_one_pass_scan_finds_what_the_plain_search_finds(
            pieces in proptest::collection::vec(
                proptest::sample::select(vec![
                    "temp", "TeMp", "advisory", "ADVISORY", "tem", "emp", "advisor", "dvisory",
                    "m", "M", "v", "V", "te", "ad", " ", "x", "SELECT ", "(", "é",
                ]),
                0..24,
            ),
            skip in 0usize..8,
        ) {
            let text = pieces.concat();
            let sql = text.as_bytes().get(skip.min(text.len())..).unwrap_or_default();
            let plain = around(sql, b'm', 2, b"temp") || around(sql, b'v', 2, b"advisory");
            proptest::prop_assert_eq!(text_may_leave_state(sql), plain);
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

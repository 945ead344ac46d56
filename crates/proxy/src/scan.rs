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

/// Is `word` (lower case) at some occurrence of `letter` (either case), which sits at
/// `offset` within the word?
fn around(hay: &[u8], letter: u8, offset: usize, word: &[u8]) -> bool {
    memchr::memchr2_iter(letter, letter.to_ascii_uppercase(), hay).any(|at| {
        at.checked_sub(offset)
            .and_then(|start| hay.get(start..start + word.len()))
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    })
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
        for (sql, want) in cases {
            assert_eq!(
                text_may_leave_state(sql),
                *want,
                "{}",
                String::from_utf8_lossy(sql)
            );
        }
    }
}

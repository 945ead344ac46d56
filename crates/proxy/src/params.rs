//! Session parameters a client expects to keep while its transactions move between server
//! connections: the reported ones (ParameterStatus) and the unreported ones it set at startup
//! (`extra_float_digits`, `options=-c name=value`). Pure logic; the session applies the SQL.

use std::fmt::Write;

/// Reported parameters a client may set and that must follow it from server to server.
/// Other reported parameters (server_version, is_superuser, …) belong to the server.
pub const TRACKED: &[&str] = &[
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "standard_conforming_strings",
    "application_name",
    "search_path",
];

/// The canonical spelling of a tracked parameter name, if `name` is one (GUC names are
/// case-insensitive).
pub fn tracked_name(name: &str) -> Option<&'static str> {
    TRACKED
        .iter()
        .copied()
        .find(|t| t.eq_ignore_ascii_case(name))
}

/// What one client wants its server connections to look like.
///
/// Read freely; change only through the methods here, which keep the fingerprint up to date.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientParams {
    /// Tracked reported parameters, canonical values once a server has echoed them.
    reported: Tracked,
    /// Unreported parameters from the startup packet, applied with SET.
    pub extra: Vec<(String, String)>,
    /// Which tracked parameters the startup packet set, by place in [`TRACKED`]: what RESET
    /// gives back (PostgreSQL makes startup parameters the session's defaults; a pooled
    /// server's defaults are its own). Until one of them changes, their values are the
    /// current ones.
    from_startup: u8,
    /// Their values as the login's server spelled them, kept only once one changes: most
    /// clients never change one, and a copy at every login cost allocations in a storm.
    startup: Option<Box<Tracked>>,
    /// A hash of both. A server connection remembers the fingerprint it was last synced to, so
    /// the check at each checkout is one comparison instead of a walk of both lists against
    /// the server's. Keyed per process (`RandomState`): a client cannot pick parameters whose
    /// fingerprint collides with another client's, which would let one client's `search_path`
    /// reach the other.
    fingerprint: u64,
}

/// The values of the tracked parameters a client has, by their place in [`TRACKED`], in one
/// allocation: every logged-in client keeps them for its whole life, and a `String` apiece
/// cost several times their length (a name-value list of seven was some 500 bytes a client).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tracked {
    /// The values one after another.
    text: Box<str>,
    /// Each value's length in `text`; [`ABSENT`] when the client has no value for it. Not an
    /// `Option<u32>`, which takes twice the room, in every idle client.
    lens: [u32; TRACKED.len()],
}

/// No value (an empty one has length 0). No value is 4 GiB long: messages are far smaller.
const ABSENT: u32 = u32::MAX;

impl Default for Tracked {
    fn default() -> Tracked {
        Tracked {
            text: Box::default(),
            lens: [ABSENT; TRACKED.len()],
        }
    }
}

impl Tracked {
    /// The length of value `i`, if the client has one.
    fn len(&self, i: usize) -> Option<usize> {
        self.lens
            .get(i)
            .filter(|l| **l != ABSENT)
            .map(|l| *l as usize)
    }

    fn get(&self, i: usize) -> Option<&str> {
        let len = self.len(i)?;
        let start: usize = (0..i).filter_map(|j| self.len(j)).sum();
        self.text.get(start..start + len)
    }

    /// `(name, value)` in [`TRACKED`] order.
    fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        TRACKED
            .iter()
            .enumerate()
            .filter_map(|(i, name)| Some((*name, self.get(i)?)))
    }

    /// Rebuilds the buffer with `values` in place of the current ones where they say so.
    /// Only logins and the rare ParameterStatus call this: measured first, then written into
    /// one allocation of the exact size (growing a `String` value by value, then shrinking it,
    /// was four allocations per login in a connection storm).
    fn update<'v>(&mut self, values: impl Fn(usize) -> Option<&'v str>) {
        let value = |i: usize| values(i).or_else(|| self.get(i));
        let mut lens = [ABSENT; TRACKED.len()];
        for (i, len) in lens.iter_mut().enumerate() {
            *len = value(i).map_or(ABSENT, |v| v.len() as u32);
        }
        let mut text = String::with_capacity(
            lens.iter()
                .filter(|l| **l != ABSENT)
                .map(|l| *l as usize)
                .sum(),
        );
        for v in (0..TRACKED.len()).filter_map(value) {
            text.push_str(v);
        }
        self.text = text.into_boxed_str();
        self.lens = lens;
    }
}

pub(crate) fn tracked_index(name: &str) -> Option<usize> {
    TRACKED.iter().position(|t| t.eq_ignore_ascii_case(name))
}

fn fingerprint_keys() -> &'static std::hash::RandomState {
    static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    KEYS.get_or_init(std::hash::RandomState::new)
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    #[error("invalid startup parameter: {0}")]
    Invalid(String),
    #[error("replication connections are not supported")]
    Replication,
    /// PostgreSQL takes a boolean or `database` here and refuses anything else with 22023.
    #[error("invalid value for parameter \"replication\": \"{0}\" (valid values are false, 0, true, 1, database)")]
    ReplicationValue(String),
}

impl ParamError {
    /// The SQLSTATE PostgreSQL sends for the same startup.
    pub fn sqlstate(&self) -> proto::SqlState {
        match self {
            ParamError::Invalid(_) => proto::SqlState::PROTOCOL_VIOLATION,
            ParamError::Replication => proto::SqlState::FEATURE_NOT_SUPPORTED,
            ParamError::ReplicationValue(_) => proto::SqlState::INVALID_PARAMETER_VALUE,
        }
    }
}

/// PostgreSQL's `parse_bool`: true/false, yes/no, on/off, 1/0, any unique prefix, any case.
fn parse_bool(value: &str) -> Option<bool> {
    let v = value.trim().to_ascii_lowercase();
    let prefix_of = |word: &str, min: usize| v.len() >= min && word.starts_with(v.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || v == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || v == "0" {
        Some(false)
    } else {
        None
    }
}

impl ClientParams {
    /// Splits a client's startup parameters. `options` is parsed for `-c name=value` and
    /// `--name=value`, as the server would.
    pub fn from_startup<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<ClientParams, ParamError> {
        let mut out = ClientParams::default();
        for (name, value) in params {
            if name == "options" {
                for (k, v) in parse_options(value)? {
                    out.put(&k, &v);
                }
            } else if name == "replication" {
                // `replication=false` is an ordinary connection; not a setting to pass on.
                match (value, parse_bool(value)) {
                    (_, Some(false)) => {}
                    ("database", _) | (_, Some(true)) => return Err(ParamError::Replication),
                    (_, None) => return Err(ParamError::ReplicationValue(value.to_owned())),
                }
            } else {
                out.put(name, value);
            }
        }
        out.from_startup = (0..TRACKED.len())
            .filter(|i| out.reported.get(*i).is_some())
            .fold(0, |mask, i| mask | 1 << i);
        out.refresh();
        Ok(out)
    }

    fn set_at_startup(&self, place: usize) -> bool {
        self.from_startup & (1 << place) != 0
    }

    /// Does a reset of `target` take away something the startup packet set?
    pub fn reset_touches_startup(&self, target: &crate::scan::Reset) -> bool {
        match target {
            crate::scan::Reset::All => self.from_startup != 0 || !self.extra.is_empty(),
            crate::scan::Reset::One(name) => {
                self.startup_value(name).is_some()
                    || self.extra.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
            }
        }
    }

    /// The tracked parameters the startup packet set, by their canonical names.
    pub fn startup_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        TRACKED
            .iter()
            .enumerate()
            .filter(|(i, _)| self.set_at_startup(*i))
            .map(|(_, name)| *name)
    }

    /// The startup value of tracked parameter `name`, if the startup packet set it.
    pub fn startup_value(&self, name: &str) -> Option<&str> {
        let i = tracked_index(name)?;
        if !self.set_at_startup(i) {
            return None;
        }
        match &self.startup {
            Some(kept) => kept.get(i),
            None => self.reported.get(i),
        }
    }

    /// A reset on the server took tracked parameter `name` to the server's default: the client
    /// keeps its startup value, which is returned, as PostgreSQL would have it. `None` when the
    /// startup packet did not set it (then the server's default is the right answer).
    pub fn restore_startup(&mut self, name: &str) -> Option<String> {
        let value = self.startup_value(name)?.to_owned();
        self.set(name, &value);
        Some(value)
    }

    /// See [`ClientParams::fingerprint`] (the field).
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// A few large writes rather than one per field (as a derived `Hash` makes): SipHash costs
    /// mostly per call, and a login in a connection storm computes this twice. The lengths go
    /// first, so two different lists never feed the hasher the same bytes.
    fn refresh(&mut self) {
        use std::hash::{BuildHasher, Hasher};
        let mut h = fingerprint_keys().build_hasher();
        let mut lens = [0u8; TRACKED.len() * 4];
        for (bytes, len) in lens.chunks_exact_mut(4).zip(&self.reported.lens) {
            // No value (ABSENT) and an empty one differ.
            bytes.copy_from_slice(&len.to_le_bytes());
        }
        h.write(&lens);
        h.write(self.reported.text.as_bytes());
        for (k, v) in &self.extra {
            h.write_usize(k.len());
            h.write_usize(v.len());
            h.write(k.as_bytes());
            h.write(v.as_bytes());
        }
        self.fingerprint = h.finish();
    }

    /// The tracked parameters this client has a value for, as `(canonical name, value)` in
    /// [`TRACKED`] order.
    pub fn reported(&self) -> impl Iterator<Item = (&'static str, &str)> + '_ {
        self.reported.iter()
    }

    /// Takes the server's spelling of each tracked value (after a SET, the server reports
    /// the canonical form: `ISO, MDY` for `iso,mdy`).
    pub fn adopt_canonical(&mut self, server: impl Fn(&str) -> Option<String>) {
        let canonical: Vec<Option<String>> = TRACKED
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mine = self.reported.get(i)?;
                server(name).filter(|v| v != mine)
            })
            .collect();
        if canonical.iter().any(Option::is_some) {
            self.reported
                .update(|i| canonical.get(i).and_then(|v| v.as_deref()));
        }
        self.refresh();
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.keep_startup_before_changing(name, value);
        self.put(name, value);
        self.refresh();
    }

    /// A startup value is about to change for the first time: keep all of them as they are.
    /// Only a session past its login calls `set`, so they are the login's canonical values.
    fn keep_startup_before_changing(&mut self, name: &str, value: &str) {
        let Some(i) = tracked_index(name) else { return };
        if self.startup.is_none() && self.set_at_startup(i) && self.reported.get(i) != Some(value) {
            let mut kept = Tracked::default();
            let (current, mask) = (&self.reported, self.from_startup);
            kept.update(|i| current.get(i).filter(|_| mask & (1 << i) != 0));
            self.startup = Some(Box::new(kept));
        }
    }

    /// [`ClientParams::set`] without the fingerprint, for a caller that sets several.
    fn put(&mut self, name: &str, value: &str) {
        if !valid_name(name) {
            return;
        }
        match tracked_index(name) {
            Some(t) => self.reported.update(|i| (i == t).then_some(value)),
            None => {
                let lower = name.to_ascii_lowercase();
                match self.extra.iter_mut().find(|(k, _)| *k == lower) {
                    Some((_, v)) => *v = value.to_owned(),
                    None => self.extra.push((lower, value.to_owned())),
                }
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.reported.get(tracked_index(name)?)
    }

    /// The value of the tracked parameter at `place` in [`TRACKED`].
    pub fn get_at(&self, place: usize) -> Option<&str> {
        self.reported.get(place)
    }

    /// Fills in the tracked parameters the client did not set from a server's values, so the
    /// client keeps what it saw at login even on a server a previous client changed. `server`
    /// gives each tracked parameter the server reported as (its place in [`TRACKED`], value):
    /// a pool works the places out once (a login in a connection storm does this, and
    /// finding each tracked name in the server's list by name was a fifth of a login's work).
    pub fn complete_from<'v>(&mut self, server: impl IntoIterator<Item = (usize, &'v str)>) {
        let mut fill: [Option<&str>; TRACKED.len()] = [None; TRACKED.len()];
        for (i, value) in server {
            if i < TRACKED.len() && self.reported.len(i).is_none() {
                if let Some(slot @ None) = fill.get_mut(i) {
                    *slot = Some(value);
                }
            }
        }
        if fill.iter().any(Option::is_some) {
            self.reported.update(|i| fill.get(i).copied().flatten());
        }
        self.refresh();
    }

    /// Parameters this client wants that the server does not report (so Breakwater must
    /// remember what it SET): the startup extras, plus tracked ones an older server does not
    /// report (search_path before PostgreSQL 18).
    pub fn unreported(&self, server_params: &[(String, String)]) -> Vec<(String, String)> {
        let mut out = self.extra.clone();
        for (name, value) in self.reported() {
            if !server_params
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
            {
                out.push((name.to_ascii_lowercase(), value.to_owned()));
            }
        }
        out
    }

    /// The SET/RESET statements that make a server with `server_params` (reported) and
    /// `applied` (unreported ones Breakwater set earlier) match this client, or `None` when it
    /// already does — the common case, which costs no round trip.
    pub fn sync_sql(
        &self,
        server_params: &[(String, String)],
        applied: &[(String, String)],
    ) -> Option<String> {
        let mut sql = String::new();
        for (name, want) in self.reported() {
            let have = server_params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str());
            if have.is_some_and(|h| h != want) {
                push_set(&mut sql, name, want);
            }
        }
        let unreported = self.unreported(server_params);
        for (name, want) in &unreported {
            let have = applied
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str());
            if have != Some(want.as_str()) {
                push_set(&mut sql, name, want);
            }
        }
        for (name, _) in applied {
            if !unreported.iter().any(|(k, _)| k == name) {
                let _ = write!(sql, "RESET \"{name}\";");
            }
        }
        (!sql.is_empty()).then_some(sql)
    }
}

fn push_set(sql: &mut String, name: &str, value: &str) {
    let _ = write!(sql, "SET \"{name}\" = '{}';", value.replace('\'', "''"));
}

/// GUC names: letters, digits, underscores and dots (custom `ext.name`). Anything else is not a
/// parameter a client can mean, and must never reach SQL text unquoted.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// Parses the `options` startup parameter: whitespace-separated, backslash escapes a character.
fn parse_options(options: &str) -> Result<Vec<(String, String)>, ParamError> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let setting = if w == "-c" {
            it.next()
                .ok_or_else(|| ParamError::Invalid("\"-c\" in options without a setting".into()))?
        } else if let Some(s) = w.strip_prefix("--") {
            s.to_owned()
        } else if let Some(s) = w.strip_prefix("-c") {
            s.to_owned()
        } else {
            return Err(ParamError::Invalid(format!(
                "unsupported option \"{w}\" in options"
            )));
        };
        let (k, v) = setting
            .split_once('=')
            .ok_or_else(|| ParamError::Invalid(format!("option \"{setting}\" has no value")))?;
        // Postgres accepts `--lock-timeout=1s` for lock_timeout.
        let k = k.replace('-', "_");
        if !valid_name(&k) {
            return Err(ParamError::Invalid(format!(
                "invalid parameter name \"{k}\" in options"
            )));
        }
        out.push((k, v.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn startup(pairs: &[(String, String)]) -> Result<ClientParams, ParamError> {
        ClientParams::from_startup(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// What a pool's welcome hands `complete_from`: the tracked pairs, by place.
    fn tracked(server: &[(String, String)]) -> Vec<(usize, &str)> {
        server
            .iter()
            .filter_map(|(k, v)| Some((tracked_index(k)?, v.as_str())))
            .collect()
    }

    #[test]
    fn startup_parameters_split_into_tracked_and_extra() {
        let p = startup(&s(&[
            ("application_name", "psql"),
            ("timezone", "UTC"),
            ("extra_float_digits", "3"),
            (
                "options",
                "-c statement_timeout=5s --lock-timeout=1s -csearch_path=a\\,b",
            ),
        ]))
        .unwrap();
        assert_eq!(p.get("TimeZone"), Some("UTC"));
        assert_eq!(p.get("application_name"), Some("psql"));
        assert_eq!(
            p.extra,
            s(&[
                ("extra_float_digits", "3"),
                ("statement_timeout", "5s"),
                ("lock_timeout", "1s")
            ])
        );
        assert_eq!(p.get("search_path"), Some("a,b"));
    }

    #[test]
    fn bad_options_and_replication_are_refused() {
        for bad in ["-c", "-x foo", "-c novalue", "-c bad;name=1"] {
            assert!(startup(&s(&[("options", bad)])).is_err(), "{bad}");
        }
        let replication = |v: &str| startup(&s(&[("replication", v)]));
        for v in ["database", "true", "on", "1", "YES", "t"] {
            assert_eq!(replication(v), Err(ParamError::Replication), "{v}");
        }
        for v in ["maybe", "o", "", "2", "databases"] {
            assert_eq!(
                replication(v).map_err(|e| e.sqlstate()),
                Err(proto::SqlState::INVALID_PARAMETER_VALUE),
                "{v}"
            );
        }
        for v in ["false", "off", "0", "no", "F"] {
            let p = replication(v).unwrap();
            assert!(p.extra.is_empty(), "replication={v} is not a setting");
        }
    }

    #[test]
    fn sync_is_empty_when_the_server_already_matches() {
        let mut p = startup(&s(&[("TimeZone", "UTC")])).unwrap();
        p.complete_from(tracked(&s(&[
            ("TimeZone", "Europe/Paris"),
            ("DateStyle", "ISO, MDY"),
            ("server_version", "15"),
        ])));
        assert_eq!(p.get("DateStyle"), Some("ISO, MDY"));
        assert_eq!(p.get("server_version"), None);
        let server = s(&[("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")]);
        assert_eq!(p.sync_sql(&server, &[]), None);
    }

    #[test]
    fn sync_sets_what_differs_and_resets_what_another_client_left() {
        let p = startup(&s(&[
            ("TimeZone", "it's"),
            ("extra_float_digits", "3"),
            ("search_path", "a"),
        ]))
        .unwrap();
        let server = s(&[("TimeZone", "UTC")]);
        let applied = s(&[("statement_timeout", "1s")]);
        assert_eq!(
            p.sync_sql(&server, &applied).unwrap(),
            "SET \"TimeZone\" = 'it''s';SET \"extra_float_digits\" = '3';SET \"search_path\" = 'a';RESET \"statement_timeout\";"
        );
        let now_applied = p.unreported(&server);
        assert_eq!(p.sync_sql(&s(&[("TimeZone", "it's")]), &now_applied), None);
    }

    #[test]
    fn tracked_values_are_kept_in_tracked_order_whatever_order_they_come_in() {
        let mut p = startup(&s(&[
            ("search_path", "a"),
            ("application_name", ""),
            ("timezone", "UTC"),
        ]))
        .unwrap();
        p.set("TIMEZONE", "Europe/Paris");
        p.set("search_path", "\"b c\", public");
        p.complete_from(tracked(&s(&[
            ("TimeZone", "UTC"),
            ("client_encoding", "UTF8"),
            ("application_name", "server"),
        ])));
        assert_eq!(
            p.reported().collect::<Vec<_>>(),
            [
                ("client_encoding", "UTF8"),
                ("TimeZone", "Europe/Paris"),
                ("application_name", ""),
                ("search_path", "\"b c\", public"),
            ]
        );
        assert_eq!(p.get("datestyle"), None);
    }

    #[test]
    fn names_that_could_inject_sql_are_dropped() {
        let p = startup(&s(&[("a\"; drop table x; --", "1")])).unwrap();
        assert!(p.extra.is_empty());
    }

    #[test]
    fn fingerprint_follows_what_the_client_wants() {
        let a = startup(&s(&[("search_path", "a"), ("TimeZone", "UTC")])).unwrap();
        let same = startup(&s(&[("TimeZone", "UTC"), ("search_path", "a")])).unwrap();
        let mut b = startup(&s(&[("search_path", "b"), ("TimeZone", "UTC")])).unwrap();
        // Order of the startup packet is the client's business; tracked names are sorted by
        // the order they arrive, so compare the sets a server would be synced to.
        assert_eq!(
            a.fingerprint() == same.fingerprint(),
            a.reported().eq(same.reported()) && a.extra == same.extra
        );
        assert_ne!(a.fingerprint(), b.fingerprint());
        b.set("search_path", "a");
        assert!(a.reported().eq(b.reported()));
        assert_eq!(a.fingerprint(), b.fingerprint());
        let before = b.fingerprint();
        b.adopt_canonical(|n| (n == "TimeZone").then(|| "Etc/UTC".to_owned()));
        assert_ne!(
            b.fingerprint(),
            before,
            "a canonical value is a different value"
        );
        let before = b.fingerprint();
        b.complete_from(tracked(&s(&[("DateStyle", "ISO, MDY")])));
        assert_ne!(b.fingerprint(), before);
    }

    #[test]
    fn fingerprints_of_lists_with_the_same_letters_differ() {
        let fp = |pairs: &[(&str, &str)]| startup(&s(pairs)).unwrap().fingerprint();
        // Where one value ends and the next starts.
        assert_ne!(
            fp(&[("search_path", "ab"), ("TimeZone", "c")]),
            fp(&[("search_path", "a"), ("TimeZone", "bc")])
        );
        // An empty value is a value.
        assert_ne!(fp(&[("search_path", "")]), fp(&[]));
        assert_ne!(
            fp(&[("work_mem", "64MB"), ("lock_timeout", "1s")]),
            fp(&[("work_mem", "64MBlock_timeout"), ("x", "1s")])
        );
        assert_ne!(fp(&[("work_mem", "1")]), fp(&[("work_me", "m1")]));
        assert_eq!(fp(&[("work_mem", "1")]), fp(&[("WORK_MEM", "1")]));
    }

    #[test]
    fn reset_gives_back_what_the_startup_packet_set_and_nothing_else() {
        use crate::scan::Reset;
        let mut p = startup(&s(&[
            ("DateStyle", "german"),
            ("options", "-c statement_timeout=5s"),
        ]))
        .unwrap();
        // The login's server spells it canonically; that is what PostgreSQL would report.
        p.adopt_canonical(|n| (n == "DateStyle").then(|| "German, DMY".to_owned()));
        p.complete_from(tracked(&s(&[("TimeZone", "UTC")])));
        assert_eq!(p.startup_value("DateStyle"), Some("German, DMY"));
        p.set("DateStyle", "ISO, MDY");
        p.set("TimeZone", "Europe/Paris");
        assert!(p.reset_touches_startup(&Reset::One("datestyle".into())));
        assert!(p.reset_touches_startup(&Reset::One("statement_timeout".into())));
        assert!(!p.reset_touches_startup(&Reset::One("timezone".into())));
        assert!(p.reset_touches_startup(&Reset::All));
        assert_eq!(
            p.restore_startup("datestyle").as_deref(),
            Some("German, DMY")
        );
        assert_eq!(p.get("DateStyle"), Some("German, DMY"));
        // Filled in from the server, not the client's: the server's default is right.
        assert_eq!(p.restore_startup("TimeZone"), None);
        // SET again after a RESET: the kept startup value stays.
        p.set("DateStyle", "SQL, DMY");
        assert_eq!(p.startup_value("DateStyle"), Some("German, DMY"));
        let plain = startup(&[]).unwrap();
        assert!(!plain.reset_touches_startup(&Reset::All));
    }
}

//! `breakwater import-pgbouncer pgbouncer.ini [userlist.txt]`: reads PgBouncer's INI (following
//! `%include`), writes an equivalent pooler.toml, and reports key by key what was mapped, what
//! behaves differently, what was ignored because Breakwater needs no equivalent, and what has
//! no equivalent and why. The result goes through the same reader and validation as any
//! pooler.toml before it is written. Nothing here listens or connects.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{
    Config, Database, Pooler, Setting, User, DATABASE_SETTINGS, SETTINGS, USER_SETTINGS,
};
use crate::pgbouncer::{self, Fate, Unit};

/// One `key = value` line of the INI, with where it was.
#[derive(Debug, Clone)]
struct Entry {
    section: String,
    key: String,
    value: String,
    at: String,
}

/// The result: the TOML text and the report.
pub struct Import {
    pub toml: String,
    pub report: String,
    /// Whether the written config passes the checks `--check` makes (except binding).
    pub valid: bool,
}

/// Includes nest at most this deep (PgBouncer's own limit is 10).
const MAX_INCLUDE_DEPTH: usize = 10;

/// Reads `path` into `out`; `section` carries over into and out of an `%include`, as in
/// PgBouncer.
fn read_ini(
    path: &Path,
    depth: usize,
    section: &mut String,
    out: &mut Vec<Entry>,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    for (i, raw) in text.lines().enumerate() {
        let at = format!("{}:{}", path.display(), i + 1);
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(file) = line.strip_prefix("%include") {
            let file = Path::new(file.trim());
            let file = match file.is_absolute() {
                true => file.to_owned(),
                false => path.parent().unwrap_or(Path::new(".")).join(file),
            };
            if depth >= MAX_INCLUDE_DEPTH {
                notes.push(format!(
                    "{at}: %include {} not followed: nested more than {MAX_INCLUDE_DEPTH} deep",
                    file.display()
                ));
                continue;
            }
            notes.push(format!("{at}: followed %include {}", file.display()));
            read_ini(&file, depth + 1, section, out, notes)?;
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            *section = name.trim().to_ascii_lowercase();
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) => out.push(Entry {
                section: section.clone(),
                // PgBouncer's keys are case-insensitive; database names are not.
                key: match section.as_str() {
                    "pgbouncer" => k.trim().to_ascii_lowercase(),
                    _ => k.trim().to_owned(),
                },
                value: unquote(v.trim()),
                at,
            }),
            None => notes.push(format!("{at}: not a key = value line, skipped: {line}")),
        }
    }
    Ok(())
}

/// PgBouncer allows a value in double quotes.
fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.to_owned(),
        None => v.to_owned(),
    }
}

/// A PgBouncer value in the text form Breakwater's settings read, or why it cannot be.
fn convert(unit: Unit, key: &str, value: &str) -> Result<String, String> {
    let number = |v: &str| v.trim().parse::<f64>().ok();
    if key.starts_with("tcp_keep") && key != "tcp_keepalive" && number(value) == Some(0.0) {
        return Err("0 means the OS default in PgBouncer; Breakwater's default is kept".into());
    }
    Ok(match unit {
        Unit::Text | Unit::Int | Unit::List => value.to_owned(),
        Unit::Bool => match value.trim().to_ascii_lowercase().as_str() {
            "1" | "on" | "yes" | "true" => "true".into(),
            "0" | "off" | "no" | "false" => "false".into(),
            other => return Err(format!("\"{other}\" is not a PgBouncer boolean")),
        },
        // PgBouncer also accepts units on times; those pass through as they are.
        Unit::Secs | Unit::Millis => match number(value) {
            Some(0.0) => "0".into(),
            Some(n) if unit == Unit::Secs => format!("{}ms", (n * 1000.0).round() as u64),
            Some(n) => format!("{}ms", n.round() as u64),
            None => value.to_owned(),
        },
    })
}

/// PgBouncer defaults that differ from Breakwater's, written out when the INI leaves them
/// unset so the imported pooler behaves as the PgBouncer did.
const PGBOUNCER_DEFAULTS: &[(&str, &str, &str)] = &[
    (
        "pool_mode",
        "session",
        "PgBouncer's default pool_mode is session (Breakwater's: transaction)",
    ),
    (
        "max_client_conn",
        "100",
        "PgBouncer's default max_client_conn is 100 (Breakwater's: 10000)",
    ),
    (
        "auth_type",
        "md5",
        "PgBouncer's default auth_type is md5 (Breakwater's: scram-sha-256)",
    ),
    (
        "server_connect_timeout",
        "15s",
        "PgBouncer's default server_connect_timeout is 15s and covers login",
    ),
];

pub fn import(ini: &Path, userlist: Option<&Path>, output: &Path) -> Result<Import, String> {
    let mut entries = Vec::new();
    let mut notes = Vec::new();
    read_ini(ini, 0, &mut String::new(), &mut entries, &mut notes)?;
    let mut pooler = Pooler::default();
    let mut databases: BTreeMap<String, Database> = BTreeMap::new();
    let (mut mapped, mut differs, mut ignored, mut missing) = (vec![], vec![], vec![], vec![]);
    let mut seen = Vec::new();
    let mut global_max_db = None;
    let setting = |key: &str| SETTINGS.iter().find(|s| s.key == key);

    for e in entries.iter().filter(|e| e.section == "pgbouncer") {
        seen.push(e.key.clone());
        let line = format!("{}  {} = {}", e.at, e.key, e.value);
        let (unit, note) = match pgbouncer::fate(&e.key) {
            None => {
                missing.push(format!(
                    "{line}: not a PgBouncer 1.25 setting Breakwater knows; not imported"
                ));
                continue;
            }
            Some(Fate::NoOp(why)) => {
                ignored.push(format!("{line}: {why}"));
                continue;
            }
            Some(Fate::Unsupported(why)) => {
                match pgbouncer::harmless(&e.key, &e.value) {
                    Some(harmless) => ignored.push(format!("{line}: {harmless}")),
                    None => missing.push(format!("{line}: {why}")),
                }
                continue;
            }
            Some(Fate::Same(unit)) => (unit, None),
            Some(Fate::Differs(unit, note)) => (unit, Some(note)),
        };
        let text = match convert(unit, &e.key, &e.value) {
            Ok(t) => t,
            Err(why) => {
                ignored.push(format!("{line}: {why}"));
                continue;
            }
        };
        if e.key == "max_db_connections" {
            global_max_db = Some(text);
            differs.push(format!("{line}: {}", note.unwrap_or_default()));
            continue;
        }
        if e.key == "auth_file" && userlist.is_some() {
            ignored.push(format!(
                "{line}: the userlist given on the command line is used instead"
            ));
            continue;
        }
        let text = match e.key.as_str() {
            // Relative to pooler.toml now; an absolute path stays right wherever it is written.
            "auth_file"
            | "client_tls_key_file"
            | "client_tls_cert_file"
            | "client_tls_ca_file"
            | "server_tls_ca_file"
            | "server_tls_key_file"
            | "server_tls_cert_file"
            | "unix_socket_dir" => absolute(ini, &text),
            _ => text,
        };
        let Some(s) = setting(&e.key) else {
            missing.push(format!("{line}: not imported"));
            continue;
        };
        match (s.set)(&mut pooler, &text) {
            Ok(()) => {
                let written = shown(s, &pooler);
                match note {
                    Some(note) => differs.push(format!("{line} → {} = {written}: {note}", e.key)),
                    None => mapped.push(format!("{line} → {} = {written}", e.key)),
                }
                if e.key == "server_connect_timeout" {
                    // PgBouncer's connect timeout also covers login; Breakwater has a second one.
                    if let Some(login) = setting("server_login_timeout") {
                        let _ = (login.set)(&mut pooler, &text);
                    }
                }
                if e.key.starts_with("tcp_keep") || e.key == "tcp_user_timeout" {
                    // PgBouncer's tcp_* apply to client and server sockets alike; Breakwater
                    // has a client_tcp_* twin of each.
                    if let Some(client) = setting(&format!("client_{}", e.key)) {
                        let _ = (client.set)(&mut pooler, &text);
                    }
                }
            }
            Err(why) => missing.push(format!("{line}: not imported: {why}")),
        }
    }
    for (key, value, why) in PGBOUNCER_DEFAULTS {
        if !seen.iter().any(|k| k == key) {
            if let Some(s) = setting(key) {
                if (s.set)(&mut pooler, value).is_ok() {
                    differs.push(format!(
                        "(unset)  {key} → {key} = {}: {why}",
                        shown(s, &pooler)
                    ));
                    if *key == "server_connect_timeout" {
                        if let Some(login) = setting("server_login_timeout") {
                            let _ = (login.set)(&mut pooler, value);
                        }
                    }
                }
            }
        }
    }
    if !seen.iter().any(|k| k == "unix_socket_dir") {
        differs.push("(unset)  unix_socket_dir: PgBouncer listens on /tmp/.s.PGSQL.<port> by default; Breakwater opens no Unix socket unless unix_socket_dir is set".into());
    }
    if let Some(u) = userlist {
        let text = absolute(ini, &u.display().to_string());
        if let Some(s) = setting("auth_file") {
            let _ = (s.set)(&mut pooler, &text);
            mapped.push(format!("{} → auth_file = \"{text}\"", u.display()));
        }
    }

    let mut db_report = Vec::new();
    for e in entries.iter().filter(|e| e.section == "databases") {
        let line = format!("{}  {}", e.at, e.key);
        if proxy::ADMIN_DATABASES.contains(&e.key.as_str()) {
            db_report.push(format!(
                "{line}: not imported: the name is Breakwater's admin console"
            ));
            continue;
        }
        let (db, notes) = database(&e.value, global_max_db.as_deref());
        let summary = DATABASE_SETTINGS
            .iter()
            .filter(|s| s.key != "password")
            .filter_map(|s| (s.to_toml)(&db).map(|v| format!("{}={}", s.key, v.to_string().trim())))
            .collect::<Vec<_>>()
            .join(" ");
        db_report.push(format!("{line} → [databases.{}] {summary}", e.key));
        db_report.extend(notes.into_iter().map(|n| format!("    {n}")));
        databases.insert(e.key.clone(), db);
    }
    let mut users: BTreeMap<String, User> = BTreeMap::new();
    for e in entries.iter().filter(|e| e.section == "users") {
        let line = format!("{}  {}", e.at, e.key);
        let (user, notes) = user(&e.value);
        let summary = USER_SETTINGS
            .iter()
            .filter_map(|s| {
                (s.to_toml)(&user).map(|v| format!("{}={}", s.key, v.to_string().trim()))
            })
            .collect::<Vec<_>>()
            .join(" ");
        db_report.push(format!("{line} → [users.{}] {summary}", e.key));
        db_report.extend(notes.into_iter().map(|n| format!("    {n}")));
        users.insert(e.key.clone(), user);
    }
    for e in entries
        .iter()
        .filter(|e| !matches!(e.section.as_str(), "pgbouncer" | "databases" | "users"))
    {
        let why = match e.section.as_str() {
            "peers" => "no peering: one Breakwater uses every core (workers)",
            _ => "unknown section",
        };
        missing.push(format!("{}  [{}] {} = …: {why}", e.at, e.section, e.key));
    }

    let toml = render(ini, &pooler, &databases, &users);
    let check = Config::parse(output, &toml);
    let mut report = String::new();
    let _ = writeln!(report, "{} → {}", ini.display(), output.display());
    for (title, lines) in [
        ("mapped (same meaning)", &mapped),
        ("mapped, behaves differently", &differs),
        ("databases and users", &db_report),
        ("ignored: Breakwater needs no equivalent", &ignored),
        ("not imported: no equivalent", &missing),
        ("notes", &notes),
    ] {
        if lines.is_empty() {
            continue;
        }
        let _ = writeln!(report, "\n{title} ({}):", lines.len());
        for l in lines.iter() {
            let _ = writeln!(report, "  {l}");
        }
    }
    let valid = match &check {
        Ok(_) => {
            let _ = writeln!(report, "\nthe result passes the config checks (run `breakwater --check -c {}` to try the listen address too)", output.display());
            true
        }
        Err(e) => {
            let _ = writeln!(
                report,
                "\nthe result needs attention before it runs:\n  {e}"
            );
            false
        }
    };
    Ok(Import {
        toml,
        report,
        valid,
    })
}

fn shown(s: &Setting<Pooler>, p: &Pooler) -> String {
    (s.to_toml)(p)
        .map(|v| v.to_string().trim().to_owned())
        .unwrap_or_default()
}

/// `path` made absolute against the INI's directory.
fn absolute(ini: &Path, path: &str) -> String {
    let p = Path::new(path);
    if p.is_absolute() || path.is_empty() {
        return path.to_owned();
    }
    let dir = ini.parent().unwrap_or(Path::new("."));
    let joined: PathBuf = dir.join(p);
    std::path::absolute(&joined)
        .unwrap_or(joined)
        .display()
        .to_string()
}

/// `key=value key='quoted value' …` (libpq style, as PgBouncer's `[databases]` and `[users]`
/// lines), with a note for what is not key=value.
fn pairs(conn: &str, notes: &mut Vec<String>) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = conn.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            notes.push(format!("\"{rest}\" is not key=value; skipped"));
            break;
        };
        let after = after.trim_start();
        let (value, next) = match after.strip_prefix('\'') {
            Some(quoted) => {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = quoted.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, c)) = chars.next() {
                                value.push(c);
                            }
                        }
                        '\'' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                (value, quoted.get(end..).unwrap_or_default())
            }
            None => {
                let end = after.find(char::is_whitespace).unwrap_or(after.len());
                (
                    after.get(..end).unwrap_or_default().to_owned(),
                    after.get(end..).unwrap_or_default(),
                )
            }
        };
        pairs.push((key.trim().to_owned(), value));
        rest = next.trim_start();
    }
    pairs
}

/// A `[users]` line: `pool_mode=session max_user_connections=10`.
fn user(conn: &str) -> (User, Vec<String>) {
    let mut user = User::default();
    let mut notes = Vec::new();
    for (key, value) in pairs(conn, &mut notes) {
        let result = match USER_SETTINGS.iter().find(|s| s.key == key) {
            Some(s) => (s.set)(&mut user, &value),
            None => Err(match key.as_str() {
                "reserve_pool_size" => "no reserve pool per user".into(),
                "query_timeout"
                | "idle_transaction_timeout"
                | "client_idle_timeout"
                | "transaction_timeout" => "timeouts are pooler-wide in Breakwater".into(),
                _ => "unknown".into(),
            }),
        };
        if let Err(why) = result {
            notes.push(format!("{key}={value}: not imported: {why}"));
        }
    }
    (user, notes)
}

/// A `[databases]` connection string: `host=db port=5432 dbname=app pool_size=40`, values
/// optionally in single quotes (libpq style).
fn database(conn: &str, global_max_db: Option<&str>) -> (Database, Vec<String>) {
    let mut db = Database::default();
    let mut notes = Vec::new();
    let pairs = pairs(conn, &mut notes);
    let mut port = None;
    let mut hosts = Vec::new();
    for (key, value) in pairs {
        let set = |db: &mut Database, k: &str, v: &str| {
            DATABASE_SETTINGS
                .iter()
                .find(|s| s.key == k)
                .map(|s| (s.set)(db, v))
                .unwrap_or(Err("unknown".into()))
        };
        let result = match key.as_str() {
            // A comma list of hosts becomes `hosts`, each with the entry's port.
            "host" => {
                hosts = value.split(',').map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect();
                Ok(())
            }
            "port" => {
                port = Some(value.clone());
                Ok(())
            }
            "dbname" | "user" | "password" | "pool_size" | "min_pool_size" | "pool_mode" | "max_db_connections" | "max_db_client_connections" => {
                set(&mut db, &key, &value)
            }
            "reserve_pool" | "reserve_pool_size" => set(&mut db, "reserve_pool_size", &value),
            "connect_query" | "client_encoding" | "timezone" | "application_name" => set(&mut db, &key, &value),
            "datestyle" => Err("no per-database datestyle: set it in the role (ALTER ROLE … SET datestyle) or the client".into()),
            "auth_user" | "auth_query" | "auth_dbname" => set(&mut db, &key, &value),
            "server_lifetime" => Err("server_lifetime is pool-wide in Breakwater".into()),
            _ => Err("unknown".into()),
        };
        if let Err(why) = result {
            notes.push(format!(
                "{key}={}: not imported: {why}",
                if key == "password" { "…" } else { &value }
            ));
        }
    }
    let port_num: Option<u16> = port.as_deref().and_then(|p| p.parse().ok());
    if port.is_some() && port_num.is_none() {
        notes.push("port: not a port number; 5432 used".into());
    }
    match hosts.as_slice() {
        [] => {}
        [one] => {
            db.host = Some(one.clone());
            db.port = port_num;
        }
        many => {
            let p = port_num.unwrap_or(5432);
            db.hosts = Some(many.iter().map(|h| format!("{h}:{p}")).collect());
        }
    }
    if db.hosts.is_none() && db.host.is_none() {
        // PgBouncer's default host is a Unix socket (/tmp); say so rather than guess.
        notes.push(
            "no host: PgBouncer connects over the Unix socket then; Breakwater uses 127.0.0.1:5432"
                .into(),
        );
        db.port = port_num;
    }
    if db.max_db_connections.is_none() {
        if let Some(m) = global_max_db {
            let _ = DATABASE_SETTINGS
                .iter()
                .find(|s| s.key == "max_db_connections")
                .map(|s| (s.set)(&mut db, m));
        }
    }
    (db, notes)
}

/// The pooler.toml text: non-default `[pooler]` keys, then the databases.
fn render(
    ini: &Path,
    pooler: &Pooler,
    databases: &BTreeMap<String, Database>,
    users: &BTreeMap<String, User>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported from {} by `breakwater import-pgbouncer`.\n# Every key not written here has Breakwater's default (pooler.toml.example lists them).\n",
        ini.display()
    );
    let _ = writeln!(out, "[pooler]");
    let defaults = Pooler::default();
    for s in SETTINGS {
        if (s.get)(pooler) == (s.get)(&defaults) {
            continue;
        }
        if let Some(v) = (s.to_toml)(pooler) {
            let _ = writeln!(out, "{} = {}", s.key, v.to_string().trim());
        }
    }
    for (name, db) in databases {
        let _ = writeln!(out, "\n[databases.{}]", table_name(name));
        for s in DATABASE_SETTINGS {
            if let Some(v) = (s.to_toml)(db) {
                let _ = writeln!(out, "{} = {}", s.key, v.to_string().trim());
            }
        }
    }
    for (name, user) in users {
        let _ = writeln!(out, "\n[users.{}]", table_name(name));
        for s in USER_SETTINGS {
            if let Some(v) = (s.to_toml)(user) {
                let _ = writeln!(out, "{} = {}", s.key, v.to_string().trim());
            }
        }
    }
    out
}

/// A name as a TOML table key: bare when it can be, else quoted.
fn table_name(name: &str) -> String {
    let bare = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match bare {
        true => name.to_owned(),
        false => toml_edit::Value::from(name).to_string().trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgbouncer_values_convert_with_their_units() {
        let cases = [
            (Unit::Secs, "query_wait_timeout", "120", Ok("120000ms")),
            (Unit::Secs, "query_timeout", "0", Ok("0")),
            (Unit::Secs, "server_login_retry", "0.5", Ok("500ms")),
            (Unit::Secs, "server_lifetime", "1h", Ok("1h")),
            (Unit::Millis, "tcp_user_timeout", "2500", Ok("2500ms")),
            (Unit::Bool, "log_stats", "0", Ok("false")),
            (Unit::Bool, "tcp_keepalive", "yes", Ok("true")),
            (Unit::Int, "tcp_keepcnt", "0", Err("OS default")),
            (Unit::Secs, "tcp_keepidle", "0", Err("OS default")),
            (
                Unit::Bool,
                "log_stats",
                "maybe",
                Err("not a PgBouncer boolean"),
            ),
        ];
        for (unit, key, value, want) in cases {
            match (convert(unit, key, value), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{key} = {value}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{key}: {got}"),
                (got, want) => panic!("{key} = {value}: {got:?}, wanted {want:?}"),
            }
        }
    }

    #[test]
    fn pgbouncer_tcp_settings_apply_to_client_sockets_too() {
        let dir = tempfile::tempdir().unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            "[databases]\napp = host=db\n[pgbouncer]\nauth_type = trust\n\
             tcp_keepidle = 7\ntcp_keepintvl = 2\ntcp_keepcnt = 4\ntcp_user_timeout = 9000\n",
        )
        .unwrap();
        let out = import(&ini, None, &dir.path().join("pooler.toml")).unwrap();
        for key in ["", "client_"] {
            for line in [
                format!("{key}tcp_keepidle = \"7s\""),
                format!("{key}tcp_keepintvl = \"2s\""),
                format!("{key}tcp_keepcnt = 4"),
                format!("{key}tcp_user_timeout = \"9s\""),
            ] {
                assert!(
                    out.toml.contains(&line),
                    "{line} missing from\n{}",
                    out.toml
                );
            }
        }
        assert!(out.valid, "{}", out.report);
    }

    #[test]
    fn connection_strings_become_database_entries() {
        let (db, notes) = database(
            "host=db1,db2 port=5433 dbname='my app' password='a b\\'c' pool_size=7 timezone=UTC \
             datestyle=ISO connect_query='SET search_path = app' client_encoding=UTF8",
            Some("40"),
        );
        assert_eq!(
            db.hosts,
            Some(vec!["db1:5433".to_string(), "db2:5433".to_string()])
        );
        assert_eq!(db.dbname.as_deref(), Some("my app"));
        assert_eq!(db.pool_size, Some(7));
        assert_eq!(db.max_db_connections, Some(40));
        assert_eq!(db.password.as_deref(), Some("a b'c"));
        assert_eq!(db.timezone.as_deref(), Some("UTC"));
        assert_eq!(db.client_encoding.as_deref(), Some("UTF8"));
        assert_eq!(db.connect_query.as_deref(), Some("SET search_path = app"));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("datestyle=ISO: not imported"),
            "{notes:?}"
        );
        let (db, notes) = database("dbname=app", None);
        assert_eq!((db.host, db.port), (None, None));
        assert!(notes[0].contains("Unix socket"), "{notes:?}");
    }

    #[test]
    fn users_lines_become_users_entries() {
        let (u, notes) = user("pool_mode=session pool_size=3 max_user_connections=10 max_user_client_connections=100 query_timeout=5");
        assert_eq!(u.pool_mode, Some(proxy::PoolMode::Session));
        assert_eq!(
            (
                u.pool_size,
                u.max_user_connections,
                u.max_user_client_connections
            ),
            (Some(3), Some(10), Some(100))
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].contains("query_timeout=5: not imported"),
            "{notes:?}"
        );
    }
}

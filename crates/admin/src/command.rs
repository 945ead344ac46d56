//! Parsing console input into [`Command`]s: `VERB [arg]`, `SHOW what`, `SET key = value`, as
//! PgBouncer accepts them (case-insensitive words, optional trailing semicolon, identifiers in
//! double quotes, values in single quotes).

/// Every SHOW the console answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Help,
    Version,
    Pools,
    Stats,
    StatsTotals,
    StatsAverages,
    Totals,
    Databases,
    Clients,
    Servers,
    Users,
    Config,
    Lists,
    State,
    DnsHosts,
    DnsZones,
    /// Breakwater's own: p50/p99 of wait, transaction, query and connect times, and the storm
    /// counters, per pool.
    Latency,
    /// Breakwater's own: connect attempts by outcome and phase, and the breaker, per host.
    Hosts,
    /// Breakwater's own: server connections closed, per pool and reason.
    ServerCloses,
    Fleet,
    /// Breakwater's own: transaction-mode LISTEN per pool (clients, channels, notifications).
    Listeners,
}

impl Show {
    fn parse(word: &str) -> Option<Show> {
        Some(match word.to_ascii_lowercase().as_str() {
            "help" => Show::Help,
            "version" => Show::Version,
            "pools" => Show::Pools,
            "stats" => Show::Stats,
            "stats_totals" => Show::StatsTotals,
            "stats_averages" => Show::StatsAverages,
            "totals" => Show::Totals,
            "databases" => Show::Databases,
            "clients" => Show::Clients,
            "servers" => Show::Servers,
            "users" => Show::Users,
            "config" => Show::Config,
            "lists" => Show::Lists,
            "state" => Show::State,
            "dns_hosts" => Show::DnsHosts,
            "dns_zones" => Show::DnsZones,
            "latency" => Show::Latency,
            "hosts" => Show::Hosts,
            "server_closes" => Show::ServerCloses,
            "fleet" => Show::Fleet,
            "listeners" => Show::Listeners,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Stop now: clients are disconnected.
    Immediate,
    /// Stop accepting; exit when every client has left.
    WaitForClients,
    /// Stop accepting; exit when every server connection is released.
    WaitForServers,
}

/// A command that changes something; only `admin_users` may run these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Pause(Option<String>),
    Resume(Option<String>),
    Disable(String),
    Enable(String),
    Reconnect(Option<String>),
    Kill(Option<String>),
    KillClient(u64),
    WaitClose(Option<String>),
    Reload,
    Shutdown(ShutdownMode),
    Set {
        key: String,
        value: String,
    },
    /// `DRILL [db] host mode FOR duration`: treat an upstream host as failing for a while
    /// (only with `allow_drills = true`).
    Drill {
        database: Option<String>,
        host: String,
        mode: String,
        secs: u64,
    },
}

impl Action {
    /// The CommandComplete tag, as PgBouncer sends it.
    pub fn tag(&self) -> String {
        match self {
            Action::Pause(_) => "PAUSE".into(),
            Action::Resume(_) => "RESUME".into(),
            Action::Disable(_) => "DISABLE".into(),
            Action::Enable(_) => "ENABLE".into(),
            Action::Reconnect(_) => "RECONNECT".into(),
            Action::Kill(_) => "KILL".into(),
            Action::KillClient(_) => "KILL_CLIENT".into(),
            Action::WaitClose(_) => "WAIT_CLOSE".into(),
            Action::Reload => "RELOAD".into(),
            Action::Shutdown(_) => "SHUTDOWN".into(),
            Action::Set { key, value } => format!("SET {key}={value}"),
            Action::Drill { .. } => "DRILL".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    /// `SHOW client_encoding` and friends that drivers send: answered with a fixed value.
    ShowParam(&'static str, &'static str),
    /// `SET client_encoding = …` and friends: accepted and ignored.
    SetIgnored,
    Action(Action),
    Empty,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Invalid(String),
    UnknownShow(String),
    BadArgument(String),
    /// More than one command in one Query.
    MoreThanOneCommand(String),
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParseError::Invalid(q) => write!(f, "invalid command '{q}', use SHOW HELP;"),
            ParseError::UnknownShow(w) => {
                write!(f, "unknown SHOW command '{w}', use SHOW HELP;")
            }
            ParseError::BadArgument(m) => f.write_str(m),
            ParseError::MoreThanOneCommand(q) => write!(
                f,
                "the admin console runs one command per query, refusing '{q}'"
            ),
        }
    }
}

/// Session parameters drivers read or set on connect; the console has no session to change.
const FAKE_PARAMS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("default_transaction_isolation", "read committed"),
    ("standard_conforming_strings", "on"),
    ("datestyle", "ISO"),
    ("timezone", "GMT"),
    ("extra_float_digits", "2"),
    ("application_name", ""),
];

/// One lexical piece of console input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// A bare word, as typed.
    Word(String),
    /// A `'…'` or `"…"` string, quotes removed and doubled quotes unescaped. A `;` or `=` inside
    /// it is text, never a separator.
    Quoted(String),
    Equals,
    Semicolon,
}

impl Token {
    fn text(&self) -> &str {
        match self {
            Token::Word(w) | Token::Quoted(w) => w,
            Token::Equals => "=",
            Token::Semicolon => ";",
        }
    }
}

/// Splits console input into tokens. Quotes are honoured so that a `;` inside a value
/// (`SET server_reset_query = 'DISCARD ALL; SELECT 1'`) is not a command separator; an
/// unterminated quote is an error.
pub fn tokenize(q: &str) -> Result<Vec<Token>, ParseError> {
    let mut out = Vec::new();
    let mut chars = q.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '=' => {
                chars.next();
                out.push(Token::Equals);
            }
            ';' => {
                chars.next();
                out.push(Token::Semicolon);
            }
            '"' | '\'' => {
                chars.next();
                let mut w = String::new();
                loop {
                    match chars.next() {
                        Some(x) if x == c => {
                            if chars.peek() == Some(&c) {
                                chars.next();
                                w.push(c);
                            } else {
                                break;
                            }
                        }
                        Some(x) => w.push(x),
                        None => return Err(ParseError::Invalid(q.to_owned())),
                    }
                }
                out.push(Token::Quoted(w));
            }
            _ => {
                let mut w = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_whitespace() || matches!(x, '=' | ';' | '"' | '\'') {
                        break;
                    }
                    w.push(x);
                    chars.next();
                }
                out.push(Token::Word(w));
            }
        }
    }
    Ok(out)
}

/// `30s`, `2m`, `90` (seconds): a drill's length, 1 s to 1 h.
fn parse_secs(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = s.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1)
    } else {
        (s.as_str(), 1)
    };
    let secs = num.parse::<u64>().ok()?.checked_mul(mult)?;
    (1..=3600).contains(&secs).then_some(secs)
}

/// Parses one Query message: exactly one command, optionally followed by one `;`. A second
/// command is refused whole, as PgBouncer does, so that `SHOW POOLS; SHUTDOWN` (or a name
/// interpolated into `PAUSE $db` by a script) can never run more than the one command asked for.
pub fn parse(query: &str) -> Result<Command, ParseError> {
    let q = query.trim();
    let mut tokens = tokenize(q)?;
    if tokens.last() == Some(&Token::Semicolon) {
        tokens.pop();
    }
    if tokens.contains(&Token::Semicolon) {
        return Err(ParseError::MoreThanOneCommand(q.to_owned()));
    }
    let q = q.trim_end_matches(';').trim();
    if tokens.is_empty() {
        return Ok(Command::Empty);
    }
    let w: Vec<String> = tokens.iter().map(|t| t.text().to_owned()).collect();
    let Some(verb) = w.first().map(|v| v.to_ascii_lowercase()) else {
        return Ok(Command::Empty);
    };
    let arg = w.get(1).cloned();
    let at_most_one = |w: &[String]| {
        if w.len() > 2 {
            Err(ParseError::Invalid(q.to_owned()))
        } else {
            Ok(())
        }
    };
    let need_db = |a: Option<String>, verb: &str| {
        a.ok_or_else(|| ParseError::BadArgument(format!("{verb} needs a database name")))
    };
    let action = match verb.as_str() {
        "show" => {
            at_most_one(&w)?;
            let what = arg.ok_or_else(|| ParseError::Invalid(q.to_owned()))?;
            if let Some((name, value)) = FAKE_PARAMS
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(&what))
            {
                return Ok(Command::ShowParam(name, value));
            }
            return Show::parse(&what)
                .map(Command::Show)
                .ok_or(ParseError::UnknownShow(what));
        }
        "set" => {
            // SET key = value | SET key TO value
            let ok = w.len() == 4
                && (tokens[2] == Token::Equals
                    || matches!(&tokens[2], Token::Word(t) if t.eq_ignore_ascii_case("to")));
            if !ok {
                return Err(ParseError::Invalid(q.to_owned()));
            }
            let key = w[1].to_ascii_lowercase();
            if FAKE_PARAMS.iter().any(|(n, _)| *n == key) {
                return Ok(Command::SetIgnored);
            }
            Action::Set {
                key,
                value: w[3].clone(),
            }
        }
        "pause" => {
            at_most_one(&w)?;
            Action::Pause(arg)
        }
        "resume" => {
            at_most_one(&w)?;
            Action::Resume(arg)
        }
        "disable" => {
            at_most_one(&w)?;
            Action::Disable(need_db(arg, "DISABLE")?)
        }
        "enable" => {
            at_most_one(&w)?;
            Action::Enable(need_db(arg, "ENABLE")?)
        }
        "reconnect" => {
            at_most_one(&w)?;
            Action::Reconnect(arg)
        }
        "kill" => {
            at_most_one(&w)?;
            Action::Kill(arg)
        }
        "kill_client" => {
            at_most_one(&w)?;
            let id = arg
                .as_deref()
                .and_then(|a| a.parse::<u64>().ok())
                .ok_or_else(|| {
                    ParseError::BadArgument("KILL_CLIENT needs a client id (SHOW CLIENTS)".into())
                })?;
            Action::KillClient(id)
        }
        "wait_close" => {
            at_most_one(&w)?;
            Action::WaitClose(arg)
        }
        "reload" if w.len() == 1 => Action::Reload,
        "drill" => {
            let usage = || {
                ParseError::BadArgument(
                    "usage: DRILL [database] host:port blackhole|refuse|slow FOR 30s".into(),
                )
            };
            let (database, rest) = match w.len() {
                5 => (None, &w[1..]),
                6 => (Some(w[1].clone()), &w[2..]),
                _ => return Err(usage()),
            };
            let mode = rest[1].to_ascii_lowercase();
            if !matches!(mode.as_str(), "blackhole" | "refuse" | "slow")
                || !rest[2].eq_ignore_ascii_case("for")
            {
                return Err(usage());
            }
            let secs = parse_secs(&rest[3]).ok_or_else(usage)?;
            Action::Drill {
                database,
                host: rest[0].clone(),
                mode,
                secs,
            }
        }
        "shutdown" => {
            at_most_one(&w)?;
            let mode = match arg.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None => ShutdownMode::Immediate,
                Some("wait_for_clients") => ShutdownMode::WaitForClients,
                Some("wait_for_servers") => ShutdownMode::WaitForServers,
                Some(_) => return Err(ParseError::Invalid(q.to_owned())),
            };
            Action::Shutdown(mode)
        }
        _ => return Err(ParseError::Invalid(q.to_owned())),
    };
    Ok(Command::Action(action))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_as_pgbouncer_accepts_them() {
        let cases: &[(&str, Command)] = &[
            ("SHOW POOLS;", Command::Show(Show::Pools)),
            ("  show   stats_totals ", Command::Show(Show::StatsTotals)),
            ("pause", Command::Action(Action::Pause(None))),
            (
                "PAUSE app;",
                Command::Action(Action::Pause(Some("app".into()))),
            ),
            (
                "resume \"My Db\"",
                Command::Action(Action::Resume(Some("My Db".into()))),
            ),
            ("KILL_CLIENT 42", Command::Action(Action::KillClient(42))),
            (
                "set default_pool_size = 5",
                Command::Action(Action::Set {
                    key: "default_pool_size".into(),
                    value: "5".into(),
                }),
            ),
            (
                "SET query_wait_timeout TO '10s'",
                Command::Action(Action::Set {
                    key: "query_wait_timeout".into(),
                    value: "10s".into(),
                }),
            ),
            ("SET client_encoding = 'UTF8'", Command::SetIgnored),
            (
                "show client_encoding",
                Command::ShowParam("client_encoding", "UTF8"),
            ),
            (
                "shutdown wait_for_clients",
                Command::Action(Action::Shutdown(ShutdownMode::WaitForClients)),
            ),
            ("RELOAD", Command::Action(Action::Reload)),
            (
                "DRILL 10.0.0.1:5432 refuse FOR 30s",
                Command::Action(Action::Drill {
                    database: None,
                    host: "10.0.0.1:5432".into(),
                    mode: "refuse".into(),
                    secs: 30,
                }),
            ),
            (
                "drill app db:5432 BLACKHOLE for 2m;",
                Command::Action(Action::Drill {
                    database: Some("app".into()),
                    host: "db:5432".into(),
                    mode: "blackhole".into(),
                    secs: 120,
                }),
            ),
            (";", Command::Empty),
        ];
        for (q, want) in cases {
            assert_eq!(&parse(q).unwrap(), want, "{q}");
        }
    }

    #[test]
    fn bad_input_gets_a_message_naming_it() {
        assert_eq!(
            parse("SHOW FOO").unwrap_err().to_string(),
            "unknown SHOW command 'FOO', use SHOW HELP;"
        );
        assert!(parse("SELECT 1")
            .unwrap_err()
            .to_string()
            .contains("invalid command 'SELECT 1'"));
        assert!(parse("DISABLE")
            .unwrap_err()
            .to_string()
            .contains("needs a database"));
        assert!(parse("KILL_CLIENT x")
            .unwrap_err()
            .to_string()
            .contains("client id"));
        assert!(parse("PAUSE a b").is_err());
        assert!(parse("RELOAD now").is_err());
        assert!(parse("SHOW 'oops").is_err());
    }

    #[test]
    fn the_tokenizer_keeps_quoted_text_whole() {
        use Token::*;
        let w = |s: &str| Word(s.into());
        let qt = |s: &str| Quoted(s.into());
        let cases: &[(&str, Vec<Token>)] = &[
            ("", vec![]),
            ("SHOW POOLS;", vec![w("SHOW"), w("POOLS"), Semicolon]),
            ("a=b", vec![w("a"), Equals, w("b")]),
            (
                "SET server_reset_query = 'DISCARD ALL; SELECT 1'",
                vec![
                    w("SET"),
                    w("server_reset_query"),
                    Equals,
                    qt("DISCARD ALL; SELECT 1"),
                ],
            ),
            ("'it''s'", vec![qt("it's")]),
            ("\"a\"\"b\"", vec![qt("a\"b")]),
            ("\"x=y\"", vec![qt("x=y")]),
            ("pause a;b", vec![w("pause"), w("a"), Semicolon, w("b")]),
            ("pause a';'", vec![w("pause"), w("a"), qt(";")]),
            ("''", vec![qt("")]),
        ];
        for (q, want) in cases {
            assert_eq!(&tokenize(q).unwrap(), want, "{q}");
        }
        for bad in ["'open", "\"open", "SET a = 'x''", "SHOW \"x"] {
            assert!(tokenize(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_query_runs_one_command_and_a_trailing_semicolon() {
        let refused = [
            "SHOW POOLS; SHUTDOWN",
            "SHOW POOLS;SHUTDOWN;",
            "PAUSE app; RESUME",
            "PAUSE x;; ",
            ";;",
            "SET a = 'b'; SHUTDOWN",
            "PAUSE \"a\";SHUTDOWN",
        ];
        for q in refused {
            assert!(
                matches!(parse(q), Err(ParseError::MoreThanOneCommand(_))),
                "{q}: {:?}",
                parse(q)
            );
        }
        assert_eq!(
            parse("SET server_reset_query = 'DISCARD ALL; SELECT 1';").unwrap(),
            Command::Action(Action::Set {
                key: "server_reset_query".into(),
                value: "DISCARD ALL; SELECT 1".into(),
            })
        );
        // A name that contains a semicolon is one quoted argument, not two commands.
        assert_eq!(
            parse("PAUSE \"a;SHUTDOWN\"").unwrap(),
            Command::Action(Action::Pause(Some("a;SHUTDOWN".into())))
        );
        // `=` only separates when it is not quoted.
        assert!(parse("SET a '=' b").is_err());
        assert_eq!(parse("  ; ").unwrap(), Command::Empty);
        assert!(parse("SHOW POOLS; SHUTDOWN")
            .unwrap_err()
            .to_string()
            .contains("one command per query"));
    }
}

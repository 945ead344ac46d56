//! The console loop on one connection: welcome, then read simple-protocol queries, answer each
//! with a result set or an error, and ReadyForQuery. Generic over the stream so it runs on TCP,
//! Unix sockets and in-memory pipes alike.

use bytes::BytesMut;
use proto::backend;
use proto::frame;
use proto::frontend;
use proto::{PgError, SqlState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::command::{self, Action, Command, Show};
use crate::show::{self, ResultSet};
use crate::Control;

/// Largest console query accepted; commands are short.
const MAX_QUERY: usize = 64 * 1024;

const INSUFFICIENT_PRIVILEGE: SqlState = SqlState("42501");
/// PgBouncer answers a failed RELOAD with F0000 (config_file_error).
const CONFIG_FILE_ERROR: SqlState = SqlState("F0000");
const OBJECT_NOT_IN_STATE: SqlState = SqlState("55000");

/// Who is on the console.
#[derive(Debug, Clone)]
pub struct ConsoleUser {
    pub user: String,
    /// In `admin_users`: may run every command; otherwise (`stats_users`) SHOW only.
    pub is_admin: bool,
    pub client_id: u64,
    pub server_version: String,
}

const HELP: &str = "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n\
\tSHOW LISTS|STATE|DNS_HOSTS|DNS_ZONES\n\
\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n\
\tSHOW LATENCY (Breakwater: p50/p99 wait, transaction, query, connect; connect outcomes)\n\
\tSHOW HOSTS (Breakwater: connect attempts by phase and outcome, breaker state)\n\
\tSHOW SERVER_CLOSES (Breakwater: server connections closed, per pool and reason)\n\
\tSHOW FLEET (Breakwater: fleet budget slots held, wanted and the fleet's total, per database)\n\
\tSHOW LISTENERS (Breakwater: transaction-mode LISTEN per pool: clients, channels, notifications)\n\
\tSET key = arg\n\
\tRELOAD\n\
\tPAUSE [<db>]\n\
\tRESUME [<db>]\n\
\tDISABLE <db>\n\
\tENABLE <db>\n\
\tRECONNECT [<db>]\n\
\tKILL [<db>]\n\
\tKILL_CLIENT <client_id>\n\
\tSHUTDOWN\n\
\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS\n\
\tWAIT_CLOSE [<db>]";

/// Runs the console until the client leaves. `buf` holds bytes already read after startup;
/// AuthenticationOk has been sent.
pub async fn serve<S, C>(
    mut stream: S,
    mut buf: BytesMut,
    me: ConsoleUser,
    control: &C,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Control,
{
    let mut out = BytesMut::with_capacity(4096);
    for (name, value) in [
        ("server_version", me.server_version.as_str()),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("standard_conforming_strings", "on"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("application_name", ""),
        ("is_superuser", if me.is_admin { "on" } else { "off" }),
    ] {
        backend::write_parameter_status(&mut out, name, value);
    }
    backend::write_backend_key_data(&mut out, (me.client_id & 0x7fff_ffff) as i32, 0);
    backend::write_ready_for_query(&mut out, backend::TxStatus::Idle);
    stream.write_all(&out).await?;
    // TLS streams hold ciphertext until flushed.
    stream.flush().await?;
    out.clear();

    // After an extended-protocol message the console refuses, skip to the next Sync.
    let mut skipping = false;
    loop {
        let msg = loop {
            match frame::take_message(&mut buf, MAX_QUERY) {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(e) => {
                    PgError::fatal(SqlState::PROTOCOL_VIOLATION, e.to_string()).write(&mut out);
                    stream.write_all(&out).await?;
                    // TLS streams hold ciphertext until flushed.
                    stream.flush().await?;
                    return Ok(());
                }
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            if stream.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        };
        match msg.tag {
            frontend::TERMINATE => return Ok(()),
            frontend::QUERY => {
                skipping = false;
                let sql = match frontend::parse_query(&msg.body) {
                    Ok(q) => String::from_utf8_lossy(q).into_owned(),
                    Err(e) => {
                        PgError::error(SqlState::PROTOCOL_VIOLATION, e.to_string()).write(&mut out);
                        backend::write_ready_for_query(&mut out, backend::TxStatus::Idle);
                        stream.write_all(&out).await?;
                        // TLS streams hold ciphertext until flushed.
                        stream.flush().await?;
                        out.clear();
                        continue;
                    }
                };
                let shutdown = run_query(&sql, &me, control, &mut out).await;
                backend::write_ready_for_query(&mut out, backend::TxStatus::Idle);
                stream.write_all(&out).await?;
                // TLS streams hold ciphertext until flushed.
                stream.flush().await?;
                out.clear();
                if shutdown {
                    return Ok(());
                }
            }
            frontend::SYNC => {
                skipping = false;
                backend::write_ready_for_query(&mut out, backend::TxStatus::Idle);
                stream.write_all(&out).await?;
                // TLS streams hold ciphertext until flushed.
                stream.flush().await?;
                out.clear();
            }
            frontend::FLUSH => {}
            _ => {
                if !skipping {
                    skipping = true;
                    PgError::error(
                        SqlState::FEATURE_NOT_SUPPORTED,
                        "the admin console speaks only the simple query protocol",
                    )
                    .write(&mut out);
                    stream.write_all(&out).await?;
                    // TLS streams hold ciphertext until flushed.
                    stream.flush().await?;
                    out.clear();
                }
            }
        }
    }
}

/// Answers one Query message (one command, see [`command::parse`]) into `out`, without the
/// final ReadyForQuery. Returns `true` after an immediate SHUTDOWN.
pub async fn run_query<C: Control>(
    sql: &str,
    me: &ConsoleUser,
    control: &C,
    out: &mut BytesMut,
) -> bool {
    let cmd = match command::parse(sql) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(user = %me.user, "admin console: {e}");
            PgError::error(SqlState::SYNTAX_ERROR, e.to_string()).write(out);
            return false;
        }
    };
    match cmd {
        Command::Empty => backend::write_empty_query_response(out),
        Command::ShowParam(name, value) => {
            backend::write_row_description(out, &[(name, show::TEXT)]);
            backend::write_data_row(out, [Some(value.as_bytes())]);
            backend::write_command_complete(out, "SHOW");
        }
        Command::SetIgnored => {
            PgError::notice("SET ignored").write(out);
            backend::write_command_complete(out, "SET");
        }
        Command::Show(Show::Help) => {
            PgError::notice("Console usage")
                .with_detail(HELP)
                .write(out);
            backend::write_command_complete(out, "SHOW");
        }
        Command::Show(what) => {
            let view = control.view(&what);
            write_result(out, &show::result(what, &view));
            backend::write_command_complete(out, "SHOW");
        }
        Command::Action(action) => {
            if !me.is_admin {
                PgError::error(
                        INSUFFICIENT_PRIVILEGE,
                        format!(
                            "admin access needed: user \"{}\" is in stats_users, which may only run SHOW",
                            me.user
                        ),
                    )
                    .write(out);
                return false;
            }
            let tag = action.tag();
            let is_shutdown = matches!(action, Action::Shutdown(crate::ShutdownMode::Immediate));
            let code = match action {
                Action::Reload | Action::Set { .. } => CONFIG_FILE_ERROR,
                _ => OBJECT_NOT_IN_STATE,
            };
            tracing::info!(user = %me.user, command = %sql.trim(), "admin command");
            match control.execute(action).await {
                Ok(notice) => {
                    if let Some(n) = notice {
                        PgError::notice(n).write(out);
                    }
                    backend::write_command_complete(out, &tag);
                    if is_shutdown {
                        return true;
                    }
                }
                Err(message) => {
                    tracing::warn!(user = %me.user, "admin command failed: {message}");
                    PgError::error(code, message).write(out);
                    return false;
                }
            }
        }
    }
    false
}

fn write_result(out: &mut BytesMut, r: &ResultSet) {
    backend::write_row_description(out, &r.columns);
    for row in &r.rows {
        backend::write_data_row(out, row.iter().map(|c| c.as_deref().map(str::as_bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::View;

    struct Fake;

    impl Control for Fake {
        fn view(&self, _: &Show) -> View {
            View {
                version: "Breakwater test".into(),
                ..View::default()
            }
        }

        async fn execute(&self, action: Action) -> Result<Option<String>, String> {
            match action {
                Action::Pause(Some(db)) if db == "nope" => Err(format!("no such database: {db}")),
                _ => Ok(None),
            }
        }
    }

    fn user(is_admin: bool) -> ConsoleUser {
        ConsoleUser {
            user: "u".into(),
            is_admin,
            client_id: 1,
            server_version: "16.0".into(),
        }
    }

    /// The message types in `out`, in order.
    fn tags(out: &BytesMut) -> String {
        let mut b = out.clone();
        let mut t = String::new();
        while let Ok(Some(m)) = frame::take_message(&mut b, 1 << 20) {
            t.push(m.tag as char);
        }
        t
    }

    #[tokio::test]
    async fn shows_answer_with_rows_and_actions_need_admin() {
        let mut out = BytesMut::new();
        run_query("SHOW VERSION", &user(false), &Fake, &mut out).await;
        assert_eq!(tags(&out), "TDC");
        assert!(String::from_utf8_lossy(&out).contains("Breakwater test"));

        out.clear();
        run_query("PAUSE", &user(false), &Fake, &mut out).await;
        assert_eq!(tags(&out), "E");
        assert!(String::from_utf8_lossy(&out).contains("42501"));

        out.clear();
        run_query("PAUSE; RESUME", &user(true), &Fake, &mut out).await;
        assert_eq!(tags(&out), "E", "a second command refuses the whole query");
        assert!(String::from_utf8_lossy(&out).contains("42601"));

        out.clear();
        run_query("PAUSE;", &user(true), &Fake, &mut out).await;
        assert_eq!(tags(&out), "C");

        out.clear();
        run_query("PAUSE nope", &user(true), &Fake, &mut out).await;
        assert!(String::from_utf8_lossy(&out).contains("no such database: nope"));

        out.clear();
        run_query("SHOW HELP", &user(false), &Fake, &mut out).await;
        assert_eq!(tags(&out), "NC");

        out.clear();
        run_query("FROB", &user(true), &Fake, &mut out).await;
        assert!(String::from_utf8_lossy(&out).contains("invalid command 'FROB'"));
    }

    #[tokio::test]
    async fn the_console_speaks_the_protocol_end_to_end() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let _ = serve(server, BytesMut::new(), user(true), &Fake).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let mut q = BytesMut::new();
        frontend::write_query(&mut q, "SHOW STATE;");
        frontend::write_terminate(&mut q);
        wr.write_all(&q).await.unwrap();
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        task.await.unwrap();
        let got = BytesMut::from(&got[..]);
        let t = tags(&got);
        assert!(t.starts_with("SSSSSSSSSKZ"), "{t}");
        assert!(t.ends_with("TDDDCZ"), "{t}");
    }
}

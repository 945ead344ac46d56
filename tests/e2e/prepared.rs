//! Named prepared statements in transaction mode: drivers prepare on one server connection and
//! execute on another.

use std::process::Command;

use futures_util::future::join_all;

use crate::common::*;

#[tokio::test]
async fn many_clients_reuse_prepared_statements_over_a_pool_of_two() {
    let env = start("", "pool_size = 2\n");
    let tasks = (0..16i32).map(|c| {
        let conn = env.conn_string();
        tokio::spawn(async move {
            let client = connect(&conn).await.unwrap();
            let add = client.prepare("SELECT $1::int + $2::int").await.unwrap();
            let cat = client
                .prepare("SELECT $1::text || '-' || $2::text")
                .await
                .unwrap();
            for i in 0..150i32 {
                let sum: i32 = client.query_one(&add, &[&c, &i]).await.unwrap().get(0);
                assert_eq!(sum, c + i);
                let s: String = client
                    .query_one(&cat, &[&c.to_string(), &i.to_string()])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(s, format!("{c}-{i}"));
            }
        })
    });
    for r in join_all(tasks).await {
        r.unwrap();
    }
}

#[tokio::test]
async fn pgbench_prepared_32_clients_on_a_pool_of_4_has_no_failures() {
    let env = start("", "pool_size = 4\n");
    let (_, err, ok) = pgbench(&env, &["-i", "-s", "1", "-q"]);
    assert!(ok, "pgbench -i failed: {err}");
    let (out, err, ok) = pgbench(
        &env,
        &["-S", "-M", "prepared", "-c", "32", "-j", "2", "-t", "300"],
    );
    assert!(ok, "pgbench -M prepared failed: {err}\n{out}");
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    assert!(
        out.contains(&format!("actually processed: {}/{}", 32 * 300, 32 * 300)),
        "{out}"
    );
}

#[tokio::test]
async fn a_statement_described_on_one_server_executes_on_another() {
    let env = start("", "pool_size = 2\n");
    let a = env.client().await;
    let b = env.client().await;
    // Prepare (Parse + Describe) while b holds the other server in a transaction.
    b.batch_execute("BEGIN").await.unwrap();
    let stmt = a
        .prepare("SELECT $1::int * 3, pg_backend_pid()")
        .await
        .unwrap();
    let first: i32 = a.query_one(&stmt, &[&1]).await.unwrap().get(1);
    b.batch_execute("COMMIT").await.unwrap();
    // Now hold the server a used, so a's next execution lands on the other one.
    let holder = env.client().await;
    holder.batch_execute("BEGIN").await.unwrap();
    let held_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let row = a.query_one(&stmt, &[&5]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 15);
    let second: i32 = row.get(1);
    if held_pid == first {
        assert_ne!(
            first, second,
            "the statement must have moved to the other server"
        );
    }
    holder.batch_execute("COMMIT").await.unwrap();
}

#[tokio::test]
async fn pipelined_parse_bind_execute_for_several_statements_before_one_sync() {
    let env = start("", "pool_size = 1\n");
    let c = env.client().await;
    let texts: Vec<String> = (0..10).map(|i| format!("SELECT $1::int + {i}")).collect();
    let stmts = join_all(texts.iter().map(|t| c.prepare(t)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    // tokio-postgres pipelines these into one write.
    let got = join_all(stmts.iter().enumerate().map(|(i, s)| {
        let c = &c;
        async move {
            (
                i as i32,
                c.query_one(s, &[&100]).await.unwrap().get::<_, i32>(0),
            )
        }
    }))
    .await;
    for (i, v) in got {
        assert_eq!(v, 100 + i);
    }
}

#[tokio::test]
async fn the_same_name_can_be_prepared_again_with_other_text_after_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = start("auth_type = \"trust\"", "pool_size = 2\n");
    let mut s = raw_login(env.pooler.port()).await;
    for (round, sql) in [
        "SELECT 'first'::text",
        "SELECT 'second'::text",
        "SELECT 'third'::text",
    ]
    .iter()
    .enumerate()
    {
        let mut out = Vec::new();
        raw::parse(&mut out, "stmt", sql);
        raw::bind_execute(&mut out, "stmt");
        raw::close(&mut out, "stmt");
        raw::sync(&mut out);
        s.write_all(&out).await.unwrap();
        let replies = raw::read_until_ready(&mut s).await;
        let tags: String = replies.iter().map(|(t, _)| *t as char).collect();
        assert_eq!(tags, "12DC3Z", "round {round}");
        let row = &replies[2].1;
        let value = String::from_utf8_lossy(&row[6..]).into_owned();
        assert_eq!(value, sql.split('\'').nth(1).unwrap());
    }
    let _ = s.shutdown().await;
    let _ = s.read(&mut [0u8; 1]).await;
}

/// Sends `parse` then Sync, as libpq's PQprepare does, and returns the reply's tags.
async fn prepare(s: &mut tokio::net::TcpStream, name: &str, sql: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut out = Vec::new();
    raw::parse(&mut out, name, sql);
    raw::sync(&mut out);
    s.write_all(&out).await.unwrap();
    let replies = tokio::time::timeout(WAIT, raw::read_until_ready(s))
        .await
        .expect("no reply to Parse, Sync");
    replies.iter().map(|(t, _)| *t as char).collect()
}

/// Bind, Execute, Sync of `name`: the reply's tags and the first column of its first row (or
/// the error's SQLSTATE).
async fn execute(s: &mut tokio::net::TcpStream, name: &str) -> (String, String) {
    use tokio::io::AsyncWriteExt;
    let mut out = Vec::new();
    raw::bind_execute(&mut out, name);
    raw::sync(&mut out);
    s.write_all(&out).await.unwrap();
    let replies = raw::read_until_ready(s).await;
    let tags = replies.iter().map(|(t, _)| *t as char).collect();
    let value = replies
        .iter()
        .find_map(|(t, body)| match t {
            b'D' => Some(String::from_utf8_lossy(&body[6..]).into_owned()),
            b'E' => error_code(&[&[b'E', 0, 0, 0, 0][..], body].concat()),
            _ => None,
        })
        .unwrap_or_default();
    (tags, value)
}

/// pgbench -M prepared (up to PostgreSQL 15) prepares each client's statements with blocking
/// PQprepare calls, from a thread that also drives clients with open transactions. When those
/// hold every server, a Parse that needs a server waits for them, and they for the thread: a
/// deadlock until query_wait_timeout. A statement a server has already parsed needs none.
#[tokio::test]
async fn a_known_statement_is_prepared_while_every_server_is_in_a_transaction() {
    let env = start("auth_type = \"trust\"", "pool_size = 1\n");
    let sql = "SELECT 40 + 2";
    let mut first = raw_login(env.pooler.port()).await;
    assert_eq!(prepare(&mut first, "a", sql).await, "1Z");

    let holder = env.client().await;
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // Another client, another name, the same statement: answered while the only server is
    // still in the holder's transaction.
    let mut second = raw_login(env.pooler.port()).await;
    assert_eq!(prepare(&mut second, "b", sql).await, "1Z");
    assert_eq!(prepare(&mut first, "a2", sql).await, "1Z");
    // Running it needs the server, once the holder is done; Breakwater's own Parse of it on
    // that server (if needed) stays hidden.
    let run = tokio::spawn(async move { execute(&mut second, "b").await });
    holder.batch_execute("COMMIT").await.unwrap();
    let (tags, value) = tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!((tags.as_str(), value.as_str()), ("2DCZ", "42"));
    assert_eq!(execute(&mut first, "a2").await.1, "42");
}

/// A statement known to parse can stop parsing (DDL). The client then hears it at its Bind,
/// with PostgreSQL's error (as it would from a statement prepared before the DDL); when the
/// error came from Breakwater's own Parse of it on a server that lacked it, the statement is
/// no longer known and the next client's Parse is the server's to answer.
#[tokio::test]
async fn a_known_statement_that_no_longer_parses_fails_at_bind_and_is_forgotten() {
    let env = start("auth_type = \"trust\"", "pool_size = 1\n");
    let direct = env.direct().await;
    direct
        .batch_execute(
            "CREATE TABLE known_t (n int); INSERT INTO known_t VALUES (7); \
             GRANT SELECT ON known_t TO app",
        )
        .await
        .unwrap();
    let sql = "SELECT n FROM known_t";
    let mut first = raw_login(env.pooler.port()).await;
    assert_eq!(prepare(&mut first, "s", sql).await, "1Z");
    assert_eq!(execute(&mut first, "s").await.1, "7");

    direct.batch_execute("DROP TABLE known_t").await.unwrap();
    // The next server connection is a new one, without the statement.
    terminate_serving_backend(&env.client().await, &direct).await;
    let mut second = raw_login(env.pooler.port()).await;
    assert_eq!(prepare(&mut second, "s", sql).await, "1Z");
    let (tags, code) = execute(&mut second, "s").await;
    assert_eq!((tags.as_str(), code.as_str()), ("EZ", "42P01"));
    let mut third = raw_login(env.pooler.port()).await;
    assert_eq!(prepare(&mut third, "s", sql).await, "EZ");
}

/// Just enough of the frontend protocol to send exact message sequences.
mod raw {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    fn msg(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
    }

    pub fn parse(out: &mut Vec<u8>, name: &str, sql: &str) {
        let body = [name.as_bytes(), &[0], sql.as_bytes(), &[0, 0, 0]].concat();
        msg(out, b'P', &body);
    }

    pub fn bind_execute(out: &mut Vec<u8>, name: &str) {
        let body = [&[0u8][..], name.as_bytes(), &[0, 0, 0, 0, 0, 0, 0]].concat();
        msg(out, b'B', &body);
        msg(out, b'E', &[0, 0, 0, 0, 0]);
    }

    pub fn close(out: &mut Vec<u8>, name: &str) {
        let body = [&[b'S'][..], name.as_bytes(), &[0]].concat();
        msg(out, b'C', &body);
    }

    pub fn sync(out: &mut Vec<u8>) {
        msg(out, b'S', &[]);
    }

    /// Reads messages until ReadyForQuery; returns (tag, body) of each.
    pub async fn read_until_ready(s: &mut TcpStream) -> Vec<(u8, Vec<u8>)> {
        let mut got = Vec::new();
        loop {
            let mut head = [0u8; 5];
            s.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.unwrap();
            let done = head[0] == b'Z';
            if !matches!(head[0], b'S' | b'K' | b'R') {
                got.push((head[0], body));
            }
            if done {
                return got;
            }
        }
    }
}

#[tokio::test]
async fn ten_statements_in_rotation_survive_eviction_with_max_prepared_statements_two() {
    let env = start("max_prepared_statements = 2", "pool_size = 1\n");
    let c = env.client().await;
    let stmts = {
        let mut v = Vec::new();
        for i in 0..10 {
            v.push(c.prepare(&format!("SELECT $1::int * {i}")).await.unwrap());
        }
        v
    };
    for round in 0..5i32 {
        for (i, s) in stmts.iter().enumerate() {
            let v: i32 = c.query_one(s, &[&round]).await.unwrap().get(0);
            assert_eq!(v, round * i as i32);
        }
    }
    // The server never holds more than two of them.
    let n: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'bw\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(n <= 2, "{n} statements on the server");
}

/// With the cache full, running a statement the server lacks makes Breakwater close the least
/// recently used one and parse it. When an error earlier in the same batch makes the server
/// skip that Close, the server keeps the evicted statement: a later Parse of its text must not
/// fail with 42P05 ("already exists").
#[tokio::test]
async fn an_eviction_the_server_skipped_after_an_error_leaves_no_stray_statement() {
    use tokio::io::AsyncWriteExt;
    let env = start(
        "auth_type = \"trust\"\nmax_prepared_statements = 1",
        "pool_size = 1\n",
    );
    let mut s = raw_login(env.pooler.port()).await;
    assert_eq!(prepare(&mut s, "y", "SELECT 2").await, "1Z");
    // y is evicted (closed) for x: the server holds x only.
    assert_eq!(prepare(&mut s, "x", "SELECT 1").await, "1Z");
    // One batch: an error, then y, for which Breakwater closes x and parses y; the server
    // skips both after the error.
    let mut out = Vec::new();
    raw::parse(&mut out, "", "SELECT 1/0");
    raw::bind_execute(&mut out, "");
    raw::bind_execute(&mut out, "y");
    raw::sync(&mut out);
    s.write_all(&out).await.unwrap();
    let replies = raw::read_until_ready(&mut s).await;
    let tags: String = replies.iter().map(|(t, _)| *t as char).collect();
    assert_eq!(
        tags, "1EZ",
        "the division's error, then nothing until the Sync"
    );
    // The text of x again, under another name.
    assert_eq!(
        prepare(&mut s, "x2", "SELECT 1").await,
        "1Z",
        "a stray statement on the server refused the Parse"
    );
    assert_eq!(execute(&mut s, "x2").await.1, "1");
}

#[tokio::test]
async fn statements_are_prepared_again_after_the_server_connection_was_replaced() {
    let env = start("", "pool_size = 1\n");
    let c = env.client().await;
    let direct = env.direct().await;
    let s = c.prepare("SELECT $1::int - 1").await.unwrap();
    assert_eq!(c.query_one(&s, &[&10]).await.unwrap().get::<_, i32>(0), 9);
    terminate_serving_backend(&c, &direct).await;
    assert_eq!(c.query_one(&s, &[&20]).await.unwrap().get::<_, i32>(0), 19);
}

#[tokio::test]
async fn a_failed_parse_reaches_the_client_as_postgres_sent_it_and_leaves_nothing_behind() {
    let env = start("", "pool_size = 1\n");
    let c = env.client().await;
    let err = c.prepare("SELEC oops").await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "42601");
    // The connection and the pool are fine afterwards.
    let s = c.prepare("SELECT 1").await.unwrap();
    assert_eq!(c.query_one(&s, &[]).await.unwrap().get::<_, i32>(0), 1);
}

#[tokio::test]
async fn asyncpg_prepared_statement_workload_runs_through_transaction_mode() {
    let Some(python) = asyncpg_python() else {
        panic!("could not set up a Python venv with asyncpg (needs python3 and PyPI)");
    };
    let env = start("", "pool_size = 2\n");
    let script = r#"
import asyncio, sys, asyncpg
async def worker(dsn, n):
    conn = await asyncpg.connect(dsn)
    stmt = await conn.prepare("SELECT $1::int * 2 AS v")
    for i in range(200):
        assert await stmt.fetchval(i) == i * 2
        assert await conn.fetchval("SELECT $1::text || 'x'", str(i)) == f"{i}x"
        async with conn.transaction():
            await conn.execute("SELECT pg_backend_pid()")
    await conn.close()
async def main(dsn):
    await asyncio.gather(*(worker(dsn, n) for n in range(8)))
    print("ok")
asyncio.run(main(sys.argv[1]))
"#;
    let dsn = format!(
        "postgresql://app:app_pw@127.0.0.1:{}/app",
        env.pooler.port()
    );
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dsn)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "asyncpg failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

/// A venv with asyncpg under target/, made once and shared by test runs.
fn asyncpg_python() -> Option<std::path::PathBuf> {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/pyenv-asyncpg");
    let python = venv.join("bin/python");
    let has = |p: &std::path::Path| {
        Command::new(p)
            .args(["-c", "import asyncpg"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if has(&python) {
        return Some(python);
    }
    // Parallel tests may race here; a lock file keeps one installer.
    let lock = venv.with_extension("lock");
    let _ = std::fs::create_dir_all(venv.parent()?);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .ok()?;
    // SAFETY: flock on a file descriptor we own; released when `f` closes.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    if has(&python) {
        return Some(python);
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(&python)
            .args(["-m", "pip", "install", "-q", "asyncpg"])
            .status()
            .is_ok_and(|s| s.success());
    (ok && has(&python)).then_some(python)
}

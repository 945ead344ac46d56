//! Shared set-up: a cluster, a pooler in front of it, and small client helpers.

use std::process::Command;
use std::time::Duration;

use testkit::{free_port, pg_bin, PgCluster, Pooler};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_postgres::{Client, NoTls};

pub const BIN: &str = env!("CARGO_BIN_EXE_breakwater");

pub struct Env {
    pub pooler: Pooler,
    pub pg: PgCluster,
}

/// The auth_file every test uses unless it says otherwise: plaintext for `app`, so Breakwater
/// can log in to the server as `app` with any auth method.
pub const USERLIST: &str = "\"app\" \"app_pw\"\n\"admin\" \"admin_pw\"\n";

/// Starts a cluster and a pooler with `[pooler]` settings `pooler_extra` and a `[databases.app]`
/// entry plus `db_extra`.
pub fn start(pooler_extra: &str, db_extra: &str) -> Env {
    let pg = PgCluster::start().expect("start postgres");
    let pooler = start_pooler(&pg, pooler_extra, db_extra, USERLIST);
    Env { pooler, pg }
}

pub fn start_pooler(pg: &PgCluster, pooler_extra: &str, db_extra: &str, userlist: &str) -> Pooler {
    let port = free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\n{pooler_extra}\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\n{db_extra}\n",
        pg.port()
    );
    Pooler::start(BIN, port, &config, &[("userlist.txt", userlist)]).expect("start breakwater")
}

impl Env {
    pub async fn client(&self) -> Client {
        self.pooler
            .connect("app", "app_pw", "app")
            .await
            .expect("connect through breakwater")
    }

    /// A direct connection to Postgres as superuser, for looking behind the pooler.
    pub async fn direct(&self) -> Client {
        self.pg
            .connect("postgres", "postgres", "app")
            .await
            .expect("connect to postgres directly")
    }

    pub fn conn_string(&self) -> String {
        self.pooler.conn_string("app", "app_pw", "app")
    }
}

pub async fn connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Server backends of `app` connected to database `app` (the pool's connections).
pub async fn app_backends(direct: &Client) -> i64 {
    direct
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = 'app' AND usename = 'app' AND backend_type = 'client backend'",
            &[],
        )
        .await
        .expect("count backends")
        .get(0)
}

/// The SQLSTATE of a failed call, or a panic naming what happened instead.
pub fn sqlstate<T: std::fmt::Debug>(r: Result<T, tokio_postgres::Error>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => match e.as_db_error() {
            Some(db) => db.code().code().to_owned(),
            None => panic!("expected a database error, got {e}"),
        },
    }
}

/// Runs pgbench through the pooler and returns (stdout, stderr, success).
pub fn pgbench(env: &Env, args: &[&str]) -> (String, String, bool) {
    let out = Command::new(pg_bin("pgbench").expect("pgbench"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.pooler.port().to_string(),
            "-U",
            "app",
        ])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", "app_pw")
        .output()
        .expect("run pgbench");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

/// Runs psql through the pooler with `extra` arguments.
pub fn psql(
    port: u16,
    user: &str,
    password: &str,
    db: &str,
    extra: &[&str],
) -> std::process::Output {
    psql_command(port, user, password, db, extra)
        .output()
        .expect("run psql")
}

/// psql through the pooler with `extra` arguments, to run or spawn.
pub fn psql_command(port: u16, user: &str, password: &str, db: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(pg_bin("psql").expect("psql"));
    cmd.args([
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        user,
        "-d",
        db,
    ])
    .args(extra)
    .env("PGPASSWORD", password)
    .env("PGCONNECT_TIMEOUT", "10")
    .env("PGCLIENTENCODING", "utf-8");
    cmd
}

pub const WAIT: Duration = Duration::from_secs(10);

/// Lets a test hold many sockets: soft fd limit up to the hard one.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Waits until a query whose text matches the LIKE `pattern` is running.
pub async fn wait_for_active_query(direct: &Client, pattern: &str) {
    testkit::wait_until(&format!("a query like {pattern} to run"), WAIT, || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1 AND state = 'active'",
                &[&pattern],
            )
            .await
            .unwrap()
            .get(0);
        n == 1
    })
    .await
    .unwrap();
}

/// Waits until the backend with `pid` has exited.
pub async fn wait_for_backend_exit(direct: &Client, pid: i32) {
    testkit::wait_until(&format!("backend {pid} to exit"), WAIT, || async {
        let n: i64 = direct
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        n == 0
    })
    .await
    .unwrap();
}

/// Terminates the server backend currently serving `client` (asked with a query through the
/// pooler) and waits until it has exited; returns its pid.
pub async fn terminate_serving_backend(client: &Client, direct: &Client) -> i32 {
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    wait_for_backend_exit(direct, pid).await;
    pid
}

/// A loopback port whose accept queue is full, so further SYNs are dropped and connects hang —
/// a blackholed host without leaving the machine.
pub fn blackholed_port() -> (u16, socket2::Socket, Vec<std::net::TcpStream>) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(0).unwrap();
    let port = s.local_addr().unwrap().as_socket().unwrap().port();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(200),
        ) {
            Ok(c) => fillers.push(c),
            Err(_) => break,
        }
    }
    (port, s, fillers)
}

/// A raw v3 startup packet.
pub fn startup(params: &[(&str, &str)], version: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// A raw connection to the pooler that has sent a v3 startup as user `app` to database `app`
/// (for trust auth), and read nothing yet.
pub async fn raw_startup(port: u16) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&startup(&[("user", "app"), ("database", "app")], 196_608))
        .await
        .unwrap();
    s
}

/// [`raw_startup`], then the welcome read up to its ReadyForQuery (bounded).
pub async fn raw_login(port: u16) -> TcpStream {
    let mut s = raw_startup(port).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(&[b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the welcome")
            .unwrap();
        assert!(n > 0, "closed during login");
        got.extend_from_slice(&buf[..n]);
    }
    s
}

/// Reads until the peer closes (bounded), returning everything it sent.
pub async fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    out
}

/// The SQLSTATE in the first ErrorResponse of `bytes`.
pub fn error_code(bytes: &[u8]) -> Option<String> {
    let start = bytes.iter().position(|&b| b == b'E')?;
    let body = bytes.get(start + 5..)?;
    let i = body.iter().position(|&b| b == b'C')?;
    let rest = &body[i + 1..];
    let end = rest.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// The whole response (status line, headers, body) to `GET path` on 127.0.0.1:`port`.
/// The value of the first Prometheus series line starting with `prefix`.
pub fn series(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The status code of `GET path` on 127.0.0.1:`port`, and the body.
pub async fn http_status(port: u16, path: &str) -> (u16, String) {
    let path = path.to_owned();
    let out = tokio::task::spawn_blocking(move || http_get(port, &path))
        .await
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, body.to_owned())
}

/// The first column of the first row of a simple query's answer, as text.
pub fn first_value(rows: Vec<tokio_postgres::SimpleQueryMessage>) -> Option<String> {
    rows.into_iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}

/// SHOW POOLS' cl_waiting for database app.
pub async fn cl_waiting(admin: &Client) -> i64 {
    let rows = admin.simple_query("SHOW POOLS").await.expect("SHOW POOLS");
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some("app") => {
                r.get("cl_waiting").and_then(|v| v.parse().ok())
            }
            _ => None,
        })
        .unwrap_or(0)
}

/// A simple-protocol Query message for `sql`, for raw connections.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    m.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

//! TLS on both legs: clients with each sslmode, direct TLS, certificate authentication, a
//! PostgreSQL with `ssl = on` under each server_tls_sslmode, certificates that must be refused,
//! and plaintext that must never be taken for encrypted data. Certificates are made per test
//! run with rcgen: nothing is checked in.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use testkit::{free_port, pg_bin, PgCluster, Pooler};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::Client;

use crate::common::{
    error_code, read_all, startup, terminate_serving_backend, BIN, USERLIST, WAIT,
};

/// A certificate and its key, PEM.
#[derive(Clone)]
struct Leaf {
    cert: String,
    key: String,
}

/// A test CA and everything it (or a stranger CA) signed.
struct Pki {
    ca: String,
    /// For "localhost" and 127.0.0.1.
    server: Leaf,
    /// Same names, expired yesterday.
    expired: Leaf,
    /// For another host only.
    wrong_host: Leaf,
    /// Signed by a CA nobody trusts.
    stranger: Leaf,
    /// Client certificates.
    client_app: Leaf,
    client_mallory: Leaf,
}

fn leaf(
    names: &[&str],
    cn: &str,
    issuer: &Issuer<'_, KeyPair>,
    expired: bool,
    client: bool,
) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let (not_before, not_after) = if expired {
        (now - 30 * day, now - day)
    } else {
        (now - day, now + 30 * day)
    };
    // rcgen takes `time` dates, which convert from SystemTime.
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, issuer).unwrap();
    Leaf {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

fn pki() -> Pki {
    let (ca_pem, issuer) = ca("Breakwater test CA");
    let (_, stranger_ca) = ca("Some other CA");
    let names = ["localhost", "127.0.0.1"];
    Pki {
        ca: ca_pem,
        server: leaf(&names, "localhost", &issuer, false, false),
        expired: leaf(&names, "localhost", &issuer, true, false),
        wrong_host: leaf(
            &["db.example.invalid"],
            "db.example.invalid",
            &issuer,
            false,
            false,
        ),
        stranger: leaf(&names, "localhost", &stranger_ca, false, false),
        client_app: leaf(&[], "app", &issuer, false, true),
        client_mallory: leaf(&[], "mallory", &issuer, false, true),
    }
}

/// A cluster with `ssl = on` serving `cert`. With `ssl_only`, pg_hba refuses plaintext TCP.
fn tls_cluster(cert: &Leaf, ssl_only: bool) -> PgCluster {
    let mut pg = PgCluster::start().expect("start postgres");
    let data = pg.data_dir().to_owned();
    let owner = std::fs::metadata(&data).unwrap();
    for (name, pem, mode) in [
        ("bw_server.crt", &cert.cert, 0o644),
        ("bw_server.key", &cert.key, 0o600),
    ] {
        let path = data.join(name);
        std::fs::write(&path, pem).unwrap();
        // The server refuses a key file it does not own or that others may read.
        std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    pg.psql(
        "postgres",
        "ALTER SYSTEM SET ssl_cert_file = 'bw_server.crt';\n\
         ALTER SYSTEM SET ssl_key_file = 'bw_server.key';\n\
         ALTER SYSTEM SET ssl = on;\n",
    )
    .unwrap();
    if ssl_only {
        let hba = data.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("hostnossl all all 127.0.0.1/32 reject\n{old}"),
        )
        .unwrap();
    }
    pg.restart();
    pg
}

/// A pooler in front of `pg` reached as `host`, with `files` beside its config.
fn pooler(pg: &PgCluster, host: &str, pooler_extra: &str, files: &[(&str, &str)]) -> Pooler {
    let port = free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\nadmin_users = [\"admin\"]\n\
         server_login_retry_max = \"1s\"\n{pooler_extra}\n\
         [databases.app]\nhost = \"{host}\"\nport = {}\n",
        pg.port()
    );
    let mut all = vec![("userlist.txt", USERLIST)];
    all.extend_from_slice(files);
    Pooler::start(BIN, port, &config, &all).expect("start breakwater")
}

/// A rustls client config trusting `ca_pem`, with an optional client certificate.
fn client_config(ca_pem: &str, client_cert: Option<&Leaf>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    match client_cert {
        Some(l) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(l.cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(l.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// tokio-postgres over TLS to localhost (sslmode=require: refuses a pooler that answers N; the
/// rustls config checks the chain to `ca_pem` and that the certificate names localhost).
async fn tls_connect(
    port: u16,
    ca_pem: &str,
    client_cert: Option<&Leaf>,
) -> Result<Client, tokio_postgres::Error> {
    let conn = format!(
        "host=localhost port={port} user=app password=app_pw dbname=app sslmode=require connect_timeout=10"
    );
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(ca_pem, client_cert));
    let (client, connection) = tokio_postgres::connect(&conn, tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Is the server leg of this session encrypted? Asked of PostgreSQL itself.
async fn server_leg_encrypted(c: &Client) -> bool {
    c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// The message of the error a connection and a first query through the pooler end in.
async fn connect_error(port: u16) -> String {
    let conn = format!(
        "host=127.0.0.1 port={port} user=app password=app_pw dbname=app connect_timeout=10"
    );
    let err = match crate::common::connect(&conn).await {
        Ok(c) => c.query_one("SELECT 1", &[]).await.unwrap_err(),
        Err(e) => e,
    };
    match err.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => err.to_string(),
    }
}

/// The files [`CLIENT_TLS`] names: `pki`'s server certificate and its CA.
fn client_tls_files(pki: &Pki) -> [(&'static str, &str); 3] {
    [
        ("server.crt", &pki.server.cert),
        ("server.key", &pki.server.key),
        ("ca.crt", &pki.ca),
    ]
}

const CLIENT_TLS: &str =
    "client_tls_cert_file = \"server.crt\"\nclient_tls_key_file = \"server.key\"\n\
                          client_tls_ca_file = \"ca.crt\"\n";

/// Checks the server leg against the CA in `ca.crt`, which [`client_tls_files`] provides.
const SERVER_VERIFY_FULL: &str =
    "server_tls_sslmode = \"verify-full\"\nserver_tls_ca_file = \"ca.crt\"\n";

/// A [`pooler`] that serves TLS to clients under `client_tls_sslmode = "{sslmode}"` with `pki`'s
/// server certificate, and has `settings` besides.
fn client_tls_pooler(
    pg: &PgCluster,
    host: &str,
    pki: &Pki,
    sslmode: &str,
    settings: &str,
) -> Pooler {
    pooler(
        pg,
        host,
        &format!("client_tls_sslmode = \"{sslmode}\"\n{CLIENT_TLS}{settings}"),
        &client_tls_files(pki),
    )
}

/// A [`pooler`] with `auth_type = "trust"` that asks `pg` for TLS under
/// `server_tls_sslmode = "{sslmode}"`, trusting `ca` when one is given.
fn server_tls_pooler(pg: &PgCluster, host: &str, sslmode: &str, ca: Option<&str>) -> Pooler {
    let mut settings = format!("auth_type = \"trust\"\nserver_tls_sslmode = \"{sslmode}\"\n");
    let mut files = Vec::new();
    if let Some(ca) = ca {
        settings.push_str("server_tls_ca_file = \"ca.crt\"\n");
        files.push(("ca.crt", ca));
    }
    pooler(pg, host, &settings, &files)
}

/// psql -X -At -c `sql` as `conninfo` says: its stdout, or its stderr when it fails.
fn psql(conninfo: &str, password: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(pg_bin("psql").unwrap())
        .args(["-X", "-At", "-c", sql, conninfo])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn verify_full_clients_reach_a_tls_postgres_encrypted_on_both_legs() {
    let pki = pki();
    let pg = tls_cluster(&pki.server, false);
    let p = client_tls_pooler(&pg, "localhost", &pki, "require", SERVER_VERIFY_FULL);
    let c = tls_connect(p.port(), &pki.ca, None)
        .await
        .expect("TLS client through breakwater");
    for i in 0..50i32 {
        let v: i32 = c.query_one("SELECT $1::int", &[&i]).await.unwrap().get(0);
        assert_eq!(v, i);
    }
    assert!(server_leg_encrypted(&c).await);
    // A large result crosses many TLS records both ways.
    let n: i64 = c
        .query_one(
            "SELECT sum(length(repeat('x', g))) FROM generate_series(1, 3000) g",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 3000 * 3001 / 2);
    let rows = c
        .query(
            "SELECT repeat('y', 1000) FROM generate_series(1, 2000)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2000);
}

#[tokio::test]
async fn an_idle_tls_server_closed_by_the_database_is_dropped_before_it_is_handed_out() {
    let pki = pki();
    let pg = tls_cluster(&pki.server, false);
    let p = pooler(
        &pg,
        "127.0.0.1",
        "server_tls_sslmode = \"require\"\ndefault_pool_size = 1\n",
        &[],
    );
    let direct = pg.connect("postgres", "postgres", "app").await.unwrap();
    let a = p.connect("app", "app_pw", "app").await.unwrap();
    assert!(server_leg_encrypted(&a).await);
    let pid = terminate_serving_backend(&a, &direct).await;
    // The FATAL and close_notify arrived encrypted; the probe sees them without decrypting.
    let pid2: i32 = a
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(pid, pid2);
}

#[tokio::test]
async fn psql_with_sslmode_verify_full_is_served() {
    let pki = pki();
    let pg = PgCluster::start().expect("start postgres");
    let p = client_tls_pooler(&pg, "127.0.0.1", &pki, "require", "");
    let verify_full = |user: &str, dbname: &str| {
        format!(
            "host=localhost port={} user={user} dbname={dbname} sslmode=verify-full sslrootcert={}",
            p.port(),
            p.dir().join("ca.crt").display()
        )
    };
    let out = psql(&verify_full("app", "app"), "app_pw", "SELECT 40 + 2").unwrap();
    assert_eq!(out.trim(), "42");
    // The admin console over TLS too.
    let out = psql(
        &verify_full("admin", "pgbouncer"),
        "admin_pw",
        "SHOW VERSION",
    )
    .unwrap();
    assert!(out.contains("Breakwater"));
    // The same psql without TLS is refused, and says why.
    let plaintext = format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=disable",
        p.port()
    );
    let err = psql(&plaintext, "app_pw", "SELECT 1").unwrap_err();
    assert!(err.contains("SSL required"), "{err}");
}

#[tokio::test]
async fn sighup_rotates_the_client_certificate_without_dropping_sessions() {
    let (old_pki, new_pki) = (pki(), pki());
    let pg = PgCluster::start().expect("start postgres");
    let p = client_tls_pooler(&pg, "127.0.0.1", &old_pki, "require", "");
    let port = p.port();
    let old = tls_connect(port, &old_pki.ca, None)
        .await
        .expect("client trusting the first CA");
    std::fs::write(p.dir().join("server.crt"), &new_pki.server.cert).unwrap();
    std::fs::write(p.dir().join("server.key"), &new_pki.server.key).unwrap();
    p.signal(libc::SIGHUP);
    testkit::wait_until("the new certificate is served", WAIT, || async {
        tls_connect(port, &new_pki.ca, None).await.is_ok()
    })
    .await
    .unwrap();
    // The session that began under the old certificate goes on; new ones get the new one.
    let v: i32 = old.query_one("SELECT 7", &[]).await.unwrap().get(0);
    assert_eq!(v, 7);
    assert!(tls_connect(port, &old_pki.ca, None).await.is_err());
}

#[tokio::test]
async fn plaintext_clients_are_refused_under_client_tls_sslmode_require() {
    let pki = pki();
    let pg = PgCluster::start().expect("start postgres");
    let p = client_tls_pooler(&pg, "127.0.0.1", &pki, "require", "");
    let err = connect_error(p.port()).await;
    assert!(err.starts_with("28000"), "{err}");
    assert!(err.contains("SSL required"), "{err}");
}

#[tokio::test]
async fn plaintext_after_an_ssl_request_is_refused_not_taken_as_encrypted() {
    let pki = pki();
    let pg = PgCluster::start().expect("start postgres");
    let p = client_tls_pooler(&pg, "127.0.0.1", &pki, "prefer", "auth_type = \"trust\"\n");
    // SSLRequest and a plaintext StartupMessage in one write: a man in the middle's injection.
    let mut s = TcpStream::connect(("127.0.0.1", p.port())).await.unwrap();
    let mut bytes = ssl_request();
    bytes.extend(startup(&[("user", "app"), ("database", "app")], 196_608));
    s.write_all(&bytes).await.unwrap();
    let reply = read_all(&mut s).await;
    assert_ne!(reply.first(), Some(&b'S'), "the pooler went on to TLS");
    assert_eq!(reply.first(), Some(&b'E'), "{reply:?}");
    assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");
    assert!(
        String::from_utf8_lossy(&reply).contains("unencrypted data after SSL request"),
        "{}",
        String::from_utf8_lossy(&reply)
    );
    // The honest order still works: SSLRequest alone is answered S.
    let mut s = TcpStream::connect(("127.0.0.1", p.port())).await.unwrap();
    s.write_all(&ssl_request()).await.unwrap();
    assert_eq!(s.read_u8().await.unwrap(), b'S');
}

#[tokio::test]
async fn direct_tls_with_alpn_postgresql_logs_in_and_without_it_is_refused() {
    let pki = pki();
    let pg = PgCluster::start().expect("start postgres");
    let p = client_tls_pooler(&pg, "127.0.0.1", &pki, "require", "auth_type = \"trust\"\n");
    for (alpn, ok) in [(Some(b"postgresql".to_vec()), true), (None, false)] {
        let mut config = client_config(&pki.ca, None);
        config.alpn_protocols = alpn.into_iter().collect();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(("127.0.0.1", p.port())).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("direct TLS handshake");
        if ok {
            tls.write_all(&startup(&[("user", "app"), ("database", "app")], 196_608))
                .await
                .unwrap();
            tls.flush().await.unwrap();
            let mut first = [0u8; 9];
            tls.read_exact(&mut first).await.unwrap();
            // AuthenticationOk: 'R', length 8, code 0.
            assert_eq!(&first, b"R\0\0\0\x08\0\0\0\0");
        } else {
            let mut reply = Vec::new();
            let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut reply)).await;
            assert_eq!(error_code(&reply).as_deref(), Some("08P01"), "{reply:?}");
            assert!(String::from_utf8_lossy(&reply).contains("ALPN"));
        }
    }
}

#[tokio::test]
async fn auth_type_cert_logs_in_the_user_named_by_the_certificate() {
    let pki = pki();
    let pg = PgCluster::start().expect("start postgres");
    let p = client_tls_pooler(
        &pg,
        "127.0.0.1",
        &pki,
        "verify-full",
        "auth_type = \"cert\"\n",
    );
    let c = tls_connect(p.port(), &pki.ca, Some(&pki.client_app))
        .await
        .expect("certificate login as app");
    let who: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "app");

    let err = tls_connect(p.port(), &pki.ca, Some(&pki.client_mallory))
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "28000");
    assert!(db.message().contains("mallory"), "{}", db.message());

    // No client certificate: the handshake itself fails.
    assert!(tls_connect(p.port(), &pki.ca, None).await.is_err());
}

#[tokio::test]
async fn each_server_tls_sslmode_against_a_postgres_with_ssl_on() {
    let pki = pki();
    let pg = tls_cluster(&pki.wrong_host, false);
    // The server's certificate names another host: fine for every mode but verify-full.
    for (mode, encrypted) in [
        ("disable", Some(false)),
        ("allow", Some(false)),
        ("prefer", Some(true)),
        ("require", Some(true)),
        ("verify-ca", Some(true)),
        ("verify-full", None),
    ] {
        let p = server_tls_pooler(&pg, "127.0.0.1", mode, Some(&pki.ca));
        match encrypted {
            Some(want) => {
                let c = p.connect("app", "app_pw", "app").await.expect(mode);
                assert_eq!(server_leg_encrypted(&c).await, want, "{mode}");
            }
            None => {
                let err = connect_error(p.port()).await;
                assert!(err.contains("\"127.0.0.1\""), "{mode}: {err}");
                assert!(err.contains("not valid for name"), "{mode}: {err}");
            }
        }
    }
}

#[tokio::test]
async fn allow_retries_with_tls_when_postgres_refuses_plaintext_and_disable_does_not() {
    let pki = pki();
    let pg = tls_cluster(&pki.server, true);
    for (mode, works) in [("allow", true), ("disable", false), ("prefer", true)] {
        let p = server_tls_pooler(&pg, "127.0.0.1", mode, None);
        if works {
            let c = p.connect("app", "app_pw", "app").await.expect(mode);
            assert!(server_leg_encrypted(&c).await, "{mode}");
        } else {
            let err = connect_error(p.port()).await;
            assert!(err.contains("no encryption"), "{mode}: {err}");
        }
    }
}

#[tokio::test]
async fn verify_full_refuses_a_wrong_ca_an_expired_and_a_wrong_host_certificate_naming_the_host() {
    let pki = pki();
    for (cert, why) in [
        (&pki.stranger, "unknownissuer"),
        (&pki.expired, "expired"),
        (&pki.wrong_host, "not valid for name"),
    ] {
        let pg = tls_cluster(cert, false);
        let p = server_tls_pooler(&pg, "localhost", "verify-full", Some(&pki.ca));
        let err = connect_error(p.port()).await;
        assert!(err.starts_with("08001"), "{why}: {err}");
        assert!(err.contains("\"localhost\""), "{why}: {err}");
        assert!(err.to_lowercase().contains(why), "{why}: {err}");
        assert!(err.contains("verify-full"), "{why}: {err}");
    }
}

#[tokio::test]
async fn a_server_without_tls_is_refused_under_require() {
    let pg = PgCluster::start().expect("start postgres");
    let p = server_tls_pooler(&pg, "127.0.0.1", "require", None);
    let err = connect_error(p.port()).await;
    assert!(err.contains("does not support TLS"), "{err}");
    assert!(err.contains("server_tls_sslmode = \"require\""), "{err}");
    assert!(err.contains("\"127.0.0.1\""), "{err}");
}

#[test]
fn pgbench_over_tls_on_both_legs_has_no_failures() {
    let pki = pki();
    let pg = tls_cluster(&pki.server, true);
    let p = client_tls_pooler(
        &pg,
        "localhost",
        &pki,
        "require",
        &format!("default_pool_size = 4\n{SERVER_VERIFY_FULL}"),
    );
    let pgbench = |args: &[&str]| {
        let out = Command::new(pg_bin("pgbench").unwrap())
            .args(["-h", "127.0.0.1", "-p", &p.port().to_string(), "-U", "app"])
            .args(args)
            .arg("app")
            .env("PGPASSWORD", "app_pw")
            .env("PGSSLMODE", "require")
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.status.success(),
        )
    };
    let (_, err, ok) = pgbench(&["-i", "-s", "1", "-q"]);
    assert!(ok, "{err}");
    // Multi-statement transactions (the TPC-B-like script) with the extended protocol, and
    // single statements prepared. Not the TPC-B script with -M prepared: pgbench prepares
    // synchronously, so with fewer servers than clients one of its threads would wait on a
    // prepare while the transactions holding the servers wait for that thread, with or without
    // TLS (as with PgBouncer).
    for args in [
        &["-c", "8", "-j", "2", "-t", "100", "-M", "extended"][..],
        &["-S", "-c", "8", "-j", "2", "-t", "100", "-M", "prepared"][..],
    ] {
        let (out, err, ok) = pgbench(args);
        assert!(ok, "{args:?}: {out}\n{err}");
        assert!(out.contains("number of failed transactions: 0"), "{out}");
        assert!(
            out.contains("number of transactions actually processed: 800/800"),
            "{out}"
        );
    }
}

fn ssl_request() -> Vec<u8> {
    let mut v = 8u32.to_be_bytes().to_vec();
    v.extend_from_slice(&80_877_103u32.to_be_bytes());
    v
}

/// The TLS overhead measurement behind benches/README.md's numbers, run by hand (it takes about a
/// minute and its numbers depend on the machine):
///
/// ```sh
/// cargo build --release -p breakwater
/// BREAKWATER_BIN=target/release/breakwater \
///   cargo nextest run -p breakwater --test e2e --run-ignored only tls_overhead --no-capture
/// ```
///
/// One PostgreSQL with `ssl = on`, two poolers in front of it: plaintext on both legs, and TLS
/// on both legs (client require, server verify-full). pgbench -S with 16 clients through each,
/// alternating, then the same with a new connection per transaction (-C), where every
/// transaction pays a client-side handshake.
#[test]
#[ignore]
fn tls_overhead() {
    let bin = std::env::var("BREAKWATER_BIN").unwrap_or_else(|_| BIN.to_owned());
    let secs = std::env::var("TLS_BENCH_SECS").unwrap_or_else(|_| "10".into());
    let pki = pki();
    let pg = tls_cluster(&pki.server, false);
    let start = |extra: &str| {
        let port = free_port();
        let config = format!(
            "[pooler]\nlisten_port = {port}\nauth_file = \"userlist.txt\"\ndefault_pool_size = 16\n{extra}\n\
             [databases.app]\nhost = \"localhost\"\nport = {}\n",
            pg.port()
        );
        let mut all = vec![("userlist.txt", USERLIST)];
        all.extend(client_tls_files(&pki));
        Pooler::start(&bin, port, &config, &all).expect("start breakwater")
    };
    let plain = start("server_tls_sslmode = \"disable\"\n");
    let tls = start(&format!(
        "client_tls_sslmode = \"require\"\n{CLIENT_TLS}{SERVER_VERIFY_FULL}"
    ));
    let pgbench = |p: &Pooler, sslmode: &str, args: &[&str]| -> String {
        let out = Command::new(pg_bin("pgbench").unwrap())
            .args(["-h", "127.0.0.1", "-p", &p.port().to_string(), "-U", "app"])
            .args(args)
            .arg("app")
            .env("PGPASSWORD", "app_pw")
            .env("PGSSLMODE", sslmode)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.into_owned()
    };
    let tps = |stdout: String| -> f64 {
        assert!(
            stdout.contains("number of failed transactions: 0"),
            "{stdout}"
        );
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("tps in pgbench output")
    };
    pgbench(&plain, "disable", &["-i", "-s", "1", "-q"]);
    let steady = ["-S", "-c", "16", "-j", "2", "-T", &secs];
    let connect = ["-S", "-C", "-c", "8", "-j", "2", "-T", &secs];
    for (what, args) in [
        ("steady -S -c 16", &steady[..]),
        ("-C new connection per transaction", &connect[..]),
    ] {
        let mut plain_tps = Vec::new();
        let mut tls_tps = Vec::new();
        for _ in 0..2 {
            plain_tps.push(tps(pgbench(&plain, "disable", args)));
            tls_tps.push(tps(pgbench(&tls, "require", args)));
        }
        let p = plain_tps.iter().sum::<f64>() / plain_tps.len() as f64;
        let t = tls_tps.iter().sum::<f64>() / tls_tps.len() as f64;
        println!(
            "TLS OVERHEAD {what}: plaintext {p:.0} tps {plain_tps:?}, TLS both legs {t:.0} tps {tls_tps:?}, TLS/plain = {:.2}",
            t / p
        );
    }
}

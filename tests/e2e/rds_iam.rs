//! `server_auth = "rds_iam"` end to end: the real binary gets its AWS credentials from a fake
//! ECS container-credentials endpoint on loopback (the `AWS_CONTAINER_CREDENTIALS_FULL_URI`
//! the AWS chain honours), and logs in to a fake RDS that speaks TLS with a certificate from a
//! test CA, asks for a cleartext password, and checks the token it gets the way RDS would: its
//! SigV4 signature, recomputed from the credentials the endpoint handed out, and its age.
//! No real PostgreSQL can stand in: none accepts a token.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use testkit::{free_port, Pooler};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

const REGION: &str = "us-east-1";
const DB_USER: &str = "app_iam";
const AUTH_TOKEN: &str = "ecs-auth-token-for-the-test";

/// Credentials handed out, by access key id.
type Issued = Arc<Mutex<HashMap<String, Credentials>>>;

/// Which part of the AWS credential chain the fake endpoint plays.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Style {
    /// ECS container credentials: `GET` with the authorization token, JSON back.
    Ecs,
    /// STS for web identity (IRSA): `POST` AssumeRoleWithWebIdentity with the token from the
    /// token file, XML back.
    Sts,
}

const WEB_IDENTITY_TOKEN: &str = "eyJ.fake-web-identity-token.sig";
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/breakwater-test";

/// A fake credentials endpoint: every request hands out the next AKIDn, valid for
/// `valid_for`, or a 500 when `fail` is set. Requests without the ECS authorization token (or,
/// for STS, without the web identity token and role) get a 401.
struct CredentialsEndpoint {
    port: u16,
    style: Style,
    issued: Issued,
    calls: Arc<Mutex<Vec<bool>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl CredentialsEndpoint {
    async fn start(valid_for: Duration, fail: bool) -> CredentialsEndpoint {
        Self::start_as(Style::Ecs, valid_for, fail).await
    }

    async fn start_as(style: Style, valid_for: Duration, fail: bool) -> CredentialsEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let issued: Issued = Arc::default();
        let calls: Arc<Mutex<Vec<bool>>> = Arc::default();
        let (i, c) = (issued.clone(), calls.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (issued, calls) = (i.clone(), c.clone());
                tokio::spawn(async move {
                    let request = read_http_request(&mut conn).await;
                    let authorized = match style {
                        Style::Ecs => request.lines().any(|l| {
                            l.eq_ignore_ascii_case(&format!("authorization: {AUTH_TOKEN}"))
                        }),
                        Style::Sts => {
                            request.starts_with("POST ")
                                && request.contains("Action=AssumeRoleWithWebIdentity")
                                && request.contains(&format!("WebIdentityToken={WEB_IDENTITY_TOKEN}"))
                                && request.contains("RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fbreakwater-test")
                        }
                    };
                    calls.lock().unwrap().push(authorized);
                    let (status, body) = if !authorized {
                        ("401 Unauthorized", String::new())
                    } else if fail {
                        (
                            "500 Internal Server Error",
                            "{\"message\":\"fake outage\"}".into(),
                        )
                    } else {
                        let mut issued = issued.lock().unwrap();
                        let n = issued.len() + 1;
                        let expiry = SystemTime::now() + valid_for;
                        let creds = Credentials::new(
                            format!("AKIDTEST{n}"),
                            format!("secret/{n}+key"),
                            Some(format!("session-token-{n}")),
                            Some(expiry),
                            "test",
                        );
                        let (key, secret, session, expiration) = (
                            creds.access_key_id(),
                            creds.secret_access_key(),
                            creds.session_token().unwrap(),
                            humantime::format_rfc3339_seconds(expiry),
                        );
                        let body = match style {
                            Style::Ecs => format!(
                                "{{\"AccessKeyId\":\"{key}\",\"SecretAccessKey\":\"{secret}\",\"Token\":\"{session}\",\"Expiration\":\"{expiration}\"}}"
                            ),
                            Style::Sts => format!(
                                "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                                 <AssumeRoleWithWebIdentityResult><Credentials>\
                                 <AccessKeyId>{key}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>\
                                 <SessionToken>{session}</SessionToken><Expiration>{expiration}</Expiration>\
                                 </Credentials><SubjectFromWebIdentityToken>system:serviceaccount:app:bw</SubjectFromWebIdentityToken>\
                                 <AssumedRoleUser><AssumedRoleId>AROATEST:bw</AssumedRoleId>\
                                 <Arn>arn:aws:sts::123456789012:assumed-role/breakwater-test/bw</Arn></AssumedRoleUser>\
                                 <Provider>oidc.example</Provider><Audience>sts.amazonaws.com</Audience>\
                                 </AssumeRoleWithWebIdentityResult>\
                                 <ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000001</RequestId></ResponseMetadata>\
                                 </AssumeRoleWithWebIdentityResponse>"
                            ),
                        };
                        issued.insert(creds.access_key_id().to_owned(), creds);
                        ("200 OK", body)
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        match style {
                            Style::Ecs => "application/json",
                            Style::Sts => "text/xml",
                        },
                        body.len()
                    );
                    let _ = conn.write_all(response.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        CredentialsEndpoint {
            port,
            style,
            issued,
            calls,
            _task: task,
        }
    }

    /// The environment that points the pooler's AWS chain here. `dir` holds files it needs
    /// (the web identity token file).
    fn env(&self, dir: &std::path::Path) -> Vec<(&'static str, String)> {
        let mut env = match self.style {
            Style::Ecs => vec![
                (
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    format!("http://127.0.0.1:{}/creds", self.port),
                ),
                ("AWS_CONTAINER_AUTHORIZATION_TOKEN", AUTH_TOKEN.into()),
            ],
            Style::Sts => {
                let token_file = dir.join("web-identity-token");
                std::fs::write(&token_file, WEB_IDENTITY_TOKEN).unwrap();
                vec![
                    (
                        "AWS_WEB_IDENTITY_TOKEN_FILE",
                        token_file.display().to_string(),
                    ),
                    ("AWS_ROLE_ARN", ROLE_ARN.into()),
                    ("AWS_ROLE_SESSION_NAME", "bw".into()),
                    ("AWS_REGION", REGION.into()),
                    (
                        "AWS_ENDPOINT_URL_STS",
                        format!("http://127.0.0.1:{}", self.port),
                    ),
                ]
            }
        };
        env.extend([
            // Nothing else of the chain may answer: no profile, no instance metadata.
            ("AWS_CONFIG_FILE", "/nonexistent/aws-config".into()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/aws-credentials".into(),
            ),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]);
        env
    }
}

/// The request head and, when it announces one, its body.
async fn read_http_request(conn: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && buf.len() < 16 * 1024 {
        match conn.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0usize);
    let mut body = vec![0u8; length.min(64 * 1024)];
    let _ = conn.read_exact(&mut body).await;
    head + &String::from_utf8_lossy(&body)
}

/// One login the fake RDS saw: the token's access key, and why it was refused, if it was.
#[derive(Debug, Clone)]
struct Login {
    access_key: String,
    token: String,
    refused: Option<String>,
}

/// A fake RDS for PostgreSQL: TLS only (a plaintext startup is refused and recorded), a
/// cleartext password request, the token checked, then just enough of the simple query
/// protocol for `SELECT 1` and the pooler's own statements.
struct FakeRds {
    port: u16,
    logins: Arc<Mutex<Vec<Login>>>,
    plaintext: Arc<Mutex<usize>>,
    _task: tokio::task::JoinHandle<()>,
}

impl FakeRds {
    async fn start(pki: &TestPki, issued: Issued) -> FakeRds {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let certs = vec![CertificateDer::from_pem_slice(pki.server_cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let logins: Arc<Mutex<Vec<Login>>> = Arc::default();
        let plaintext: Arc<Mutex<usize>> = Arc::default();
        let (l, p) = (logins.clone(), plaintext.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (acceptor, issued, logins, plaintext) =
                    (acceptor.clone(), issued.clone(), l.clone(), p.clone());
                tokio::spawn(async move {
                    let first = read_startup(&mut conn).await;
                    if first.get(..4) != Some(&80_877_103u32.to_be_bytes()[..]) {
                        *plaintext.lock().unwrap() += 1;
                        return;
                    }
                    let _ = conn.write_all(b"S").await;
                    let Ok(mut tls) = acceptor.accept(conn).await else {
                        return;
                    };
                    serve_login(&mut tls, port, &issued, &logins).await;
                });
            }
        });
        FakeRds {
            port,
            logins,
            plaintext,
            _task: task,
        }
    }

    fn logins(&self) -> Vec<Login> {
        self.logins.lock().unwrap().clone()
    }
}

async fn read_startup<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut len = [0u8; 4];
    if s.read_exact(&mut len).await.is_err() {
        return Vec::new();
    }
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len.saturating_sub(4).min(10_000)];
    let _ = s.read_exact(&mut body).await;
    body
}

async fn read_message<S: AsyncRead + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let tag = s.read_u8().await.ok()?;
    let len = s.read_u32().await.ok()? as usize;
    let mut body = vec![0u8; len.checked_sub(4)?.min(1 << 20)];
    s.read_exact(&mut body).await.ok()?;
    Some((tag, body))
}

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(parts: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p.as_bytes());
        b.push(0);
    }
    b
}

async fn serve_login<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    port: u16,
    issued: &Issued,
    logins: &Mutex<Vec<Login>>,
) {
    let startup = read_startup(s).await;
    let params: Vec<String> = startup
        .get(4..)
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let user = params
        .iter()
        .position(|p| p == "user")
        .and_then(|i| params.get(i + 1))
        .cloned()
        .unwrap_or_default();
    // AuthenticationCleartextPassword.
    if s.write_all(&message(b'R', &3i32.to_be_bytes()))
        .await
        .is_err()
    {
        return;
    }
    let Some((b'p', body)) = read_message(s).await else {
        return;
    };
    let token = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body)).into_owned();
    let (access_key, refused) = match check_token(&token, port, &user, issued) {
        Ok(key) => (key, None),
        Err((key, why)) => (key, Some(why)),
    };
    logins.lock().unwrap().push(Login {
        access_key,
        token,
        refused: refused.clone(),
    });
    if let Some(why) = refused {
        let fields = cstr(&[
            "SFATAL",
            "C28P01",
            &format!("MPAM authentication failed: {why}"),
            "",
        ]);
        let _ = s.write_all(&message(b'E', &fields)).await;
        return;
    }
    let mut out = message(b'R', &0i32.to_be_bytes());
    for (k, v) in [
        ("server_version", "16.4"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        out.extend(message(b'S', &cstr(&[k, v])));
    }
    out.extend(message(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
    out.extend(message(b'Z', b"I"));
    if s.write_all(&out).await.is_err() {
        return;
    }
    while let Some((tag, body)) = read_message(s).await {
        let mut out = Vec::new();
        match tag {
            b'Q' => {
                let sql = String::from_utf8_lossy(&body).to_ascii_uppercase();
                if sql.starts_with("SELECT") {
                    let mut row_desc = 1i16.to_be_bytes().to_vec();
                    row_desc.extend(cstr(&["x"]));
                    row_desc.extend_from_slice(&0i32.to_be_bytes());
                    row_desc.extend_from_slice(&0i16.to_be_bytes());
                    row_desc.extend_from_slice(&25i32.to_be_bytes());
                    row_desc.extend_from_slice(&(-1i16).to_be_bytes());
                    row_desc.extend_from_slice(&(-1i32).to_be_bytes());
                    row_desc.extend_from_slice(&0i16.to_be_bytes());
                    out.extend(message(b'T', &row_desc));
                    let mut row = 1i16.to_be_bytes().to_vec();
                    row.extend_from_slice(&1i32.to_be_bytes());
                    row.push(b'1');
                    out.extend(message(b'D', &row));
                    out.extend(message(b'C', &cstr(&["SELECT 1"])));
                } else {
                    out.extend(message(b'C', &cstr(&["SET"])));
                }
                out.extend(message(b'Z', b"I"));
            }
            b'S' => out.extend(message(b'Z', b"I")),
            _ => return,
        }
        if s.write_all(&out).await.is_err() {
            return;
        }
    }
}

/// What RDS checks: the token is for this host, port and user, signed now-ish (not expired),
/// with credentials that were handed out, and its signature is theirs. Returns the access key.
fn check_token(
    token: &str,
    port: u16,
    user: &str,
    issued: &Issued,
) -> Result<String, (String, String)> {
    let param = |name: &str| {
        token
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let credential = param("X-Amz-Credential");
    let access_key = credential
        .split("%2F")
        .next()
        .unwrap_or_default()
        .to_owned();
    let fail = |why: String| Err((access_key.clone(), why));
    if !token.starts_with(&format!("localhost:{port}/?")) {
        return fail(format!(
            "token for another endpoint: {}",
            &token[..token.len().min(40)]
        ));
    }
    if param("DBUser") != user || param("Action") != "connect" {
        return fail("token for another user or action".into());
    }
    let date = param("X-Amz-Date");
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &date[0..4],
        &date[4..6],
        &date[6..8],
        &date[9..11],
        &date[11..13],
        &date[13..15]
    );
    let Ok(signed_at) = humantime::parse_rfc3339(&rfc3339) else {
        return fail(format!("bad X-Amz-Date {date}"));
    };
    let now = SystemTime::now();
    if signed_at > now + Duration::from_secs(5) {
        return fail("signed in the future".into());
    }
    let expires = Duration::from_secs(param("X-Amz-Expires").parse().unwrap_or(0));
    if expires != Duration::from_secs(900) || signed_at + expires < now {
        return fail(format!("expired or wrong lifetime ({expires:?})"));
    }
    let Some(creds) = issued.lock().unwrap().get(&access_key).cloned() else {
        return fail(format!("unknown access key {access_key}"));
    };
    let expected =
        upstream::rds_iam::rds_token("localhost", port, user, REGION, &creds, signed_at).unwrap();
    if expected != token {
        return fail("signature does not match".into());
    }
    Ok(access_key)
}

struct TestPki {
    ca: String,
    server_cert: String,
    server_key: String,
}

fn test_pki() -> TestPki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "Fake RDS CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    TestPki {
        ca: ca_cert.pem(),
        server_cert: cert.pem(),
        server_key: key.serialize_pem(),
    }
}

struct Setup {
    pooler: Pooler,
    rds: FakeRds,
    creds: CredentialsEndpoint,
    metrics: u16,
    _files: tempfile::TempDir,
}

async fn setup(valid_for: Duration, fail: bool, pooler_extra: &str) -> Setup {
    setup_with(
        CredentialsEndpoint::start(valid_for, fail).await,
        pooler_extra,
    )
    .await
}

async fn setup_with(creds: CredentialsEndpoint, pooler_extra: &str) -> Setup {
    let pki = test_pki();
    let rds = FakeRds::start(&pki, creds.issued.clone()).await;
    let (port, metrics) = (free_port(), free_port());
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_type = \"trust\"\nquery_wait_timeout = \"3s\"\n\
         server_tls_sslmode = \"verify-full\"\nserver_tls_ca_file = \"ca.pem\"\n{pooler_extra}\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
         [databases.app]\nhost = \"localhost\"\nport = {}\nuser = \"{DB_USER}\"\n\
         server_auth = \"rds_iam\"\nrds_iam_region = \"{REGION}\"\n",
        rds.port
    );
    let files = tempfile::tempdir().unwrap();
    let env = creds.env(files.path());
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Debug logging everywhere (the AWS crates' too): the token must still not show.
    env.push(("RUST_LOG", "debug"));
    let pooler = Pooler::start_with(
        BIN,
        port,
        &["--config", "pooler.toml"],
        &env,
        &[("pooler.toml", &config), ("ca.pem", &pki.ca)],
    )
    .expect("start breakwater");
    Setup {
        pooler,
        rds,
        creds,
        metrics,
        _files: files,
    }
}

async fn metric(port: u16, prefix: &str) -> f64 {
    let prefix = prefix.to_owned();
    let body = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .unwrap();
    series(&body, &prefix).unwrap_or(0.0)
}

#[tokio::test]
async fn an_rds_iam_login_sends_a_valid_token_over_verified_tls_and_never_logs_it() {
    let s = setup(Duration::from_secs(3600), false, "").await;
    let client = s.pooler.connect("app", "", "app").await.expect("connect");
    let rows = client.simple_query("SELECT 1").await.expect("SELECT 1");
    assert_eq!(first_value(rows).as_deref(), Some("1"));

    let logins = s.rds.logins();
    assert!(!logins.is_empty());
    for l in &logins {
        assert_eq!(l.refused, None, "the fake RDS refused a token");
    }
    assert_eq!(
        *s.rds.plaintext.lock().unwrap(),
        0,
        "a login came in the clear"
    );
    let calls = s.creds.calls.lock().unwrap().clone();
    assert_eq!(calls, vec![true], "one authorized credentials fetch");

    let log = s.pooler.log();
    for l in &logins {
        let signature = l.token.rsplit_once("X-Amz-Signature=").unwrap().1;
        assert!(
            !log.contains(signature),
            "the token's signature is in the log"
        );
    }
    assert!(!log.contains("X-Amz-Signature"), "a token is in the log");
    assert!(
        !log.contains("secret/1+key"),
        "the secret key is in the log"
    );
    testkit::wait_until("the token to be counted", WAIT, || async {
        metric(s.metrics, "breakwater_host_rds_iam_tokens_total{").await >= 1.0
    })
    .await
    .unwrap();
}

/// Credentials that expire 75 s after they are handed out are used for 15 s (the last minute
/// is not) and refreshed in the background 10 s after each fetch (they are always within the
/// 5-minute margin); with server_lifetime short, new server logins keep coming. Every one gets
/// a token RDS accepts, tokens follow the new credentials, and no client query fails.
#[tokio::test]
async fn tokens_follow_rotating_credentials_without_failing_a_client() {
    let s = setup(
        Duration::from_secs(75),
        false,
        "server_lifetime = \"100ms\"\nserver_reset_query = \"\"\n",
    )
    .await;
    let client = s.pooler.connect("app", "", "app").await.expect("connect");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let keys =
        || -> BTreeSet<String> { s.rds.logins().into_iter().map(|l| l.access_key).collect() };
    let mut queries = 0;
    while keys().len() < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "tokens used only {:?} after {queries} queries",
            keys()
        );
        let rows = client
            .simple_query("SELECT 1")
            .await
            .expect("a query failed");
        assert_eq!(first_value(rows).as_deref(), Some("1"));
        queries += 1;
    }
    let refused: Vec<_> = s
        .rds
        .logins()
        .into_iter()
        .filter_map(|l| l.refused)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}

/// A credentials endpoint that fails: the client's wait ends with the cause (not only a
/// timeout), the failure is counted, and RDS never saw a login.
#[tokio::test]
async fn without_credentials_the_client_is_told_why_and_rds_sees_nothing() {
    let s = setup(Duration::from_secs(3600), true, "").await;
    let err = match s.pooler.connect("app", "", "app").await {
        Ok(c) => c
            .simple_query("SELECT 1")
            .await
            .expect_err("served without a token"),
        Err(e) => e,
    };
    let msg = err
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| err.to_string());
    assert!(msg.contains("RDS IAM authentication"), "{msg}");
    assert!(s.rds.logins().is_empty());
    // The exporter publishes host counters on its tick.
    testkit::wait_until("the failure to be counted", WAIT, || async {
        metric(s.metrics, "breakwater_host_rds_iam_failures_total{").await >= 1.0
    })
    .await
    .unwrap();
}

/// Web identity (IRSA on EKS): the chain trades the token file for credentials at STS
/// (AssumeRoleWithWebIdentity, here a fake reached through AWS_ENDPOINT_URL_STS) and the
/// token signed with them is one RDS accepts.
#[tokio::test]
async fn web_identity_credentials_from_sts_sign_tokens_rds_accepts() {
    let sts = CredentialsEndpoint::start_as(Style::Sts, Duration::from_secs(3600), false).await;
    let s = setup_with(sts, "").await;
    let client = s.pooler.connect("app", "", "app").await.expect("connect");
    let rows = client.simple_query("SELECT 1").await.expect("SELECT 1");
    assert_eq!(first_value(rows).as_deref(), Some("1"));
    let logins = s.rds.logins();
    assert!(!logins.is_empty());
    assert!(logins.iter().all(|l| l.refused.is_none()), "{logins:?}");
    assert_eq!(s.creds.calls.lock().unwrap().clone(), vec![true]);
}

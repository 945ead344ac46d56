//! Opening a server connection: resolve (through the DNS cache) → TCP or Unix connect with
//! socket options → TLS → startup and authentication until the first ReadyForQuery, each phase
//! bounded by its own setting, after the host's storm controls admit the attempt. It never
//! decides which host to try (that is `failover`) nor keeps a connection (that is `pool`).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use proto::auth::{md5_hash_response, md5_password_response, ScramClient, ServerCredential};
use proto::backend::{self, AuthRequest};
use proto::error::parse_error_fields;
use proto::{frame, frontend, startup, FrameError};

use crate::conn::{ServerAddr, ServerConn};
use crate::dns::{DnsCache, DnsError};
use crate::error::ConnectError;
use crate::host::{DrillMode, Host};
use crate::rds_iam::ServerAuth;
use crate::require_auth::AuthMethod;
use crate::settings::{ServerSettings, ServerTarget};
use crate::stream::Stream;

/// What a `slow` failure drill adds to each connect.
const SLOW_DRILL_DELAY: Duration = Duration::from_secs(1);

impl ServerConn {
    /// Connects and logs in, each phase bounded by its own setting, after the host's storm
    /// controls admit the attempt. The outcome feeds the host's back-off and breaker.
    pub async fn connect(
        target: &ServerTarget,
        settings: &ServerSettings,
        host: &Host,
    ) -> Result<ServerConn, ConnectError> {
        let attempt = host.admit().await?;
        Self::connect_admitted(attempt, target, settings, host).await
    }

    /// Connects and logs in with an attempt the host's storm controls already admitted.
    pub(crate) async fn connect_admitted(
        attempt: crate::host::Attempt<'_>,
        target: &ServerTarget,
        settings: &ServerSettings,
        host: &Host,
    ) -> Result<ServerConn, ConnectError> {
        let result = match host.drill() {
            None => Self::connect_phases(target, settings, host).await,
            Some(DrillMode::Refuse) => Err(ConnectError::Connect {
                addr: host.name.clone(),
                source: io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    "refused by a failure drill (DRILL)",
                ),
            }),
            Some(DrillMode::Blackhole) => {
                let t = settings.connect_timeout.unwrap_or(Duration::from_secs(5));
                crate::timer::sleep(t).await;
                Err(ConnectError::ConnectTimeout {
                    addr: format!("{} (blackholed by a failure drill)", host.name),
                    timeout: t,
                })
            }
            Some(DrillMode::Slow) => {
                crate::timer::sleep(SLOW_DRILL_DELAY).await;
                Self::connect_phases(target, settings, host).await
            }
        };
        match &result {
            Ok(_) => attempt.succeeded(),
            Err(e) => {
                if let Some((phase, timed_out)) = e.phase() {
                    host.stats.failed(phase, timed_out);
                }
                if matches!(e, ConnectError::AuthNotAllowed { .. }) {
                    stats::GlobalStats::bump(&host.stats.auth_refused);
                }
                if e.server_is_busy() {
                    attempt.server_busy(e);
                } else {
                    attempt.failed(e);
                }
            }
        }
        result
    }

    async fn connect_phases(
        target: &ServerTarget,
        settings: &ServerSettings,
        host: &Host,
    ) -> Result<ServerConn, ConnectError> {
        let dns = host.dns.as_deref();
        // The password is a token signed now, before any socket is opened: a login without
        // credentials costs the server nothing.
        let with_token;
        let target = match &target.server_auth {
            ServerAuth::Password => target,
            ServerAuth::RdsIam { region } => {
                with_token = with_rds_iam_token(target, region, settings, host).await?;
                &with_token
            }
        };
        let (addrs, cached) = resolve(target, settings.dns_timeout, dns).await?;
        let err = match connect_first(&addrs, target, settings).await {
            Ok((stream, addr)) => return login_allowing_tls(stream, addr, target, settings).await,
            Err(e) => e,
        };
        // A connect to a cached address failed: the name may point elsewhere by now.
        if let (Some(dns), Some(old)) = (dns, cached) {
            if let Ok(fresh) = dns.re_resolve(&target.host, settings.dns_timeout).await {
                if fresh.addrs != old {
                    tracing::info!(host = %target.host, old = ?old, new = ?fresh.addrs,
                        "connect to a cached address failed and DNS now answers differently; retrying");
                    let addrs = tcp_addrs(&fresh.addrs, target.port);
                    let (stream, addr) = connect_first(&addrs, target, settings).await?;
                    return login_allowing_tls(stream, addr, target, settings).await;
                }
            }
        }
        Err(err)
    }
}

/// `target` with an RDS IAM token as its password, waiting for AWS credentials at most
/// server_login_timeout.
async fn with_rds_iam_token(
    target: &ServerTarget,
    region: &str,
    settings: &ServerSettings,
    host: &Host,
) -> Result<ServerTarget, ConnectError> {
    let token = crate::RdsIam::global()
        .token(
            &target.host,
            target.port,
            &target.user,
            region,
            settings.login_timeout,
        )
        .await;
    match token {
        Ok(token) => {
            if token.refreshed {
                stats::GlobalStats::bump(&host.stats.rds_iam_tokens);
            }
            let mut target = target.clone();
            target.credential = Some(token.credential);
            Ok(target)
        }
        Err(source) => {
            stats::GlobalStats::bump(&host.stats.rds_iam_failures);
            Err(ConnectError::RdsIamToken {
                host: host.name.clone(),
                user: target.user.clone(),
                source,
            })
        }
    }
}

/// Logs in; under sslmode=allow, as libpq, a server that refuses a login in the clear (pg_hba
/// `hostssl`) gets a second attempt with TLS.
async fn login_allowing_tls(
    stream: Stream,
    addr: ServerAddr,
    target: &ServerTarget,
    settings: &ServerSettings,
) -> Result<ServerConn, ConnectError> {
    match login(stream, addr.clone(), target, settings).await {
        Err(ConnectError::Refused { .. })
            if settings.tls.mode == crate::tls::SslMode::Allow
                && matches!(addr, ServerAddr::Tcp(_)) =>
        {
            let stream = connect_one(&addr, target, settings, true).await?;
            login(stream, addr, target, settings).await
        }
        other => other,
    }
}

/// The addresses to try, and the IPs when they came from the DNS cache rather than a fresh
/// answer (so a failed connect is worth a re-lookup).
async fn resolve(
    target: &ServerTarget,
    timeout: Option<Duration>,
    dns: Option<&DnsCache>,
) -> Result<(Vec<ServerAddr>, Option<Vec<std::net::IpAddr>>), ConnectError> {
    if target.host.starts_with('/') {
        let path = std::path::Path::new(&target.host).join(format!(".s.PGSQL.{}", target.port));
        return Ok((vec![ServerAddr::Unix(path)], None));
    }
    if let Ok(ip) = target.host.parse::<std::net::IpAddr>() {
        return Ok((
            vec![ServerAddr::Tcp(SocketAddr::new(ip, target.port))],
            None,
        ));
    }
    if let Some(dns) = dns {
        let resolved = dns
            .resolve(&target.host, timeout)
            .await
            .map_err(|e| match e {
                DnsError::Timeout { host, timeout } => ConnectError::DnsTimeout { host, timeout },
                other => ConnectError::Dns {
                    host: target.host.clone(),
                    source: io::Error::other(other.to_string()),
                },
            })?;
        let addrs = tcp_addrs(&resolved.addrs, target.port);
        return Ok((addrs, resolved.cached.then_some(resolved.addrs)));
    }
    let lookup = tokio::net::lookup_host((target.host.as_str(), target.port));
    let result = match timeout {
        Some(t) => {
            crate::timer::timeout(t, lookup)
                .await
                .map_err(|_| ConnectError::DnsTimeout {
                    host: target.host.clone(),
                    timeout: t,
                })?
        }
        None => lookup.await,
    };
    let addrs = result.map_err(|source| ConnectError::Dns {
        host: target.host.clone(),
        source,
    })?;
    Ok((addrs.map(ServerAddr::Tcp).collect(), None))
}

fn tcp_addrs(ips: &[std::net::IpAddr], port: u16) -> Vec<ServerAddr> {
    ips.iter()
        .map(|ip| ServerAddr::Tcp(SocketAddr::new(*ip, port)))
        .collect()
}

/// Connects to the first address that answers; the last error if none does.
async fn connect_first(
    addrs: &[ServerAddr],
    target: &ServerTarget,
    settings: &ServerSettings,
) -> Result<(Stream, ServerAddr), ConnectError> {
    let mut last_err = None;
    for addr in addrs {
        match connect_one(addr, target, settings, settings.tls.asks_first()).await {
            Ok(stream) => return Ok((stream, addr.clone())),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| ConnectError::Dns {
        host: target.host.clone(),
        source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
    }))
}

/// TCP (or Unix) connect, socket options, then TLS when `tls` says so. Each of the connect and
/// the TLS negotiation is bounded by server_connect_timeout.
async fn connect_one(
    addr: &ServerAddr,
    target: &ServerTarget,
    settings: &ServerSettings,
    tls: bool,
) -> Result<Stream, ConnectError> {
    let connecting = addr.connect();
    let stream = match settings.connect_timeout {
        Some(t) => crate::timer::timeout(t, connecting).await.map_err(|_| {
            ConnectError::ConnectTimeout {
                addr: addr.to_string(),
                timeout: t,
            }
        })?,
        None => connecting.await,
    }
    .map_err(|source| ConnectError::Connect {
        addr: addr.to_string(),
        source,
    })?;
    if let Stream::Tcp(tcp) = &stream {
        let _ = tcp.set_nodelay(true);
        settings.liveness.apply(tcp);
    }
    if !tls {
        return Ok(stream);
    }
    let negotiation = settings.tls.start(stream, &target.host);
    match crate::tls::bounded(settings.connect_timeout, negotiation).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(ConnectError::Tls {
            host: target.host.clone(),
            addr: addr.to_string(),
            source,
        }),
        Err(timeout) => Err(ConnectError::TlsTimeout {
            host: target.host.clone(),
            addr: addr.to_string(),
            timeout,
        }),
    }
}

async fn login(
    stream: Stream,
    addr: ServerAddr,
    target: &ServerTarget,
    settings: &ServerSettings,
) -> Result<ServerConn, ConnectError> {
    // Could someone other than the server be asking for the password? Not over a Unix
    // socket, nor under TLS whose certificate was checked against a CA.
    let verified = match &stream {
        Stream::Unix(_) => true,
        Stream::TlsToServer(_) => matches!(
            settings.tls.mode,
            crate::tls::SslMode::VerifyCa | crate::tls::SslMode::VerifyFull
        ),
        Stream::Tcp(_) | Stream::TlsFromClient(_) | Stream::Detached(_) => false,
    };
    // An RDS IAM token is a password for 15 minutes: never to a server whose certificate was
    // not checked, whatever server_require_auth says (config load refuses such a setup too).
    if target.server_auth != ServerAuth::Password && !verified {
        return Err(ConnectError::Auth {
            addr: addr.to_string(),
            user: target.user.clone(),
            reason: "server_auth = \"rds_iam\" sends its token only over TLS whose certificate was verified (server_tls_sslmode = verify-ca or verify-full), and this connection's was not".into(),
        });
    }
    let mut conn = ServerConn::new(stream, addr, settings.max_message);
    let addr_s = conn.addr().to_string();
    let work = run_login(&mut conn, target, verified);
    match settings.login_timeout {
        Some(t) => {
            crate::timer::timeout(t, work)
                .await
                .map_err(|_| ConnectError::LoginTimeout {
                    addr: addr_s,
                    timeout: t,
                })??
        }
        None => work.await?,
    }
    Ok(conn)
}

async fn run_login(
    conn: &mut ServerConn,
    target: &ServerTarget,
    verified: bool,
) -> Result<(), ConnectError> {
    let max_message = conn.max_message();
    let addr = conn.addr().to_string();
    let io_err = |source| ConnectError::Io {
        addr: addr.clone(),
        source,
    };
    let proto_err = |source| ConnectError::Protocol {
        addr: addr.clone(),
        source,
    };
    let auth_err = |reason: &str| ConnectError::Auth {
        addr: addr.clone(),
        user: target.user.clone(),
        reason: reason.to_owned(),
    };

    let mut out = BytesMut::with_capacity(256);
    let mut params = vec![("user", target.user.as_str()), ("database", &target.dbname)];
    params.extend(
        target
            .startup_params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str())),
    );
    startup::write_startup(&mut out, &params);
    conn.write_all(&out).await.map_err(io_err)?;
    // Checked before anything is sent in answer: a refused method costs the server nothing.
    let allowed = |method: AuthMethod| {
        target
            .require_auth
            .check(method, verified)
            .map_err(|why| ConnectError::AuthNotAllowed {
                addr: addr.clone(),
                method,
                policy: target.require_auth.clone(),
                why,
            })
    };
    let mut scram: Option<ScramClient> = None;
    let mut asked = false;
    let mut scram_verified = false;
    loop {
        let msg = loop {
            match frame::take_message(conn.buf_mut(), max_message).map_err(proto_err)? {
                Some(m) => break m,
                None => {
                    conn.read().await.map_err(io_err)?;
                }
            }
        };
        out.clear();
        match msg.tag {
            backend::AUTHENTICATION => {
                let request = backend::parse_auth(&msg.body).map_err(proto_err)?;
                let method = match &request {
                    AuthRequest::Ok if !asked => Some(AuthMethod::None),
                    AuthRequest::Cleartext => Some(AuthMethod::Password),
                    AuthRequest::Md5 { .. } => Some(AuthMethod::Md5),
                    AuthRequest::Sasl { .. } => Some(AuthMethod::ScramSha256),
                    _ => None,
                };
                if let Some(method) = method {
                    allowed(method)?;
                    asked = true;
                }
                match request {
                    // A server that began SCRAM must prove it knows the password (its
                    // signature, in SASLFinal) before it may say Ok; PostgreSQL always does.
                    AuthRequest::Ok if scram.is_some() && !scram_verified => {
                        return Err(auth_err("server ended SCRAM without proving it knows the password (no server signature)"));
                    }
                    AuthRequest::Ok => continue,
                    AuthRequest::Cleartext => match &target.credential {
                        Some(ServerCredential::Password(p)) => {
                            frontend::write_password(&mut out, p.as_bytes())
                        }
                        _ => return Err(auth_err("server asks for a cleartext password and none is configured")),
                    },
                    AuthRequest::Md5 { salt } => match &target.credential {
                        Some(ServerCredential::Password(p)) => {
                            let resp = md5_password_response(&target.user, p, salt);
                            frontend::write_password(&mut out, &resp);
                        }
                        Some(ServerCredential::Md5Hash(hash)) => {
                            frontend::write_password(&mut out, &md5_hash_response(hash, salt));
                        }
                        _ => return Err(auth_err("server asks for an md5 password and no plaintext password is configured")),
                    },
                    AuthRequest::Sasl { mechanisms } => {
                        if !mechanisms.iter().any(|m| m == "SCRAM-SHA-256") {
                            return Err(auth_err("server offers no SASL mechanism Breakwater supports"));
                        }
                        let cred = match &target.credential {
                            None => return Err(auth_err("server asks for SCRAM and no password is configured")),
                            Some(ServerCredential::Md5Hash(_)) => return Err(auth_err("server asks for SCRAM and only an md5 hash of the password is known (auth_query returned md5)")),
                            Some(cred) => cred,
                        };
                        let client = ScramClient::new(cred);
                        frontend::write_sasl_initial_response(&mut out, "SCRAM-SHA-256", &client.client_first());
                        scram = Some(client);
                    }
                    AuthRequest::SaslContinue(data) => {
                        let Some(client) = scram.as_mut() else {
                            return Err(auth_err("SASL continue without SASL start"));
                        };
                        let reply = client
                            .server_first(&data)
                            .map_err(|e| auth_err(&format!("SCRAM: {e}")))?;
                        frontend::write_sasl_response(&mut out, &reply);
                    }
                    AuthRequest::SaslFinal(data) => {
                        let Some(client) = scram.as_mut() else {
                            return Err(auth_err("SASL final without SASL start"));
                        };
                        client
                            .server_final(&data)
                            .map_err(|e| auth_err(&format!("SCRAM: {e}")))?;
                        scram_verified = true;
                        continue;
                    }
                    AuthRequest::Unsupported(code) => {
                        return Err(auth_err(&format!("unsupported authentication method {code}")))
                    }
                }
                conn.write_all(&out).await.map_err(io_err)?;
            }
            backend::PARAMETER_STATUS => {
                let (k, v) = backend::parse_parameter_status(&msg.body).map_err(proto_err)?;
                let (k, v) = (k.to_owned(), v.to_owned());
                conn.set_param(&k, &v);
            }
            backend::BACKEND_KEY_DATA => {
                let (pid, key) = backend::parse_backend_key_data(&msg.body).map_err(proto_err)?;
                conn.set_backend_key(pid, key);
            }
            backend::ERROR_RESPONSE => {
                let fields = parse_error_fields(&msg.body).map_err(proto_err)?;
                return Err(ConnectError::Refused { addr, fields });
            }
            backend::NOTICE_RESPONSE => {}
            backend::READY_FOR_QUERY => return Ok(()),
            _ => {
                return Err(proto_err(FrameError::Malformed {
                    what: "unexpected message during login",
                }))
            }
        }
    }
}

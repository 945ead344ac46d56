//! `server_auth = "rds_iam"`: the server password is an RDS IAM authentication token, a SigV4
//! presigned URL `host:port/?Action=connect&DBUser=user&X-Amz-…` for the service `rds-db`, valid
//! for 15 minutes. Signing is aws-sigv4's (never our own), with credentials from the standard
//! AWS chain (environment, profile, web identity / IRSA, ECS container credentials, IMDSv2) as
//! aws-config builds it.
//!
//! Signing costs microseconds; fetching credentials is the slow, fallible part (an HTTP call to
//! STS, ECS or IMDS). So credentials are cached and fetched by one task at a time, in the
//! background when they are about to expire, while a token per (host, port, user, region) is
//! re-signed after [`REFRESH_AFTER`] — well before its 15 minutes — or as soon as the credentials
//! it was signed with change or near their own expiry. A login waits for credentials only when
//! none usable are cached, and then at most as long as its caller allows (the login timeout);
//! credentials whose refresh failed are used until a minute before they expire.
//!
//! A token is a password: it is never logged, and nothing here derives `Debug` over one.
//! Tokens travel only as [`ServerCredential::Password`], whose `Debug` is redacted, and only over
//! TLS whose certificate was verified (checked at config load and again at login).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    sign, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
};
use aws_sigv4::sign::v4;
use proto::auth::ServerCredential;
use tokio::sync::watch;

/// The service name RDS IAM tokens are signed for.
pub const SERVICE: &str = "rds-db";
/// How long RDS accepts a token after it was signed (`X-Amz-Expires`).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// A token older than this is signed again before use: a third of its life is left for the
/// logins that already hold it.
pub const REFRESH_AFTER: Duration = Duration::from_secs(600);
/// Credentials closer than this to their expiry are refreshed in the background (still used
/// meanwhile); aws-config's own caches use the same margin.
const CREDENTIALS_REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Credentials closer than this to their expiry are not used at all: a token signed with them
/// would die with them.
const CREDENTIALS_MIN_LEFT: Duration = Duration::from_secs(60);
/// Credentials without an expiry (static keys in the environment or a profile) are read again
/// this often, so a rotated key is picked up.
const STATIC_CREDENTIALS_MAX_AGE: Duration = Duration::from_secs(600);
/// Background refreshes of credentials that stay near their expiry (a chain that keeps
/// handing out the same ones) are at least this far apart; a login that finds none usable
/// still fetches at once.
const BACKGROUND_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// One fetch from the chain may take this long (the providers have their own, shorter,
/// timeouts for each call; this bounds a misbehaving chain as a whole).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// `server_auth`, as configured: where the server password comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServerAuthKind {
    /// The configured password (or the auth_file's, or the client's own keys).
    #[default]
    Password,
    /// An RDS IAM token.
    RdsIam,
}

impl ServerAuthKind {
    pub const ALL: [ServerAuthKind; 2] = [ServerAuthKind::Password, ServerAuthKind::RdsIam];

    pub fn as_str(self) -> &'static str {
        match self {
            ServerAuthKind::Password => "password",
            ServerAuthKind::RdsIam => "rds_iam",
        }
    }
}

/// How a pool logs in to its server, resolved: an RDS IAM token carries its region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ServerAuth {
    #[default]
    Password,
    RdsIam {
        region: String,
    },
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("no AWS credentials: {0}")]
    Credentials(String),
    #[error("no AWS credentials within {0:?} (the credential chain is still being asked)")]
    Timeout(Duration),
    #[error("signing the RDS IAM token failed: {0}")]
    Signing(String),
}

/// Presigns `GET url` with SigV4 in the query string: what aws-sigv4 calls signing with
/// `SignatureLocation::QueryParams`. Returns the signed URL. `url` must already be encoded.
pub fn presign(
    url: &str,
    region: &str,
    service: &str,
    credentials: &Credentials,
    time: SystemTime,
    expires_in: Duration,
) -> Result<String, TokenError> {
    let signing = |e: &dyn fmt::Display| TokenError::Signing(e.to_string());
    let identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(expires_in);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| signing(&e))?
        .into();
    let request = SignableRequest::new("GET", url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| signing(&e))?;
    let (instructions, _signature) = sign(request, &params)
        .map_err(|e| signing(&e))?
        .into_parts();
    let mut http_request = http::Request::builder()
        .uri(url)
        .body(())
        .map_err(|e| signing(&e))?;
    instructions.apply_to_request_http1x(&mut http_request);
    Ok(http_request.uri().to_string())
}

/// The RDS IAM token for logging in to `host:port` as `user`: the presigned URL without its
/// scheme, as the AWS SDKs' `generate_db_auth_token` makes it.
pub fn rds_token(
    host: &str,
    port: u16,
    user: &str,
    region: &str,
    credentials: &Credentials,
    time: SystemTime,
) -> Result<String, TokenError> {
    let user = percent_encoding::utf8_percent_encode(user, UNRESERVED);
    let url = format!("https://{host}:{port}/?Action=connect&DBUser={user}");
    let signed = presign(&url, region, SERVICE, credentials, time, TOKEN_LIFETIME)?;
    Ok(signed
        .strip_prefix("https://")
        .map(str::to_owned)
        .unwrap_or(signed))
}

/// SigV4's unreserved characters; everything else in a query value is percent-encoded.
const UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Whose token: one per server host, port, user and region.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    host: String,
    port: u16,
    user: String,
    region: String,
}

/// A signed token and what it was signed with. No `Debug`: it holds the token.
struct Signed {
    token: String,
    signed_at: SystemTime,
    /// The access key of the credentials that signed it: new credentials re-sign.
    access_key: String,
}

/// The cached credentials, and the state of the fetch. No `Debug` derive: it holds secrets.
#[derive(Default)]
struct CredentialState {
    /// The credentials and when they were fetched.
    current: Option<(Credentials, SystemTime)>,
    /// Fetches that ended (success or failure), sent to waiters through `RdsIam::fetched`.
    generation: u64,
    last_error: Option<String>,
    /// When the last fetch ended: background refreshes are spaced out from it.
    last_fetch: Option<SystemTime>,
}

/// A token, and whether it was signed for this call (a refresh, for the host's counters).
pub struct Token {
    pub credential: ServerCredential,
    pub refreshed: bool,
}

/// What RDS IAM logins share in one process: the credential chain, the cached credentials and
/// the tokens signed with them.
pub struct RdsIam {
    /// The chain, made on first use (it reads the environment and profile files).
    provider: tokio::sync::OnceCell<SharedCredentialsProvider>,
    /// Set for tests: a provider of their own instead of the chain.
    fixed_provider: Option<SharedCredentialsProvider>,
    clock: fn() -> SystemTime,
    refresh_after: Duration,
    credentials: Mutex<CredentialState>,
    fetching: AtomicBool,
    fetched: watch::Sender<u64>,
    tokens: Mutex<HashMap<TokenKey, Signed>>,
}

impl fmt::Debug for RdsIam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdsIam")
            .field("refresh_after", &self.refresh_after)
            .finish_non_exhaustive()
    }
}

impl RdsIam {
    /// The process's one: credentials from the standard AWS chain.
    pub fn global() -> Arc<RdsIam> {
        static GLOBAL: OnceLock<Arc<RdsIam>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Arc::new(RdsIam::with_chain(None, SystemTime::now, REFRESH_AFTER)))
            .clone()
    }

    /// With `provider` instead of the chain (tests), a clock, and a token refresh age.
    pub fn with_provider(
        provider: impl ProvideCredentials + 'static,
        clock: fn() -> SystemTime,
        refresh_after: Duration,
    ) -> RdsIam {
        RdsIam::with_chain(
            Some(SharedCredentialsProvider::new(provider)),
            clock,
            refresh_after,
        )
    }

    fn with_chain(
        fixed_provider: Option<SharedCredentialsProvider>,
        clock: fn() -> SystemTime,
        refresh_after: Duration,
    ) -> RdsIam {
        RdsIam {
            provider: tokio::sync::OnceCell::new(),
            fixed_provider,
            clock,
            refresh_after,
            credentials: Mutex::new(CredentialState::default()),
            fetching: AtomicBool::new(false),
            fetched: watch::channel(0).0,
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// A token for logging in to `host:port` as `user`, waiting at most `wait` for credentials
    /// when none usable are cached.
    pub async fn token(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        user: &str,
        region: &str,
        wait: Option<Duration>,
    ) -> Result<Token, TokenError> {
        let key = TokenKey {
            host: host.to_owned(),
            port,
            user: user.to_owned(),
            region: region.to_owned(),
        };
        let now = (self.clock)();
        if let Some(token) = self.cached_token(&key, now) {
            return Ok(Token {
                credential: ServerCredential::Password(token),
                refreshed: false,
            });
        }
        // Credentials that failed to refresh are still used while they last (a minute short
        // of their expiry), so an endpoint that hiccups costs nothing until then.
        let credentials = self.credentials(wait).await?;
        let now = (self.clock)();
        let token = rds_token(host, port, user, region, &credentials, now)?;
        tracing::debug!(host, port, user, region, "signed a new RDS IAM token");
        lock(&self.tokens).insert(
            key,
            Signed {
                token: token.clone(),
                signed_at: now,
                access_key: credentials.access_key_id().to_owned(),
            },
        );
        Ok(Token {
            credential: ServerCredential::Password(token),
            refreshed: true,
        })
    }

    /// The cached token if it is young enough and was signed with the current credentials.
    /// Credentials near their expiry are refreshed in the background from here, so that the
    /// token signed after them finds new ones waiting.
    fn cached_token(self: &Arc<Self>, key: &TokenKey, now: SystemTime) -> Option<String> {
        let (access_key, stale) = {
            let state = lock(&self.credentials);
            let (c, at) = state.current.as_ref()?;
            let (usable, stale) = freshness(c, *at, now);
            (usable.then(|| c.access_key_id().to_owned()), stale)
        };
        if stale {
            self.refresh_in_background(now);
        }
        let access_key = access_key?;
        let tokens = lock(&self.tokens);
        let signed = tokens.get(key)?;
        let young = age(signed.signed_at, now) < self.refresh_after;
        (young && signed.access_key == access_key).then(|| signed.token.clone())
    }

    /// Usable credentials: the cached ones (a background refresh starts when they near
    /// expiry), else the outcome of a fetch, waited for at most `wait`.
    async fn credentials(
        self: &Arc<Self>,
        wait: Option<Duration>,
    ) -> Result<Credentials, TokenError> {
        let mut fetched = self.fetched.subscribe();
        let waiting = async {
            let mut fetch_ended = false;
            loop {
                let stale = {
                    let state = lock(&self.credentials);
                    match &state.current {
                        Some((c, at)) => match freshness(c, *at, (self.clock)()) {
                            (true, stale) => Some((c.clone(), stale)),
                            (false, _) => None,
                        },
                        None => None,
                    }
                    .map(Ok)
                    .or_else(|| {
                        // A fetch ended since this call began and left nothing usable.
                        fetch_ended.then(|| {
                            Err(TokenError::Credentials(
                                state.last_error.clone().unwrap_or_else(|| {
                                    "the chain returned expired credentials".into()
                                }),
                            ))
                        })
                    })
                };
                match stale {
                    Some(Ok((c, stale))) => {
                        if stale {
                            self.refresh_in_background((self.clock)());
                        }
                        return Ok(c);
                    }
                    Some(Err(e)) => return Err(e),
                    None => {}
                }
                self.start_fetch();
                // The sender lives as long as `self`: this never fails while we wait.
                if fetched.changed().await.is_err() {
                    return Err(TokenError::Credentials(
                        "the credential cache is gone".into(),
                    ));
                }
                fetch_ended = true;
            }
        };
        match wait {
            Some(t) => crate::timer::timeout(t, waiting)
                .await
                .unwrap_or(Err(TokenError::Timeout(t))),
            None => waiting.await,
        }
    }

    /// Starts a fetch for credentials that are still usable but near their expiry, unless the
    /// last fetch ended less than [`BACKGROUND_REFRESH_INTERVAL`] ago.
    fn refresh_in_background(self: &Arc<Self>, now: SystemTime) {
        let recent = lock(&self.credentials)
            .last_fetch
            .is_some_and(|at| age(at, now) < BACKGROUND_REFRESH_INTERVAL);
        if !recent {
            self.start_fetch();
        }
    }

    /// Fetches credentials in a task of their own, unless one is already fetching: a login that
    /// gives up does not cancel the fetch, and a storm of logins makes one call.
    fn start_fetch(self: &Arc<Self>) {
        if self.fetching.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        // On the control runtime: the AWS SDK makes timers, and a shard has no timer wheel.
        crate::timer::spawn_on_control(async move {
            let result = match crate::timer::timeout(FETCH_TIMEOUT, this.fetch()).await {
                Ok(r) => r,
                Err(_) => Err(format!(
                    "the credential chain did not answer within {FETCH_TIMEOUT:?}"
                )),
            };
            let generation = {
                let mut state = lock(&this.credentials);
                match result {
                    Ok(c) => {
                        tracing::info!(
                            expires_in = ?c.expiry().map(|e| left((this.clock)(), e)),
                            "fetched AWS credentials for RDS IAM authentication"
                        );
                        state.current = Some((c, (this.clock)()));
                        state.last_error = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot fetch AWS credentials for RDS IAM authentication");
                        state.last_error = Some(e);
                    }
                }
                state.generation += 1;
                state.last_fetch = Some((this.clock)());
                state.generation
            };
            this.fetching.store(false, Ordering::Release);
            this.fetched.send_replace(generation);
        });
    }

    async fn fetch(&self) -> Result<Credentials, String> {
        let provider = match &self.fixed_provider {
            Some(p) => p.clone(),
            None => self.provider.get_or_init(chain).await.clone(),
        };
        provider
            .provide_credentials()
            .await
            .map_err(|e| error_chain(&e))
    }
}

/// The standard chain, over the smithy HTTPS client on rustls with ring (the crypto the rest
/// of Breakwater uses). Region for STS from AWS_REGION / AWS_DEFAULT_REGION or the profile.
async fn chain() -> SharedCredentialsProvider {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_config::provider_config::ProviderConfig::default()
        .with_http_client(http)
        .with_region(default_region().map(aws_config::Region::new));
    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .configure(config)
        .build()
        .await;
    SharedCredentialsProvider::new(chain)
}

/// `AWS_REGION`, else `AWS_DEFAULT_REGION`: what `rds_iam_region` defaults to.
pub fn default_region() -> Option<String> {
    ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|r| !r.trim().is_empty()))
}

/// (usable now, due for a refresh).
fn freshness(c: &Credentials, fetched_at: SystemTime, now: SystemTime) -> (bool, bool) {
    match c.expiry() {
        Some(e) => {
            let left = left(now, e);
            (
                left > CREDENTIALS_MIN_LEFT,
                left <= CREDENTIALS_REFRESH_MARGIN,
            )
        }
        None => (true, age(fetched_at, now) >= STATIC_CREDENTIALS_MAX_AGE),
    }
}

fn age(then: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(then).unwrap_or_default()
}

fn left(now: SystemTime, until: SystemTime) -> Duration {
    until.duration_since(now).unwrap_or_default()
}

/// An error and its sources, one line: the chain's errors say little at the top level.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

#[cfg(test)]
mod tests;

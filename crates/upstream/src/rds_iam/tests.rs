//! The signer against AWS's published vectors, and the token cache on paused time with a
//! credentials provider that counts its calls.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use aws_credential_types::provider::{error::CredentialsError, future};

use super::*;

fn at(unix: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
}

/// The query of a signed URL as a set: SigV4 fixes the signature, not the order the signer
/// appends its parameters in.
fn query_set(url: &str) -> BTreeSet<String> {
    let (_, query) = url.split_once('?').unwrap();
    query.split('&').map(str::to_owned).collect()
}

fn signature(url: &str) -> &str {
    url.rsplit_once("X-Amz-Signature=").unwrap().1
}

/// AWS's SigV4 test suite, `get-vanilla-query-order-key-case`, presigned (query-signed-request.txt):
/// AKIDEXAMPLE, us-east-1, service "service", 2015-08-30T12:36:00Z, 3600 s.
#[test]
fn presign_matches_the_aws_sigv4_test_suite_query_vector() {
    let creds = Credentials::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        None,
        None,
        "test",
    );
    let url = presign(
        "https://example.amazonaws.com/?Param2=value2&Param1=value1",
        "us-east-1",
        "service",
        &creds,
        at(1_440_938_160),
        Duration::from_secs(3600),
    )
    .unwrap();
    let want = "Param2=value2&Param1=value1&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Signature=86012e2c9ad4d77369f5d81c11f75158aae4f895a085212cc6d3f923d300bed5";
    assert_eq!(query_set(&url), query_set(&format!("/?{want}")));
    assert_eq!(
        signature(&url),
        "86012e2c9ad4d77369f5d81c11f75158aae4f895a085212cc6d3f923d300bed5"
    );
}

/// The RDS token botocore's test suite publishes for `generate_db_auth_token` (keys "akid" /
/// "skid", 2016-11-07T17:39:33Z): our token is the same URL, parameter for parameter.
#[test]
fn rds_token_matches_the_published_generate_db_auth_token_vector() {
    let creds = Credentials::new("akid", "skid", None, None, "test");
    let token = rds_token(
        "prod-instance.us-east-1.rds.amazonaws.com",
        3306,
        "someusername",
        "us-east-1",
        &creds,
        at(1_478_540_373),
    )
    .unwrap();
    assert!(
        token.starts_with("prod-instance.us-east-1.rds.amazonaws.com:3306/?"),
        "{token}"
    );
    let want = "Action=connect&DBUser=someusername&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20161107T173933Z&X-Amz-SignedHeaders=host&X-Amz-Expires=900&X-Amz-Credential=akid%2F20161107%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Signature=d1138cdbc0ca63eec012ec0fc6c2267e03642168f5884a7795320d4c18374c61";
    assert_eq!(query_set(&token), query_set(&format!("/?{want}")));
}

#[test]
fn tokens_carry_the_session_token_and_an_encoded_user() {
    let creds = Credentials::new("ASIAX", "secret", Some("sess/ion+".into()), None, "test");
    let token = rds_token(
        "db.example",
        5432,
        "app user@x",
        "eu-west-1",
        &creds,
        at(1_800_000_000),
    )
    .unwrap();
    let q = query_set(&token);
    assert!(q.contains("DBUser=app%20user%40x"), "{token}");
    assert!(q.contains("X-Amz-Security-Token=sess%2Fion%2B"), "{token}");
    assert!(q.contains("X-Amz-Expires=900"), "{token}");
    assert!(
        token.contains("%2Feu-west-1%2Frds-db%2Faws4_request"),
        "{token}"
    );
}

/// The wall clock follows tokio's paused clock, so the cache's ages move with `advance`.
fn paused_clock() -> SystemTime {
    static BASE: OnceLock<tokio::time::Instant> = OnceLock::new();
    let base = *BASE.get_or_init(tokio::time::Instant::now);
    at(1_800_000_000) + tokio::time::Instant::now().saturating_duration_since(base)
}

/// Hands out AKID1, AKID2, … each valid for `valid_for`, or fails / hangs as told.
#[derive(Debug)]
struct Rotating {
    calls: AtomicUsize,
    valid_for: Duration,
    behaviour: Mutex<Behaviour>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Serve,
    Fail,
    Hang,
}

impl Rotating {
    fn new(valid_for: Duration) -> Arc<Rotating> {
        Arc::new(Rotating {
            calls: AtomicUsize::new(0),
            valid_for,
            behaviour: Mutex::new(Behaviour::Serve),
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().unwrap() = b;
    }
}

#[derive(Debug)]
struct Shared(Arc<Rotating>);

impl ProvideCredentials for Shared {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let r = &self.0;
        let n = r.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let behaviour = *r.behaviour.lock().unwrap();
        let creds = Credentials::new(
            format!("AKID{n}"),
            format!("secret{n}"),
            Some(format!("session{n}")),
            Some(paused_clock() + r.valid_for),
            "test",
        );
        future::ProvideCredentials::new(async move {
            match behaviour {
                Behaviour::Serve => Ok(creds),
                Behaviour::Fail => Err(CredentialsError::not_loaded("the endpoint said no")),
                Behaviour::Hang => std::future::pending().await,
            }
        })
    }
}

fn cache(provider: &Arc<Rotating>) -> Arc<RdsIam> {
    Arc::new(RdsIam::with_provider(
        Shared(provider.clone()),
        paused_clock,
        REFRESH_AFTER,
    ))
}

async fn token(cache: &Arc<RdsIam>) -> Result<Token, TokenError> {
    cache
        .token(
            "db.example",
            5432,
            "app",
            "us-east-1",
            Some(Duration::from_secs(5)),
        )
        .await
}

fn text(t: &Token) -> String {
    match &t.credential {
        ServerCredential::Password(p) => p.clone(),
        other => panic!("{other:?}"),
    }
}

/// Lets the background fetch task run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_token_is_reused_until_ten_minutes_then_signed_again_with_the_cached_credentials() {
    let provider = Rotating::new(Duration::from_secs(3600));
    let cache = cache(&provider);
    let first = token(&cache).await.unwrap();
    assert!(first.refreshed);
    let again = token(&cache).await.unwrap();
    assert!(!again.refreshed);
    assert_eq!(text(&first), text(&again));
    tokio::time::advance(REFRESH_AFTER - Duration::from_secs(1)).await;
    assert!(!token(&cache).await.unwrap().refreshed, "refreshed early");
    tokio::time::advance(Duration::from_secs(2)).await;
    let renewed = token(&cache).await.unwrap();
    assert!(renewed.refreshed, "not refreshed after ten minutes");
    assert_ne!(text(&renewed), text(&first));
    assert!(text(&renewed).contains("X-Amz-Credential=AKID1%2F"));
    assert_eq!(provider.calls(), 1, "the credentials were still good");
}

#[tokio::test(start_paused = true)]
async fn credentials_near_expiry_are_refreshed_in_the_background_and_new_tokens_use_them() {
    let provider = Rotating::new(Duration::from_secs(900));
    let cache = cache(&provider);
    token(&cache).await.unwrap();
    // 4 minutes left: still used, and a fetch starts without anyone waiting for it.
    tokio::time::advance(Duration::from_secs(660)).await;
    let t = token(&cache).await.unwrap();
    assert!(
        text(&t).contains("AKID1%2F"),
        "the login waited for new credentials"
    );
    settle().await;
    assert_eq!(provider.calls(), 2);
    let t = token(&cache).await.unwrap();
    assert!(t.refreshed, "new credentials sign a new token");
    assert!(text(&t).contains("AKID2%2F"));
}

#[tokio::test(start_paused = true)]
async fn credentials_that_stay_near_expiry_are_asked_for_again_only_every_ten_seconds() {
    // Every fetch hands out credentials with 2 minutes left: always due for a refresh.
    let provider = Rotating::new(Duration::from_secs(120));
    let cache = cache(&provider);
    token(&cache).await.unwrap();
    for _ in 0..50 {
        token(&cache).await.unwrap();
        settle().await;
    }
    assert_eq!(provider.calls(), 1, "refreshed again within ten seconds");
    tokio::time::advance(BACKGROUND_REFRESH_INTERVAL).await;
    token(&cache).await.unwrap();
    settle().await;
    assert_eq!(provider.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_storm_of_logins_without_credentials_makes_one_fetch() {
    let provider = Rotating::new(Duration::from_secs(3600));
    let cache = cache(&provider);
    let logins: Vec<_> = (0..100)
        .map(|_| {
            let c = cache.clone();
            tokio::spawn(async move { token(&c).await.map(|t| text(&t)) })
        })
        .collect();
    for l in logins {
        l.await.unwrap().unwrap();
    }
    assert_eq!(provider.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_credential_chain_costs_a_login_its_wait_and_no_more() {
    let provider = Rotating::new(Duration::from_secs(3600));
    provider.set(Behaviour::Hang);
    let cache = cache(&provider);
    let started = tokio::time::Instant::now();
    let err = token(&cache).await.err().unwrap();
    assert!(matches!(err, TokenError::Timeout(_)), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_failing_chain_costs_nothing_until_the_credentials_it_cannot_renew_run_out() {
    let provider = Rotating::new(Duration::from_secs(900));
    provider.set(Behaviour::Fail);
    let cache = cache(&provider);
    let err = token(&cache).await.err().unwrap();
    assert!(err.to_string().contains("the endpoint said no"), "{err}");

    provider.set(Behaviour::Serve);
    let first = token(&cache).await.unwrap();
    assert!(text(&first).contains("AKID2%2F"));
    provider.set(Behaviour::Fail);
    // Past the refresh age, 4 minutes left on the credentials: the background fetch fails and
    // the token is signed again with the credentials there are.
    tokio::time::advance(Duration::from_secs(660)).await;
    let t = token(&cache).await.unwrap();
    settle().await;
    assert_eq!(provider.calls(), 3, "no background refresh was tried");
    assert!(t.refreshed && text(&t).contains("AKID2%2F"));
    // A minute before they expire they are not used any more: the error shows the cause.
    tokio::time::advance(Duration::from_secs(190)).await;
    let err = token(&cache).await.err().unwrap();
    assert!(err.to_string().contains("the endpoint said no"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn tokens_do_not_show_in_debug_output() {
    let provider = Rotating::new(Duration::from_secs(3600));
    let cache = cache(&provider);
    let t = token(&cache).await.unwrap();
    let shown = format!("{:?} {:?}", t.credential, cache);
    assert!(!shown.contains("X-Amz"), "{shown}");
    assert!(!shown.contains("secret1"), "{shown}");
}

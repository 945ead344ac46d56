//! A server (or someone in the middle before TLS) that turns hostile during login is cut off at
//! once with an error that names what it did: an absurd SCRAM iteration count (which would burn
//! CPU on every login), a server signature that does not verify (it does not hold the verifier),
//! a message announced far over the cap (which must not be buffered). And a server that asks
//! for a method `server_require_auth` refuses — by default a cleartext password over a
//! connection whose certificate was not verified — gets nothing.

use std::time::Duration;

use testkit::{free_port, FakeUpstream, Hostility, Pooler};

use crate::common::*;

/// A pooler whose database `app` is the fake; the server password comes from the config, so
/// the SCRAM client runs PBKDF2 with the server's iteration count.
fn pooler_for(fake: &FakeUpstream) -> Pooler {
    pooler_with(fake, "", "")
}

fn pooler_with(fake: &FakeUpstream, pooler_extra: &str, db_extra: &str) -> Pooler {
    let port = free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_type = \"trust\"\nauth_file = \"userlist.txt\"\n\
         query_wait_timeout = \"3s\"\n{pooler_extra}\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"secret\"\n{db_extra}",
        fake.port()
    );
    Pooler::start(BIN, port, &config, &[("userlist.txt", USERLIST)]).expect("start breakwater")
}

async fn login_error(pooler: &Pooler) -> String {
    let err = match pooler.connect("app", "", "app").await {
        Ok(c) => c
            .simple_query("SELECT 1")
            .await
            .expect_err("the fake server never lets a login finish"),
        Err(e) => e,
    };
    err.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| err.to_string())
}

/// Every login that reached the bad step was hung up on at once (well within the fake's 10 s).
async fn assert_cut_at_once(fake: &FakeUpstream) {
    // The fake records a login when it sees the hang-up, which can be just after the client
    // has its error.
    testkit::wait_until("a login to reach the fake's bad step", WAIT, || async {
        !fake.outcomes().is_empty()
    })
    .await
    .expect("no login reached the fake's bad step");
    let outcomes = fake.outcomes();
    for o in outcomes {
        let cut = o.cut_after.expect("the pooler never hung up");
        assert!(cut < Duration::from_secs(2), "hung up after {cut:?}");
    }
}

#[tokio::test]
async fn an_absurd_scram_iteration_count_is_refused_before_any_pbkdf2() {
    let fake = FakeUpstream::start(Hostility::ScramIterations(2_000_000_000)).unwrap();
    let pooler = pooler_for(&fake);
    let msg = login_error(&pooler).await;
    assert!(msg.contains("iteration count 2000000000"), "{msg}");
    assert_cut_at_once(&fake).await;
}

#[tokio::test]
async fn a_wrong_server_signature_ends_the_login() {
    let fake = FakeUpstream::start(Hostility::WrongServerSignature).unwrap();
    let pooler = pooler_for(&fake);
    let msg = login_error(&pooler).await;
    assert!(msg.contains("server signature is wrong"), "{msg}");
    assert_cut_at_once(&fake).await;
}

#[tokio::test]
async fn an_oversized_server_message_is_cut_before_it_is_buffered() {
    let fake = FakeUpstream::start(Hostility::OversizedMessage).unwrap();
    let pooler = pooler_for(&fake);
    let msg = login_error(&pooler).await;
    assert!(msg.contains("exceeds the limit"), "{msg}");
    assert_cut_at_once(&fake).await;
}

/// The downgrade the issue describes: a server — or anyone answering at its address, the
/// connection being in the clear — asks for the password in cleartext. By default it gets
/// nothing: the login fails at once (a permanent error, not retried until
/// query_wait_timeout), with an error naming the setting, a log line and a counter.
#[tokio::test]
async fn a_server_asking_for_a_cleartext_password_without_verified_tls_gets_nothing() {
    let fake = FakeUpstream::start(Hostility::AsksCleartext).unwrap();
    let mport = free_port();
    let pooler = pooler_with(
        &fake,
        &format!("[metrics]\nlisten = \"127.0.0.1:{mport}\""),
        "",
    );
    let started = std::time::Instant::now();
    let msg = login_error(&pooler).await;
    // query_wait_timeout is 3 s: an error well before it was not waited out.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(
        msg.contains("asked for password authentication, which server_require_auth")
            && msg.contains("verify-ca or verify-full"),
        "{msg}"
    );
    assert_cut_at_once(&fake).await;
    assert!(
        fake.outcomes().iter().all(|o| !o.password_sent),
        "the password was sent"
    );
    assert!(pooler.log().contains("server connection failed"));
    testkit::wait_until("the refusal to be counted", WAIT, || async {
        let body = tokio::task::spawn_blocking(move || http_get(mport, "/metrics"))
            .await
            .unwrap();
        series(&body, "breakwater_host_auth_refused_total{").is_some_and(|n| n >= 1.0)
    })
    .await
    .unwrap();
}

/// Listing `password` is how an operator who accepts the risk allows cleartext anyway.
#[tokio::test]
async fn server_require_auth_password_lets_a_cleartext_request_through() {
    let fake = FakeUpstream::start(Hostility::AsksCleartext).unwrap();
    let pooler = pooler_with(&fake, "", "server_require_auth = \"password\"\n");
    login_error(&pooler).await;
    testkit::wait_until("the fake to see the password", WAIT, || async {
        fake.outcomes().iter().any(|o| o.password_sent)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_server_that_ends_scram_without_its_signature_is_not_believed() {
    let fake = FakeUpstream::start(Hostility::ScramWithoutProof).unwrap();
    let pooler = pooler_for(&fake);
    let msg = login_error(&pooler).await;
    assert!(
        msg.contains("without proving it knows the password"),
        "{msg}"
    );
    assert_cut_at_once(&fake).await;
}

//! A server (or someone in the middle before TLS) that turns hostile during login is cut off at
//! once with an error that names what it did: an absurd SCRAM iteration count (which would burn
//! CPU on every login), a server signature that does not verify (it does not hold the verifier),
//! a message announced far over the cap (which must not be buffered).

use std::time::Duration;

use testkit::{free_port, FakeUpstream, Hostility, Pooler};

use crate::common::*;

/// A pooler whose database `app` is the fake; the server password comes from the config, so
/// the SCRAM client runs PBKDF2 with the server's iteration count.
fn pooler_for(fake: &FakeUpstream) -> Pooler {
    let port = free_port();
    let config = format!(
        "[pooler]\nlisten_port = {port}\nauth_type = \"trust\"\nauth_file = \"userlist.txt\"\n\
         query_wait_timeout = \"3s\"\n\
         [databases.app]\nhost = \"127.0.0.1\"\nport = {}\npassword = \"secret\"\n",
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

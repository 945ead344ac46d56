//! Client authentication against the auth_file, and server logins with each method.

use crate::common::*;
use testkit::PgCluster;

#[tokio::test]
async fn scram_login_accepts_the_right_password_and_refuses_a_wrong_one_with_28p01() {
    let env = start("auth_type = \"scram-sha-256\"", "");
    let c = env.client().await;
    let v: i32 = c.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
    assert_eq!(v, 42);
    assert_eq!(
        sqlstate(env.pooler.connect("app", "wrong", "app").await),
        "28P01"
    );
    // An unknown user looks exactly like a wrong password.
    assert_eq!(
        sqlstate(env.pooler.connect("nobody", "x", "app").await),
        "28P01"
    );
}

#[tokio::test]
async fn md5_login_accepts_the_right_password_and_refuses_a_wrong_one() {
    let env = start("auth_type = \"md5\"", "");
    let c = env.client().await;
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    assert_eq!(
        sqlstate(env.pooler.connect("app", "nope", "app").await),
        "28P01"
    );
}

#[tokio::test]
async fn trust_login_needs_no_password_but_the_user_must_be_in_the_auth_file() {
    let env = start("auth_type = \"trust\"", "");
    let c = env
        .pooler
        .connect("app", "anything", "app")
        .await
        .expect("trust login");
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
    assert_eq!(
        sqlstate(env.pooler.connect("stranger", "", "app").await),
        "28000"
    );
}

#[tokio::test]
async fn unknown_database_is_refused_with_3d000() {
    let env = start("auth_type = \"scram-sha-256\"", "");
    assert_eq!(
        sqlstate(env.pooler.connect("app", "app_pw", "nosuchdb").await),
        "3D000"
    );
}

#[tokio::test]
async fn a_scram_verifier_in_the_auth_file_works_for_clients_and_server_without_any_plaintext() {
    let pg = PgCluster::start().unwrap();
    // The same verifier Postgres holds, so the keys from the client's login also open the server.
    let verifier = pg
        .psql(
            "app",
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'",
        )
        .unwrap();
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let userlist = format!("\"app\" \"{verifier}\"\n");
    let pooler = start_pooler(&pg, "auth_type = \"scram-sha-256\"", "", &userlist);
    let c = pooler
        .connect("app", "app_pw", "app")
        .await
        .expect("login with a verifier only");
    let user: String = c
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, "app");
    assert_eq!(sqlstate(pooler.connect("app", "bad", "app").await), "28P01");
}

#[tokio::test]
async fn breakwater_logs_in_to_servers_that_ask_for_md5_cleartext_or_nothing() {
    let pg = PgCluster::start().unwrap();
    for (user, password) in [
        ("md5user", "md5_pw"),
        ("plainuser", "plain_pw"),
        ("trustuser", ""),
    ] {
        pg.psql("app", &format!("GRANT CONNECT ON DATABASE app TO {user}"))
            .unwrap();
        // Cleartext over TCP without verified TLS must be allowed explicitly.
        let db_extra = format!(
            "user = \"{user}\"\npassword = \"{password}\"\nserver_require_auth = \"password,md5,none\"\n"
        );
        let pooler = start_pooler(&pg, "auth_type = \"scram-sha-256\"", &db_extra, USERLIST);
        let c = pooler
            .connect("app", "app_pw", "app")
            .await
            .expect("client login");
        let who: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user, "server login as {user}");
    }
}

/// PostgreSQL with pg_hba `password` (plainuser) or `md5` (md5user): by default the cleartext
/// request is refused, as is md5 where only SCRAM is allowed; the client is told why.
#[tokio::test]
async fn server_require_auth_refuses_real_servers_asking_for_weaker_methods() {
    let pg = PgCluster::start().unwrap();
    for (user, password, require, method) in [
        ("plainuser", "plain_pw", "", "password"),
        ("md5user", "md5_pw", "scram-sha-256", "md5"),
        ("trustuser", "", "!none", "none"),
    ] {
        pg.psql("app", &format!("GRANT CONNECT ON DATABASE app TO {user}"))
            .unwrap();
        let db_extra = format!(
            "user = \"{user}\"\npassword = \"{password}\"\nserver_require_auth = \"{require}\"\n"
        );
        let pooler = start_pooler(&pg, "auth_type = \"scram-sha-256\"", &db_extra, USERLIST);
        let err = match pooler.connect("app", "app_pw", "app").await {
            Ok(c) => c.simple_query("SELECT 1").await.expect_err("refused"),
            Err(e) => e,
        };
        let msg = err
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(
            msg.contains(&format!(
                "asked for {method} authentication, which server_require_auth"
            )),
            "{user}: {err}"
        );
    }
}

#[tokio::test]
async fn a_wrong_server_password_reaches_the_client_as_28p01() {
    let env = start(
        "auth_type = \"scram-sha-256\"",
        "password = \"not-the-password\"\n",
    );
    assert_eq!(
        sqlstate(env.pooler.connect("app", "app_pw", "app").await),
        "28P01"
    );
}

#[tokio::test]
async fn max_client_conn_refuses_the_next_client_with_53300() {
    let env = start("auth_type = \"scram-sha-256\"\nmax_client_conn = 2", "");
    let _a = env.client().await;
    let _b = env.client().await;
    assert_eq!(
        sqlstate(env.pooler.connect("app", "app_pw", "app").await),
        "53300"
    );
    drop(_a);
    // The slot frees when a client leaves.
    testkit::wait_until("a slot frees up", WAIT, || async {
        env.pooler.connect("app", "app_pw", "app").await.is_ok()
    })
    .await
    .unwrap();
}

//! Running Breakwater where it is deployed: probes on the metrics listener, and shutdown as
//! a pod or a rolling restart needs it.

use std::time::Duration;

use crate::common::*;

/// A pooler with the HTTP listener on a port of its own and one warm server, as a sidecar runs.
fn start_sidecar(pooler_extra: &str) -> (Env, u16) {
    let mport = testkit::free_port();
    let env = start(
        &format!("{pooler_extra}\n[metrics]\nlisten = \"127.0.0.1:{mport}\""),
        "user = \"app\"\nmin_pool_size = 1\n",
    );
    (env, mport)
}

#[tokio::test]
async fn readiness_turns_503_while_the_database_is_down_and_200_when_it_returns() {
    let (mut env, mport) = start_sidecar("");
    let ready = || async move { http_status(mport, "/readyz").await };
    testkit::wait_until("ready", WAIT, || async { ready().await.0 == 200 })
        .await
        .unwrap();
    assert_eq!(http_status(mport, "/healthz").await.0, 200);
    // Only the three paths: a probe pointed at a wrong path must not pass.
    for path in ["/", "/health", "/ready", "/metricsx"] {
        assert_eq!(http_status(mport, path).await.0, 404, "{path}");
    }

    env.pg.stop();
    testkit::wait_until("not ready with the database down", WAIT, || async {
        ready().await.0 == 503
    })
    .await
    .unwrap();
    let (_, why) = ready().await;
    assert!(why.contains("app/app"), "{why}");
    // Alive all the same: restarting the pooler would not bring the database back.
    assert_eq!(http_status(mport, "/healthz").await.0, 200);

    env.pg.try_restart().unwrap();
    // Maintenance reconnects with back-off (at most server_retry_max apart, 5 s by default).
    testkit::wait_until("ready again", Duration::from_secs(20), || async {
        ready().await.0 == 200
    })
    .await
    .unwrap();
    env.client().await.simple_query("SELECT 1").await.unwrap();
}

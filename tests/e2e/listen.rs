//! Issue 17 item 6: LISTEN in transaction mode. Breakwater answers a client's LISTEN itself and
//! one listener connection per pool fans notifications out, so the pool's servers stay shared.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_postgres::{AsyncMessage, Client, NoTls, Notification};

use crate::common::*;

/// A client through the pooler whose notifications the test receives.
async fn listening_client(env: &Env) -> (Client, UnboundedReceiver<Notification>) {
    let (client, mut connection) = tokio_postgres::connect(&env.conn_string(), NoTls)
        .await
        .expect("connect through breakwater");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notification(n) = m {
                let _ = tx.send(n);
            }
        }
    });
    (client, rx)
}

async fn next(rx: &mut UnboundedReceiver<Notification>) -> (String, String) {
    let n = tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a notification")
        .expect("the connection is open");
    (n.channel().to_owned(), n.payload().to_owned())
}

fn pair(channel: &str, payload: &str) -> (String, String) {
    (channel.to_owned(), payload.to_owned())
}

/// Backends of the pools' listener connections.
async fn listener_backends(direct: &Client) -> Vec<i32> {
    direct
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'breakwater listener'",
            &[],
        )
        .await
        .expect("list listener backends")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The app pool's SHOW LISTENERS row: (clients, channels, notifications, dropped, reconnects).
async fn listeners_row(env: &Env) -> Option<[u64; 5]> {
    let admin = connect(&env.pooler.conn_string("admin", "admin_pw", "pgbouncer"))
        .await
        .expect("admin console login");
    let rows = admin.simple_query("SHOW LISTENERS").await.unwrap();
    rows.into_iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) if r.get("database") == Some("app") => {
            let n = |c: &str| r.get(c).unwrap().parse::<u64>().unwrap();
            Some([
                n("clients"),
                n("channels"),
                n("notifications"),
                n("dropped"),
                n("reconnects"),
            ])
        }
        _ => None,
    })
}

async fn wait_for_listener_backends(direct: &Client, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + WAIT;
    loop {
        let pids = listener_backends(direct).await;
        if pids.len() == n {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "{} listener backends, not {n}",
            pids.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn clients_listening_in_transaction_mode_share_a_pool_of_one_and_get_every_notify() {
    let env = start("", "pool_size = 1\n");
    let (a, mut rx_a) = listening_client(&env).await;
    let (b, mut rx_b) = listening_client(&env).await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    b.batch_execute("listen \"jobs\";").await.unwrap();
    let c = env.client().await;
    c.batch_execute("NOTIFY jobs, 'first'").await.unwrap();
    assert_eq!(next(&mut rx_a).await, pair("jobs", "first"));
    assert_eq!(next(&mut rx_b).await, pair("jobs", "first"));

    // Nobody is pinned: the one pooled server serves all three clients, and the only other
    // backend is the listener connection.
    let one = |rows| first_value(rows).unwrap();
    let pid_a = one(a.simple_query("SELECT pg_backend_pid()").await.unwrap());
    let pid_c = one(c.simple_query("SELECT pg_backend_pid()").await.unwrap());
    assert_eq!(pid_a, pid_c);
    let direct = env.direct().await;
    let listeners = listener_backends(&direct).await;
    assert_eq!(listeners.len(), 1, "one listener connection for the pool");
    assert_eq!(
        app_backends(&direct).await,
        2,
        "the pooled server and the listener"
    );
    // The sender's own notifications reach it too, as with PostgreSQL.
    a.batch_execute("NOTIFY jobs, 'own'").await.unwrap();
    assert_eq!(next(&mut rx_a).await, pair("jobs", "own"));
    assert_eq!(next(&mut rx_b).await, pair("jobs", "own"));

    // UNLISTEN stops delivery to that client only. `other` is a marker: what a receives
    // next shows that nothing came before it.
    a.batch_execute("UNLISTEN jobs; ").await.unwrap();
    a.batch_execute("LISTEN other").await.unwrap();
    c.batch_execute("NOTIFY jobs, 'second'").await.unwrap();
    c.batch_execute("NOTIFY other, 'marker'").await.unwrap();
    assert_eq!(next(&mut rx_b).await, pair("jobs", "second"));
    assert_eq!(next(&mut rx_a).await, pair("other", "marker"));
    a.batch_execute("UNLISTEN *").await.unwrap();
    c.batch_execute("NOTIFY other, 'gone'; NOTIFY jobs, 'third'")
        .await
        .unwrap();
    assert_eq!(next(&mut rx_b).await, pair("jobs", "third"));
    b.batch_execute("LISTEN other").await.unwrap();
    a.batch_execute("LISTEN other").await.unwrap();
    c.batch_execute("NOTIFY other, 'last'").await.unwrap();
    assert_eq!(next(&mut rx_a).await, pair("other", "last"));
    assert_eq!(next(&mut rx_b).await, pair("other", "last"));
    // Two clients on `other`, b on `jobs` too; nine notifications queued, none dropped.
    assert_eq!(listeners_row(&env).await, Some([2, 2, 9, 0, 0]));
}

#[tokio::test]
async fn a_client_busy_in_a_transaction_keeps_its_newest_thousand_notifications() {
    let env = start("", "pool_size = 2\n");
    let (a, mut rx_a) = listening_client(&env).await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    // Mid-transaction a is sent nothing, so its inbox fills up.
    a.batch_execute("BEGIN").await.unwrap();
    let c = env.client().await;
    c.batch_execute("SELECT pg_notify('jobs', g::text) FROM generate_series(1, 1100) g")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while listeners_row(&env).await != Some([1, 1, 1100, 100, 0]) {
        assert!(
            Instant::now() < deadline,
            "SHOW LISTENERS: {:?}",
            listeners_row(&env).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.batch_execute("COMMIT").await.unwrap();
    for want in 101..=1100 {
        assert_eq!(next(&mut rx_a).await, pair("jobs", &want.to_string()));
    }
    c.batch_execute("NOTIFY jobs, 'marker'").await.unwrap();
    assert_eq!(next(&mut rx_a).await, pair("jobs", "marker"));
}

#[tokio::test]
async fn the_listener_connection_comes_back_after_its_backend_is_killed() {
    let env = start("", "pool_size = 1\n");
    let (a, mut rx_a) = listening_client(&env).await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    let direct = env.direct().await;
    let killed = listener_backends(&direct).await;
    assert_eq!(killed.len(), 1);
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&killed[0]])
        .await
        .unwrap();
    // Notifications sent before the listener is back are lost (as PostgreSQL loses them when
    // a session ends); keep sending until one arrives.
    let c = env.client().await;
    let deadline = Instant::now() + WAIT;
    loop {
        c.batch_execute("NOTIFY jobs, 'again'").await.unwrap();
        if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(100), rx_a.recv()).await {
            assert_eq!((n.channel(), n.payload()), ("jobs", "again"));
            break;
        }
        assert!(Instant::now() < deadline, "no notification after the kill");
    }
    let now = wait_for_listener_backends(&direct, 1).await;
    assert_ne!(now, killed, "a new listener connection");
    // A new LISTEN works on the new connection.
    let (b, mut rx_b) = listening_client(&env).await;
    b.batch_execute("LISTEN fresh").await.unwrap();
    c.batch_execute("NOTIFY fresh, 'yes'").await.unwrap();
    assert_eq!(next(&mut rx_b).await, pair("fresh", "yes"));
    let reconnects = listeners_row(&env).await.map(|r| r[4]);
    assert_eq!(reconnects, Some(1), "the loss is counted");
}

#[tokio::test]
async fn discard_all_and_leaving_take_a_client_off_its_channels() {
    let env = start("", "pool_size = 1\n");
    let (a, mut rx_a) = listening_client(&env).await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    a.batch_execute("DISCARD ALL").await.unwrap();
    a.batch_execute("LISTEN marker").await.unwrap();
    let c = env.client().await;
    c.batch_execute("NOTIFY jobs, 'discarded'; NOTIFY marker, 'm'")
        .await
        .unwrap();
    assert_eq!(next(&mut rx_a).await, pair("marker", "m"));

    // The last listening client leaves: the listener connection closes.
    let direct = env.direct().await;
    assert_eq!(listener_backends(&direct).await.len(), 1);
    drop(a);
    wait_for_listener_backends(&direct, 0).await;
}

#[tokio::test]
async fn statement_mode_clients_listen_too() {
    let env = start("pool_mode = \"statement\"", "pool_size = 1\n");
    let (a, mut rx_a) = listening_client(&env).await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    let c = env.client().await;
    c.batch_execute("SELECT pg_notify('jobs', 'via function')")
        .await
        .unwrap();
    assert_eq!(next(&mut rx_a).await, pair("jobs", "via function"));
}

#[tokio::test]
async fn a_listen_inside_a_transaction_is_answered_with_its_status_and_leaves_no_state() {
    let env = start("", "pool_size = 1\n");
    let (a, mut rx_a) = listening_client(&env).await;
    // psycopg2's default: every statement in a transaction, LISTEN included.
    a.batch_execute("BEGIN").await.unwrap();
    a.batch_execute("LISTEN jobs").await.unwrap();
    // Still in the transaction: the answer said so, and the server agrees.
    let one = |rows| first_value(rows).unwrap();
    assert_eq!(
        one(a
            .simple_query("SELECT count(*) FROM pg_listening_channels()")
            .await
            .unwrap()),
        "0",
        "the pooled server never ran the LISTEN"
    );
    a.batch_execute("COMMIT").await.unwrap();
    let c = env.client().await;
    c.batch_execute("NOTIFY jobs, 'after commit'")
        .await
        .unwrap();
    assert_eq!(next(&mut rx_a).await, pair("jobs", "after commit"));
    // An error inside the transaction: the server answers, as PostgreSQL would.
    a.batch_execute("BEGIN").await.unwrap();
    assert!(a.batch_execute("SELECT 1/0").await.is_err());
    assert_eq!(sqlstate(a.batch_execute("LISTEN more").await), "25P02");
    a.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        one(c
            .simple_query("SELECT count(*) FROM pg_listening_channels()")
            .await
            .unwrap()),
        "0"
    );
}

#[tokio::test]
async fn a_client_pinned_by_an_advisory_lock_gets_its_notifications_after_each_transaction() {
    let env = start("", "pool_size = 2\n");
    let (a, mut rx_a) = listening_client(&env).await;
    a.batch_execute("LISTEN jobs").await.unwrap();
    a.batch_execute("SELECT pg_advisory_lock(7)").await.unwrap();
    let c = env.client().await;
    c.batch_execute("NOTIFY jobs, 'while pinned'")
        .await
        .unwrap();
    // The notification reaches a's inbox on its own time; each transaction a ends hands over
    // what is there.
    let deadline = Instant::now() + WAIT;
    let got = loop {
        a.batch_execute("SELECT 1").await.unwrap();
        if let Ok(n) = rx_a.try_recv() {
            break n;
        }
        assert!(Instant::now() < deadline, "nothing delivered while pinned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((got.channel(), got.payload()), ("jobs", "while pinned"));
    a.batch_execute("SELECT pg_advisory_unlock(7)")
        .await
        .unwrap();
}

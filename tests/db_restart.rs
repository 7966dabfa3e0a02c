//! PostgreSQL stops while redeliver relays, and comes back: new messages
//! are refused with `resource-constraint` meanwhile (the sender told),
//! nothing accepted before is lost, and once the
//! database answers again redeliver exits with status 75 for its
//! supervisor to restart it, then delivers everything it had accepted.
//! On a cluster of the test's own, since it is stopped.

mod common;

use std::time::Duration;

use common::pg::OwnCluster;
use common::*;

const BOB: &str = "bob@relay.localhost";

#[tokio::test]
async fn database_restart_refuses_then_resumes() {
    let cluster = OwnCluster::start();
    let url = pg::new_database_on(&cluster.url, Some(cluster.password.clone()));
    let server = Server::start(Kind::Prosody, ServerOpts::default());
    let mut relay = Relay::start(
        &server,
        RelayOpts {
            postgres_url: Some(url),
            db_password: Some(cluster.password.clone()),
            ..Default::default()
        },
    );
    let mut alice = Client::connect(server.c2s_port, "alice", ClientOpts::default()).await;
    // Accepted and durable while bob is away.
    let kept = ids("kept", 3);
    for id in &kept {
        alice.message(BOB, id, &format!("body of {id}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    cluster.stop();
    alice.message(BOB, "during", "body of during");
    let (id, condition) = alice
        .next_error(SECS(15))
        .await
        .expect("the sender is told");
    assert_eq!(
        (id.as_str(), condition.as_str()),
        ("during", "resource-constraint")
    );

    cluster.resume();
    // The relay notices within its 5 s probe and exits for a restart.
    assert_eq!(relay.wait_exit(SECS(30)), Some(75), "{}", relay.log_text());
    relay.restart();
    let mut bob = Client::connect(server.c2s_port, "bob", ClientOpts::default()).await;
    expect_exactly(&mut bob, &kept).await;
    alice.message(BOB, "after", "body of after");
    assert_eq!(bob.body_ids(1, SECS(10)).await, ["after"]);
    let receipts = alice.receipt_ids(4, SECS(10)).await;
    assert_eq!(receipts.len(), 4, "{receipts:?}");
}

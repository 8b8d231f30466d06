//! Role discovery and failover with a real primary and a streaming replica.

mod common;
use common::*;
use pgheal::cluster::Role;
use pgheal::localpg::PgNode;
use std::time::Duration;

async fn primary_and_replica() -> (PgNode, PgNode) {
    let primary = app_node().await;
    let replica = PgNode::start_replica_of(&primary).await.expect("replica");
    (primary, replica)
}

/// pgheal with nodes listed replica first: roles must be discovered.
async fn proxy_for(primary: &PgNode, replica: &PgNode) -> pgheal::listener::Running {
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[health]\ninterval = \"200ms\"\ntimeout = \"1s\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [databases.app]\nnodes = [\"{}\", \"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        replica.addr(),
        primary.addr()
    ))
    .await
}

async fn roles(proxy: &pgheal::listener::Running) -> Vec<Role> {
    let target = proxy.app.target("app").expect("target");
    target
        .cluster
        .snapshot()
        .nodes
        .iter()
        .map(|n| n.role)
        .collect()
}

async fn wait_for_roles(proxy: &pgheal::listener::Running, expected: &[Role]) {
    eventually(
        Duration::from_secs(30),
        &format!("roles {expected:?}"),
        || async { roles(proxy).await == expected },
    )
    .await;
}

async fn in_recovery(client: &tokio_postgres::Client) -> Result<String, tokio_postgres::Error> {
    let rows = client.simple_query("SELECT pg_is_in_recovery()").await?;
    Ok(rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_discovered_whatever_the_order() {
    let (primary, replica) = primary_and_replica().await;
    let proxy = proxy_for(&primary, &replica).await;
    wait_for_roles(&proxy, &[Role::Replica, Role::Primary]).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    client
        .batch_execute("CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
        .await
        .expect("writes reach the primary");
    assert_eq!(in_recovery(&client).await.unwrap(), "f");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_promotion_writes_go_to_the_new_primary_on_the_same_connection() {
    let (mut primary, replica) = primary_and_replica().await;
    let proxy = proxy_for(&primary, &replica).await;
    wait_for_roles(&proxy, &[Role::Replica, Role::Primary]).await;
    let (client, _h) = connect(&app_url(&proxy)).await;
    client.batch_execute("CREATE TABLE t(x int)").await.unwrap();

    primary.kill9().await;
    wait_for_roles(&proxy, &[Role::Replica, Role::Down]).await;
    replica.promote().await.expect("promote");
    wait_for_roles(&proxy, &[Role::Primary, Role::Down]).await;

    // The same client connection writes again, now on the promoted node.
    let mut wrote = false;
    for _ in 0..50 {
        match client.batch_execute("INSERT INTO t VALUES (2)").await {
            Ok(()) => {
                wrote = true;
                break;
            }
            Err(e) => assert!(
                ["08006", "08001", "57P01", "25006"].contains(&code(&e).as_str()),
                "{e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(wrote, "no write succeeded after the promotion");
    assert_eq!(in_recovery(&client).await.unwrap(), "f");
    assert!(!client.is_closed());
}

//! Client authentication against [[users]], and upstream authentication
//! with each method PostgreSQL may ask for.

mod common;
use common::*;

const USERS: &str = r#"
[[users]]
name = "app"
password = "apppw"

[[users]]
name = "m"
password = "mpw"
auth = "md5"

[[users]]
name = "t"
auth = "trust"

[[users]]
name = "s"
scram_secret = "SECRET"
"#;

async fn proxy_for(node: &pgheal::testkit::localpg::PgNode, dbs: &str) -> pgheal::server::Running {
    let secret = postgres_protocol_secret("spw");
    let users = USERS.replace("SECRET", &secret);
    start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{users}\n[databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n{dbs}",
        node.addr()
    ))
    .await
}

fn postgres_protocol_secret(password: &str) -> String {
    // The form PostgreSQL stores in pg_authid.
    postgres_protocol::password::scram_sha_256(password.as_bytes())
}

async fn login(
    proxy: &pgheal::server::Running,
    user: &str,
    pw: &str,
    db: &str,
) -> Result<(), String> {
    let url = url(proxy, user, pw, db);
    match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            let h = tokio::spawn(conn);
            let row = client
                .query_one("SELECT current_user::text", &[])
                .await
                .map_err(|e| code(&e))?;
            let who: String = row.get(0);
            drop(client);
            let _ = h.await;
            Ok(who)
        }
        Err(e) => Err(code(&e)),
    }
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_method_accepts_the_right_secret_only() {
    let node = app_node().await;
    let proxy = proxy_for(&node, "").await;
    assert_eq!(login(&proxy, "app", APP_PASSWORD, "app").await, Ok(()));
    assert_eq!(login(&proxy, "m", "mpw", "app").await, Ok(()));
    assert_eq!(login(&proxy, "t", "", "app").await, Ok(()));
    assert_eq!(login(&proxy, "s", "spw", "app").await, Ok(()));

    assert_eq!(
        login(&proxy, "app", "wrong", "app").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, "m", "wrong", "app").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, "s", "wrong", "app").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, "nobody", "x", "app").await,
        Err("28P01".into())
    );
    assert_eq!(
        login(&proxy, "app", APP_PASSWORD, "nosuchdb").await,
        Err("3D000".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_reports_failures_with_their_messages() {
    let node = app_node().await;
    let proxy = proxy_for(&node, "").await;
    let out = psql(
        &url(&proxy, "app", "wrong", "app"),
        &["-c", "SELECT 1"],
        None,
    )
    .await;
    assert!(
        text(&out.stderr).contains("password authentication failed for user \"app\""),
        "{}",
        text(&out.stderr)
    );
    let out = psql(
        &url(&proxy, "app", APP_PASSWORD, "nope"),
        &["-c", "SELECT 1"],
        None,
    )
    .await;
    assert!(
        text(&out.stderr).contains("database \"nope\" does not exist"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_md5_cleartext_and_trust() {
    let node = app_node().await;
    node.sql(
        "postgres",
        "SET password_encryption = 'md5'; CREATE ROLE um LOGIN PASSWORD 'umpw'",
    )
    .await
    .unwrap();
    node.sql(
        "postgres",
        "CREATE ROLE uc LOGIN PASSWORD 'ucpw'; CREATE ROLE ut LOGIN",
    )
    .await
    .unwrap();
    node.prepend_hba(
        "host all um 127.0.0.1/32 md5\nhost all uc 127.0.0.1/32 password\nhost all ut 127.0.0.1/32 trust",
    )
    .await
    .unwrap();
    let addr = node.addr();
    let dbs = format!(
        "[databases.via_md5]\nnodes = [\"{addr}\"]\ndbname = \"app\"\nuser = \"um\"\npassword = \"umpw\"\n\
         [databases.via_cleartext]\nnodes = [\"{addr}\"]\ndbname = \"app\"\nuser = \"uc\"\npassword = \"ucpw\"\n\
         [databases.via_trust]\nnodes = [\"{addr}\"]\ndbname = \"app\"\nuser = \"ut\"\n\
         [databases.wrong_pw]\nnodes = [\"{addr}\"]\ndbname = \"app\"\nuser = \"um\"\npassword = \"bad\"\n"
    );
    let proxy = proxy_for(&node, &dbs).await;
    for (db, role) in [
        ("via_md5", "um"),
        ("via_cleartext", "uc"),
        ("via_trust", "ut"),
    ] {
        let (client, _h) = connect(&url(&proxy, "app", APP_PASSWORD, db)).await;
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, role, "database {db}");
    }
    // The server's refusal reaches the client with the server's SQLSTATE.
    let err = tokio_postgres::connect(
        &url(&proxy, "app", APP_PASSWORD, "wrong_pw"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(code(&err), "28P01", "{err}");
}

//! Secrets: SCRAM secrets instead of passwords, `${ENV}` values, and no
//! password or secret in logs or `pgheal check` output. Also the client
//! connection limit.

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::Duration;

fn pgheal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pgheal"))
}

fn hash_password(password: &str) -> String {
    let mut cmd = pgheal();
    cmd.arg("hash-password");
    let input = format!("{password}\n").into_bytes();
    let out = output_within(cmd, Some(input), SUBPROCESS_DEADLINE);
    assert!(out.status.success());
    let secret = text(&out.stdout).trim().to_string();
    assert!(secret.starts_with("SCRAM-SHA-256$4096:"), "{secret}");
    secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_secret_and_env_passwords_authenticate() {
    let node = app_node().await;
    let secret = hash_password("client-side-pw");
    std::env::set_var("PGHEAL_TEST_UPSTREAM_PW", APP_PASSWORD);
    let proxy = start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n\
         [[users]]\nname = \"app\"\nscram_secret = \"{secret}\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"${{PGHEAL_TEST_UPSTREAM_PW}}\"\n",
        node.addr()
    ))
    .await;
    let (client, _c) = connect(&url(&proxy, "app", "client-side-pw", "app")).await;
    assert_eq!(first_value(&client, "SELECT 1").await.expect("query"), "1");
    let e = tokio_postgres::connect(
        &url(&proxy, "app", APP_PASSWORD, "app"),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("the upstream password is not the client's");
    assert_eq!(code(&e), "28P01");
}

/// pgheal as a process with debug logs: failed logins and `check` must not
/// print any password or secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_logs_or_check_output() {
    let node = app_node().await;
    let port = free_port();
    let secret = hash_password("other-user-pw");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("pgheal.toml");
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:{port}\"\n\
         [[users]]\nname = \"app\"\npassword = \"{APP_PASSWORD}\"\n\
         [[users]]\nname = \"other\"\nscram_secret = \"{secret}\"\n\
         [databases.app]\nnodes = [\"{}\"]\nuser = \"app\"\npassword = \"{APP_PASSWORD}\"\n",
        node.addr()
    );
    std::fs::write(&config, &body).expect("write config");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pgheal"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "pgheal=trace")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start pgheal");
    let good = format!("postgres://app:{APP_PASSWORD}@127.0.0.1:{port}/app");
    wait_accepting(&good).await;
    let guesses = ["guess-one-XYZ", "other-user-pw-wrong"];
    for (user, pw) in [
        ("app", guesses[0]),
        ("other", guesses[1]),
        ("nobody", guesses[0]),
    ] {
        let bad = format!("postgres://{user}:{pw}@127.0.0.1:{port}/app");
        let e = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
            .await
            .err()
            .expect("wrong password refused");
        assert_eq!(code(&e), "28P01");
    }
    // And a successful session with a query, for the debug lines.
    let (client, _c) = connect(&good).await;
    first_value(&client, "SELECT 1").await.expect("query");
    drop(client);
    let _ = child.start_kill();
    let out = tokio::time::timeout(SUBPROCESS_DEADLINE, child.wait_with_output())
        .await
        .expect("pgheal exits within the deadline")
        .expect("pgheal output");
    let logs = text(&out.stderr);
    assert!(logs.contains("client authentication failed"), "{logs}");
    for s in [APP_PASSWORD, secret.as_str(), "other-user-pw", guesses[0]] {
        assert!(!logs.contains(s), "the logs show a secret ({s}):\n{logs}");
    }

    // `check` reports errors by key path and never prints values.
    std::fs::write(
        &config,
        format!("{body}\n[pool]\nbogus = \"{APP_PASSWORD}\"\n"),
    )
    .expect("write config");
    let mut cmd = pgheal();
    cmd.arg("check").arg("--config").arg(&config);
    let out = output_within(cmd, None, SUBPROCESS_DEADLINE);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success());
    assert!(all.contains("pool.bogus"), "{all}");
    for s in [APP_PASSWORD, secret.as_str()] {
        assert!(!all.contains(s), "check shows a secret ({s}):\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_client_connections_new_clients_get_53300() {
    let node = app_node().await;
    let proxy = proxy_with(&node, "max_client_connections = 3", "").await;
    let url = app_url(&proxy);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(connect(&url).await);
    }
    let e = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a fourth client is refused");
    assert_eq!(code(&e), "53300");
    for (c, _) in &clients {
        assert_eq!(first_value(c, "SELECT 1").await.expect("still served"), "1");
    }
    clients.pop();
    eventually(Duration::from_secs(10), "a slot to come free", || {
        let url = url.clone();
        async move {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_ok()
        }
    })
    .await;
}

//! `pgheal check`: every error in a file, each with its key path.

mod common;
use common::{output_within, SUBPROCESS_DEADLINE};
use std::process::Command;

fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgheal.toml");
    std::fs::write(&path, text).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgheal"));
    cmd.args(["check", "--config"]).arg(&path);
    let out = output_within(cmd, None, SUBPROCESS_DEADLINE);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), all)
}

#[test]
fn the_example_file_is_valid() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"))
            .unwrap();
    let (ok, out) = check(&example);
    assert!(ok, "{out}");
    assert!(out.contains("configuration is valid"), "{out}");
}

#[test]
fn every_error_is_reported_with_its_key_path() {
    let bad = r#"
[proxy]
listen = "127.0.0.1:6432"
pool_mode = "statement"
login_timeout = "ten seconds"
colour = "blue"

[pool]
checkout_timeout = 5

[[users]]
name = "app"
auth = "md5"

[databases.app]
nodes = []
pool_size = "twenty"

[databases.other]
nodes = ["localhost", "db:5432"]
min_idle = 50
"#;
    let (ok, out) = check(bad);
    assert!(!ok, "{out}");
    for expected in [
        "proxy.pool_mode: unknown pool mode \"statement\"",
        "proxy.login_timeout: invalid duration \"ten seconds\"",
        "proxy.colour: unknown key",
        "pool.checkout_timeout: expected a duration",
        "users[0].password: missing: md5 needs the plain password",
        "databases.app.nodes: must list at least one node",
        "databases.app.pool_size: expected an integer, found string",
        "databases.other.nodes[0]: `localhost` is not \"host:port\"",
        "databases.other.min_idle: must not exceed pool_size",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
    assert!(out.contains("9 error(s)"), "{out}");
}

#[test]
fn syntax_errors_and_missing_files_are_reported() {
    let (ok, out) = check("[proxy\nlisten = 1");
    assert!(!ok);
    assert!(out.contains("line 1"), "{out}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgheal"));
    cmd.args(["check", "--config", "/nonexistent/pgheal.toml"]);
    let out = output_within(cmd, None, SUBPROCESS_DEADLINE);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn secrets_never_appear_in_errors() {
    let (ok, out) = check(
        "[[users]]\nname = \"u\"\npassword = \"hunter2\"\nscram_secret = \"hunter3\"\n[databases.d]\nnodes = [\"h:1\"]\npassword = 5",
    );
    assert!(!ok);
    assert!(
        out.contains("users[0].scram_secret: invalid SCRAM secret"),
        "{out}"
    );
    assert!(
        !out.contains("hunter2") && !out.contains("hunter3"),
        "{out}"
    );
}

#[test]
fn env_references_are_expanded_or_reported() {
    std::env::set_var("PGHEAL_TEST_CONFIG_PW", "from-env");
    let base = "[[users]]\nname = \"u\"\npassword = \"${PGHEAL_TEST_CONFIG_PW}\"\n\
                [databases.d]\nnodes = [\"127.0.0.1:5432\"]\npassword = \"p$$x-${PGHEAL_TEST_CONFIG_PW}\"\n";
    let config = pgheal::config::Config::parse(base).expect("valid with the variable set");
    assert_eq!(config.users[0].password.as_deref(), Some("from-env"));
    assert_eq!(
        config.databases["d"].password.as_deref(),
        Some("p$x-from-env")
    );
    let (ok, out) = check(
        "[[users]]\nname = \"u\"\npassword = \"${PGHEAL_TEST_NOT_SET_ANYWHERE}\"\n\
         [databases.d]\nnodes = [\"127.0.0.1:5432\"]\n",
    );
    assert!(!ok);
    assert!(
        out.contains(
            "users[0].password: environment variable PGHEAL_TEST_NOT_SET_ANYWHERE is not set"
        ),
        "{out}"
    );
}

#[test]
fn tls_settings_are_checked() {
    let (ok, out) = check(
        "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\nmode = \"always\"\n\
         [[users]]\nname = \"u\"\npassword = \"p\"\n\
         [databases.d]\nnodes = [\"127.0.0.1:5432\"]\ntls = \"verify-full\"\n\
         [databases.e]\nnodes = [\"127.0.0.1:5432\"]\ntls = \"sometimes\"\n",
    );
    assert!(!ok);
    for expected in [
        "tls.mode: expected \"prefer\" or \"require\"",
        "tls: cannot read certificates from /nonexistent/cert.pem",
        "databases.d.tls: verify-full needs tls_ca",
        "databases.e.tls: expected disable, prefer, require, verify-ca or verify-full",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[test]
fn the_kubernetes_configmap_holds_a_valid_config() {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/configmap.yaml"
    ))
    .expect("deploy/configmap.yaml");
    let toml: String = yaml
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("pgheal.toml: |"))
        .skip(1)
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("[databases.app]"), "{toml}");
    std::env::set_var("APP_PASSWORD", "from-the-secret");
    let config = pgheal::config::Config::parse(&toml).expect("the ConfigMap's config is valid");
    assert_eq!(config.users[0].password.as_deref(), Some("from-the-secret"));
    assert!(config.proxy.http_listen.is_some());
    assert!(
        config.proxy.watch_config,
        "a mounted ConfigMap changes without a signal"
    );
}

#[test]
fn one_node_reached_with_two_tls_settings_is_an_error() {
    let bad = r#"
[proxy]
listen = "127.0.0.1:6432"
[[users]]
name = "app"
password = "pw"
[databases.a]
nodes = ["db1:5432", "db2:5432"]
tls = "require"
[databases.b]
nodes = ["db2:5432"]
tls = "disable"
[databases.c]
nodes = ["db1:5432"]
tls = "require"
"#;
    let (ok, out) = check(bad);
    assert!(!ok, "{out}");
    assert!(
        out.contains("databases.b.tls: node db2:5432 is also a node of database \"a\""),
        "{out}"
    );
    assert!(out.contains("1 error(s)"), "{out}");
}

#[test]
fn auth_and_any_database_sections_are_checked() {
    let bad = r#"
[proxy]
listen = "127.0.0.1:6432"
[auth]
query = "SELECT usename, passwd FROM pg_shadow WHERE usename = 'x'"
colour = "blue"
[databases.app]
nodes = ["db1:5432"]
max_databases = 3
[databases."*"]
nodes = ["db1:5432"]
"#;
    let (ok, out) = check(bad);
    assert!(!ok, "{out}");
    for expected in [
        "auth.colour: unknown key",
        "auth.user: missing: who runs the lookup",
        "databases.app.max_databases: only the \"*\" database takes max_databases",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
}

#[test]
fn restore_settings_are_checked() {
    let base = "[[users]]\nname = \"app\"\npassword = \"pw\"\n\
                [databases.app]\nnodes = [\"127.0.0.1:5432\"]\n\
                [backup]\ndir = \"/tmp/b\"\nevery = \"1h\"\n";
    let (ok, out) = check(&format!(
        "{base}restore_args = [\"--no-owner\", \"-d\", \"--dbname=x\", \"oops\"]\n\
         restore_check_every = \"7d\"\n"
    ));
    assert!(!ok, "{out}");
    for expected in [
        "backup.restore_args: \"-d\" is set by pgheal itself",
        "backup.restore_args: \"--dbname=x\" is set by pgheal itself",
        "backup.restore_args: \"oops\" is not an option",
        "backup.restore_target: missing",
    ] {
        assert!(out.contains(expected), "missing `{expected}` in:\n{out}");
    }
    let (ok, out) = check(&format!("{base}restore_target = \"scratch\"\n"));
    assert!(
        !ok && out.contains("backup.restore_check_every: missing"),
        "{out}"
    );
    let (ok, out) = check(&format!(
        "{base}restore_check_every = \"7d\"\nrestore_target = \"scratch\"\n"
    ));
    assert!(
        !ok && out.contains("backup.restore_target: expected \"host:port\""),
        "{out}"
    );
    for target in ["primary", "scratch.internal:5433"] {
        let (ok, out) = check(&format!(
            "{base}restore_check_every = \"7d\"\nrestore_target = \"{target}\"\n\
             user = \"restorer\"\npassword = \"x\"\n"
        ));
        assert!(ok, "{target}: {out}");
    }
}

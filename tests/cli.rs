//! The binary's command line: `check-config` and the exit status for bad settings.

use std::process::{Command, Output};

const SECRET: &str = "this is my long pass phrase";

fn nsbridge(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nsbridge"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// The standard output of a run that must have succeeded (its errors shown if not).
fn stdout_of_success(out: Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn good_env() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "MONGODB_URI",
            "mongodb://ns:hunter2-password@db.example:27017/nightscout?replicaSet=rs0",
        ),
        ("API_SECRET", SECRET),
    ]
}

#[test]
fn check_config_prints_effective_settings_with_secrets_redacted() {
    let out = nsbridge(&["check-config"], &good_env());
    let text = stdout_of_success(out);
    assert!(!text.contains("hunter2-password"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    for line in [
        "listen = \"0.0.0.0:8080\"",
        "relay = \"apiv3\"",
        "replace_window_secs = 60",
        "uri = \"mongodb://ns:<redacted>@db.example:27017/nightscout?replicaSet=rs0\"",
        "database = \"nightscout\"",
        "api_secret = \"<redacted>\"",
        "collections_prefix = \"auth_\"",
        "treatments = \"treatments\"",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn bad_settings_exit_2_with_one_line_naming_the_setting() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("API_SECRET", SECRET)], "mongo.uri: not set"),
        (
            &[("MONGODB_URI", "mongodb://h:27017"), ("API_SECRET", SECRET)],
            "mongo.uri: names no database",
        ),
        (
            &[("MONGODB_URI", "mongodb://h/ns"), ("API_SECRET", "too short")],
            "auth.api_secret: too short",
        ),
        (
            &[
                ("MONGODB_URI", "mongodb://h/ns"),
                ("API_SECRET", SECRET),
                ("NSBRIDGE_LISTEN", "8080"),
            ],
            "listen: \"8080\" is not an address",
        ),
        (
            &[
                ("MONGODB_URI", "mongodb://h/ns"),
                ("API_SECRET", SECRET),
                ("NSBRIDGE_RELAY", "everything"),
            ],
            "relay: unknown mode \"everything\"",
        ),
    ];
    for (env, expected) in cases {
        for args in [&["check-config"][..], &["run"][..], &[][..]] {
            let out = nsbridge(args, env);
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
            assert!(
                stderr.starts_with(&format!("nsbridge: bad configuration: {expected}")),
                "{args:?} {env:?}: {stderr}"
            );
            assert!(!stderr.contains(SECRET));
        }
    }
}

#[test]
fn config_file_from_flag_or_env() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nsbridge.toml");
    std::fs::write(&file, "relay = \"all\"\n[mongo]\nuri = \"mongodb://h/filedb\"\n").unwrap();
    let path = file.to_str().unwrap();
    let env = [("API_SECRET", SECRET)];
    let out = nsbridge(&["--config", path, "check-config"], &env);
    let text = stdout_of_success(out);
    assert!(
        text.contains("relay = \"all\"") && text.contains("database = \"filedb\""),
        "{text}"
    );

    let out = nsbridge(
        &["check-config"],
        &[("API_SECRET", SECRET), ("NSBRIDGE_CONFIG", path)],
    );
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains("database = \"filedb\"")
    );

    let out = nsbridge(&["--config", "/nonexistent.toml", "check-config"], &env);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_tenants_file_is_checked_and_its_problems_name_the_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tenants.toml");
    let path = file.to_str().unwrap();
    let env = [
        ("MONGODB_URI", "mongodb://db.example:27017/?replicaSet=rs0"),
        ("NSBRIDGE_TENANTS", path),
        ("ALICE_SECRET", "alice's long pass phrase"),
    ];
    let alice = "[[tenant]]\nname = \"alice\"\nhosts = [\"alice.example.org\"]\ndatabase = \"ns_alice\"\napi_secret_env = \"ALICE_SECRET\"\n";
    std::fs::write(&file, alice).unwrap();
    let out = nsbridge(&["check-config"], &env);
    let text = stdout_of_success(out);
    assert!(
        text.contains("# alice: database ns_alice, hosts alice.example.org"),
        "{text}"
    );
    assert!(!text.contains("alice's long pass phrase"), "{text}");

    let cases = [
        (
            format!("{alice}\n[[tenant]]\nname = \"bob\"\nhosts = [\"ALICE.example.org\"]\ndatabase = \"ns_bob\"\napi_secret = \"bob's long pass phrase\"\n"),
            "tenants file: tenant \"bob\": host \"alice.example.org\" is also tenant \"alice\"'s",
        ),
        (
            "[[tenant]]\nname = \"carol\"\nhosts = [\"c.example.org\"]\ndatabase = \"ns_c\"\napi_secret_env = \"CAROL_SECRET\"\n".to_string(),
            "tenants file: tenant \"carol\": api_secret_env names \"CAROL_SECRET\", which is not set",
        ),
        (
            format!("{alice}port = 1\n"),
            "tenants file: tenant \"alice\": unknown field `port`",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&file, &text).unwrap();
        for args in [&["check-config"][..], &["run"][..]] {
            let out = nsbridge(args, &env);
            let stderr = String::from_utf8(out.stderr).unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(
                stderr.starts_with(&format!("nsbridge: bad configuration: {expected}")),
                "{args:?}: {stderr}"
            );
            assert!(!stderr.contains("pass phrase"), "{stderr}");
        }
    }
}

//! The docker-compose stack, validated by `docker-compose config` (no Docker engine runs
//! on the test machines) and checked for the wiring docs/deploy.md describes.

use std::process::{Command, Output};

use yaml_rust2::{Yaml, YamlLoader};

const SECRET: &str = "compose-test-secret-123";

fn compose_config(api_secret: Option<&str>) -> Output {
    compose_config_with(api_secret, &[])
}

fn compose_config_with(api_secret: Option<&str>, profiles: &[&str]) -> Output {
    let repo = env!("CARGO_MANIFEST_DIR");
    // An empty env file, so that a developer's own .env cannot change the outcome.
    let empty = tempfile::NamedTempFile::new().unwrap();
    let mut command = Command::new("docker-compose");
    command
        .current_dir(repo)
        .env_remove("API_SECRET")
        .arg("--env-file")
        .arg(empty.path())
        .args(["-f", "docker-compose.yml"]);
    for profile in profiles {
        command.args(["--profile", profile]);
    }
    command.arg("config");
    if let Some(secret) = api_secret {
        command.env("API_SECRET", secret);
    }
    command
        .output()
        .expect("docker-compose is needed (scripts/test installs Debian's docker-compose)")
}

fn text(yaml: &Yaml) -> String {
    match yaml {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn strings(yaml: &Yaml) -> Vec<String> {
    yaml.as_vec()
        .map(|v| v.iter().map(text).collect())
        .unwrap_or_default()
}

/// Port entries come as `"127.0.0.1:27017:27017/tcp"` or `{published, target}`.
fn targets(ports: &Yaml) -> Vec<String> {
    ports
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| match p {
            Yaml::String(s) => s.trim_end_matches("/tcp").rsplit(':').next().unwrap().to_string(),
            other => text(&other["target"]),
        })
        .collect()
}

#[test]
fn compose_stack_wires_mongo_nightscout_and_the_bridge() {
    let out = compose_config(Some(SECRET));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = &YamlLoader::load_from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()[0];
    let services = &config["services"];
    // The services started by default (docker-compose 1.x lists the profiles' too).
    let mut names: Vec<String> = services
        .as_hash()
        .unwrap()
        .iter()
        .filter(|(_, service)| service["profiles"].is_badvalue())
        .map(|(name, _)| text(name))
        .collect();
    names.sort();
    assert_eq!(names, ["mongo", "nightscout", "nsbridge"]);

    // MongoDB: a single-node replica set, initiated idempotently by its health check.
    let mongo = &services["mongo"];
    let command = strings(&mongo["command"]);
    assert!(
        command.windows(2).any(|w| w == ["--replSet", "rs0"]),
        "{command:?}"
    );
    let health = strings(&mongo["healthcheck"]["test"]).join(" ");
    assert!(
        health.contains("rs.initiate") && health.contains("mongo:27017"),
        "{health}"
    );
    let image = text(&mongo["image"]);
    let major: u32 = image
        .trim_start_matches("mongo:")
        .split('.')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(major >= 5, "MongoDB 4.4+ (mongosh needs 5+): {image}");
    assert!(
        strings(&mongo["volumes"])
            .iter()
            .any(|v| v.starts_with("mongo-data:/data/db"))
    );
    assert!(!config["volumes"]["mongo-data"].is_badvalue());

    // Nightscout and the bridge: the same secret and the same replica-set URI.
    let nightscout = &services["nightscout"];
    let bridge = &services["nsbridge"];
    assert!(text(&nightscout["image"]).starts_with("nightscout/cgm-remote-monitor:"));
    for service in [nightscout, bridge] {
        assert_eq!(text(&service["environment"]["API_SECRET"]), SECRET);
        assert_eq!(
            text(&service["depends_on"]["mongo"]["condition"]),
            "service_healthy"
        );
    }
    let uri = text(&nightscout["environment"]["MONGO_CONNECTION"]);
    assert!(
        uri.starts_with("mongodb://mongo:27017/") && uri.contains("replicaSet=rs0"),
        "{uri}"
    );
    assert_eq!(text(&bridge["environment"]["MONGO_CONNECTION"]), uri);

    // The bridge: built here, on its own port, never Nightscout's PORT.
    assert!(
        !bridge["build"]["context"].is_badvalue(),
        "built from this repository"
    );
    assert_eq!(text(&bridge["environment"]["NSBRIDGE_LISTEN"]), "0.0.0.0:8080");
    assert!(bridge["environment"]["PORT"].is_badvalue());
    // The bridge is the front door: it alone is published, and it reaches Nightscout
    // inside the stack.
    assert_eq!(targets(&bridge["ports"]), ["8080"]);
    assert!(
        nightscout["ports"].is_badvalue(),
        "Nightscout's port is not published"
    );
    assert_eq!(
        text(&bridge["environment"]["NSBRIDGE_UPSTREAM"]),
        "http://nightscout:1337"
    );
    // Its resume position outlives the container, on a named volume at the image's
    // state directory.
    assert!(
        strings(&bridge["volumes"])
            .iter()
            .any(|v| v.starts_with("nsbridge-state:/var/lib/nsbridge")),
        "{:?}",
        strings(&bridge["volumes"])
    );
    assert!(!config["volumes"]["nsbridge-state"].is_badvalue());
    assert_eq!(strings(&nightscout["expose"]), ["1337"]);
    assert!(!bridge["restart"].is_badvalue());
}

#[test]
fn compose_refuses_to_start_without_api_secret() {
    let out = compose_config(None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set API_SECRET"));
}

/// What `docker build` and `docker run ... nsbridge check-config` (docs/deploy.md) rely on,
/// read from the Dockerfile, since no Docker engine runs here: a multi-stage build of the
/// locked graph, an unprivileged user, the state volume, `nsbridge` as entry point and
/// health check.
#[test]
fn dockerfile_runs_as_non_root_with_the_binary_as_health_check() {
    let dockerfile = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    // One string per instruction, continuation lines joined.
    let joined = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instructions: Vec<&str> = joined.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert!(
        instructions.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    let user = instructions
        .iter()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("a USER");
    assert!(
        !user.contains("root") && !user.ends_with(" 0") && !user.contains(" 0:"),
        "{user}"
    );
    // The state directory is a volume the unprivileged user owns, named by the setting.
    assert!(
        instructions.contains(&r#"VOLUME ["/var/lib/nsbridge"]"#),
        "{instructions:?}"
    );
    assert!(instructions.contains(&"ENV NSBRIDGE_STATE_DIR=/var/lib/nsbridge"));
    assert!(
        instructions
            .iter()
            .any(|l| l.contains("install -d -o 10001 -g 10001") && l.contains("/var/lib/nsbridge"))
    );
    let health = instructions
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    assert!(health.contains(r#"CMD ["nsbridge", "healthcheck"]"#), "{health}");
    assert!(
        instructions
            .iter()
            .any(|l| l.starts_with("ENTRYPOINT") && l.contains("nsbridge"))
    );
    // The dependency layer builds the locked graph, vendored crates included: each path
    // patched in Cargo.toml is copied in before the first build.
    let manifest: toml::Table = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let first_build = instructions
        .iter()
        .position(|l| l.contains("cargo build"))
        .expect("a cargo build");
    let copied: Vec<&str> = instructions[..first_build]
        .iter()
        .filter_map(|l| l.strip_prefix("COPY "))
        .flat_map(|l| l.split_whitespace())
        .collect();
    let patched = manifest["patch"]["crates-io"].as_table().unwrap();
    for (name, patch) in patched {
        let path = patch["path"].as_str().unwrap();
        let top = path.split('/').next().unwrap();
        assert!(
            copied.contains(&top),
            "{name} ({path}) is not copied before the first build"
        );
    }
}

#[test]
fn the_replicas_profile_puts_nginx_in_front_of_two_bridges() {
    let out = compose_config_with(Some(SECRET), &["replicas"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = &YamlLoader::load_from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()[0];
    let services = &config["services"];
    let (first, second, nginx) = (&services["nsbridge"], &services["nsbridge-2"], &services["nginx"]);
    // The same site, the same database and secret; the second reached through nginx only.
    for key in [
        "MONGO_CONNECTION",
        "API_SECRET",
        "NSBRIDGE_UPSTREAM",
        "NSBRIDGE_LISTEN",
    ] {
        assert_eq!(
            text(&second["environment"][key]),
            text(&first["environment"][key]),
            "{key}"
        );
    }
    assert_eq!(
        text(&second["environment"]["NSBRIDGE_AUTH__TRUSTED_PROXY"]),
        "true"
    );
    assert!(
        second["ports"].is_badvalue(),
        "the second bridge is not published"
    );
    assert_eq!(targets(&nginx["ports"]), ["80"]);
    let mounts = strings(&nginx["volumes"]);
    assert!(
        mounts
            .iter()
            .any(|m| m.ends_with("deploy/nginx/replicas.conf:/etc/nginx/conf.d/default.conf:ro")),
        "{mounts:?}"
    );
    // nginx balances over exactly these services, sticky by client address.
    let conf =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx/replicas.conf")).unwrap();
    let servers: Vec<&str> = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("server "))
        .filter(|l| !l.starts_with('{'))
        .map(|l| l.split(':').next().unwrap())
        .collect();
    assert_eq!(servers, ["nsbridge", "nsbridge-2"]);
    assert!(conf.contains("hash $remote_addr consistent;"));
    // Without the profile, neither is started.
    for service in [second, nginx] {
        assert_eq!(strings(&service["profiles"]), ["replicas"]);
    }
}

/// docs/deploy.md's quick start: `cp .env.example .env`, set API_SECRET in it, then
/// `docker-compose up -d` reads it.
#[test]
fn the_quick_start_env_file_with_its_secret_set_configures_the_stack() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(format!("{repo}/.env.example")).unwrap();
    assert!(
        example.lines().any(|l| l == "API_SECRET="),
        "the example leaves API_SECRET to fill in"
    );
    let env_file = dir.path().join(".env");
    std::fs::write(
        &env_file,
        example.replace("API_SECRET=\n", &format!("API_SECRET={SECRET}\n")),
    )
    .unwrap();
    let output = Command::new("docker-compose")
        .current_dir(repo)
        .env_remove("API_SECRET")
        .arg("--env-file")
        .arg(&env_file)
        .args(["-f", "docker-compose.yml", "config"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config = &YamlLoader::load_from_str(&String::from_utf8_lossy(&output.stdout)).unwrap()[0];
    for service in ["nightscout", "nsbridge"] {
        assert_eq!(
            text(&config["services"][service]["environment"]["API_SECRET"]),
            SECRET,
            "{service}"
        );
    }
}

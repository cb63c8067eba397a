use super::*;

struct Secrets;

impl SecretSource for Secrets {
    fn env(&self, name: &str) -> Option<String> {
        match name {
            "ALICE_API_SECRET" => Some("alice's long pass phrase".into()),
            "EMPTY" => Some("  ".into()),
            _ => None,
        }
    }

    fn file(&self, path: &std::path::Path) -> std::io::Result<String> {
        match path.to_str() {
            Some("/run/secrets/bob") => Ok("bob's long pass phrase\n".into()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "No such file or directory",
            )),
        }
    }
}

fn settings() -> Settings {
    let env: HashMap<String, String> = [
        ("MONGODB_URI", "mongodb://db.example:27017/?replicaSet=rs0"),
        ("NSBRIDGE_TENANTS", "/etc/nsbridge/tenants.toml"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Settings::load(None, &env).unwrap()
}

const THREE: &str = r#"
[[tenant]]
name = "alice"
hosts = ["alice.example.org", "Alice.Example.net."]
database = "ns_alice"
api_secret_env = "ALICE_API_SECRET"

[[tenant]]
name = "bob"
hosts = ["bob.example.org"]
database = "ns_bob"
api_secret_file = "/run/secrets/bob"
relay = "all"
auth_default_roles = "denied"

[[tenant]]
name = "carol"
hosts = ["carol.example.org:443"]
database = "ns_carol"
api_secret = "carol's long pass phrase"
mongodb_uri = "mongodb://other.example:27017/?replicaSet=rs1"
upstream = "http://carol-nightscout:1337"
"#;

#[test]
fn a_file_of_three_tenants() {
    let settings = settings();
    assert!(
        settings.auth.api_secret.expose().is_empty(),
        "no global secret needed"
    );
    let tenants = parse(THREE, &settings, &Secrets).unwrap();
    let names: Vec<&str> = tenants.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["alice", "bob", "carol"]);
    let [alice, bob, carol] = &tenants[..] else {
        panic!()
    };
    assert_eq!(alice.hosts, ["alice.example.org", "alice.example.net"]);
    assert_eq!(alice.api_secret.expose(), "alice's long pass phrase");
    assert_eq!(alice.relay, RelayMode::Apiv3, "the bridge's default");
    assert_eq!(alice.default_roles, ["readable"]);
    assert_eq!(alice.uri(&settings), "mongodb://db.example:27017/?replicaSet=rs0");
    assert_eq!(
        bob.api_secret.expose(),
        "bob's long pass phrase",
        "the file's newline dropped"
    );
    assert_eq!(
        (bob.relay, bob.default_roles.clone()),
        (RelayMode::All, vec!["denied".to_string()])
    );
    assert_eq!(
        carol.hosts,
        ["carol.example.org"],
        "the port is not part of the name"
    );
    assert_eq!(
        carol.uri(&settings),
        "mongodb://other.example:27017/?replicaSet=rs1"
    );
    assert_eq!(
        carol.upstream.as_ref().unwrap().to_string(),
        "http://carol-nightscout:1337/"
    );
    // Secrets never printed.
    assert!(!format!("{tenants:?}").contains("pass phrase"));
    assert_eq!(parse("", &settings, &Secrets).unwrap(), Vec::new());
}

#[test]
fn every_problem_names_its_tenant() {
    let settings = settings();
    let tenant = |extra: &str| {
        format!(
            "[[tenant]]\nname = \"ok\"\nhosts = [\"ok.example.org\"]\ndatabase = \"ns_ok\"\napi_secret = \"a long enough secret\"\n\n[[tenant]]\n{extra}"
        )
    };
    let cases = [
        (
            tenant(
                "name = \"dave\"\nhosts = [\"ok.example.org\"]\ndatabase = \"ns_dave\"\napi_secret = \"a long enough secret\"",
            ),
            "tenant \"dave\"",
            "host \"ok.example.org\" is also tenant \"ok\"'s",
        ),
        (
            tenant(
                "name = \"ok\"\nhosts = [\"x.example.org\"]\ndatabase = \"ns_x\"\napi_secret = \"a long enough secret\"",
            ),
            "tenant \"ok\"",
            "its name is used twice",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_ok\"\napi_secret = \"a long enough secret\"",
            ),
            "tenant \"dave\"",
            "database \"ns_ok\" is also tenant \"ok\"'s",
        ),
        (
            tenant("name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\""),
            "tenant \"dave\"",
            "no API secret (api_secret, api_secret_env or api_secret_file)",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret_env = \"DAVE_SECRET\"",
            ),
            "tenant \"dave\"",
            "api_secret_env names \"DAVE_SECRET\", which is not set",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret_env = \"EMPTY\"",
            ),
            "tenant \"dave\"",
            "api_secret_env names \"EMPTY\", which is not set",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret_file = \"/run/secrets/dave\"",
            ),
            "tenant \"dave\"",
            "api_secret_file /run/secrets/dave: No such file or directory",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret = \"short\"",
            ),
            "tenant \"dave\"",
            "API secret too short: 5 characters, Nightscout requires at least 12",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret = \"a long enough secret\"\napi_secret_env = \"X\"",
            ),
            "tenant \"dave\"",
            "give one of api_secret, api_secret_env and api_secret_file",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret = \"a long enough secret\"\nsecret = \"x\"",
            ),
            "tenant \"dave\"",
            "unknown field `secret`",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = []\ndatabase = \"ns_dave\"\napi_secret = \"a long enough secret\"",
            ),
            "tenant \"dave\"",
            "hosts must name at least one host",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"bad host\"]\ndatabase = \"ns_dave\"\napi_secret = \"a long enough secret\"",
            ),
            "tenant \"dave\"",
            "\"bad host\" is not a host name",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"admin\"\napi_secret = \"a long enough secret\"",
            ),
            "tenant \"dave\"",
            "database \"admin\" is not a MongoDB database name",
        ),
        (
            tenant(
                "name = \"dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret = \"a long enough secret\"\nrelay = \"v1\"",
            ),
            "tenant \"dave\"",
            "unknown mode \"v1\" (expected \"apiv3\" or \"all\")",
        ),
        (
            tenant(
                "name = \"Dave\"\nhosts = [\"d.example.org\"]\ndatabase = \"ns_dave\"\napi_secret = \"a long enough secret\"",
            ),
            "tenant #2",
            "name \"Dave\" must be 1 to 64 characters of a-z, 0-9, '-' and '_'",
        ),
        (
            tenant("hosts = [\"d.example.org\"]\ndatabase = \"ns_dave\""),
            "tenant #2",
            "missing field `name`",
        ),
        (
            "[tenants]\nname = \"x\"".to_string(),
            "file",
            "unknown key \"tenants\" (expected [[tenant]] tables)",
        ),
        (
            "name = \"x\"\n[[tenant]\n".to_string(),
            "file",
            "line 2: unclosed array table",
        ),
    ];
    for (text, tenant, problem) in cases {
        let e = parse(&text, &settings, &Secrets).unwrap_err();
        assert_eq!(e.tenant, tenant, "{text}\n{e}");
        assert!(e.problem.contains(problem), "{text}\n{e}");
    }
}

#[test]
fn hosts_as_clients_send_them() {
    assert_eq!(
        normalise_host("Alice.Example.org"),
        Some("alice.example.org".into())
    );
    assert_eq!(
        normalise_host("alice.example.org:8443"),
        Some("alice.example.org".into())
    );
    assert_eq!(
        normalise_host("alice.example.org."),
        Some("alice.example.org".into())
    );
    assert_eq!(normalise_host("127.0.0.1:8080"), Some("127.0.0.1".into()));
    assert_eq!(normalise_host("[::1]:8080"), Some("[::1]".into()));
    assert_eq!(normalise_host("localhost"), Some("localhost".into()));
    for bad in [
        "",
        "a b",
        "a..b",
        "-a.org",
        "a.org:port",
        "[::1",
        "[zz]:1",
        "a/b",
        &"a".repeat(64),
    ] {
        assert_eq!(normalise_host(bad), None, "{bad:?}");
    }
}

#[test]
fn the_single_site_is_one_tenant_on_any_host() {
    let env: HashMap<String, String> = [
        ("MONGODB_URI", "mongodb://db.example:27017/nightscout"),
        ("API_SECRET", "a long enough secret"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let settings = Settings::load(None, &env).unwrap();
    let single = TenantSpec::single(&settings);
    assert_eq!(
        (single.name.as_str(), single.database.as_str()),
        ("nightscout", "nightscout")
    );
    assert!(single.hosts.is_empty());
    assert_eq!(single.api_secret.expose(), "a long enough secret");
}

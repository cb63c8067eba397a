use super::*;

const SECRET: &str = "this is my long pass phrase";

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn minimal() -> Vec<(&'static str, &'static str)> {
    vec![
        ("MONGODB_URI", "mongodb://db.example:27017/nightscout"),
        ("API_SECRET", SECRET),
    ]
}

fn load(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::load(None, &env(pairs))
}

fn load_err(pairs: &[(&str, &str)]) -> SettingsError {
    load(pairs).expect_err("settings should be refused")
}

#[test]
fn defaults_with_nightscout_env() {
    let s = load(&minimal()).unwrap();
    assert_eq!(s.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(s.relay, RelayMode::Apiv3);
    assert_eq!(s.replace_window, Duration::from_secs(60));
    assert_eq!(s.identifier_cache_size.get(), 100_000);
    assert_eq!(s.mongo.uri, "mongodb://db.example:27017/nightscout");
    assert_eq!(s.mongo.database, "nightscout");
    assert!(!s.mongo.pre_images);
    assert_eq!(s.collections, CollectionNames::default());
    assert_eq!(s.auth.api_secret.expose(), SECRET);
    assert_eq!(s.auth.collections_prefix, "auth_");
    assert_eq!(s.auth.default_roles, vec!["readable".to_string()]);
    assert!(!s.auth.trusted_proxy);
    assert_eq!(s.log.format, LogFormat::Text);
}

#[test]
fn nightscout_uri_names_in_nightscout_order_with_azure_and_lower_case_forms() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("MONGODB_URI", "mongodb://h/a"),
                ("MONGO_CONNECTION", "mongodb://h/b"),
            ],
            "b",
        ),
        (
            &[("MONGO", "mongodb://h/c"), ("MONGOLAB_URI", "mongodb://h/d")],
            "c",
        ),
        (
            &[
                ("STORAGE_URI", "mongodb://h/e"),
                ("MONGO_CONNECTION", "mongodb://h/b"),
            ],
            "e",
        ),
        (&[("mongodb_uri", "mongodb://h/f")], "f"),
        (
            &[
                ("CUSTOMCONNSTR_MONGO_CONNECTION", "mongodb://h/g"),
                ("MONGO_CONNECTION", "mongodb://h/b"),
            ],
            "g",
        ),
        (&[("CUSTOMCONNSTR_mongolab_uri", "mongodb://h/h")], "h"),
        (
            &[("MONGO_CONNECTION", "  "), ("MONGODB_URI", " mongodb://h/i ")],
            "i",
        ),
    ];
    for (vars, db) in cases {
        let mut pairs = vars.to_vec();
        pairs.push(("API_SECRET", SECRET));
        let s = load(&pairs).unwrap();
        assert_eq!(&s.mongo.database, db, "{vars:?}");
    }
}

#[test]
fn nightscout_collection_and_auth_variables() {
    let mut pairs = minimal();
    pairs.extend([
        ("MONGO_COLLECTION", "sgv"),
        ("MONGO_TREATMENTS_COLLECTION", "tx"),
        ("MONGO_DEVICESTATUS_COLLECTION", "ds"),
        ("MONGO_PROFILE_COLLECTION", "pr"),
        ("MONGO_FOOD_COLLECTION", "fd"),
        ("MONGO_SETTINGS_COLLECTION", "st"),
        ("MONGO_AUTHENTICATION_COLLECTIONS_PREFIX", "sec_"),
        ("AUTH_DEFAULT_ROLES", "readable, careportal:denied"),
    ]);
    let s = load(&pairs).unwrap();
    assert_eq!(
        s.collections,
        CollectionNames {
            entries: "sgv".into(),
            treatments: "tx".into(),
            devicestatus: "ds".into(),
            profile: "pr".into(),
            food: "fd".into(),
            settings: "st".into(),
        }
    );
    assert_eq!(s.auth.collections_prefix, "sec_");
    assert_eq!(s.auth.default_roles, vec!["readable", "careportal", "denied"]);
    pairs.push(("ENTRIES_COLLECTION", "entries2"));
    assert_eq!(load(&pairs).unwrap().collections.entries, "entries2");
}

#[test]
fn empty_default_roles_means_none() {
    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_AUTH__DEFAULT_ROLES", ","));
    assert!(load(&pairs).unwrap().auth.default_roles.is_empty());
}

#[test]
fn nightscout_port_is_not_the_bridge_port() {
    let mut pairs = minimal();
    pairs.push(("PORT", "1337"));
    assert_eq!(load(&pairs).unwrap().listen.port(), 8080);
}

#[test]
fn nsbridge_env_beats_nightscout_env_beats_file_beats_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nsbridge.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9000\"\nrelay = \"all\"\n[mongo]\nuri = \"mongodb://file/filedb\"\n[auth]\napi_secret = \"file secret 123\"\n",
    )
    .unwrap();
    let from_file = Settings::load(Some(&file), &env(&[])).unwrap();
    assert_eq!(from_file.listen.port(), 9000);
    assert_eq!(from_file.relay, RelayMode::All);
    assert_eq!(from_file.mongo.database, "filedb");
    assert_eq!(from_file.auth.api_secret.expose(), "file secret 123");

    let nightscout = Settings::load(Some(&file), &env(&minimal())).unwrap();
    assert_eq!(nightscout.mongo.database, "nightscout");
    assert_eq!(nightscout.auth.api_secret.expose(), SECRET);
    assert_eq!(nightscout.listen.port(), 9000);

    let mut pairs = minimal();
    pairs.extend([
        ("NSBRIDGE_MONGO__URI", "mongodb://env/envdb"),
        ("NSBRIDGE_LISTEN", "[::1]:7000"),
        ("NSBRIDGE_RELAY", "apiv3"),
        ("NSBRIDGE_REPLACE_WINDOW_SECS", "5"),
        ("NSBRIDGE_MONGO__PRE_IMAGES", "true"),
        ("NSBRIDGE_CONFIG", "ignored here: it names the file"),
    ]);
    let s = Settings::load(Some(&file), &env(&pairs)).unwrap();
    assert_eq!(s.mongo.database, "envdb");
    assert_eq!(s.listen, "[::1]:7000".parse().unwrap());
    assert_eq!(s.relay, RelayMode::Apiv3);
    assert_eq!(s.replace_window, Duration::from_secs(5));
    assert!(s.mongo.pre_images);
}

#[test]
fn database_setting_wins_over_uri_path() {
    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_MONGO__DATABASE", "other"));
    assert_eq!(load(&pairs).unwrap().mongo.database, "other");
    let pairs = [
        ("MONGODB_URI", "mongodb://h:27017/"),
        ("API_SECRET", SECRET),
        ("NSBRIDGE_MONGO__DATABASE", "x"),
    ];
    assert_eq!(load(&pairs).unwrap().mongo.database, "x");
}

#[test]
fn bad_settings_name_the_setting_and_the_problem() {
    let e = load_err(&[("API_SECRET", SECRET)]);
    assert_eq!(e.setting, "mongo.uri");
    assert!(e.problem.starts_with("not set"), "{e}");

    let e = load_err(&[
        ("MONGODB_URI", "mongodb://user:pw@h:27017/?replicaSet=rs0"),
        ("API_SECRET", SECRET),
    ]);
    assert_eq!(e.setting, "mongo.uri");
    assert!(e.problem.contains("names no database"), "{e}");

    let e = load_err(&[("MONGODB_URI", "http://h/db"), ("API_SECRET", SECRET)]);
    assert_eq!(e.setting, "mongo.uri");

    let e = load_err(&[("MONGODB_URI", "mongodb://h/db"), ("API_SECRET", "short")]);
    assert_eq!(
        e.to_string(),
        "auth.api_secret: too short: 5 characters, Nightscout requires at least 12"
    );

    let e = load_err(&[("MONGODB_URI", "mongodb://h/db")]);
    assert_eq!(e.setting, "auth.api_secret");

    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_LISTEN", "localhost"));
    let e = load_err(&pairs);
    assert_eq!(
        e.to_string(),
        "listen: \"localhost\" is not an address and port such as 0.0.0.0:8080"
    );

    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_RELAY", "apiv1"));
    assert_eq!(
        load_err(&pairs).to_string(),
        "relay: unknown mode \"apiv1\" (expected \"apiv3\" or \"all\")"
    );

    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_REPLACE_WINDOW_SECS", "soon"));
    let e = load_err(&pairs);
    assert_eq!(e.setting, "replace_window_secs", "{e}");

    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_LSTEN", "0.0.0.0:1"));
    let e = load_err(&pairs);
    assert!(e.to_string().contains("lsten"), "{e}");

    let mut pairs = minimal();
    pairs.push(("MONGO_FOOD_COLLECTION", "treatments"));
    assert_eq!(load_err(&pairs).setting, "collections");

    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_LOG__FORMAT", "xml"));
    assert_eq!(load_err(&pairs).setting, "log.format");
}

#[test]
fn missing_or_broken_config_file() {
    let e = Settings::load(Some(Path::new("/nonexistent/nsbridge.toml")), &env(&minimal())).unwrap_err();
    assert_eq!(e.setting, "--config");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "listen = \n").unwrap();
    let e = Settings::load(Some(&file), &env(&minimal())).unwrap_err();
    assert_eq!(e.setting, "--config");
    assert!(!e.to_string().contains('\n'));
}

#[test]
fn redacted_view_hides_secret_and_uri_password() {
    let pairs = [
        (
            "MONGODB_URI",
            "mongodb://ns:s3cr3t-pw@db1:27017,db2:27017/nightscout?replicaSet=rs0&authSource=admin",
        ),
        ("API_SECRET", SECRET),
    ];
    let text = Settings::load_redacted(None, &env(&pairs)).unwrap();
    assert!(!text.contains("s3cr3t-pw"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
    assert!(
        text.contains(
            "mongodb://ns:<redacted>@db1:27017,db2:27017/nightscout?replicaSet=rs0&authSource=admin"
        ),
        "{text}"
    );
    assert!(text.contains("api_secret = \"<redacted>\""), "{text}");
    assert!(text.contains("database = \"nightscout\""), "{text}");
    assert!(text.contains("listen = \"0.0.0.0:8080\""), "{text}");
}

#[test]
fn redact_uri_forms() {
    assert_eq!(redact_uri("mongodb://h/db"), "mongodb://h/db");
    assert_eq!(
        redact_uri("mongodb+srv://u:p@c.example/db"),
        "mongodb+srv://u:<redacted>@c.example/db"
    );
    assert_eq!(redact_uri("mongodb://u@h/db"), "mongodb://u@h/db");
    assert_eq!(redact_uri("mongodb://u:p@ss@h"), "mongodb://u:<redacted>@h");
    assert_eq!(
        redact_uri("mongodb://h/db?tlsCertificateKeyFilePassword=x&w=1"),
        "mongodb://h/db?tlsCertificateKeyFilePassword=<redacted>&w=1"
    );
}

#[test]
fn secret_debug_does_not_show_it() {
    let s = load(&minimal()).unwrap();
    assert!(!format!("{s:?}").contains(SECRET));
}

#[test]
fn upstream_is_nightscouts_internal_http_address() {
    assert_eq!(load(&minimal()).unwrap().upstream, None);
    for good in ["http://nightscout:1337", "http://10.0.0.5:1337/", "http://ns"] {
        let mut pairs = minimal();
        pairs.push(("NSBRIDGE_UPSTREAM", good));
        let upstream = load(&pairs).unwrap().upstream.expect(good);
        assert_eq!(upstream.scheme_str(), Some("http"), "{good}");
    }
    for (bad, why) in [
        ("https://ns.example.org", "uses https"),
        ("nightscout:1337", "is not an http:// URL"),
        ("http://nightscout:1337/site", "has a path"),
        ("http://nightscout:1337/?x=1", "has a path"),
        ("http://", "is not a URL"),
        ("ftp://nightscout", "is not an http:// URL"),
    ] {
        let mut pairs = minimal();
        pairs.push(("NSBRIDGE_UPSTREAM", bad));
        let e = load_err(&pairs);
        assert_eq!(e.setting, "upstream", "{bad}");
        assert!(e.problem.contains(why), "{bad}: {}", e.problem);
    }
}

#[test]
fn history_replay_and_state_settings() {
    let s = load(&minimal()).unwrap();
    assert_eq!(s.state, StateLocation::None);
    assert_eq!(s.history.limits, crate::history::HistoryLimits::default());
    assert_eq!(s.history.recovery_window, Duration::from_secs(120));
    assert_eq!(s.history.replay, crate::channel::replay::ReplayLimits::default());

    let mut pairs = minimal();
    pairs.extend([
        ("NSBRIDGE_STATE_DIR", "/var/lib/nsbridge"),
        ("NSBRIDGE_HISTORY__MAX_AGE_SECS", "60"),
        ("NSBRIDGE_HISTORY__RECOVERY_WINDOW_SECS", "0"),
        ("NSBRIDGE_REPLAY__MAX_DOCUMENTS", "10"),
    ]);
    let s = load(&pairs).unwrap();
    assert_eq!(s.state, StateLocation::Directory("/var/lib/nsbridge".into()));
    assert_eq!(s.history.limits.max_age, Duration::from_secs(60));
    assert_eq!(s.history.recovery_window, Duration::ZERO, "0 turns recovery off");
    assert_eq!(s.history.replay.max_documents, 10);

    let mut pairs = minimal();
    pairs.push(("NSBRIDGE_STATE_COLLECTION", "nsbridge_state"));
    assert_eq!(
        load(&pairs).unwrap().state,
        StateLocation::Collection("nsbridge_state".into())
    );

    for (extra, setting, problem) in [
        (
            [("NSBRIDGE_STATE_DIR", "/s"), ("NSBRIDGE_STATE_COLLECTION", "s")],
            "state_collection",
            "set either state_dir or state_collection, not both",
        ),
        (
            [
                ("NSBRIDGE_STATE_COLLECTION", "treatments"),
                ("NSBRIDGE_LOG__LEVEL", "info"),
            ],
            "state_collection",
            "\"treatments\" is one of Nightscout's collections",
        ),
        (
            [
                ("NSBRIDGE_STATE_COLLECTION", "a$b"),
                ("NSBRIDGE_LOG__LEVEL", "info"),
            ],
            "state_collection",
            "\"a$b\" is not a usable MongoDB collection name",
        ),
        (
            [
                ("NSBRIDGE_HISTORY__MAX_EVENTS", "0"),
                ("NSBRIDGE_LOG__LEVEL", "info"),
            ],
            "history.max_events",
            "must be at least 1",
        ),
        (
            [
                ("NSBRIDGE_REPLAY__MAX_SINCE_AGE_DAYS", "5000"),
                ("NSBRIDGE_LOG__LEVEL", "info"),
            ],
            "replay.max_since_age_days",
            "must be at most 3650",
        ),
    ] {
        let mut pairs = minimal();
        pairs.extend(extra);
        let e = load_err(&pairs);
        assert_eq!((e.setting.as_str(), e.problem.as_str()), (setting, problem));
    }
}

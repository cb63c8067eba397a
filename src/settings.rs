//! Typed settings, layered: built-in defaults < `--config` file < Nightscout's environment
//! < `NSBRIDGE_*` environment.
//!
//! The bridge usually runs from the same env file as Nightscout, so Nightscout's variable
//! names are read with Nightscout's own rules (`readENV`: a `CUSTOMCONNSTR_` prefix, lower
//! case, trimmed, empty means unset). Nightscout's `PORT` is deliberately not one of them.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::Path;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::{Deserialize, Deserializer, Serialize};

use crate::auth::throttle::ThrottleConfig;
use crate::channel::replay::ReplayLimits;
use crate::collections::CollectionNames;
use crate::history::HistoryLimits;
use crate::mapping::RelayMode;
use crate::net::ConnectionLimits;

/// The defaults, compiled in so the binary runs without the file.
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// Nightscout's minimum length for API_SECRET.
pub const MIN_API_SECRET_LEN: usize = 12;

/// A setting that cannot be used; printed as one line naming the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct SettingsError {
    pub setting: String,
    pub problem: String,
}

impl SettingsError {
    fn new(setting: &str, problem: impl Into<String>) -> Self {
        SettingsError {
            setting: setting.to_string(),
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// The tenants file: many sites, routed by host. `None`: the one site of these
    /// settings.
    pub tenants: Option<std::path::PathBuf>,
    /// Nightscout's internal URL: front-door mode, when set.
    pub upstream: Option<axum::http::Uri>,
    pub relay: RelayMode,
    pub replace_window: Duration,
    pub identifier_cache_size: NonZeroUsize,
    pub mongo: MongoSettings,
    pub collections: CollectionNames,
    pub auth: AuthSettings,
    pub channel: ChannelSettings,
    pub connections: ConnectionLimits,
    pub state: StateLocation,
    pub history: HistorySettings,
    pub log: LogSettings,
}

/// Where the resume position is kept across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// Not kept: a restarted bridge starts from the present.
    None,
    Directory(std::path::PathBuf),
    /// A collection of the watched database (the bridge then writes to it).
    Collection(String),
}

#[derive(Debug, Clone)]
pub struct HistorySettings {
    pub limits: HistoryLimits,
    pub recovery_window: Duration,
    pub replay: ReplayLimits,
}

#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub max_events_in_flight: usize,
    pub slow_client_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct MongoSettings {
    pub uri: String,
    pub database: String,
    pub pre_images: bool,
}

#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub api_secret: ApiSecret,
    pub collections_prefix: String,
    pub default_roles: Vec<String>,
    pub trusted_proxy: bool,
    pub throttle: ThrottleConfig,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Nightscout's API_SECRET. Never printed: `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiSecret(String);

impl ApiSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        ApiSecret(secret.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiSecret(<{} characters>)", self.0.chars().count())
    }
}

/// The settings as the layers give them, before validation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    listen: String,
    tenants: String,
    upstream: String,
    relay: String,
    replace_window_secs: u64,
    identifier_cache_size: usize,
    state_dir: String,
    state_collection: String,
    mongo: RawMongo,
    collections: CollectionNames,
    auth: RawAuth,
    channel: RawChannel,
    connections: RawConnections,
    history: RawHistory,
    replay: RawReplay,
    log: RawLog,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    max_age_secs: u64,
    max_events: usize,
    recovery_window_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplay {
    max_since_age_days: u64,
    max_documents: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConnections {
    max: usize,
    header_read_timeout_secs: u64,
    keep_alive_timeout_secs: u64,
    request_body_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChannel {
    max_events_in_flight: usize,
    slow_client_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMongo {
    uri: String,
    database: String,
    pre_images: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    api_secret: String,
    collections_prefix: String,
    #[serde(deserialize_with = "role_list")]
    default_roles: Vec<String>,
    trusted_proxy: bool,
    failure_delay_ms: u64,
    failure_window_secs: u64,
    max_failure_delay_ms: u64,
    max_pending_failures: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: String,
    level: String,
}

/// Roles as a list, or as one string split the way Nightscout splits AUTH_DEFAULT_ROLES.
fn role_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Roles {
        Text(String),
        List(Vec<String>),
    }
    Ok(match Roles::deserialize(deserializer)? {
        Roles::Text(text) => split_roles(&text),
        Roles::List(list) => list.iter().flat_map(|r| split_roles(r)).collect(),
    })
}

pub fn split_roles(text: &str) -> Vec<String> {
    text.split([',', ' ', ':', '\t'])
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .collect()
}

/// Nightscout variable → setting key, in Nightscout's order of preference per key.
const NIGHTSCOUT_VARIABLES: &[(&str, &[&str])] = &[
    (
        "mongo.uri",
        &[
            "STORAGE_URI",
            "MONGO_CONNECTION",
            "MONGO",
            "MONGOLAB_URI",
            "MONGODB_URI",
        ],
    ),
    ("auth.api_secret", &["API_SECRET"]),
    (
        "auth.collections_prefix",
        &["MONGO_AUTHENTICATION_COLLECTIONS_PREFIX"],
    ),
    ("auth.default_roles", &["AUTH_DEFAULT_ROLES"]),
    ("collections.entries", &["ENTRIES_COLLECTION", "MONGO_COLLECTION"]),
    ("collections.treatments", &["MONGO_TREATMENTS_COLLECTION"]),
    ("collections.devicestatus", &["MONGO_DEVICESTATUS_COLLECTION"]),
    ("collections.profile", &["MONGO_PROFILE_COLLECTION"]),
    ("collections.food", &["MONGO_FOOD_COLLECTION"]),
    ("collections.settings", &["MONGO_SETTINGS_COLLECTION"]),
];

/// Nightscout's `readENV(name)`: `CUSTOMCONNSTR_NAME`, `CUSTOMCONNSTR_name`, `NAME`,
/// `name`; keys and values trimmed; empty counts as unset.
fn read_nightscout_env(env: &HashMap<String, String>, name: &str) -> Option<String> {
    let lower = name.to_lowercase();
    let candidates = [
        format!("CUSTOMCONNSTR_{name}"),
        format!("CUSTOMCONNSTR_{lower}"),
        name.to_string(),
        lower,
    ];
    candidates.iter().find_map(|key| {
        env.iter()
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    })
}

/// The Nightscout layer, spelled as config's environment source expects (`SECTION__KEY`).
fn nightscout_layer(env: &HashMap<String, String>) -> config::Map<String, String> {
    NIGHTSCOUT_VARIABLES
        .iter()
        .filter_map(|(key, names)| {
            let value = names.iter().find_map(|n| read_nightscout_env(env, n))?;
            Some((key.replace('.', "__").to_uppercase(), value))
        })
        .collect()
}

/// The `NSBRIDGE_*` layer, without `NSBRIDGE_CONFIG` (which names the file, not a setting).
fn nsbridge_layer(env: &HashMap<String, String>) -> config::Map<String, String> {
    env.iter()
        .filter(|(k, _)| k.starts_with("NSBRIDGE_") && k.as_str() != "NSBRIDGE_CONFIG")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Settings {
    /// Loads and validates the settings from the layers; `env` is the process environment.
    pub fn load(
        config_file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let raw = load_raw(config_file, env)?;
        Settings::validate(raw).map(|(settings, _)| settings)
    }

    /// The effective settings as TOML, with API_SECRET and any password in the URI hidden.
    pub fn load_redacted(
        config_file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<String, SettingsError> {
        let raw = load_raw(config_file, env)?;
        let (_, mut effective) = Settings::validate(raw)?;
        effective.auth.api_secret = "<redacted>".into();
        effective.mongo.uri = redact_uri(&effective.mongo.uri);
        toml::to_string(&effective).map_err(|e| SettingsError::new("configuration", e.to_string()))
    }

    fn validate(mut raw: RawSettings) -> Result<(Settings, RawSettings), SettingsError> {
        let listen = raw.listen.parse::<SocketAddr>().map_err(|_| {
            SettingsError::new(
                "listen",
                format!("{:?} is not an address and port such as 0.0.0.0:8080", raw.listen),
            )
        })?;
        let upstream = upstream_url(&raw.upstream)?;
        let relay = parse_relay(&raw.relay)?;
        let tenants = (!raw.tenants.trim().is_empty()).then(|| std::path::PathBuf::from(raw.tenants.trim()));
        let identifier_cache_size = NonZeroUsize::new(raw.identifier_cache_size)
            .ok_or_else(|| SettingsError::new("identifier_cache_size", "must be at least 1"))?;

        if raw.mongo.uri.is_empty() {
            return Err(SettingsError::new(
                "mongo.uri",
                "not set (NSBRIDGE_MONGO__URI, or Nightscout's MONGODB_URI, MONGO_CONNECTION, ...)",
            ));
        }
        let parsed = mongodb::options::ConnectionString::parse(&raw.mongo.uri).map_err(|e| {
            let reason = e.to_string().replace(&raw.mongo.uri, &redact_uri(&raw.mongo.uri));
            SettingsError::new("mongo.uri", format!("not a MongoDB connection string: {reason}"))
        })?;
        if raw.mongo.database.is_empty() {
            raw.mongo.database = parsed.default_database.clone().unwrap_or_default();
        }
        // With a tenants file, each tenant names its database and its secret.
        if raw.mongo.database.is_empty() && tenants.is_none() {
            return Err(SettingsError::new(
                "mongo.uri",
                "names no database (add /<database> to the URI, or set mongo.database)",
            ));
        }

        let secret_len = raw.auth.api_secret.chars().count();
        if secret_len == 0 && tenants.is_none() {
            return Err(SettingsError::new(
                "auth.api_secret",
                "not set (Nightscout's API_SECRET, or NSBRIDGE_AUTH__API_SECRET)",
            ));
        }
        if secret_len > 0 && secret_len < MIN_API_SECRET_LEN {
            return Err(SettingsError::new(
                "auth.api_secret",
                format!(
                    "too short: {secret_len} characters, Nightscout requires at least {MIN_API_SECRET_LEN}"
                ),
            ));
        }
        if let Some(name) = raw.collections.duplicate() {
            return Err(SettingsError::new(
                "collections",
                format!("MongoDB collection {name:?} is named for two logical collections"),
            ));
        }
        for (setting, value) in [
            ("channel.max_events_in_flight", raw.channel.max_events_in_flight),
            (
                "channel.slow_client_timeout_secs",
                raw.channel.slow_client_timeout_secs as usize,
            ),
            ("connections.max", raw.connections.max),
            (
                "connections.header_read_timeout_secs",
                raw.connections.header_read_timeout_secs as usize,
            ),
            (
                "connections.keep_alive_timeout_secs",
                raw.connections.keep_alive_timeout_secs as usize,
            ),
            (
                "connections.request_body_timeout_secs",
                raw.connections.request_body_timeout_secs as usize,
            ),
            ("auth.failure_window_secs", raw.auth.failure_window_secs as usize),
            ("auth.max_pending_failures", raw.auth.max_pending_failures),
            ("history.max_age_secs", raw.history.max_age_secs as usize),
            ("history.max_events", raw.history.max_events),
            (
                "replay.max_since_age_days",
                raw.replay.max_since_age_days as usize,
            ),
            ("replay.max_documents", raw.replay.max_documents),
        ] {
            if value == 0 {
                return Err(SettingsError::new(setting, "must be at least 1"));
            }
        }
        for (setting, value) in [
            ("auth.collections_prefix", &raw.auth.collections_prefix),
            ("log.level", &raw.log.level),
        ] {
            if value.is_empty() {
                return Err(SettingsError::new(setting, "must not be empty"));
            }
        }
        let state = state_location(&raw.state_dir, &raw.state_collection, &raw.collections)?;
        if raw.replay.max_since_age_days > 3650 {
            return Err(SettingsError::new(
                "replay.max_since_age_days",
                "must be at most 3650",
            ));
        }
        let format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(SettingsError::new(
                    "log.format",
                    format!("unknown format {other:?} (expected \"text\" or \"json\")"),
                ));
            }
        };

        let settings = Settings {
            listen,
            tenants,
            upstream,
            relay,
            replace_window: Duration::from_secs(raw.replace_window_secs),
            identifier_cache_size,
            mongo: MongoSettings {
                uri: raw.mongo.uri.clone(),
                database: raw.mongo.database.clone(),
                pre_images: raw.mongo.pre_images,
            },
            collections: raw.collections.clone(),
            auth: AuthSettings {
                api_secret: ApiSecret::new(raw.auth.api_secret.clone()),
                collections_prefix: raw.auth.collections_prefix.clone(),
                default_roles: raw.auth.default_roles.clone(),
                trusted_proxy: raw.auth.trusted_proxy,
                throttle: ThrottleConfig {
                    per_failure: Duration::from_millis(raw.auth.failure_delay_ms),
                    window: Duration::from_secs(raw.auth.failure_window_secs),
                    max_delay: Duration::from_millis(raw.auth.max_failure_delay_ms),
                    max_pending: raw.auth.max_pending_failures,
                    ..ThrottleConfig::default()
                },
            },
            channel: ChannelSettings {
                max_events_in_flight: raw.channel.max_events_in_flight,
                slow_client_timeout: Duration::from_secs(raw.channel.slow_client_timeout_secs),
            },
            connections: ConnectionLimits {
                max_connections: raw.connections.max,
                header_read_timeout: Duration::from_secs(raw.connections.header_read_timeout_secs),
                keep_alive_timeout: Duration::from_secs(raw.connections.keep_alive_timeout_secs),
                request_body_timeout: Duration::from_secs(raw.connections.request_body_timeout_secs),
            },
            state,
            history: HistorySettings {
                limits: HistoryLimits {
                    max_age: Duration::from_secs(raw.history.max_age_secs),
                    max_events: raw.history.max_events,
                },
                recovery_window: Duration::from_secs(raw.history.recovery_window_secs),
                replay: ReplayLimits {
                    max_since_age: Duration::from_secs(raw.replay.max_since_age_days * 24 * 3600),
                    max_documents: raw.replay.max_documents,
                },
            },
            log: LogSettings {
                format,
                level: raw.log.level.clone(),
            },
        };
        Ok((settings, raw))
    }
}

/// `relay`: "apiv3" or "all".
pub fn parse_relay(text: &str) -> Result<RelayMode, SettingsError> {
    match text {
        "apiv3" => Ok(RelayMode::Apiv3),
        "all" => Ok(RelayMode::All),
        other => Err(SettingsError::new(
            "relay",
            format!("unknown mode {other:?} (expected \"apiv3\" or \"all\")"),
        )),
    }
}

/// `state_dir` or `state_collection`, at most one of them.
fn state_location(
    dir: &str,
    collection: &str,
    names: &CollectionNames,
) -> Result<StateLocation, SettingsError> {
    match (dir.trim(), collection.trim()) {
        ("", "") => Ok(StateLocation::None),
        (dir, "") => Ok(StateLocation::Directory(dir.into())),
        ("", collection) => {
            let valid = !collection.starts_with("system.")
                && !collection.contains(['$', '\0'])
                && collection.len() <= 120;
            if !valid {
                return Err(SettingsError::new(
                    "state_collection",
                    format!("{collection:?} is not a usable MongoDB collection name"),
                ));
            }
            if names.logical(collection).is_some() {
                return Err(SettingsError::new(
                    "state_collection",
                    format!("{collection:?} is one of Nightscout's collections"),
                ));
            }
            Ok(StateLocation::Collection(collection.to_string()))
        }
        _ => Err(SettingsError::new(
            "state_collection",
            "set either state_dir or state_collection, not both",
        )),
    }
}

/// `upstream`: empty, or Nightscout's internal `http://host:port`.
pub fn upstream_url(text: &str) -> Result<Option<axum::http::Uri>, SettingsError> {
    if text.is_empty() {
        return Ok(None);
    }
    let problem = |why: &str| {
        SettingsError::new(
            "upstream",
            format!("{text:?} {why} (expected Nightscout's internal URL, such as http://nightscout:1337)"),
        )
    };
    let uri: axum::http::Uri = text.parse().map_err(|_| problem("is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(problem(
                "uses https: give Nightscout's internal plain-HTTP address",
            ));
        }
        _ => return Err(problem("is not an http:// URL")),
    }
    if uri.authority().is_none_or(|a| a.host().is_empty()) {
        return Err(problem("names no host"));
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(problem(
            "has a path: Nightscout must be at the root of its address",
        ));
    }
    Ok(Some(uri))
}

fn load_raw(config_file: Option<&Path>, env: &HashMap<String, String>) -> Result<RawSettings, SettingsError> {
    let mut builder = Config::builder().add_source(File::from_str(DEFAULTS_TOML, FileFormat::Toml));
    if let Some(path) = config_file {
        if !path.is_file() {
            return Err(SettingsError::new(
                "--config",
                format!("{} is not a readable file", path.display()),
            ));
        }
        builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
    }
    let config = builder
        .add_source(
            Environment::default()
                .separator("__")
                .source(Some(nightscout_layer(env))),
        )
        .add_source(
            Environment::with_prefix("NSBRIDGE")
                .prefix_separator("_")
                .separator("__")
                .ignore_empty(true)
                .source(Some(nsbridge_layer(env))),
        )
        .build()
        .map_err(config_error)?;
    config.try_deserialize::<RawSettings>().map_err(config_error)
}

fn config_error(e: config::ConfigError) -> SettingsError {
    use config::ConfigError;
    match e {
        ConfigError::Type {
            key: Some(key),
            unexpected,
            expected,
            ..
        } => SettingsError::new(&key, format!("expected {expected}, found {unexpected}")),
        ConfigError::FileParse { uri, cause } => SettingsError::new(
            "--config",
            format!("{}: {}", uri.unwrap_or_default(), one_line(&cause.to_string())),
        ),
        ConfigError::NotFound(key) => SettingsError::new(&key, "missing"),
        other => SettingsError::new("configuration", one_line(&other.to_string())),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The URI with the password of its user info (and any password option) replaced.
pub fn redact_uri(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:<redacted>@{hosts}"),
            None => format!("{userinfo}@{hosts}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if k.to_ascii_lowercase().contains("password") => format!("{k}=<redacted>"),
                    _ => pair.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests;

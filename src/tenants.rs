//! The sites a bridge serves: one, from the single-site settings, or many, from the
//! tenants file (`NSBRIDGE_TENANTS`). Pure: reading the file and the secrets it names is
//! the caller's; here the text is parsed and every tenant validated, and a problem names
//! its tenant.
//!
//! ```toml
//! [[tenant]]
//! name = "alice"
//! hosts = ["alice.example.org"]
//! database = "ns_alice"
//! api_secret_env = "ALICE_API_SECRET"   # or api_secret = "...", or api_secret_file = "..."
//! # optional: mongodb_uri, relay, auth_default_roles, upstream
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use crate::mapping::RelayMode;
use crate::settings::{ApiSecret, MIN_API_SECRET_LEN, Settings, parse_relay, split_roles, upstream_url};

/// At most this many tenants in one file.
pub const MAX_TENANTS: usize = 100_000;

/// One site, as the bridge runs it.
#[derive(Clone, PartialEq)]
pub struct TenantSpec {
    /// Unique; in logs and metrics.
    pub name: String,
    /// Lower-case host names (no port) this site is reached by; empty: any host (the
    /// single site).
    pub hosts: Vec<String>,
    pub database: String,
    pub api_secret: ApiSecret,
    /// A deployment of its own; `None`: the bridge's `mongo.uri`.
    pub mongodb_uri: Option<String>,
    pub relay: RelayMode,
    pub default_roles: Vec<String>,
    /// Front-door mode for this site: Nightscout's internal URL.
    pub upstream: Option<axum::http::Uri>,
}

impl fmt::Debug for TenantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantSpec")
            .field("name", &self.name)
            .field("hosts", &self.hosts)
            .field("database", &self.database)
            .field("api_secret", &self.api_secret)
            .field(
                "mongodb_uri",
                &self.mongodb_uri.as_deref().map(crate::settings::redact_uri),
            )
            .field("relay", &self.relay)
            .field("default_roles", &self.default_roles)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl TenantSpec {
    /// The one site of the single-site settings: reached by any host.
    pub fn single(settings: &Settings) -> TenantSpec {
        TenantSpec {
            name: settings.mongo.database.clone(),
            hosts: Vec::new(),
            database: settings.mongo.database.clone(),
            api_secret: settings.auth.api_secret.clone(),
            mongodb_uri: None,
            relay: settings.relay,
            default_roles: settings.auth.default_roles.clone(),
            upstream: settings.upstream.clone(),
        }
    }

    /// The deployment whose change stream serves this site.
    pub fn uri<'a>(&'a self, settings: &'a Settings) -> &'a str {
        self.mongodb_uri.as_deref().unwrap_or(&settings.mongo.uri)
    }
}

/// A tenants file that cannot be used: which tenant, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenants file: {tenant}: {problem}")]
pub struct TenantsError {
    /// The tenant's name, else its position (`tenant #3`), or `file`.
    pub tenant: String,
    pub problem: String,
}

impl TenantsError {
    fn new(tenant: impl Into<String>, problem: impl Into<String>) -> TenantsError {
        TenantsError {
            tenant: tenant.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    hosts: Vec<String>,
    database: String,
    api_secret: Option<String>,
    api_secret_env: Option<String>,
    api_secret_file: Option<PathBuf>,
    mongodb_uri: Option<String>,
    relay: Option<String>,
    auth_default_roles: Option<RoleList>,
    upstream: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RoleList {
    Text(String),
    List(Vec<String>),
}

/// Where the secrets named in the file come from.
pub trait SecretSource {
    fn env(&self, name: &str) -> Option<String>;
    fn file(&self, path: &std::path::Path) -> std::io::Result<String>;
}

/// The process environment and file system.
pub struct System<'a>(pub &'a HashMap<String, String>);

impl SecretSource for System<'_> {
    fn env(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn file(&self, path: &std::path::Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// Parses and validates the tenants file's `text`; `settings` gives the defaults of the
/// optional keys.
pub fn parse(
    text: &str,
    settings: &Settings,
    secrets: &dyn SecretSource,
) -> Result<Vec<TenantSpec>, TenantsError> {
    let file: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map_or(1, |span| text[..span.start].lines().count().max(1));
        TenantsError::new("file", format!("line {line}: {}", one_line(e.message())))
    })?;
    if let Some(key) = file.keys().find(|k| *k != "tenant") {
        return Err(TenantsError::new(
            "file",
            format!("unknown key {key:?} (expected [[tenant]] tables)"),
        ));
    }
    let entries = match file.get("tenant") {
        None => return Ok(Vec::new()),
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => return Err(TenantsError::new("file", "`tenant` must be [[tenant]] tables")),
    };
    if entries.len() > MAX_TENANTS {
        return Err(TenantsError::new(
            "file",
            format!("more than {MAX_TENANTS} tenants"),
        ));
    }
    let mut tenants = Vec::with_capacity(entries.len());
    let mut names = HashSet::new();
    let mut hosts: HashMap<String, String> = HashMap::new();
    let mut databases: HashMap<(String, String), String> = HashMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let label = entry
            .get("name")
            .and_then(toml::Value::as_str)
            .filter(|n| valid_name(n))
            .map_or_else(|| format!("tenant #{}", i + 1), |n| format!("tenant {n:?}"));
        let raw: RawTenant = entry
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| TenantsError::new(&label, one_line(e.message())))?;
        let tenant =
            validate(raw, settings, secrets).map_err(|problem| TenantsError::new(&label, problem))?;
        if !names.insert(tenant.name.clone()) {
            return Err(TenantsError::new(&label, "its name is used twice"));
        }
        for host in &tenant.hosts {
            if let Some(other) = hosts.insert(host.clone(), tenant.name.clone()) {
                let problem = if other == tenant.name {
                    format!("host {host:?} is listed twice")
                } else {
                    format!("host {host:?} is also tenant {other:?}'s")
                };
                return Err(TenantsError::new(&label, problem));
            }
        }
        let deployment = tenant.uri(settings).to_string();
        if let Some(other) = databases.insert((deployment, tenant.database.clone()), tenant.name.clone()) {
            return Err(TenantsError::new(
                &label,
                format!("database {:?} is also tenant {other:?}'s", tenant.database),
            ));
        }
        tenants.push(tenant);
    }
    Ok(tenants)
}

fn validate(raw: RawTenant, settings: &Settings, secrets: &dyn SecretSource) -> Result<TenantSpec, String> {
    if !valid_name(&raw.name) {
        return Err(format!(
            "name {:?} must be 1 to 64 characters of a-z, 0-9, '-' and '_'",
            raw.name
        ));
    }
    if raw.hosts.is_empty() {
        return Err("hosts must name at least one host".into());
    }
    let hosts = raw
        .hosts
        .iter()
        .map(|h| normalise_host(h).ok_or_else(|| format!("{h:?} is not a host name")))
        .collect::<Result<Vec<_>, _>>()?;
    if !valid_database(&raw.database) {
        return Err(format!(
            "database {:?} is not a MongoDB database name",
            raw.database
        ));
    }
    let secret = match (&raw.api_secret, &raw.api_secret_env, &raw.api_secret_file) {
        (Some(secret), None, None) => secret.clone(),
        (None, Some(name), None) => secrets
            .env(name)
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| format!("api_secret_env names {name:?}, which is not set"))?,
        (None, None, Some(path)) => secrets
            .file(path)
            .map_err(|e| format!("api_secret_file {}: {e}", path.display()))?
            .trim_end_matches(['\r', '\n'])
            .to_string(),
        (None, None, None) => {
            return Err("no API secret (api_secret, api_secret_env or api_secret_file)".into());
        }
        _ => return Err("give one of api_secret, api_secret_env and api_secret_file".into()),
    };
    let length = secret.chars().count();
    if length < MIN_API_SECRET_LEN {
        return Err(format!(
            "API secret too short: {length} characters, Nightscout requires at least {MIN_API_SECRET_LEN}"
        ));
    }
    if let Some(uri) = &raw.mongodb_uri {
        let parsed = mongodb::options::ConnectionString::parse(uri).map_err(|_| {
            format!(
                "mongodb_uri {} is not a MongoDB connection string",
                crate::settings::redact_uri(uri)
            )
        })?;
        drop(parsed);
    }
    let relay = match &raw.relay {
        Some(relay) => parse_relay(relay).map_err(|e| e.problem)?,
        None => settings.relay,
    };
    let default_roles = match raw.auth_default_roles {
        Some(RoleList::Text(text)) => split_roles(&text),
        Some(RoleList::List(list)) => list.iter().flat_map(|r| split_roles(r)).collect(),
        None => settings.auth.default_roles.clone(),
    };
    let upstream = match &raw.upstream {
        Some(text) => upstream_url(text).map_err(|e| e.problem)?,
        None => settings.upstream.clone(),
    };
    Ok(TenantSpec {
        name: raw.name,
        hosts,
        database: raw.database,
        api_secret: ApiSecret::new(secret),
        mongodb_uri: raw.mongodb_uri,
        relay,
        default_roles,
        upstream,
    })
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_database(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && !name.contains(['/', '\\', '.', ' ', '"', '$', '*', '<', '>', ':', '|', '?', '\0'])
        && !matches!(name, "admin" | "local" | "config")
}

/// A host as clients send it (`Host` or `X-Forwarded-Host`), without port or trailing
/// dot, lower case; `None` when it is not a host name.
pub fn normalise_host(text: &str) -> Option<String> {
    let text = text.trim();
    // A bracketed IPv6 literal, with or without a port.
    let host = if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok())) {
            return None;
        }
        inside.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(format!("[{}]", inside.to_ascii_lowercase()));
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            Some(_) => return None,
            None => text,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let valid = (1..=253).contains(&host.len())
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    valid.then_some(host)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;

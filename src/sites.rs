//! The sites a bridge serves, at run time: each one's channel, auth store, resume state and
//! Nightscout, its database routed in its deployment's change stream, and its hosts in the
//! table that routes requests. Sites come from the tenants file (watched: added, changed
//! and removed while running) or are the one site of the single-site settings.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use mongodb::Client;
use mongodb::change_stream::event::ResumeToken;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::store::AuthStore;
use crate::channel::replay::Catalog;
use crate::channel::transport::SiteResolver;
use crate::channel::{Channel, ChannelConfig, Routed, SiteChannel, SiteSetup};
use crate::deployment::{Deployment, StreamSetup};
use crate::feed::{FeedEvent, Route};
use crate::history::Checkpoint;
use crate::http::SitesHealth;
use crate::mapping::MappingRules;
use crate::settings::Settings;
use crate::state::{StateStore, keep_saving};
use crate::telemetry::metric;
use crate::tenants::{self, TenantSpec, normalise_host};
use crate::upstream::Upstream;

/// How often the tenants file is looked at.
pub const TENANTS_POLL: Duration = Duration::from_secs(1);

/// One site while it is served.
pub struct Site {
    pub spec: TenantSpec,
    pub channel: Arc<SiteChannel>,
    pub upstream: Option<Arc<Upstream>>,
    state: StateStore,
    /// Its tasks (auth store, slow clients, permissions, saving its position).
    stop: CancellationToken,
}

pub struct Sites {
    settings: Arc<Settings>,
    channel_config: ChannelConfig,
    channel: Channel,
    streams: StreamSetup,
    /// The client of `mongo.uri`; tenants with a deployment of their own get their own.
    main_client: Client,
    shutdown: CancellationToken,
    by_name: RwLock<BTreeMap<String, Arc<Site>>>,
    by_host: RwLock<HashMap<String, Arc<Site>>>,
    /// The single site: reached by any host.
    any_host: RwLock<Option<Arc<Site>>>,
    deployments: Mutex<HashMap<String, Deployment>>,
    /// Clients of the tenants' own deployments, by URI.
    clients: Mutex<HashMap<String, Client>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Sites {
    pub fn new(
        settings: Arc<Settings>,
        channel_config: ChannelConfig,
        channel: Channel,
        streams: StreamSetup,
        main_client: Client,
        shutdown: CancellationToken,
    ) -> Arc<Sites> {
        Arc::new(Sites {
            settings,
            channel_config,
            channel,
            streams,
            main_client,
            shutdown,
            by_name: RwLock::default(),
            by_host: RwLock::default(),
            any_host: RwLock::default(),
            deployments: Mutex::default(),
            clients: Mutex::default(),
            tasks: Mutex::default(),
        })
    }

    /// The sites of the settings as the bridge starts: their saved positions read, each
    /// deployment's streams started where the oldest of its sites' histories began.
    pub async fn start(self: &Arc<Self>, specs: Vec<TenantSpec>) -> anyhow::Result<()> {
        let single = self.settings.tenants.is_none();
        let mut loaded = Vec::with_capacity(specs.len());
        let mut starts: HashMap<String, HashMap<String, ResumeToken>> = HashMap::new();
        for spec in specs {
            let client = self.client_for(&spec).await?;
            let state = StateStore::new(&self.settings.state, &spec.name, &client.database(&spec.database));
            state.prepare().map_err(|e| {
                anyhow::anyhow!("state_dir (NSBRIDGE_STATE_DIR) must be a writable directory: {e}")
            })?;
            let checkpoint = match state.load().await {
                Ok(saved) => saved,
                Err(e) => {
                    metrics::counter!(metric::RESUME_FAILURES).increment(1);
                    tracing::error!(tenant = %spec.name, error = %e, "cannot use the saved resume position; starting from the present");
                    None
                }
            };
            if let Some(token) = checkpoint
                .as_ref()
                .and_then(|c| bson::from_bson(c.token.clone()).ok())
            {
                starts
                    .entry(spec.uri(&self.settings).to_string())
                    .or_default()
                    .insert(spec.database.clone(), token);
                tracing::info!(tenant = %spec.name, state = %state.describe(), "resuming the change stream where the last run's history started");
            }
            loaded.push((spec, state, checkpoint));
        }
        // Every site routed before the streams open: one stream from the start.
        for (spec, state, checkpoint) in loaded {
            self.deployment_for(&spec).await?;
            self.add(spec, state, checkpoint).await?;
        }
        let tasks: Vec<JoinHandle<()>> = self
            .deployments
            .lock()
            .unwrap()
            .iter()
            .map(|(uri, deployment)| {
                let start = starts.remove(uri).unwrap_or_default();
                deployment.start(single, start, self.streams.clone(), self.shutdown.clone())
            })
            .collect();
        self.tasks.lock().unwrap().extend(tasks);
        metrics::gauge!(metric::TENANTS).set(self.by_name.read().unwrap().len() as f64);
        Ok(())
    }

    /// The client of `spec`'s deployment, one per URI.
    async fn client_for(&self, spec: &TenantSpec) -> anyhow::Result<Client> {
        let Some(uri) = &spec.mongodb_uri else {
            return Ok(self.main_client.clone());
        };
        if let Some(client) = self.clients.lock().unwrap().get(uri) {
            return Ok(client.clone());
        }
        let (client, _) = crate::mongo::connect(uri)
            .await
            .map_err(|e| anyhow::anyhow!("tenant {}: MongoDB URI: {e}", spec.name))?;
        Ok(self
            .clients
            .lock()
            .unwrap()
            .entry(uri.clone())
            .or_insert(client)
            .clone())
    }

    /// The deployment of `spec`'s URI, made if it is the first site on it; true when new
    /// (its streams are not started yet).
    async fn deployment_for(&self, spec: &TenantSpec) -> anyhow::Result<bool> {
        let uri = spec.uri(&self.settings).to_string();
        if self.deployments.lock().unwrap().contains_key(&uri) {
            return Ok(false);
        }
        let client = self.client_for(spec).await?;
        self.deployments
            .lock()
            .unwrap()
            .insert(uri, Deployment::new(client));
        Ok(true)
    }

    async fn add(
        &self,
        spec: TenantSpec,
        state: StateStore,
        checkpoint: Option<Checkpoint>,
    ) -> anyhow::Result<()> {
        let client = self.client_for(&spec).await?;
        let db = client.database(&spec.database);
        let auth_store = AuthStore::new(
            db.clone(),
            &self.settings.auth.collections_prefix,
            spec.api_secret.clone(),
            spec.default_roles.clone(),
        );
        let auth_changed = Arc::new(Notify::new());
        let tenant: Arc<str> = Arc::from(spec.name.as_str());
        let channel = SiteChannel::new(
            &self.channel_config,
            SiteSetup {
                tenant: tenant.clone(),
                auth: auth_store.snapshots(),
                resumed: checkpoint,
                catalog: Some(Catalog {
                    db,
                    names: self.settings.collections.clone(),
                }),
            },
        );
        let upstream = spec
            .upstream
            .as_ref()
            .map(|url| Upstream::new(url, self.settings.auth.trusted_proxy));
        let stop = self.shutdown.child_token();
        let route = Route {
            tenant,
            rules: MappingRules {
                relay: spec.relay,
                replace_window_ms: self.settings.replace_window.as_millis() as i64,
                names: self.settings.collections.clone(),
            },
            auth_collections: auth_store.collections(),
            auth_changed: auth_changed.clone(),
        };
        let mut tasks = vec![
            tokio::spawn(auth_store.run(auth_changed, stop.clone())),
            tokio::spawn(channel.clone().follow_auth(stop.clone())),
            tokio::spawn(channel.clone().watch_slow_clients(stop.clone())),
            tokio::spawn(keep_saving(state.clone(), channel.clone(), stop.clone())),
        ];
        if let Some(upstream) = &upstream {
            tasks.push(tokio::spawn(
                upstream
                    .clone()
                    .watch_reachable(crate::upstream::PROBE_INTERVAL, stop.clone()),
            ));
        }
        self.tasks.lock().unwrap().extend(tasks);
        let site = Arc::new(Site {
            spec,
            channel,
            upstream,
            state,
            stop,
        });
        if let Some(deployment) = self
            .deployments
            .lock()
            .unwrap()
            .get(site.spec.uri(&self.settings))
        {
            deployment.add(&site.spec.database, route);
        }
        if site.spec.hosts.is_empty() {
            *self.any_host.write().unwrap() = Some(site.clone());
        }
        {
            let mut by_host = self.by_host.write().unwrap();
            for host in &site.spec.hosts {
                by_host.insert(host.clone(), site.clone());
            }
        }
        tracing::info!(
            tenant = %site.spec.name,
            database = %site.spec.database,
            hosts = ?site.spec.hosts,
            relay = %site.spec.relay,
            front_door = site.upstream.is_some(),
            "site served"
        );
        self.by_name.write().unwrap().insert(site.spec.name.clone(), site);
        Ok(())
    }

    /// Stops serving `name`: its hosts refused from now on, its sockets disconnected, its
    /// database out of the change stream, its position saved.
    async fn remove(&self, name: &str) {
        let Some(site) = self.by_name.write().unwrap().remove(name) else {
            return;
        };
        self.by_host
            .write()
            .unwrap()
            .retain(|_, s| !Arc::ptr_eq(s, &site));
        if let Some(deployment) = self
            .deployments
            .lock()
            .unwrap()
            .get(site.spec.uri(&self.settings))
        {
            deployment.remove(&site.spec.database);
        }
        site.stop.cancel();
        self.channel.disconnect_site(&site.channel);
        if let Some(checkpoint) = site.channel.checkpoint()
            && let Err(e) = site.state.save(&checkpoint).await
        {
            tracing::error!(tenant = %name, error = %e, "cannot save the resume position");
        }
        tracing::info!(tenant = %name, "site no longer served: its clients were disconnected");
    }

    /// Applies a new list of sites: the ones gone or changed are removed, new and changed
    /// ones added.
    pub async fn apply(self: &Arc<Self>, specs: Vec<TenantSpec>) -> anyhow::Result<()> {
        let wanted: HashMap<String, TenantSpec> = specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        let current: Vec<(String, TenantSpec)> = self
            .by_name
            .read()
            .unwrap()
            .iter()
            .map(|(name, site)| (name.clone(), site.spec.clone()))
            .collect();
        for (name, spec) in &current {
            if wanted.get(name) != Some(spec) {
                self.remove(name).await;
            }
        }
        for (name, spec) in wanted {
            if self.by_name.read().unwrap().contains_key(&name) {
                continue;
            }
            let client = self.client_for(&spec).await?;
            let state = StateStore::new(&self.settings.state, &spec.name, &client.database(&spec.database));
            let uri = spec.uri(&self.settings).to_string();
            let new_deployment = self.deployment_for(&spec).await?;
            self.add(spec, state, None).await?;
            if new_deployment {
                let task = self
                    .deployments
                    .lock()
                    .unwrap()
                    .get(&uri)
                    .map(|d| d.start(false, HashMap::new(), self.streams.clone(), self.shutdown.clone()));
                self.tasks.lock().unwrap().extend(task);
            }
        }
        metrics::gauge!(metric::TENANTS).set(self.by_name.read().unwrap().len() as f64);
        Ok(())
    }

    /// Re-reads the tenants file whenever it changes, until shut down. A file that cannot
    /// be used is reported and the sites stay as they are.
    pub async fn follow_file(self: Arc<Self>, path: PathBuf, env: HashMap<String, String>) {
        let mut last = std::fs::read(&path).ok();
        let mut tick = tokio::time::interval(TENANTS_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let text = match tokio::fs::read(&path).await {
                Ok(text) => text,
                Err(e) => {
                    if last.is_some() {
                        tracing::error!(file = %path.display(), error = %e, "cannot read the tenants file; the sites stay as they are");
                        last = None;
                    }
                    continue;
                }
            };
            if last.as_ref() == Some(&text) {
                continue;
            }
            last = Some(text.clone());
            let parsed = std::str::from_utf8(&text)
                .map_err(|_| tenants::TenantsError {
                    tenant: "file".into(),
                    problem: "not UTF-8".into(),
                })
                .and_then(|text| tenants::parse(text, &self.settings, &tenants::System(&env)));
            match parsed {
                Ok(specs) => {
                    let count = specs.len();
                    match self.apply(specs).await {
                        Ok(()) => {
                            metrics::counter!(metric::TENANTS_RELOADS, "outcome" => "applied").increment(1);
                            tracing::info!(file = %path.display(), tenants = count, "tenants file applied");
                        }
                        Err(e) => {
                            metrics::counter!(metric::TENANTS_RELOADS, "outcome" => "partial").increment(1);
                            tracing::error!(error = %format!("{e:#}"), "tenants file applied in part");
                        }
                    }
                }
                Err(e) => {
                    metrics::counter!(metric::TENANTS_RELOADS, "outcome" => "invalid").increment(1);
                    tracing::error!(error = %e, "tenants file not applied; the sites stay as they are");
                }
            }
        }
    }

    /// Hands each event to its site's channel, until shut down (then the events already
    /// read too, so that the positions saved at shutdown count them).
    pub async fn fan_out(self: Arc<Self>, mut events: tokio::sync::mpsc::Receiver<FeedEvent>) {
        loop {
            let event = tokio::select! {
                event = events.recv() => event,
                _ = self.shutdown.cancelled() => break,
            };
            let Some(event) = event else { return };
            self.publish(event);
        }
        while let Ok(event) = events.try_recv() {
            self.publish(event);
        }
    }

    fn publish(&self, event: FeedEvent) {
        let site = self.by_name.read().unwrap().get(&*event.tenant).cloned();
        if let Some(site) = site {
            site.channel.publish(event);
        }
    }

    /// Saves every site's position (at shutdown, after the streams stopped).
    pub async fn save_all(&self) {
        let sites: Vec<Arc<Site>> = self.by_name.read().unwrap().values().cloned().collect();
        for site in sites {
            let Some(checkpoint) = site.channel.checkpoint() else {
                continue;
            };
            match site.state.save(&checkpoint).await {
                Ok(()) if !matches!(site.state, StateStore::None) => {
                    tracing::info!(tenant = %site.spec.name, state = %site.state.describe(), "resume position saved")
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(tenant = %site.spec.name, error = %e, "cannot save the resume position")
                }
            }
        }
    }

    /// The tasks of the sites and deployments, to wait for at shutdown.
    pub fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.tasks.lock().unwrap())
    }

    pub fn len(&self) -> usize {
        self.by_name.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SiteResolver for Sites {
    fn resolve(&self, headers: &HeaderMap) -> Result<Routed, String> {
        let forwarded = self
            .settings
            .auth
            .trusted_proxy
            .then(|| headers.get("x-forwarded-host"))
            .flatten();
        let sent = forwarded
            .or_else(|| headers.get(axum::http::header::HOST))
            .and_then(|v| v.to_str().ok())
            // X-Forwarded-Host may list hosts: the first is the client's.
            .map(|v| v.split(',').next().unwrap_or_default().trim())
            .unwrap_or_default();
        let site = normalise_host(sent)
            .and_then(|host| self.by_host.read().unwrap().get(&host).cloned())
            .or_else(|| self.any_host.read().unwrap().clone());
        match site {
            Some(site) => Ok(Routed {
                site: site.channel.clone(),
                upstream: site.upstream.clone(),
            }),
            None => Err(sent.to_string()),
        }
    }
}

/// Names listed in readiness at most.
const LISTED: usize = 5;

impl SitesHealth for Sites {
    fn auth_pending(&self) -> (usize, Vec<String>) {
        let sites = self.by_name.read().unwrap();
        let pending: Vec<&String> = sites
            .iter()
            .filter(|(_, site)| !site.channel.auth_loaded())
            .map(|(name, _)| name)
            .collect();
        (
            pending.len(),
            pending.iter().take(LISTED).map(|n| n.to_string()).collect(),
        )
    }

    fn upstreams(&self) -> (usize, usize) {
        let sites = self.by_name.read().unwrap();
        let upstreams: Vec<&Arc<Upstream>> = sites.values().filter_map(|s| s.upstream.as_ref()).collect();
        let unreachable = upstreams.iter().filter(|u| !*u.reachable().borrow()).count();
        (upstreams.len(), unreachable)
    }
}

//! What every handler shares: the store, the blob store, the backend, the controller's queue,
//! the gateway's route table, the run recorder, and what is deployed now.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dispatch_core::{Kind, Object};
use dispatch_runtime::Backend;
use dispatch_store::{BlobStore, Store, StoreError};

use crate::clock::Clock;
use crate::controller::{Controller, Key};
use crate::error::ApiError;
use crate::queue::Queue;
use crate::recorder::Recorder;
use crate::routes::Routes;

/// A function that serves calls now (the controller deployed it).
#[derive(Debug, Clone)]
pub struct Deployed {
    pub digest: String,
    /// Merged data of the function's secrets (`context.secrets`); values are redacted from
    /// logs, errors and run records.
    pub secrets: Arc<serde_json::Map<String, serde_json::Value>>,
    pub timeout: Duration,
    /// concurrency.maxWorkers: the async queue starts at most this many runs at once.
    pub max_workers: u32,
    pub retry: dispatch_core::Retry,
    pub callback_url: Option<String>,
    /// spec.maxQueued (none: the server's bound).
    pub max_queued: Option<usize>,
    /// spec.history: which sync calls leave a run record.
    pub history: dispatch_core::HistoryPolicy,
}

/// Namespace → function → deployment. Nested so that lookups borrow `&str`.
type DeployedMap = HashMap<String, HashMap<String, Arc<Deployed>>>;

/// `--run-history-budget`: run records kept per namespace, in bytes.
pub const DEFAULT_RUN_HISTORY_BUDGET: u64 = 1 << 30;

/// Limits and retention (flags of `dispatch server`).
#[derive(Debug, Clone)]
pub struct Options {
    /// Logs kept per run record (stdout + stderr); the rest is cut with a marker.
    pub max_log_bytes: usize,
    /// Finished runs older than this are deleted.
    pub run_retention: Duration,
    /// Finished runs kept per function at most (newest first).
    pub runs_per_function: usize,
    /// Bytes of run records kept per namespace at most (oldest finished ones go first);
    /// none: no byte bound.
    pub run_history_budget: Option<u64>,
    /// How often retention looks for runs to prune when it has caught up (tests that drive
    /// `retention::step` themselves set it long).
    pub retention_interval: Duration,
    /// Async runs waiting per namespace before new ones get 429.
    pub max_queue_depth: usize,
    /// Async runs waiting per function (unless its spec.maxQueued says) before 429.
    pub max_queued_per_function: usize,
    /// Payload bytes of the async runs waiting per namespace before 429.
    pub max_queued_bytes: u64,
    /// Largest payload of an async run (below the sync limit: it is stored until it runs).
    pub max_async_payload: usize,
    /// Async runs running at once, all functions together.
    pub max_running: usize,
    /// Synchronous calls of one function allowed to wait for a worker when all of its
    /// `maxWorkers` are busy; past it a call is refused with 429. Applied by `Server::serve`
    /// to the embedded backend it creates (with `serve_with`, set it on the backend).
    pub max_waiting_calls: usize,
    /// Scratch folders of job executions (`<data dir>/jobs`).
    pub jobs_dir: std::path::PathBuf,
    /// Require API tokens (off only with `--insecure-no-auth`).
    pub auth: bool,
    /// The key that seals secrets (`<data dir>/secret.key`); none = a key in memory only.
    pub secret_key_file: Option<std::path::PathBuf>,
    /// Serve both listeners over TLS (`--tls-cert`, `--tls-key`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The clock (tests share one across a simulated restart); none = the wall clock now.
    pub clock: Option<Clock>,
    /// Sandboxes for job commands (and, set on the embedded backend, functions and builds);
    /// none: `--isolation none`, user code runs as the server (DESIGN §9).
    pub sandboxes: Option<Arc<dispatch_runtime::sandbox::Sandboxes>>,
    /// Connection caps and timeouts of both listeners.
    pub edge: crate::serve::EdgeLimits,
    /// Function workers alive at once, all functions together (embedded backend).
    pub max_workers_total: usize,
    /// Memory of those workers together, counted at their limits (none: 3/4 of the RAM).
    pub worker_memory_budget: Option<u64>,
    /// The data dir, whose free space is watched (none: not watched; `Server::start` sets it).
    pub data_dir: Option<std::path::PathBuf>,
    /// Free space kept in reserve for work already accepted (`--min-free-disk`; none: 5 % of
    /// the file system, at most 1 GiB): below it new async runs, events, jobs and uploads
    /// get 507.
    pub min_free_disk: Option<u64>,
    /// How long an event is kept, and how long its pending deliveries are retried before
    /// they are dead (`--event-ttl`).
    pub event_ttl: Duration,
    /// Pending event deliveries per namespace past which new events get 429
    /// (`--max-pending-deliveries`).
    pub max_pending_deliveries: usize,
    /// How long a dead delivery (and its event) is kept for a redelivery
    /// (`--dead-delivery-retention`).
    pub dead_delivery_retention: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_log_bytes: 1024 * 1024,
            run_retention: Duration::from_secs(7 * 24 * 3600),
            runs_per_function: 10_000,
            run_history_budget: Some(DEFAULT_RUN_HISTORY_BUDGET),
            retention_interval: Duration::from_secs(1),
            max_queue_depth: 10_000,
            max_queued_per_function: 1_000,
            max_queued_bytes: 256 << 20,
            max_async_payload: 1 << 20,
            max_running: 64,
            max_waiting_calls: dispatch_runtime::DEFAULT_MAX_WAITING_CALLS,
            jobs_dir: std::env::temp_dir().join("dispatch-jobs"),
            auth: true,
            secret_key_file: None,
            tls: None,
            clock: None,
            sandboxes: None,
            edge: Default::default(),
            max_workers_total: dispatch_runtime::budget::DEFAULT_MAX_WORKERS_TOTAL,
            worker_memory_budget: None,
            data_dir: None,
            min_free_disk: None,
            event_ttl: Duration::from_secs(24 * 3600),
            max_pending_deliveries: 10_000,
            dead_delivery_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What the server keeps of a namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// `None` for `default`, which exists without being created.
    pub created: Option<jiff::Timestamp>,
    /// Its own budget for run records (bytes); `None`: `--run-history-budget`.
    pub run_history_budget: Option<u64>,
}

pub struct AppState {
    pub store: Arc<dyn Store>,
    pub blobs: BlobStore,
    pub backend: Arc<dyn Backend>,
    pub recorder: Recorder,
    pub queue: Queue,
    pub jobs: crate::jobs::Jobs,
    pub tokens: crate::auth::Tokens,
    pub secrets: crate::secrets::SecretBox,
    event_index: RwLock<Arc<crate::events::EventIndex>>,
    /// Wakes the cron scheduler (drivers changed).
    pub cron_wake: Arc<tokio::sync::Notify>,
    /// Wakes the broker driver supervisor (drivers changed).
    pub broker_wake: Arc<tokio::sync::Notify>,
    /// Namespace → when it was created and its own settings; `default` is always there.
    namespaces: RwLock<std::collections::BTreeMap<String, NamespaceInfo>>,
    pub config: Options,
    /// Outgoing HTTP (callbacks).
    pub http: reqwest::Client,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    controller: Controller,
    /// Swapped whole on every endpoint change; readers clone the `Arc` (no lock across await).
    routes: RwLock<Routes>,
    deployed: RwLock<DeployedMap>,
    ready: AtomicBool,
    /// Cold starts and finished calls (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
    /// The data dir's free space (none without a data dir).
    pub disk: Option<crate::disk::DiskGuard>,
    /// Event deliveries waiting for room in their function's queue.
    pub deliveries: crate::deliveries::Deliveries,
    /// Stores accepted events (group commit).
    pub events: crate::events::EventWriter,
}

impl AppState {
    /// Ok unless writing `incoming` bytes would take the data dir's disk below its reserve
    /// (then a 507 naming `what`); the store's own free pages count when the disk is short.
    pub async fn disk_admits(&self, what: &str, incoming: u64) -> Result<(), ApiError> {
        let Some(d) = &self.disk else {
            return Ok(());
        };
        if d.fits(incoming, || 0).is_ok() {
            return Ok(());
        }
        let store = self.store.clone();
        let reusable = tokio::task::spawn_blocking(move || store.reclaim())
            .await
            .unwrap_or(0);
        d.fits(incoming, || reusable)
            .map_err(|short| d.refuse(what, short))
    }

    /// Builds the state, starts the recorder and the controller, loads the route table and
    /// hands every stored resource to the controller (so that a restart redeploys).
    pub async fn start(
        store: Arc<dyn Store>,
        blobs: BlobStore,
        backend: Arc<dyn Backend>,
    ) -> Arc<Self> {
        Self::start_with(store, blobs, backend, Options::default()).await
    }

    pub async fn start_with(
        store: Arc<dyn Store>,
        blobs: BlobStore,
        backend: Arc<dyn Backend>,
        config: Options,
    ) -> Arc<Self> {
        let secrets = crate::secrets::SecretBox::load_or_create(config.secret_key_file.as_deref())
            .or_else(|e| {
                tracing::error!("{e}: secrets use a key in memory until this is fixed");
                crate::secrets::SecretBox::load_or_create(None)
            })
            .unwrap_or_else(|e| {
                // No randomness at all: fail loudly rather than seal with a fixed key.
                panic!("cannot create a key to seal secrets: {e}")
            });
        let recorder = Recorder::start(store.clone());
        let (controller, keys) = Controller::channel();
        // One provider (ring) for every TLS client of the process (DESIGN §11).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let events = crate::events::EventWriter::start(store.clone());
        let state = Arc::new(AppState {
            store,
            blobs,
            backend,
            recorder,
            queue: Queue::new(
                config.clock.unwrap_or_default(),
                crate::queue::Bounds {
                    per_namespace: config.max_queue_depth,
                    bytes_per_namespace: config.max_queued_bytes,
                    per_function: config.max_queued_per_function,
                },
                config.max_running,
            ),
            jobs: crate::jobs::Jobs::new(config.jobs_dir.clone()),
            disk: config
                .data_dir
                .as_ref()
                .map(|d| crate::disk::DiskGuard::new(d, config.min_free_disk)),
            tokens: crate::auth::Tokens::default(),
            namespaces: RwLock::new(std::collections::BTreeMap::new()),
            event_index: RwLock::new(Arc::new(crate::events::EventIndex::default())),
            cron_wake: Arc::new(tokio::sync::Notify::new()),
            broker_wake: Arc::new(tokio::sync::Notify::new()),
            // Server::start checked the key file already (an unreadable one fails there);
            // here a failure can only be the OS random source, for an in-memory key.
            secrets,
            config,
            http,
            tasks: std::sync::Mutex::new(Vec::new()),
            controller,
            routes: RwLock::new(Routes::default()),
            deployed: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            metrics: Default::default(),
            deliveries: Default::default(),
            events,
        });
        state.controller.spawn(state.clone(), keys);
        // Before the first list, so that nothing changed after it is missed (handled once
        // start-up is done).
        let (changes_tx, changes) = tokio::sync::mpsc::unbounded_channel();
        state.store.on_external_change(Box::new(move |c| {
            let _ = changes_tx.send(c);
        }));
        if let Err(e) = state.rebuild_routes().await {
            tracing::error!("failed to load endpoints: {}", e.message);
        }
        let store = state.store.clone();
        let all = tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            for kind in Kind::ALL {
                for o in store.list(None, kind)? {
                    keys.push(Key::of(&o));
                }
            }
            Ok::<_, StoreError>(keys)
        })
        .await;
        match all {
            Ok(Ok(keys)) => keys.into_iter().for_each(|k| state.enqueue(k)),
            Ok(Err(e)) => tracing::error!("failed to list stored resources: {e}"),
            Err(e) => tracing::error!("failed to list stored resources: {e}"),
        }
        if let Err(e) = state.load_namespaces().await {
            tracing::error!("failed to load namespaces: {}", e.message);
        }
        match state.db(|s| s.list_tokens()).await {
            Ok(all) => state.tokens.replace_all(all),
            Err(e) => tracing::error!("failed to load API tokens: {}", e.message),
        }
        crate::queue::recover(&state).await;
        crate::callbacks::resume(&state).await;
        crate::jobs::recover(&state).await;
        if let Err(e) = crate::events::rebuild(&state).await {
            tracing::error!("failed to load subscriptions: {}", e.message);
        }
        crate::events::recover(&state).await;
        let tasks = vec![
            tokio::spawn(external_changes(state.clone(), changes)),
            Queue::spawn(state.clone()),
            Queue::spawn_expiry(state.clone()),
            crate::retention::spawn(state.clone()),
            crate::events::spawn_cron(state.clone(), state.cron_wake.clone()),
            crate::brokers::spawn_supervisor(state.clone(), state.broker_wake.clone()),
            crate::deliveries::spawn(state.clone()),
        ];
        *state.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        state.ready.store(true, Ordering::Release);
        state
    }

    /// Namespaces from the store, plus any that stored resources use (data from before
    /// namespaces were rows).
    async fn load_namespaces(&self) -> Result<(), ApiError> {
        let now = self.queue.clock.now();
        let rows = self
            .db(move |s| {
                let mut used = std::collections::BTreeSet::new();
                for kind in Kind::ALL {
                    for o in s.list(None, kind)? {
                        used.insert(o.namespace().to_string());
                    }
                }
                for ns in used {
                    if ns != dispatch_core::DEFAULT_NAMESPACE {
                        s.put_namespace(&ns, now)?;
                    }
                }
                s.list_namespaces()
            })
            .await?;
        let mut map = self.namespaces.write().unwrap_or_else(|p| p.into_inner());
        map.insert(
            dispatch_core::DEFAULT_NAMESPACE.to_string(),
            NamespaceInfo::default(),
        );
        for r in rows {
            // `default` has a row only once it has settings: it has no creation time.
            let created = (r.name != dispatch_core::DEFAULT_NAMESPACE).then_some(r.created);
            map.insert(
                r.name,
                NamespaceInfo {
                    created,
                    run_history_budget: r.run_history_budget,
                },
            );
        }
        Ok(())
    }

    /// Every namespace, when it was created (`default`: never) and its own settings.
    pub fn namespaces(&self) -> Vec<(String, NamespaceInfo)> {
        let mut all: Vec<_> = self
            .namespaces
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !all
            .iter()
            .any(|(n, _)| n == dispatch_core::DEFAULT_NAMESPACE)
        {
            all.insert(
                0,
                (
                    dispatch_core::DEFAULT_NAMESPACE.to_string(),
                    NamespaceInfo::default(),
                ),
            );
        }
        all
    }

    /// One namespace's entry (404 unless it exists).
    pub fn namespace(&self, ns: &str) -> Result<NamespaceInfo, ApiError> {
        self.require_namespace(ns)?;
        Ok(self
            .namespaces
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ns)
            .cloned()
            .unwrap_or_default())
    }

    /// Sets (`None`: clears) a namespace's own run-history budget.
    pub async fn set_run_history_budget(
        &self,
        ns: &str,
        budget: Option<u64>,
    ) -> Result<NamespaceInfo, ApiError> {
        self.require_namespace(ns)?;
        let now = self.queue.clock.now();
        let n = ns.to_string();
        self.db(move |s| s.set_run_history_budget(&n, budget, now))
            .await?;
        let mut map = self.namespaces.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(ns.to_string()).or_default();
        entry.run_history_budget = budget;
        Ok(entry.clone())
    }

    /// 404 unless the namespace exists.
    pub fn require_namespace(&self, ns: &str) -> Result<(), ApiError> {
        let known = ns == dispatch_core::DEFAULT_NAMESPACE
            || self
                .namespaces
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(ns);
        if known {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "namespace {ns:?} not found: create it first (dispatch create namespace {ns})"
            )))
        }
    }

    /// `false` when it exists.
    pub async fn create_namespace(&self, name: &str) -> Result<bool, ApiError> {
        if name == dispatch_core::DEFAULT_NAMESPACE {
            return Ok(false);
        }
        let now = self.queue.clock.now();
        let n = name.to_string();
        let created = self.db(move |s| s.put_namespace(&n, now)).await?;
        if created {
            self.namespaces
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(
                    name.to_string(),
                    NamespaceInfo {
                        created: Some(now),
                        run_history_budget: None,
                    },
                );
        }
        Ok(created)
    }

    pub async fn delete_namespace(&self, name: &str) -> Result<(), ApiError> {
        let n = name.to_string();
        self.db(move |s| s.delete_namespace(&n)).await?;
        self.namespaces
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        Ok(())
    }

    pub fn event_index(&self) -> Arc<crate::events::EventIndex> {
        self.event_index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_event_index(&self, idx: crate::events::EventIndex) {
        *self.event_index.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(idx);
    }

    /// Creates an API token; returns the token (shown once) and its record.
    pub async fn create_token(
        &self,
        name: &str,
        role: dispatch_core::auth::Role,
        namespace: &str,
        expires: Option<Duration>,
    ) -> Result<(String, dispatch_core::auth::ApiToken), ApiError> {
        dispatch_core::names::validate_name("token", name)?;
        if namespace != dispatch_core::auth::ALL_NAMESPACES {
            dispatch_core::names::validate_name("namespace", namespace)?;
        }
        let secret = crate::auth::generate_token()?;
        let now = self.queue.clock.now();
        let record = dispatch_core::auth::ApiToken {
            name: name.to_string(),
            role,
            namespace: namespace.to_string(),
            hash: dispatch_core::auth::token_hash(&secret),
            created_at: now,
            expires_at: expires.and_then(|d| {
                now.checked_add(jiff::SignedDuration::try_from(d).ok()?)
                    .ok()
            }),
        };
        let r = record.clone();
        if !self.db(move |s| s.put_token(&r)).await? {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "AlreadyExists",
                format!("token {name:?} already exists: delete it first or pick another name"),
            ));
        }
        self.tokens.insert(record.clone());
        Ok((secret, record))
    }

    /// Runs a blocking store call on the blocking pool.
    pub async fn db<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(r) => r.map_err(ApiError::from),
            Err(e) => Err(ApiError::internal("running a store call", &e)),
        }
    }

    /// One stored resource (built-in base images included).
    pub async fn get(&self, ns: &str, kind: Kind, name: &str) -> Result<Option<Object>, ApiError> {
        if kind == Kind::BaseImage
            && let Some(b) = crate::api::builtin_base_image(ns, name)
        {
            return Ok(Some(b));
        }
        let (ns, name) = (ns.to_string(), name.to_string());
        self.db(move |s| s.get(&ns, kind, &name)).await
    }

    pub fn enqueue(&self, key: Key) {
        self.controller.enqueue(key);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The gateway's route table (held for a lookup or a check; never across an await).
    pub fn routes(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces (or with `None` removes) one endpoint's routes in the gateway's table.
    pub fn set_route(&self, namespace: &str, name: &str, endpoint: Option<&Object>) {
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .set_endpoint(namespace, name, endpoint);
    }

    /// Reloads the gateway's route table from the stored endpoints.
    pub async fn rebuild_routes(&self) -> Result<(), ApiError> {
        let endpoints = self.db(|s| s.list(None, Kind::Endpoint)).await?;
        let table = Routes::build(&endpoints);
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = table;
        Ok(())
    }

    pub fn deployed(&self, ns: &str, name: &str) -> Option<Arc<Deployed>> {
        self.deployed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(ns)?
            .get(name)
            .cloned()
    }

    /// Digests of every function build serving calls now.
    pub fn deployed_digests(&self) -> Vec<String> {
        self.deployed
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flat_map(|m| m.values().map(|d| d.digest.clone()))
            .collect()
    }

    pub fn set_deployed(&self, ns: &str, name: &str, d: Option<Deployed>) {
        let mut map = self.deployed.write().unwrap_or_else(|p| p.into_inner());
        match d {
            Some(d) => {
                map.entry(ns.to_string())
                    .or_default()
                    .insert(name.to_string(), Arc::new(d));
                drop(map);
                // Parked async runs of this function may start now.
                self.queue.wake();
            }
            None => {
                if let Some(m) = map.get_mut(ns) {
                    m.remove(name);
                }
            }
        }
    }

    /// Stops the controller, kills every worker and flushes run records.
    pub async fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.controller.stop();
        crate::jobs::stop_all(self);
        self.backend.shutdown().await;
        self.recorder.flush().await;
    }
}

/// Resources changed outside this server (the store's watch), one at a time, in order.
async fn external_changes(
    state: Arc<AppState>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<dispatch_store::Changed>,
) {
    while let Some(change) = changes.recv().await {
        let what = format!("{} {:?}", change.kind.human(), change.name);
        if let Err(e) = crate::api::resources::changed_elsewhere(&state, change).await {
            tracing::error!(
                "failed to take in a change to {what} made outside this server: {}",
                e.message
            );
        }
    }
}

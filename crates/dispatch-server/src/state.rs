//! What every handler shares: the store, the blob store, the backend, the controller's queue,
//! the gateway's route table, the run recorder, and what is deployed now.

use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dispatch_core::{Kind, Object};
use dispatch_runtime::Backend;
use dispatch_store::{BlobStore, RecordStore, ResourceStore, Store, StoreError};

use crate::controller::{Controller, Key};
use crate::queue::Queue;
use crate::recorder::Recorder;
use crate::routes::Routes;

pub use crate::state_error::{StateError, chain};

/// A function that serves calls now (the controller deployed it).
#[derive(Debug, Clone)]
pub struct Deployed {
    /// What the backend's deploy handed back: calls go straight to it.
    pub handle: dispatch_runtime::FunctionHandle,
    pub digest: String,
    /// The function's version this build is (`None` if it could not be recorded).
    pub version: Option<u32>,
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
    /// spec.idleTimeout: the longest silence between a stream's chunks.
    pub stream_idle: Option<Duration>,
    /// The function's counters in `/metrics` (its versions share them; set when deployed).
    pub metrics: Arc<crate::metrics::FunctionMetrics>,
}

/// Namespace → function → deployment. Nested so that lookups borrow `&str`.
type DeployedMap = HashMap<String, HashMap<String, Arc<Deployed>>>;

pub use crate::options::{DEFAULT_RUN_HISTORY_BUDGET, Options};

/// What the server keeps of a namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// `None` for `default`, which exists without being created.
    pub created: Option<jiff::Timestamp>,
    /// Its own budget for run records (bytes); `None`: `--run-history-budget`.
    pub run_history_budget: Option<u64>,
}

/// Where the server keeps what it keeps (dispatch-store's two seams).
#[derive(Clone)]
pub struct Stores {
    pub resources: Arc<dyn ResourceStore>,
    pub records: Arc<dyn RecordStore>,
    /// Sync calls' run records (a file of their own, so that durable writes never
    /// share a write-ahead log with them); the same as `records` when one store holds both.
    pub history: Arc<dyn RecordStore>,
}

impl Stores {
    /// One store for everything (tests, benchmarks: an in-memory SQLite).
    pub fn single<S: Store>(store: Arc<S>) -> Stores {
        Stores {
            resources: store.clone(),
            records: store.clone(),
            history: store,
        }
    }

    /// The stores that hold run records: `records`, then `history` when it is another one.
    pub fn run_stores(&self) -> Vec<Arc<dyn RecordStore>> {
        let mut all = vec![self.records.clone()];
        if !self.history_is_records() {
            all.push(self.history.clone());
        }
        all
    }

    fn history_is_records(&self) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(&self.records), Arc::as_ptr(&self.history))
    }
}

pub struct AppState {
    pub stores: Stores,
    pub blobs: BlobStore,
    pub backend: Arc<dyn Backend>,
    pub recorder: Recorder,
    pub queue: Queue,
    pub jobs: crate::jobs::Jobs,
    pub tokens: crate::tokens::Tokens,
    pub secrets: crate::secrets::SecretBox,
    event_index: RwLock<Arc<crate::events::EventIndex>>,
    /// Held by an index rebuild from its read of the store to its swap, so that a rebuild
    /// that read earlier never replaces the index of one that read later.
    pub(crate) event_index_rebuild: tokio::sync::Mutex<()>,
    /// Wakes the cron scheduler (drivers changed).
    pub cron_wake: Arc<tokio::sync::Notify>,
    /// Wakes the broker driver supervisor (drivers changed).
    pub broker_wake: Arc<tokio::sync::Notify>,
    /// Namespace → when it was created and its own settings; `default` is always there.
    namespaces: RwLock<std::collections::BTreeMap<String, NamespaceInfo>>,
    pub config: Options,
    /// Outgoing HTTP (callbacks).
    pub http: reqwest::Client,
    /// The span exporter, when `--otlp-endpoint` is set (started with the server).
    pub otlp: std::sync::OnceLock<Arc<crate::otlp::Exporter>>,
    /// The gateway's listening address (set when it binds): the console's endpoint links.
    pub gateway_addr: std::sync::OnceLock<std::net::SocketAddr>,
    pub(crate) tasks: parking_lot::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub(crate) controller: Controller,
    /// Swapped whole on every endpoint change; readers clone the `Arc` (no lock across await).
    routes: RwLock<Routes>,
    deployed: RwLock<DeployedMap>,
    pub(crate) ready: AtomicBool,
    /// Cold starts and finished calls (`GET /metrics`).
    pub metrics: crate::metrics::Metrics,
    /// The data dir's free space (none without a data dir).
    pub disk: Option<crate::disk::DiskGuard>,
    /// Event deliveries waiting for room in their function's queue.
    pub deliveries: crate::deliveries::Deliveries,
    /// Stores accepted events (group commit).
    pub events: crate::events::EventWriter,
    /// This server among the servers sharing its store (`crate::replicas`).
    pub replica: crate::replicas::Replica,
    /// Functions stored at start whose first reconcile has not ended yet: the server is not
    /// ready (`/readyz`) until it has tried to deploy them all, so that a load balancer does
    /// not send calls to a server that would answer "being deployed" (a rolling restart).
    pub(crate) warming: parking_lot::Mutex<std::collections::HashSet<(String, String)>>,
    /// Aliases and the versions deployed beside their functions' current builds (issue 23).
    pub(crate) versions: crate::versions::Versions,
    /// Open WebSocket connections (by namespace) and their counters.
    pub websockets: crate::websocket::WebSockets,
    /// Live log lines of the runs running here, for their followers.
    pub live_logs: Arc<crate::live::LiveLogs>,
}

impl AppState {
    /// Ok unless writing `incoming` bytes would take the data dir's disk below its reserve
    /// (then a 507 naming `what`); the store's own free pages count when the disk is short.
    pub async fn disk_admits(&self, what: &str, incoming: u64) -> Result<(), StateError> {
        let Some(d) = &self.disk else {
            return Ok(());
        };
        if d.fits(incoming, || 0).is_ok() {
            return Ok(());
        }
        let reusable = self
            .with_run_stores(|all| Ok(all.iter().map(|s| s.reclaim()).sum()))
            .await
            .unwrap_or(0);
        d.fits(incoming, || reusable)
            .map_err(|short| d.refuse(what, short).into())
    }

    /// Builds the state and starts its writers (recorder, event writer); the controller's
    /// queue comes back for `builder::launch`, which wires the rest.
    pub(crate) fn new(
        stores: Stores,
        blobs: BlobStore,
        backend: Arc<dyn Backend>,
        config: Options,
    ) -> (Arc<Self>, tokio::sync::mpsc::UnboundedReceiver<Key>) {
        let secrets = crate::secrets::SecretBox::load_or_create(config.secret_key_file.as_deref())
            .or_else(|e| {
                tracing::error!("{e}: secrets use a key in memory until this is fixed");
                crate::secrets::SecretBox::load_or_create(None)
            })
            .unwrap_or_else(|e| {
                // No randomness at all: fail loudly rather than seal with a fixed key.
                panic!("cannot create a key to seal secrets: {e}")
            });
        let recorder = Recorder::start(stores.records.clone(), stores.history.clone());
        let (controller, keys) = Controller::channel();
        // One provider (ring) for every TLS client of the process (DESIGN §11).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        let events = crate::events::EventWriter::start(stores.records.clone());
        let state = Arc::new(AppState {
            stores,
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
            tokens: crate::tokens::Tokens::default(),
            versions: Default::default(),
            websockets: Default::default(),
            live_logs: Default::default(),
            namespaces: RwLock::new(std::collections::BTreeMap::new()),
            event_index: RwLock::new(Arc::new(crate::events::EventIndex::default())),
            event_index_rebuild: tokio::sync::Mutex::new(()),
            cron_wake: Arc::new(tokio::sync::Notify::new()),
            broker_wake: Arc::new(tokio::sync::Notify::new()),
            // Server::start checked the key file already (an unreadable one fails there);
            // here a failure can only be the OS random source, for an in-memory key.
            secrets,
            config,
            http,
            otlp: std::sync::OnceLock::new(),
            gateway_addr: std::sync::OnceLock::new(),
            tasks: parking_lot::Mutex::new(Vec::new()),
            controller,
            routes: RwLock::new(Routes::default()),
            deployed: RwLock::new(HashMap::new()),
            ready: AtomicBool::new(false),
            metrics: Default::default(),
            deliveries: Default::default(),
            events,
            replica: Default::default(),
            warming: Default::default(),
        });
        (state, keys)
    }

    /// Namespaces from the store, plus any that stored resources use (data from before
    /// namespaces were rows).
    pub(crate) async fn load_namespaces(&self) -> Result<(), StateError> {
        let now = self.queue.clock.now();
        let rows = self
            .res(move |s| {
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
        self.take_namespaces(rows, None);
        Ok(())
    }

    /// Namespaces as the store has them now, replacing this server's copy (another server
    /// that shares the store created, changed or deleted one).
    pub(crate) async fn reload_namespaces(&self) -> Result<(), StateError> {
        // One this server creates while the rows are read is not in them: it stays.
        let reading = self.queue.clock.now() - jiff::SignedDuration::from_secs(5);
        let rows = self.res(|s| s.list_namespaces()).await?;
        self.take_namespaces(rows, Some(reading));
        Ok(())
    }

    /// Puts the store's namespace rows in the copy; with `replace_before`, namespaces not in
    /// them that were created before that time go.
    fn take_namespaces(
        &self,
        rows: Vec<dispatch_store::NamespaceRecord>,
        replace_before: Option<jiff::Timestamp>,
    ) {
        let mut map = self.namespaces.write();
        if let Some(before) = replace_before {
            map.retain(|name, info| {
                rows.iter().any(|r| r.name == *name) || info.created.is_some_and(|c| c >= before)
            });
        }
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
    }

    /// Every namespace, when it was created (`default`: never) and its own settings.
    pub fn namespaces(&self) -> Vec<(String, NamespaceInfo)> {
        let mut all: Vec<_> = self
            .namespaces
            .read()
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
    pub fn namespace(&self, ns: &str) -> Result<NamespaceInfo, StateError> {
        self.require_namespace(ns)?;
        Ok(self.namespaces.read().get(ns).cloned().unwrap_or_default())
    }

    /// Sets (`None`: clears) a namespace's own run-history budget.
    pub async fn set_run_history_budget(
        &self,
        ns: &str,
        budget: Option<u64>,
    ) -> Result<NamespaceInfo, StateError> {
        self.require_namespace(ns)?;
        let now = self.queue.clock.now();
        let n = ns.to_string();
        self.res(move |s| s.set_run_history_budget(&n, budget, now))
            .await?;
        let mut map = self.namespaces.write();
        let entry = map.entry(ns.to_string()).or_default();
        entry.run_history_budget = budget;
        Ok(entry.clone())
    }

    /// 404 unless the namespace exists.
    pub fn require_namespace(&self, ns: &str) -> Result<(), StateError> {
        let known =
            ns == dispatch_core::DEFAULT_NAMESPACE || self.namespaces.read().contains_key(ns);
        if known {
            Ok(())
        } else {
            Err(StateError::NamespaceNotFound(ns.to_string()))
        }
    }

    /// `false` when it exists.
    pub async fn create_namespace(&self, name: &str) -> Result<bool, StateError> {
        if name == dispatch_core::DEFAULT_NAMESPACE {
            return Ok(false);
        }
        let now = self.queue.clock.now();
        let n = name.to_string();
        let created = self.res(move |s| s.put_namespace(&n, now)).await?;
        if created {
            self.namespaces.write().insert(
                name.to_string(),
                NamespaceInfo {
                    created: Some(now),
                    run_history_budget: None,
                },
            );
        }
        Ok(created)
    }

    pub async fn delete_namespace(&self, name: &str) -> Result<(), StateError> {
        // Records first: a failure leaves the namespace there to delete again.
        let n = name.to_string();
        self.each_run_store(move |s| s.delete_records_of(&n))
            .await?;
        let n = name.to_string();
        self.res(move |s| s.delete_namespace(&n)).await?;
        self.namespaces.write().remove(name);
        Ok(())
    }

    pub fn event_index(&self) -> Arc<crate::events::EventIndex> {
        self.event_index.read().clone()
    }

    pub fn set_event_index(&self, idx: crate::events::EventIndex) {
        *self.event_index.write() = Arc::new(idx);
    }

    /// Creates an API token; returns the token (shown once) and its record.
    pub async fn create_token(
        &self,
        name: &str,
        role: dispatch_core::auth::Role,
        namespace: &str,
        expires: Option<Duration>,
    ) -> Result<(String, dispatch_core::auth::ApiToken), StateError> {
        dispatch_core::names::validate_name("token", name)?;
        if namespace != dispatch_core::auth::ALL_NAMESPACES {
            dispatch_core::names::validate_name("namespace", namespace)?;
        }
        let secret = crate::tokens::generate_token()
            .map_err(|e| StateError::internal("drawing a token's randomness", e))?;
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
            return Err(StateError::TokenExists(name.to_string()));
        }
        self.tokens.insert(record.clone());
        Ok((secret, record))
    }

    /// Runs a blocking call of the record store on the blocking pool.
    pub async fn db<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn RecordStore) -> Result<T, StoreError> + Send + 'static,
    {
        blocking(self.stores.records.clone(), f).await
    }

    /// Runs a blocking call of the resource store on the blocking pool.
    pub async fn res<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn ResourceStore) -> Result<T, StoreError> + Send + 'static,
    {
        blocking(self.stores.resources.clone(), f).await
    }

    /// Runs a blocking call on every store that holds run records (see
    /// [`Stores::run_stores`]), one after the other; the answers in that order.
    pub async fn each_run_store<T, F>(&self, f: F) -> Result<Vec<T>, StateError>
    where
        T: Send + 'static,
        F: Fn(&dyn RecordStore) -> Result<T, StoreError> + Send + Sync + 'static,
    {
        self.with_run_stores(move |all| all.iter().map(|s| f(s.as_ref())).collect())
            .await
    }

    /// Runs a blocking call that is given every store holding run records, in order.
    pub async fn with_run_stores<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&[Arc<dyn RecordStore>]) -> Result<T, StoreError> + Send + 'static,
    {
        blocking(Arc::new(self.stores.run_stores()), move |all| {
            f(all.as_slice())
        })
        .await
    }

    /// The first answer of `f` that is something, asking the run stores in order (the
    /// later ones are not asked once one answers).
    pub async fn first_in_run_stores<T, F>(&self, f: F) -> Result<Option<T>, StateError>
    where
        T: Send + 'static,
        F: Fn(&dyn RecordStore) -> Result<Option<T>, StoreError> + Send + Sync + 'static,
    {
        self.with_run_stores(move |all| {
            for s in all {
                if let Some(found) = f(s.as_ref())? {
                    return Ok(Some(found));
                }
            }
            Ok(None)
        })
        .await
    }

    /// One stored resource (built-in base images included).
    pub async fn get(
        &self,
        ns: &str,
        kind: Kind,
        name: &str,
    ) -> Result<Option<Object>, StateError> {
        if kind == Kind::BaseImage
            && let Some(b) = crate::builtins::builtin_base_image(ns, name)
        {
            return Ok(Some(b));
        }
        let (ns, name) = (ns.to_string(), name.to_string());
        self.res(move |s| s.get(&ns, kind, &name)).await
    }

    pub fn enqueue(&self, key: Key) {
        self.controller.enqueue(key);
    }

    /// Started, every function stored at start tried once, and not stopping.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.warming.lock().is_empty()
    }

    /// The gateway's route table (held for a lookup or a check; never across an await).
    pub fn routes(&self) -> parking_lot::RwLockReadGuard<'_, Routes> {
        self.routes.read()
    }

    /// Replaces (or with `None` removes) one endpoint's routes in the gateway's table.
    pub fn set_route(&self, namespace: &str, name: &str, endpoint: Option<&Object>) {
        self.routes.write().set_endpoint(namespace, name, endpoint);
    }

    /// Reloads the gateway's route table from the stored endpoints.
    pub async fn rebuild_routes(&self) -> Result<(), StateError> {
        let endpoints = self.res(|s| s.list(None, Kind::Endpoint)).await?;
        let table = Routes::build(&endpoints);
        *self.routes.write() = table;
        Ok(())
    }

    pub fn deployed(&self, ns: &str, name: &str) -> Option<Arc<Deployed>> {
        self.deployed.read().get(ns)?.get(name).cloned()
    }

    /// The names deployed in a namespace (functions, and versions beside them: `hello@3`).
    pub fn deployed_names(&self, ns: &str) -> Vec<String> {
        self.deployed
            .read()
            .get(ns)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Digests of every function build serving calls now.
    pub fn deployed_digests(&self) -> Vec<String> {
        self.deployed
            .read()
            .values()
            .flat_map(|m| m.values().map(|d| d.digest.clone()))
            .collect()
    }

    pub fn set_deployed(&self, ns: &str, name: &str, d: Option<Deployed>) {
        // `hello@3` is a version of hello: it counts as hello.
        let function = name.split_once('@').map_or(name, |(f, _)| f);
        let d = d.map(|mut d| {
            d.metrics = self.metrics.function(ns, function);
            d
        });
        if d.is_none() && function == name {
            self.metrics.forget_function(ns, name);
        }
        let mut map = self.deployed.write();
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
    /// A source archive: from the blob folder, else from the store when servers share it
    /// (uploaded to another one; kept in the folder from then on). `None`: stored nowhere.
    pub async fn blob(&self, digest: &str) -> Result<Option<Vec<u8>>, StateError> {
        let blobs = self.blobs.clone();
        let store = self.stores.records.clone();
        let digest = digest.to_string();
        blocking(store, move |s| {
            if blobs.exists(&digest) {
                return blobs.read(&digest).map(Some);
            }
            let Some(data) = s.get_blob(&digest)? else {
                return Ok(None);
            };
            // Kept only if its bytes are what the digest says.
            if blobs.put(&data)? != digest {
                return Err(StoreError::CorruptBlob { digest });
            }
            Ok(Some(data))
        })
        .await
    }

    pub async fn stop(&self) {
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.controller.stop();
        crate::jobs::stop_all(self);
        self.backend.shutdown().await;
        self.recorder.flush().await;
        crate::replicas::leave(self).await;
    }
}

/// Runs `f` on `store` on the blocking pool.
async fn blocking<S, T, F>(store: Arc<S>, f: F) -> Result<T, StateError>
where
    S: ?Sized + Send + Sync + 'static,
    T: Send + 'static,
    F: FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
        Ok(r) => r.map_err(StateError::from),
        Err(e) => Err(StateError::internal("running a store call", e)),
    }
}
